//! Where the evaluation commands get their backbone from: the flags they share and the loading.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::model::{ARCHITECTURES, Network, ResNetConfig, VitConfig};
use crate::model::pretrained;

/// Backbone flags shared by extract, knn, linear, attention and video-seg.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct BackboneArgs {
    /// Weights to evaluate: a `dino train` checkpoint, a `dino export` file, or official DINO
    /// weights (.pth: backbone-only or a full training checkpoint).
    #[arg(long, visible_alias = "weights", alias = "checkpoint")]
    pub pretrained_weights: Option<PathBuf>,
    /// Which network of a training checkpoint: teacher or student.
    #[arg(long, default_value = "teacher")]
    pub checkpoint_key: String,
    /// Use a randomly initialised --arch network (a baseline).
    #[arg(long, default_value_t = false)]
    pub random_init: bool,
    /// vit_micro, vit_mini, vit_tiny, vit_small, vit_base, resnet50 or resnet_micro: the model of
    /// --random_init (default vit_small); with ViT weights, fixes the head count (otherwise
    /// width / 64); checked against the weights.
    #[arg(long)]
    pub arch: Option<String>,
    /// Patch size of --random_init.
    #[arg(long, default_value_t = 16)]
    pub patch_size: usize,
}

/// A backbone, a ViT's shape and, for trained weights, the crop size it was trained at.
pub struct Backbone {
    pub network: Network,
    pub vit_config: Option<VitConfig>,
    pub trained_size: Option<usize>,
}

impl BackboneArgs {
    /// What makes these flags' backbone this backbone, for feature caches: the flags and the
    /// weights file's size and modification time.
    pub fn fingerprint(&self) -> String {
        let file = self.pretrained_weights.as_ref().and_then(|p| std::fs::metadata(p).ok()).map(|m| (m.len(), m.modified().ok()));
        format!("{self:?} {file:?}")
    }

    /// True when weights or --random_init name a backbone.
    pub fn given(&self) -> bool {
        self.pretrained_weights.is_some() || self.random_init
    }

    /// Builds the backbone the flags name; an error when they name none or two.
    pub fn load(&self, device: &Device) -> Result<Backbone> {
        if !["teacher", "student"].contains(&self.checkpoint_key.as_str()) {
            bail!("--checkpoint_key must be teacher or student, not '{}'", self.checkpoint_key);
        }
        match (&self.pretrained_weights, self.random_init) {
            (Some(_), true) => bail!("give either --pretrained_weights or --random_init, not both"),
            (Some(path), false) => {
                let p = pretrained::load(path, &self.checkpoint_key, self.arch.as_deref(), device)?;
                Ok(Backbone { network: p.network, vit_config: p.vit_config, trained_size: p.trained_size })
            }
            (None, true) => {
                let arch = self.arch.as_deref().unwrap_or("vit_small");
                let mut rng = StdRng::seed_from_u64(0);
                if let Some(cfg) = ResNetConfig::from_arch(arch) {
                    return Ok(Backbone { network: Network::ResNet(cfg.init(&mut rng, device)), vit_config: None, trained_size: None });
                }
                let cfg = VitConfig::from_arch(arch, self.patch_size)
                    .with_context(|| format!("--arch: unknown architecture '{arch}' ({ARCHITECTURES})"))?;
                if self.patch_size == 0 {
                    bail!("--patch_size must be positive");
                }
                Ok(Backbone { network: Network::Vit(cfg.init(&mut rng, device)), vit_config: Some(cfg), trained_size: None })
            }
            (None, false) => bail!("no backbone: give --pretrained_weights FILE (or --random_init)"),
        }
    }
}
