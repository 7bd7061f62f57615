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
use crate::model::Network;
use crate::weights::{export, metadata, write_safetensors};

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
    match (&loaded.network, loaded.vit_config) {
        (Network::Vit(vit), Some(mut config)) => {
            config.img_size = loaded.trained_size.unwrap_or(config.img_size);
            config.drop_path_rate = 0.0;
            let tensors = export(vit);
            let count = tensors.len();
            let meta = HashMap::from([(metadata::VIT_CONFIG.to_string(), serde_json::to_string(&config)?)]);
            write_safetensors(&args.output, tensors, meta)?;
            eprintln!(
                "{count} tensors (ViT width {}, depth {}, patch {}, trained at {} px) -> {}",
                config.embed_dim,
                config.depth,
                config.patch_size,
                config.img_size,
                args.output.display()
            );
        }
        (Network::ResNet(resnet), _) => {
            let tensors = resnet.state_dict();
            let count = tensors.len();
            let meta = loaded.trained_size.map(|size| (metadata::TRAINED_SIZE.to_string(), size.to_string()));
            write_safetensors(&args.output, tensors, meta.into_iter().collect())?;
            eprintln!("{count} tensors (ResNet, stages {:?}, {}-d output) -> {}", resnet.stage_depths(), resnet.out_dim(), args.output.display());
        }
        (Network::Vit(_), None) => unreachable!("a loaded ViT has its shape"),
    }
    Ok(())
}
