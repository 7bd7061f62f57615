//! `dino knn`: weighted k-NN accuracy of frozen features on a labelled train/test pair: features
//! computed here (a checkpoint's backbone, a randomly initialised ViT, or raw pixels) or read
//! from two `dino extract` output directories.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use super::backbone::BackboneArgs;
use super::eval_args::{DeviceArgs, LabelledPairArgs, Pooling, PrecisionArgs, ReferencePlumbing, TransformArgs};
use crate::eval::features::{FeatureKind, extract};
use crate::eval::knn::{LabelledFeatures, knn_accuracy};
use crate::weights::npy;

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct KnnArgs {
    #[command(flatten)]
    pub data: LabelledPairArgs,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub reference: ReferencePlumbing,
    /// Use the raw centre-crop pixels as features (baseline).
    #[arg(long, default_value_t = false)]
    pub pixels: bool,
    /// Read training features from a `dino extract` directory (features.npy, labels.npy)
    /// instead of computing them; needs --test_features too.
    #[arg(long, requires = "test_features")]
    pub train_features: Option<PathBuf>,
    /// Read test features from a `dino extract` directory.
    #[arg(long, requires = "train_features")]
    pub test_features: Option<PathBuf>,
    #[command(flatten)]
    pub transform: TransformArgs,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// What follows the cls token in each feature: nothing (cls, the reference's k-NN), the
    /// mean patch token (mean), or the GeM of the patch tokens (gem).
    #[arg(long, value_enum, default_value = "cls")]
    pub pooling: Pooling,
    /// Numbers of neighbours to report.
    #[arg(long, num_args = 1.., default_values_t = [10, 20, 100, 200])]
    pub nb_knn: Vec<usize>,
    /// Temperature of the exp(similarity / T) vote weights.
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f64,
    /// Use only N train / test images, drawn per class in proportion (seeded; 0: all).
    #[arg(long, default_value_t = 0)]
    pub subset_train: usize,
    #[arg(long, default_value_t = 0)]
    pub subset_test: usize,
}

pub fn run(args: KnnArgs) -> Result<()> {
    args.reference.note();
    let device = args.device.open()?;
    let sources = [args.backbone.given(), args.pixels, args.train_features.is_some()].iter().filter(|&&b| b).count();
    if sources != 1 {
        bail!("give exactly one feature source: --pretrained_weights, --random_init, --pixels or --train_features/--test_features");
    }
    if args.nb_knn.contains(&0) {
        bail!("--nb_knn values must be positive");
    }
    let started = std::time::Instant::now();
    let (mut train_features, mut test_features) = match (&args.train_features, &args.test_features) {
        (Some(train), Some(test)) => (read_extracted(train, "--train_features")?, read_extracted(test, "--test_features")?),
        _ => {
            let (train, test) = args.data.open((args.subset_train, args.subset_test))?;
            let backbone = if args.pixels { None } else { Some(args.backbone.load(&device)?) };
            let transform = args.transform.transform(backbone.as_ref().and_then(|b| b.trained_size))?;
            let network = backbone.as_ref().map(|b| args.precision.prepare(&b.network)).transpose()?;
            let kind = match &network {
                Some(n) => n.kind(args.pooling.layout(1, false)),
                None => FeatureKind::Pixels,
            };
            let batch = args.transform.batch_size;
            let train_features = extract(kind, &train, transform, batch, &device)?.into_labelled(&train)?;
            (train_features, extract(kind, &test, transform, batch, &device)?.into_labelled(&test)?)
        }
    };
    eprintln!(
        "features: {} train, {} test, dim {} ({:.1}s)",
        train_features.len(),
        test_features.len(),
        train_features.dim,
        started.elapsed().as_secs_f64()
    );
    if train_features.is_empty() || test_features.is_empty() {
        bail!("no readable labelled images to evaluate");
    }
    if train_features.dim != test_features.dim {
        bail!("train features are {}-d but test features {}-d", train_features.dim, test_features.dim);
    }
    train_features.l2_normalize();
    test_features.l2_normalize();
    for r in knn_accuracy(&train_features, &test_features, &args.nb_knn, args.temperature, &device) {
        println!("{}-NN classifier result: Top1: {:.2}, Top5: {:.2}", r.k, r.top1, r.top5);
    }
    Ok(())
}

/// Features and labels from a `dino extract` output directory.
fn read_extracted(dir: &Path, flag: &str) -> Result<LabelledFeatures> {
    let features = npy::read(&dir.join("features.npy"))?;
    let labels_path = dir.join("labels.npy");
    if !labels_path.exists() {
        bail!("{flag} {}: no labels.npy (the images were unlabelled)", dir.display());
    }
    let labels = npy::read(&labels_path)?;
    let [n, dim] = features.shape[..] else {
        bail!("{flag} {}: features.npy has shape {:?}, expected [N, D]", dir.display(), features.shape);
    };
    if labels.shape != [n] {
        bail!("{flag} {}: labels.npy has shape {:?} for {n} features", dir.display(), labels.shape);
    }
    if labels.values.iter().any(|&l| l < 0.0 || l.fract() != 0.0) {
        bail!("{flag} {}: labels.npy holds values that are not class indices", dir.display());
    }
    Ok(LabelledFeatures {
        dim,
        values: features.values.iter().map(|&v| v as f32).collect(),
        labels: labels.values.iter().map(|&l| l as usize).collect(),
    })
}
