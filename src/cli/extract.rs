//! `dino extract`: frozen features of a dataset written as NumPy files, for use outside dino or
//! by `dino knn --train_features/--test_features`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::backbone::BackboneArgs;
use super::eval_args::{DeviceArgs, Pooling, PrecisionArgs, TransformArgs, check_last_blocks, open_dataset};
use crate::data::dataset::IdxSplit;
use crate::eval::features::extract;
use crate::weights::npy;

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct ExtractArgs {
    /// Images: a folder tree (class subfolders give labels; flat = unlabelled) or an IDX directory.
    #[arg(long)]
    pub data: PathBuf,
    /// For an IDX directory: train (its train-* files) or test (its t10k-* files).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Where features.npy, labels.npy (when labelled) and files.txt are written.
    #[arg(long)]
    pub output_dir: PathBuf,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub transform: TransformArgs,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Concatenate the cls tokens of the last n blocks.
    #[arg(long, default_value_t = 1)]
    pub n_last_blocks: usize,
    /// Also append the mean patch token of the last block.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, value_parser = crate::cli::bool_value)]
    pub avgpool_patchtokens: bool,
    /// Use only N images, drawn per class in proportion (seeded; 0: all).
    #[arg(long, default_value_t = 0)]
    pub subset: usize,
    /// What follows the cls token(s): nothing (cls), the mean patch token (mean, as
    /// --avgpool_patchtokens), or the GeM (p = 4) of the patch tokens (gem: copy detection's
    /// features).
    #[arg(long, value_enum, default_value = "cls")]
    pub pooling: Pooling,
}

/// Parses --split.
pub fn idx_split(split: &str) -> Result<IdxSplit> {
    match split {
        "train" => Ok(IdxSplit::Train),
        "test" => Ok(IdxSplit::Test),
        other => bail!("--split must be train or test, not '{other}'"),
    }
}

pub fn run(args: ExtractArgs) -> Result<()> {
    let device = args.device.open()?;
    let dataset = open_dataset(&args.data, idx_split(&args.split)?, args.subset, "--data", false)?;
    let backbone = args.backbone.load(&device)?;
    check_last_blocks(&backbone.network, args.n_last_blocks)?;
    let transform = args.transform.transform(backbone.trained_size)?;
    let layout = args.pooling.layout(args.n_last_blocks, args.avgpool_patchtokens);
    let network = args.precision.prepare(&backbone.network)?;
    let started = std::time::Instant::now();
    let features = extract(network.kind(layout), &dataset, transform, args.transform.batch_size, &device)?;
    if features.indices.is_empty() {
        bail!("--data {}: no readable images", args.data.display());
    }
    std::fs::create_dir_all(&args.output_dir).with_context(|| format!("--output_dir {}: cannot create", args.output_dir.display()))?;
    let n = features.indices.len();
    npy::write_f32(&args.output_dir.join("features.npy"), &features.values, &[n, features.dim])?;
    if features.labels.iter().all(Option::is_some) {
        let labels: Vec<i64> = features.labels.iter().map(|l| l.unwrap() as i64).collect();
        npy::write_i64(&args.output_dir.join("labels.npy"), &labels)?;
    }
    let list = args.output_dir.join("files.txt");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&list).with_context(|| format!("{}: cannot write", list.display()))?);
    for &i in &features.indices {
        writeln!(out, "{}", dataset.describe(i))?;
    }
    out.flush()?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{n} features of dim {} in {secs:.1}s ({:.1} img/s) -> {}",
        features.dim,
        n as f64 / secs,
        args.output_dir.display()
    );
    Ok(())
}
