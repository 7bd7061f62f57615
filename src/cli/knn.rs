//! `dino knn`: weighted k-NN accuracy of frozen features (a checkpoint's backbone, a randomly
//! initialised ViT, or raw pixels) on a labelled train/test pair.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::data::dataset::{Dataset, IdxSplit};
use crate::eval::features::{EvalTransform, FeatureKind, REFERENCE_CROP, extract};
use crate::eval::knn::knn_accuracy;
use crate::model::VitConfig;
use crate::train::checkpoint::load_backbone;

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct KnnArgs {
    /// Labelled training images (a class-folder tree, or an IDX directory: its train-* files).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub train_data: PathBuf,
    /// Labelled test images (a class-folder tree, or an IDX directory: its t10k-* files).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub test_data: PathBuf,
    /// A `dino train` checkpoint; without it the features come from --random_init or --pixels.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Which network of the checkpoint: teacher or student.
    #[arg(long, default_value = "teacher")]
    pub checkpoint_key: String,
    /// Use the raw centre-crop pixels as features (baseline).
    #[arg(long, default_value_t = false)]
    pub pixels: bool,
    /// Use a randomly initialised --arch/--patch_size ViT (baseline).
    #[arg(long, default_value_t = false)]
    pub random_init: bool,
    #[arg(long, default_value = "vit_tiny")]
    pub arch: String,
    #[arg(long, default_value_t = 4)]
    pub patch_size: usize,
    /// Side of the evaluation crop (default: the checkpoint's global crop size, else 28).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Fraction of the shorter side kept by the centre crop (the reference: 224/256 = 0.875;
    /// 1 keeps whole images, better for small centred images such as Fashion-MNIST).
    #[arg(long, default_value_t = REFERENCE_CROP)]
    pub center_crop: f64,
    /// Numbers of neighbours to report.
    #[arg(long, num_args = 1.., default_values_t = [10, 20, 100, 200])]
    pub nb_knn: Vec<usize>,
    /// Temperature of the exp(similarity / T) vote weights.
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Use only the first N train / test images (0: all).
    #[arg(long, default_value_t = 0)]
    pub subset_train: usize,
    #[arg(long, default_value_t = 0)]
    pub subset_test: usize,
}

pub fn run(args: KnnArgs) -> Result<()> {
    let device = Device::flex();
    let sources = [args.checkpoint.is_some(), args.pixels, args.random_init].iter().filter(|&&b| b).count();
    if sources != 1 {
        bail!("give exactly one of --checkpoint, --pixels, --random_init");
    }
    if !["teacher", "student"].contains(&args.checkpoint_key.as_str()) {
        bail!("--checkpoint_key must be teacher or student, not '{}'", args.checkpoint_key);
    }
    let open = |path: &PathBuf, split, subset: usize, flag: &str| -> Result<Dataset> {
        let mut d = Dataset::open(path, split).with_context(|| format!("{flag} {}", path.display()))?;
        if subset > 0 {
            d.truncate(subset);
        }
        if d.num_classes().is_none() {
            bail!("{flag} {}: no labels (k-NN needs class subfolders or IDX labels)", path.display());
        }
        Ok(d)
    };
    let train = open(&args.train_data, IdxSplit::Train, args.subset_train, "--train_data")?;
    let test = open(&args.test_data, IdxSplit::Test, args.subset_test, "--test_data")?;

    let (vit, trained_size) = if let Some(path) = &args.checkpoint {
        let (vit, config) = load_backbone(path, &args.checkpoint_key, &device)?;
        (Some(vit), Some(config.global_crop_size))
    } else if args.random_init {
        let cfg = VitConfig::from_arch(&args.arch, args.patch_size)
            .with_context(|| format!("--arch: unknown architecture '{}'", args.arch))?;
        (Some(cfg.init(&mut StdRng::seed_from_u64(0), &device)), None)
    } else {
        (None, None)
    };
    if !(args.center_crop > 0.0 && args.center_crop <= 1.0) {
        bail!("--center_crop must be in (0, 1], got {}", args.center_crop);
    }
    let transform = EvalTransform { size: args.image_size.or(trained_size).unwrap_or(28), crop: args.center_crop };
    let kind = match &vit {
        Some(v) => FeatureKind::Cls(v),
        None => FeatureKind::Pixels,
    };
    let started = std::time::Instant::now();
    let mut train_features = extract(kind, &train, transform, args.batch_size, &device)?;
    let mut test_features = extract(kind, &test, transform, args.batch_size, &device)?;
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
    train_features.l2_normalize();
    test_features.l2_normalize();
    for r in knn_accuracy(&train_features, &test_features, &args.nb_knn, args.temperature, &device) {
        println!("{}-NN classifier result: Top1: {:.2}, Top5: {:.2}", r.k, r.top1, r.top5);
    }
    Ok(())
}
