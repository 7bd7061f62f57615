//! `dino copy-detection`: the flags of copy detection on Copydays (`eval/copy_detection.rs`
//! holds the algorithm); named as the reference's `eval_copy_detection.py`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::backbone::BackboneArgs;
use super::eval_args::{DeviceArgs, PrecisionArgs, ReferencePlumbing};
use crate::eval::copy_detection::{self, LAYOUT, Setup};
use crate::eval::features::FeatureCache;

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct CopyDetectionArgs {
    /// Copydays: DATA_PATH/original (the database), and the query blocks strong,
    /// jpegqual/{3..75} and crops/{10..80} that are present.
    #[arg(long)]
    pub data_path: PathBuf,
    /// Images added to the database as distractors (the reference: 10k YFCC100M images).
    #[arg(long)]
    pub distractors_path: Option<PathBuf>,
    /// Images to learn the PCA whitening on (the reference: 20k YFCC100M images).
    #[arg(long)]
    pub whitening_path: Option<PathBuf>,
    /// Where the whitening learnt on --whitening_path is written; without --whitening_path,
    /// a whitening written so before, to apply.
    #[arg(long)]
    pub whitening_file: Option<PathBuf>,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub reference: ReferencePlumbing,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Side of the square every image is resized to.
    #[arg(long, default_value_t = 320)]
    pub imsize: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size_per_gpu: usize,
    /// Keep the features here (`dino extract`'s format, a folder per image set) and reuse them
    /// on the next run with the same images and settings.
    #[arg(long)]
    pub features_cache: Option<PathBuf>,
}

pub fn run(args: CopyDetectionArgs) -> Result<()> {
    args.reference.note();
    let device = args.device.open()?;
    let backbone = args.backbone.load(&device)?;
    if backbone.network.vit("copy detection").is_err() {
        bail!("--pretrained_weights: copy detection pools a ViT's patch tokens; this is a ResNet");
    }
    let network = args.precision.prepare(&backbone.network)?;
    let setup = Setup {
        data_path: args.data_path,
        distractors: args.distractors_path,
        whitening_images: args.whitening_path,
        whitening_file: args.whitening_file,
        imsize: args.imsize,
        batch: args.batch_size_per_gpu,
    };
    let settings = format!("{} {:?} imsize {} copy detection", args.backbone.fingerprint(), network.precision(), args.imsize);
    let cache = args.features_cache.as_deref().map(|dir| FeatureCache { dir, settings });
    for (block, map) in copy_detection::evaluate(network.kind(LAYOUT), &setup, cache.as_ref(), &device)? {
        println!("eval on {block} mAP={:.3}", map);
    }
    Ok(())
}
