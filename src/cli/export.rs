//! `dino export`: a backbone from any weights file (our checkpoints, official .pth files) as a
//! safetensors state dict under the official key names and PyTorch layouts, which the reference
//! ViT loads with `model.load_state_dict(safetensors.torch.load_file(path))`; dino reads it
//! back with --pretrained_weights.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::tensor::Device;
use clap::Args;

use super::backbone::BackboneArgs;
use crate::pretrained::EXPORT_METADATA;
use crate::weights::{export, write_safetensors};

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct ExportArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// The safetensors file to write.
    #[arg(long)]
    pub output: PathBuf,
}

pub fn run(args: ExportArgs) -> Result<()> {
    if args.backbone.random_init {
        bail!("--random_init: export takes trained weights (--pretrained_weights FILE)");
    }
    let loaded = args.backbone.load(&Device::flex())?;
    let mut config = loaded.config.clone();
    config.img_size = loaded.trained_size.unwrap_or(config.img_size);
    config.drop_path_rate = 0.0;
    let tensors = export(&loaded.vit);
    let count = tensors.len();
    let metadata = HashMap::from([(EXPORT_METADATA.to_string(), serde_json::to_string(&config)?)]);
    write_safetensors(&args.output, tensors, metadata)?;
    eprintln!(
        "{count} tensors (ViT width {}, depth {}, patch {}, trained at {} px) -> {}",
        config.embed_dim,
        config.depth,
        config.patch_size,
        config.img_size,
        args.output.display()
    );
    Ok(())
}
