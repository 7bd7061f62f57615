//! Backbones from any weights file a user brings: our training checkpoints, our `dino export`
//! safetensors, plain safetensors state dicts under the official names, and the official
//! PyTorch `.pth` releases (ViT backbone-only files, full training checkpoints, ResNet-50). The
//! architecture is read from the tensors: for a ViT, width and depth from the keys, patch size
//! from the patch projection, training resolution from the position embedding, and heads from
//! the width (every DINO ViT uses 64-dim heads) unless --arch names them; for a ResNet, the
//! stages and widths from its convolutions.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::{Network, ResNet, ResNetConfig, VisionTransformer, VitConfig};
use crate::weights::pth::PthFile;
use crate::weights::{self, HostTensor, metadata};

/// A loaded backbone, a ViT's shape, and the crop size it was trained at when known.
pub struct Pretrained {
    pub network: Network,
    pub vit_config: Option<VitConfig>,
    pub trained_size: Option<usize>,
}

/// A ViT backbone, its shape and training crop size (an error for other networks).
pub fn load_vit(path: &Path, key: &str, arch: Option<&str>, device: &Device) -> Result<(VisionTransformer, VitConfig, usize)> {
    let p = load(path, key, arch, device)?;
    match (p.network, p.vit_config) {
        (Network::Vit(vit), Some(config)) => Ok((vit, config, p.trained_size.unwrap_or(crate::model::FALLBACK_IMAGE_SIZE))),
        _ => bail!("{}: a ViT is needed here; these weights are a ResNet", path.display()),
    }
}

/// Loads the backbone stored in `path`. `key` picks teacher or student in training
/// checkpoints; `arch` (vit_tiny, vit_small, ...) fixes a ViT's head count and is checked
/// against the tensors.
pub fn load(path: &Path, key: &str, arch: Option<&str>, device: &Device) -> Result<Pretrained> {
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let n = f.read(&mut magic).with_context(|| format!("{}: cannot read", path.display()))?;
        if n < 4 {
            bail!("{}: not a weights file (too short)", path.display());
        }
    }
    let backbone = if &magic == b"PK\x03\x04" { Backbone { tensors: pth_backbone(path, key)?, shape: None, trained_size: None } } else { safetensors_backbone(path, key)? };
    let in_file = |e: anyhow::Error| e.context(path.display().to_string());
    let shape = match backbone.shape {
        Some(shape) => shape,
        None if ResNet::recognises(&backbone.tensors) => {
            if arch.is_some_and(|a| ResNetConfig::from_arch(a).is_none()) {
                bail!("{}: --arch {} but the weights are a ResNet", path.display(), arch.unwrap_or_default());
            }
            let resnet = ResNet::from_state_dict(&backbone.tensors, device).map_err(in_file)?;
            return Ok(Pretrained { network: Network::ResNet(resnet), vit_config: None, trained_size: backbone.trained_size });
        }
        None => Shape::Vit(VitConfig::from_state_dict(&backbone.tensors, arch).map_err(in_file)?),
    };
    let mut rng = StdRng::seed_from_u64(0);
    Ok(match shape {
        Shape::Vit(config) => {
            let vit = weights::import(config.init(&mut rng, device), &backbone.tensors, "").map_err(|e| in_file(e.into()))?;
            Pretrained { network: Network::Vit(vit), trained_size: Some(backbone.trained_size.unwrap_or(config.img_size)), vit_config: Some(config) }
        }
        Shape::ResNet(config) => {
            let resnet = weights::import(config.init(&mut rng, device), &backbone.tensors, "").map_err(|e| in_file(e.into()))?;
            Pretrained { network: Network::ResNet(resnet), vit_config: None, trained_size: backbone.trained_size }
        }
    })
}

/// A backbone's shape as a file of ours records it.
enum Shape {
    Vit(VitConfig),
    ResNet(ResNetConfig),
}

/// A backbone's tensors (for a ViT or a torchvision-layout ResNet, under the official names;
/// for a ResNet of our checkpoints, under our module's), and what the file says of its shape.
struct Backbone {
    tensors: HashMap<String, HostTensor>,
    shape: Option<Shape>,
    trained_size: Option<usize>,
}

/// The backbone of a safetensors file: the `key` network of one of our training checkpoints,
/// or the whole file (`dino export`, or any state dict under the official names).
fn safetensors_backbone(path: &Path, key: &str) -> Result<Backbone> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if safetensors::SafeTensors::read_metadata(&bytes).is_err() {
        bail!("{}: neither a PyTorch .pth nor a safetensors file", path.display());
    }
    let (tensors, meta) = weights::read_safetensors(&bytes, path)?;
    let record = |name: &str| -> Result<Option<serde_json::Value>> {
        meta.get(name).map(|s| serde_json::from_str(s)).transpose().with_context(|| format!("{}: bad {name} metadata", path.display()))
    };
    let bad = |name: &str| format!("{}: bad {name} metadata", path.display());
    let mut shape = match (record(metadata::VIT_CONFIG)?, record(metadata::RESNET_CONFIG)?) {
        (Some(vit), _) => Some(Shape::Vit(serde_json::from_value(vit).with_context(|| bad(metadata::VIT_CONFIG))?)),
        (None, Some(resnet)) => Some(Shape::ResNet(serde_json::from_value(resnet).with_context(|| bad(metadata::RESNET_CONFIG))?)),
        (None, None) => None,
    };
    let mut trained_size: Option<usize> = record(metadata::TRAINED_SIZE)?.and_then(|v| v.as_u64()).map(|v| v as usize);
    let format_1 = record(metadata::TRAIN_RECORD_FORMAT_1)?;
    if !meta.contains_key(metadata::TRAIN_RECORD) && format_1.is_none() {
        return Ok(Backbone { tensors: strip_prefixes(tensors), shape, trained_size });
    }
    if let Some(settings) = format_1.as_ref().map(|r| &r["config"]) {
        // Format 1 named the backbone only in the run's settings.
        let setting = |name: &str| settings.get(name).with_context(|| format!("{}: the checkpoint's settings lack '{name}'", path.display()));
        let number = |name: &str| setting(name)?.as_u64().map(|v| v as usize).with_context(|| bad(metadata::TRAIN_RECORD_FORMAT_1));
        let arch = setting("arch")?.as_str().with_context(|| bad(metadata::TRAIN_RECORD_FORMAT_1))?;
        let size = number("global_crop_size")?;
        trained_size = Some(size);
        shape = match (VitConfig::from_arch(arch, number("patch_size")?), ResNetConfig::from_arch(arch)) {
            (Some(vit), _) => Some(Shape::Vit(VitConfig { img_size: size, ..vit })),
            (None, Some(resnet)) => Some(Shape::ResNet(resnet)),
            (None, None) => bail!("{}: the checkpoint's settings name an unknown architecture '{arch}'", path.display()),
        };
    }
    if key != "teacher" && key != "student" {
        bail!("--checkpoint_key {key}: a training checkpoint holds 'teacher' and 'student'");
    }
    let prefix = format!("{key}.backbone.");
    let tensors = tensors.into_iter().filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v))).collect();
    Ok(Backbone { tensors, shape, trained_size })
}

/// The backbone tensors of a .pth file: a backbone state dict, or the `key` network of a
/// training checkpoint (its 'module.' and 'backbone.' prefixes removed, head keys dropped).
fn pth_backbone(path: &Path, key: &str) -> Result<HashMap<String, HostTensor>> {
    let file = PthFile::open(path)?;
    let root = &file.root;
    let state = match root.get(key) {
        Some(v) => v,
        None if root.get("teacher").is_some() || root.get("student").is_some() => {
            bail!("{}: no '{key}' entry (it has: {})", path.display(), root.keys().join(", "))
        }
        None => root.get("state_dict").or(root.get("model")).unwrap_or(root),
    };
    let tensors = file.state_dict(state).with_context(|| format!("{}", path.display()))?;
    if tensors.is_empty() {
        bail!("{}: no tensors in the state dict", path.display());
    }
    Ok(strip_prefixes(tensors))
}

/// Removes the DistributedDataParallel 'module.' prefix and the 'backbone.' prefix of the
/// multi-crop wrapper; keys of the DINO head are dropped.
fn strip_prefixes(tensors: HashMap<String, HostTensor>) -> HashMap<String, HostTensor> {
    tensors
        .into_iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix("module.").unwrap_or(&k);
            if k.starts_with("head.") {
                return None;
            }
            Some((k.strip_prefix("backbone.").unwrap_or(k).to_string(), v))
        })
        .collect()
}
