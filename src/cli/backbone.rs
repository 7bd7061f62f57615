//! Where the evaluation commands get their backbone from: the flags they share and the loading.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::model::{VisionTransformer, VitConfig};
use crate::train::checkpoint::load_backbone;

/// Backbone flags shared by extract, knn, linear, attention and video-seg.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct BackboneArgs {
    /// Weights to evaluate: a `dino train` checkpoint.
    #[arg(long, alias = "checkpoint")]
    pub pretrained_weights: Option<PathBuf>,
    /// Which network of a training checkpoint: teacher or student.
    #[arg(long, default_value = "teacher")]
    pub checkpoint_key: String,
    /// Use a randomly initialised --arch/--patch_size ViT (a baseline).
    #[arg(long, default_value_t = false)]
    pub random_init: bool,
    /// Architecture of --random_init: vit_micro, vit_tiny, vit_small or vit_base.
    #[arg(long, default_value = "vit_small")]
    pub arch: String,
    /// Patch size of --random_init.
    #[arg(long, default_value_t = 16)]
    pub patch_size: usize,
}

/// A backbone and, when it came from training, the global crop size it was trained at.
pub struct Backbone {
    pub vit: VisionTransformer,
    pub trained_size: Option<usize>,
}

impl BackboneArgs {
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
                let (vit, config) = load_backbone(path, &self.checkpoint_key, device)?;
                Ok(Backbone { vit, trained_size: Some(config.global_crop_size) })
            }
            (None, true) => {
                let cfg = VitConfig::from_arch(&self.arch, self.patch_size).with_context(|| {
                    format!("--arch: unknown architecture '{}' (vit_micro, vit_tiny, vit_small, vit_base)", self.arch)
                })?;
                if self.patch_size == 0 {
                    bail!("--patch_size must be positive");
                }
                Ok(Backbone { vit: cfg.init(&mut StdRng::seed_from_u64(0), device), trained_size: None })
            }
            (None, false) => bail!("no backbone: give --pretrained_weights FILE (or --random_init)"),
        }
    }
}
