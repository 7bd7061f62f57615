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

use crate::model::{Network, ResNet, ResNetConfig, VisionTransformer, VitConfig};
use crate::pth::PthFile;
use crate::train::checkpoint;
use crate::weights::{self, HostTensor};

/// safetensors metadata key under which `dino export` records the backbone's shape.
pub const EXPORT_METADATA: &str = "dino_vit";

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
    let (tensors, known) = if &magic == b"PK\x03\x04" {
        (pth_backbone(path, key)?, None)
    } else {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|_| anyhow::anyhow!("{}: neither a PyTorch .pth nor a safetensors file", path.display()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.contains_key("dino") {
            let (network, config) = checkpoint::load_backbone(path, key, device)?;
            return Ok(Pretrained { network, vit_config: config.vit(), trained_size: Some(config.global_crop_size) });
        }
        let known: Option<VitConfig> = meta.get(EXPORT_METADATA).map(|s| serde_json::from_str(s)).transpose().with_context(|| format!("{}: bad {EXPORT_METADATA} metadata", path.display()))?;
        (strip_prefixes(checkpoint::read_tensors(&bytes, path)?), known)
    };
    if known.is_none() && ResNet::recognises(&tensors) {
        if arch.is_some_and(|a| ResNetConfig::from_arch(a).is_none()) {
            bail!("{}: --arch {} but the weights are a ResNet", path.display(), arch.unwrap_or_default());
        }
        let resnet = ResNet::from_state_dict(&tensors, device).with_context(|| format!("{}", path.display()))?;
        return Ok(Pretrained { network: Network::ResNet(resnet), vit_config: None, trained_size: None });
    }
    let config = match known {
        Some(c) => c,
        None => infer_config(&tensors, arch).with_context(|| format!("{}", path.display()))?,
    };
    let vit = config.init(&mut StdRng::seed_from_u64(0), device);
    let vit = weights::import(vit, &tensors, "").with_context(|| format!("{}", path.display()))?;
    Ok(Pretrained { network: Network::Vit(vit), trained_size: Some(config.img_size), vit_config: Some(config) })
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

/// The ViT shape the tensors describe.
pub fn infer_config(tensors: &HashMap<String, HostTensor>, arch: Option<&str>) -> Result<VitConfig> {
    let shape = |k: &str| tensors.get(k).map(|t| t.shape.as_slice());
    let Some(&[1, 1, dim]) = shape("cls_token") else {
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        let some: Vec<&str> = keys.iter().take(4).map(|k| k.as_str()).collect();
        bail!("not a ViT backbone: no 'cls_token' of shape [1, 1, D] (keys start: {})", some.join(", "));
    };
    let Some(&[d, 3, p, p2]) = shape("patch_embed.proj.weight") else {
        bail!("key 'patch_embed.proj.weight': missing or not [D, 3, p, p]");
    };
    if d != dim || p != p2 {
        bail!("key 'patch_embed.proj.weight': shape [{d}, 3, {p}, {p2}] does not fit cls_token width {dim}");
    }
    let Some(&[1, tokens, _]) = shape("pos_embed") else { bail!("key 'pos_embed': missing or not [1, N, D]") };
    let side = ((tokens - 1) as f64).sqrt().round() as usize;
    if side * side != tokens - 1 {
        bail!("key 'pos_embed': {} patch positions do not form a square grid", tokens - 1);
    }
    let depth = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("blocks.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    if depth == 0 {
        bail!("no 'blocks.N.*' keys: not a ViT backbone");
    }
    let Some(&[hidden, _]) = shape("blocks.0.mlp.fc1.weight") else { bail!("key 'blocks.0.mlp.fc1.weight': missing or not 2-D") };
    if hidden % dim != 0 {
        bail!("key 'blocks.0.mlp.fc1.weight': hidden width {hidden} is not a multiple of {dim}");
    }
    let num_heads = match arch {
        Some(a) => {
            let reference = VitConfig::from_arch(a, p).with_context(|| format!("--arch: unknown architecture '{a}'"))?;
            if reference.embed_dim != dim {
                bail!("--arch {a} has width {}, but the weights have width {dim}", reference.embed_dim);
            }
            reference.num_heads
        }
        None if dim % 64 == 0 => dim / 64,
        None => bail!("cannot tell the number of heads of a {dim}-wide ViT; name the architecture with --arch"),
    };
    Ok(VitConfig { img_size: side * p, patch_size: p, embed_dim: dim, depth, num_heads, mlp_ratio: hidden / dim, drop_path_rate: 0.0 })
}
