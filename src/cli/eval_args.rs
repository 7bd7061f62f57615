//! Flags shared by the commands that turn images into features.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::data::dataset::{Dataset, IdxSplit, SUBSET_SEED};
use crate::device::DeviceKind;
use crate::engine::PrecisionChoice;
use crate::eval::features::{EvalTransform, FeatureLayout, FeatureNetwork, Precision, REFERENCE_CROP};
use crate::model::{FALLBACK_IMAGE_SIZE, Network};

/// How evaluation images are prepared.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct TransformArgs {
    /// Side of the evaluation crop (default: the checkpoint's global crop size, else 224).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Fraction of the shorter side kept by the centre crop (the reference: 224/256 = 0.875;
    /// 1 keeps whole images, better for small centred images such as Fashion-MNIST).
    #[arg(long, default_value_t = REFERENCE_CROP)]
    pub center_crop: f64,
    /// Images per forward pass (also --batch_size_per_gpu, the reference's name).
    #[arg(long, alias = "batch_size_per_gpu", default_value_t = 256)]
    pub batch_size: usize,
}

/// Flags of the reference's evaluation scripts that are plumbing there (its launcher, CUDA,
/// loader workers), accepted so that its command lines run as pasted, and hidden from --help:
/// the launcher's mean nothing here, image decoding uses every core, and --device says where
/// the backbone runs (`--use_cuda true` says so on stderr).
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct ReferencePlumbing {
    #[arg(long, hide = true)]
    pub dist_url: Option<String>,
    #[arg(long, hide = true)]
    pub local_rank: Option<usize>,
    #[arg(long, hide = true)]
    pub num_workers: Option<usize>,
    #[arg(long, hide = true, action = clap::ArgAction::Set, value_parser = crate::cli::bool_value)]
    pub use_cuda: Option<bool>,
}

impl ReferencePlumbing {
    /// Says on stderr what a pasted flag does not do here.
    pub fn note(&self) {
        if self.use_cuda == Some(true) {
            eprintln!("note: --use_cuda is ignored: the backbone runs where --device says (cpu unless given)");
        }
    }
}

/// The labelled train/test pair of knn and linear: two paths, or one directory holding both
/// (the reference's `train/` and `val/`, or an IDX directory's train-* and t10k-* files).
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct LabelledPairArgs {
    /// Labelled training images (a class-folder tree, or an IDX directory: its train-* files);
    /// required unless --data_path.
    #[arg(long)]
    pub train_data: Option<PathBuf>,
    /// Labelled test images (a class-folder tree, or an IDX directory: its t10k-* files);
    /// required unless --data_path.
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// Both at once: DATA_PATH/train and DATA_PATH/val (the reference's layout), or an IDX
    /// directory (its train-* and t10k-* files).
    #[arg(long, conflicts_with_all = ["train_data", "test_data"])]
    pub data_path: Option<PathBuf>,
}

impl LabelledPairArgs {
    /// The train and test datasets (`subsets`: images kept of each, 0 for all).
    pub fn open(&self, subsets: (usize, usize)) -> Result<(Dataset, Dataset)> {
        let open = |path: &Path, split, subset, flag: &str| open_dataset(path, split, subset, flag, true);
        match (&self.data_path, &self.train_data, &self.test_data) {
            (Some(root), ..) if root.join("train").is_dir() => Ok((
                open(&root.join("train"), IdxSplit::Train, subsets.0, "--data_path (its train/)")?,
                open(&root.join("val"), IdxSplit::Test, subsets.1, "--data_path (its val/)")?,
            )),
            (Some(root), ..) if Dataset::holds_idx(root, IdxSplit::Train) && Dataset::holds_idx(root, IdxSplit::Test) => {
                Ok((open(root, IdxSplit::Train, subsets.0, "--data_path")?, open(root, IdxSplit::Test, subsets.1, "--data_path")?))
            }
            (Some(root), ..) => bail!("--data_path {}: holds neither train/ and val/ folders nor IDX train-* and t10k-* files", root.display()),
            (None, Some(train), Some(test)) => Ok((open(train, IdxSplit::Train, subsets.0, "--train_data")?, open(test, IdxSplit::Test, subsets.1, "--test_data")?)),
            (None, ..) => bail!("--train_data and --test_data are required unless --data_path names one directory for both"),
        }
    }
}

impl TransformArgs {
    /// The transform; `trained_size` is the checkpoint's global crop size when known.
    pub fn transform(&self, trained_size: Option<usize>) -> Result<EvalTransform> {
        eval_transform(self.image_size.or(trained_size).unwrap_or(FALLBACK_IMAGE_SIZE), self.center_crop)
    }
}

/// The evaluation transform, with --image_size and --center_crop checked.
pub fn eval_transform(size: usize, center_crop: f64) -> Result<EvalTransform> {
    if !(center_crop > 0.0 && center_crop <= 1.0) {
        bail!("--center_crop must be in (0, 1], got {center_crop}");
    }
    if size == 0 {
        bail!("--image_size must be positive");
    }
    Ok(EvalTransform { size, crop: center_crop })
}

/// Where the backbone runs.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct DeviceArgs {
    /// Device of the backbone's forward passes: cpu, or cuda / vulkan in a binary built for
    /// them (README, GPUs); features come back to the host, results equal the CPU's within
    /// float tolerance.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
}

impl DeviceArgs {
    /// The burn device; an error in one line when this binary lacks its backend.
    pub fn open(&self) -> Result<burn::tensor::Device> {
        self.device.open(None)
    }
}

/// How the backbone computes features.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct PrecisionArgs {
    /// Arithmetic of the backbone's forward pass: f32 (the reference's numbers), bf16 (ViT
    /// matrix products with bf16 inputs: on CPUs with AMX or AVX512-BF16 — Intel Xeon Sapphire
    /// Rapids or Cooper Lake, AMD Zen 4 and newer — and on CUDA GPUs; features within about
    /// 1e-2 of f32, same k-NN accuracy; see BENCHMARKS.md), or auto (bf16 where the device
    /// multiplies bf16 in hardware, f32 elsewhere).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionChoice,
}

impl PrecisionArgs {
    /// The network prepared for this precision; an error in one line where the device cannot
    /// run it.
    pub fn prepare<'a>(&self, network: &'a Network) -> Result<FeatureNetwork<'a>> {
        let precision = match network {
            Network::Vit(vit) => self.precision.resolve(Some(vit.head_width()), &vit.cls_token.val().device()),
            // A ResNet computes at f32; FeatureNetwork::new refuses bf16 asked of one.
            Network::ResNet(_) if self.precision == PrecisionChoice::Bf16 => Precision::Bf16,
            Network::ResNet(_) => Precision::F32,
        };
        FeatureNetwork::new(network, precision)
    }
}

/// Checks --n_last_blocks against a ViT's depth (a ResNet has a single output).
pub fn check_last_blocks(network: &Network, n_last_blocks: usize) -> Result<()> {
    if let Network::Vit(vit) = network
        && (n_last_blocks == 0 || n_last_blocks > vit.blocks.len())
    {
        bail!("--n_last_blocks must be between 1 and the depth {}, got {n_last_blocks}", vit.blocks.len());
    }
    Ok(())
}

/// Opens a dataset for a flag, keeping a stratified subset of `subset` images (0: all); `labelled` demands
/// labels.
pub fn open_dataset(path: &Path, split: IdxSplit, subset: usize, flag: &str, labelled: bool) -> Result<Dataset> {
    let mut d = Dataset::open(path, split).with_context(|| format!("{flag} {}", path.display()))?;
    d.keep_subset(subset, SUBSET_SEED);
    if labelled && d.num_classes().is_none() {
        bail!("{flag} {}: no labels (class subfolders or IDX label files are needed)", path.display());
    }
    Ok(d)
}

/// Pooling of the last block's patch tokens appended to the cls token(s) of a feature.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Pooling {
    /// Nothing: the cls token(s) alone (the reference's k-NN).
    Cls,
    /// The mean patch token (as --avgpool_patchtokens).
    Mean,
    /// The GeM (p = 4) of the patch tokens (copy detection's features).
    Gem,
}

impl Pooling {
    /// The feature of the cls tokens of the last `n_last_blocks` blocks, this pooling, and the
    /// mean patch token too when `avgpool_patchtokens`.
    pub fn layout(self, n_last_blocks: usize, avgpool_patchtokens: bool) -> FeatureLayout {
        FeatureLayout {
            n_last_blocks,
            avgpool_patchtokens: avgpool_patchtokens || self == Pooling::Mean,
            gem_patchtokens: (self == Pooling::Gem).then_some(crate::eval::copy_detection::GEM_EXPONENT),
        }
    }
}
