//! `dino linear`'s flags: the reference's linear evaluation (`eval::linear`) on the cls tokens
//! of the last n blocks (optionally with the mean patch token), the probe written to
//! linear.safetensors and each evaluation to log.txt.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::backbone::BackboneArgs;
use super::eval_args::{DeviceArgs, LabelledPairArgs, PrecisionArgs, ReferencePlumbing, check_last_blocks, eval_transform};
use crate::eval::features::{FeatureLayout, REFERENCE_CROP, feature_dim};
use crate::eval::linear::{ProbeSettings, train_probe};
use crate::model::FALLBACK_IMAGE_SIZE;
use crate::weights::{HostTensor, write_safetensors};

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct LinearArgs {
    #[command(flatten)]
    pub data: LabelledPairArgs,
    /// Where linear.safetensors and log.txt are written.
    #[arg(long, default_value = "linear")]
    pub output_dir: PathBuf,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub reference: ReferencePlumbing,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Concatenate the cls tokens of the last n blocks (reference: 4 for ViT-S, 1 for ViT-B;
    /// a ResNet always gives its pooled output).
    #[arg(long, default_value_t = 4)]
    pub n_last_blocks: usize,
    /// Also use the mean patch token of the last block (reference: ViT-B).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, value_parser = crate::cli::bool_value)]
    pub avgpool_patchtokens: bool,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Learning rate at batch 256; scaled linearly with --batch_size_per_gpu.
    #[arg(long, default_value_t = 0.001)]
    pub lr: f64,
    #[arg(long, default_value_t = 128)]
    pub batch_size_per_gpu: usize,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Train on random-resized-crop + flip views, recomputing features each epoch (the
    /// reference); false: centre-crop features computed once, much faster.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_parser = crate::cli::bool_value)]
    pub augment: bool,
    /// Side of the network input (default: the checkpoint's global crop size, else 224).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Centre-crop fraction of the test transform.
    #[arg(long, default_value_t = REFERENCE_CROP)]
    pub center_crop: f64,
    /// Evaluate every N epochs (and after the last).
    #[arg(long, default_value_t = 1)]
    pub val_freq: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use only N train / test images, drawn per class in proportion (seeded; 0: all).
    #[arg(long, default_value_t = 0)]
    pub subset_train: usize,
    #[arg(long, default_value_t = 0)]
    pub subset_test: usize,
}

pub fn run(args: LinearArgs) -> Result<()> {
    args.reference.note();
    let settings = ProbeSettings {
        epochs: args.epochs,
        lr: args.lr,
        batch_size: args.batch_size_per_gpu,
        momentum: args.momentum,
        augment: args.augment,
        val_freq: args.val_freq,
        seed: args.seed,
    };
    settings.validate()?;
    let device = args.device.open()?;
    let (train, test) = args.data.open((args.subset_train, args.subset_test))?;
    let backbone = args.backbone.load(&device)?;
    check_last_blocks(&backbone.network, args.n_last_blocks)?;
    let transform = eval_transform(args.image_size.or(backbone.trained_size).unwrap_or(FALLBACK_IMAGE_SIZE), args.center_crop)?;
    let layout = FeatureLayout { n_last_blocks: args.n_last_blocks, avgpool_patchtokens: args.avgpool_patchtokens, gem_patchtokens: None };
    let network = args.precision.prepare(&backbone.network)?;
    let classes = train.num_classes().unwrap_or(0).max(test.num_classes().unwrap_or(0));

    std::fs::create_dir_all(&args.output_dir).with_context(|| format!("--output_dir {}: cannot create", args.output_dir.display()))?;
    let log_path = args.output_dir.join("log.txt");
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("{}: cannot write", log_path.display()))?;
    let dim = feature_dim(&backbone.network, layout);
    let result = train_probe(network.kind(layout), dim, classes, &train, &test, transform, settings, &mut log, &device)?;

    let tensors = vec![("linear.weight".to_string(), HostTensor::from_tensor(result.probe.weight)), ("linear.bias".to_string(), HostTensor::from_tensor(result.probe.bias))];
    let meta = serde_json::json!({ "n_last_blocks": args.n_last_blocks, "avgpool_patchtokens": args.avgpool_patchtokens, "image_size": transform.size, "classes": classes });
    write_safetensors(&args.output_dir.join("linear.safetensors"), tensors, HashMap::from([("dino_linear".to_string(), meta.to_string())]))?;
    println!("Linear probe: Top1: {:.2}, Top5: {:.2} (best top-1 over evaluations: {:.2})", result.top1, result.top5, result.best_top1);
    Ok(())
}
