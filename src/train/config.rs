//! Every setting of `dino train`, with its default, in one place. The doc comments are the
//! `--help` text. Values resolve as: defaults < `--preset` < `--config` file < command line.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use serde::{Deserialize, Serialize};

use super::optim::OptimizerKind;
use crate::device::DeviceKind;
use crate::engine::PrecisionChoice;
use crate::data::augment::MultiCropConfig;
use super::loss::{CENTER_MOMENTUM, STUDENT_TEMP};
use crate::model::{ARCHITECTURES, DinoHeadConfig, Network, ResNetConfig, VitConfig, head};

/// The reference's backbone, patch, prototypes and crop size (main_dino.py), which `dino
/// model-info` shares.
pub const ARCH: &str = "vit_small";
pub const PATCH_SIZE: usize = 16;
pub const OUT_DIM: usize = 65536;
pub const GLOBAL_CROP_SIZE: usize = 224;

/// The online k-NN of `--knn_every`: neighbours and vote temperature (the reference's k-NN
/// evaluation), images per feature batch.
pub const ONLINE_KNN_K: usize = 20;
pub const ONLINE_KNN_TEMPERATURE: f64 = 0.07;
pub const ONLINE_KNN_BATCH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The reference's ImageNet settings (224/96-px crops).
    Imagenet,
    /// Small images such as Fashion-MNIST: 28/12-px crops, ViT-Tiny/4, 6 local crops,
    /// out_dim 4096, batch 128.
    Small,
    /// Small images in minutes on a CPU, with --max_minutes (the quickstart's recipe, chosen
    /// by 5-minute runs on Fashion-MNIST; BENCHMARKS.md): 28/14-px crops, ViT-Micro/7,
    /// global crops of 90-100% of the image (k-NN sees whole images: 0.25, 0.4, 0.7, 0.9 and
    /// 1.0 scored 78.6, 80.8, 81.1, 81.8, 81.3 at 10000 steps of ViT-Mini), 2 local crops,
    /// head 512/128 to 1024 prototypes without a fixed last-layer norm, no drop path,
    /// batch 32, lr 0.002, teacher momentum 0.97.
    Quick,
    /// Small images in about an hour on a CPU (chosen by 25-minute runs on Fashion-MNIST,
    /// BENCHMARKS.md): the quick recipe with ViT-Mini/7 (128 wide, 4 blocks), which sees half
    /// the images of ViT-Micro in a budget and still learns better features from them, at
    /// twice the learning rate (0.004: ahead by 1.0-1.3 points at equal steps on two seeds
    /// and by 0.4 over a Sapphire Rapids hour), and local crops of 20-50% of the image
    /// instead of 5-40% (ahead by 0.9 and 3.0 points at 10000 steps on two seeds).
    Hour,
}

impl Preset {
    /// The settings a preset changes, as (flag, value).
    fn values(self) -> Vec<(&'static str, serde_json::Value)> {
        use serde_json::json;
        match self {
            Preset::Imagenet => vec![],
            Preset::Small => vec![
                ("arch", json!("vit_tiny")),
                ("patch_size", json!(4)),
                ("global_crop_size", json!(28)),
                ("local_crop_size", json!(12)),
                ("local_crops_number", json!(6)),
                ("out_dim", json!(4096)),
                ("batch_size_per_gpu", json!(128)),
            ],
            Preset::Quick => Self::quick_recipe("vit_micro", 0.002),
            Preset::Hour => {
                let mut values = Self::quick_recipe("vit_mini", 0.004);
                values.push(("local_crops_scale", json!([0.2, 0.5])));
                values
            }
        }
    }

    /// The quick recipe's settings with the backbone `arch` and learning rate `lr`.
    fn quick_recipe(arch: &'static str, lr: f64) -> Vec<(&'static str, serde_json::Value)> {
        use serde_json::json;
        vec![
            ("arch", json!(arch)),
            ("patch_size", json!(7)),
            ("global_crop_size", json!(28)),
            ("local_crop_size", json!(14)),
            ("global_crops_scale", json!([0.9, 1.0])),
            ("local_crops_number", json!(2)),
            ("out_dim", json!(1024)),
            ("head_hidden_dim", json!(512)),
            ("head_bottleneck_dim", json!(128)),
            ("norm_last_layer", json!(false)),
            ("drop_path_rate", json!(0.0)),
            ("batch_size_per_gpu", json!(32)),
            ("lr", json!(lr)),
            ("momentum_teacher", json!(0.97)),
        ]
    }
}

/// The reference's ResNet recipe, applied under the config file and flags when --arch is a
/// ResNet: SGD at lr 0.03, fixed weight decay 1e-4, global crops 0.14-1, local 0.05-0.14.
fn resnet_recipe() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        ("optimizer", json!("sgd")),
        ("lr", json!(0.03)),
        ("weight_decay", json!(1e-4)),
        ("weight_decay_end", json!(1e-4)),
        ("global_crops_scale", json!([0.14, 1.0])),
        ("local_crops_scale", json!([0.05, 0.14])),
    ]
}

/// `dino train` settings. Flag names follow the reference's main_dino.py.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case")]
pub struct TrainConfig {
    /// Training images (required, on the command line or in --config): a folder (ImageFolder
    /// layout or flat) or a directory of IDX files (also --data_path, the reference's name).
    #[arg(long, alias = "data_path")]
    pub data: Option<PathBuf>,
    /// Use only N images of --data, drawn per class in proportion with --seed (0: all).
    #[arg(long, default_value_t = 0)]
    pub subset: usize,
    /// Where checkpoints, logs, the plot and the resolved config go.
    #[arg(long, default_value = "runs/dino")]
    pub output_dir: PathBuf,
    /// A JSON or TOML file of settings (keys are the flag names); flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Settings bundle applied under the config file and flags.
    #[arg(long, value_enum, default_value = "imagenet")]
    pub preset: Preset,

    /// Start the student and teacher backbones from these weights (any file --pretrained_weights
    /// of the evaluation commands takes: official .pth, `dino export`, a training checkpoint's
    /// teacher); the head starts fresh. Ignored when resuming.
    #[arg(long)]
    pub pretrained_weights: Option<PathBuf>,
    /// Backbone: vit_tiny, vit_small, vit_base (or vit_micro, a 4-block test size), resnet50
    /// (or resnet_micro, a test size). A ResNet brings the reference's ResNet recipe (SGD,
    /// lr 0.03, weight decay 1e-4, crop scales 0.14-1 / 0.05-0.14) for settings not given.
    #[arg(long, default_value = ARCH)]
    pub arch: String,
    /// Patch side in pixels (ViT only).
    #[arg(long, default_value_t = PATCH_SIZE)]
    pub patch_size: usize,
    /// Number of prototypes K of the head's last layer.
    #[arg(long, default_value_t = OUT_DIM)]
    pub out_dim: usize,
    /// Fix the last layer's weight-norm gain at 1 (more stable).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_parser = crate::cli::bool_value)]
    pub norm_last_layer: bool,
    /// BatchNorm in the head's MLP.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_parser = crate::cli::bool_value)]
    pub use_bn_in_head: bool,
    /// Width of the head's hidden layers (the reference's DINOHead default).
    #[arg(long, default_value_t = head::HIDDEN_DIM)]
    pub head_hidden_dim: usize,
    /// Width of the head's bottleneck before the weight-normalised last layer.
    #[arg(long, default_value_t = head::BOTTLENECK_DIM)]
    pub head_bottleneck_dim: usize,
    /// Stochastic depth rate of the student's last block.
    #[arg(long, default_value_t = 0.1)]
    pub drop_path_rate: f64,

    /// Teacher EMA momentum at the start; it follows a cosine to 1.
    #[arg(long, default_value_t = 0.996)]
    pub momentum_teacher: f64,
    /// Teacher temperature after warm-up.
    #[arg(long, default_value_t = 0.04)]
    pub teacher_temp: f64,
    /// Teacher temperature at the start of the warm-up.
    #[arg(long, default_value_t = 0.04)]
    pub warmup_teacher_temp: f64,
    /// Epochs of linear teacher-temperature warm-up.
    #[arg(long, default_value_t = 0)]
    pub warmup_teacher_temp_epochs: usize,
    /// Temperature of the student's softmax (a fixed value in the reference).
    #[arg(long, default_value_t = STUDENT_TEMP)]
    pub student_temp: f64,
    /// Momentum of the centre: an EMA of the teacher's batch-mean output (fixed in the
    /// reference).
    #[arg(long, default_value_t = CENTER_MOMENTUM)]
    pub center_momentum: f64,

    /// Update rule: adamw (the ViT recipe) or sgd with momentum 0.9 (the ResNet recipe).
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerKind,
    /// Peak learning rate at batch 256 (scaled linearly with the batch size).
    #[arg(long, default_value_t = 0.0005)]
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-6)]
    pub min_lr: f64,
    /// Epochs of linear learning-rate warm-up.
    #[arg(long, default_value_t = 10)]
    pub warmup_epochs: usize,
    /// Weight decay at the start (cosine schedule).
    #[arg(long, default_value_t = 0.04)]
    pub weight_decay: f64,
    /// Weight decay at the end.
    #[arg(long, default_value_t = 0.4)]
    pub weight_decay_end: f64,
    /// Per-parameter gradient norm limit (0 disables clipping).
    #[arg(long, default_value_t = 3.0)]
    pub clip_grad: f64,
    /// Epochs during which the head's last layer stays fixed.
    #[arg(long, default_value_t = 1)]
    pub freeze_last_layer: usize,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch_size_per_gpu: usize,
    /// Training epochs (under --max_minutes: the unit that epoch-based settings are fractions of,
    /// and the longest the plan may be).
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,

    /// Side of the global crops in pixels.
    #[arg(long, default_value_t = GLOBAL_CROP_SIZE)]
    pub global_crop_size: usize,
    /// Side of the local crops in pixels.
    #[arg(long, default_value_t = 96)]
    pub local_crop_size: usize,
    /// Area range of the global crops, as fractions of the image.
    #[arg(long, num_args = 2, default_values_t = [0.4, 1.0])]
    pub global_crops_scale: Vec<f64>,
    /// Number of local crops per image.
    #[arg(long, default_value_t = 8)]
    pub local_crops_number: usize,
    /// Area range of the local crops.
    #[arg(long, num_args = 2, default_values_t = [0.05, 0.4])]
    pub local_crops_scale: Vec<f64>,
    /// Sigma range of the Gaussian blur in pixels of the crop (the reference's 0.1-2 suits
    /// 96-224-px crops; on a 28-px crop 2 px erases the detail).
    #[arg(long, num_args = 2, default_values_t = [0.1, 2.0])]
    pub blur_sigma: Vec<f64>,

    /// Seed of everything random (init, data order, augmentation, drop path).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also keep checkpoint<epoch>.safetensors every N epochs (0: never).
    #[arg(long, default_value_t = 20)]
    pub saveckp_freq: usize,
    /// Also checkpoint every N steps inside an epoch (0: only at epoch ends).
    #[arg(long, default_value_t = 0)]
    pub saveckp_steps: usize,
    /// Threads decoding and augmenting images (0: one per CPU core).
    #[arg(long, default_value_t = 0)]
    pub num_workers: usize,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
    /// Arithmetic of the backbones: f32 (the reference's numbers), bf16 (ViT on a CPU with
    /// AMX or AVX512-BF16 — Intel Xeon Sapphire Rapids or Cooper Lake, AMD Zen 4 and newer —
    /// or on a CUDA GPU: the teacher's and student's backbone matrix products take bf16 inputs
    /// with f32 accumulation; weights, optimiser, heads and loss stay f32; see BENCHMARKS.md),
    /// or auto (bf16 where the device multiplies bf16 in hardware, f32 elsewhere).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionChoice,
    /// Time budget in minutes (0: none). The schedules are laid over the steps the budget buys,
    /// measured over the first steps (at most --epochs' worth); epoch-based settings become
    /// fractions of that plan. The run stops cleanly with a checkpoint at the budget.
    #[arg(long, default_value_t = 0.0)]
    pub max_minutes: f64,
    /// Lay the schedules over exactly N steps, as a time budget does once it has measured the
    /// step rate, without measuring anything (0: none). Replays a budgeted run's plan (its
    /// log's "total_steps") on any machine, or compares recipes at equal steps; epoch-based
    /// settings are fractions of it as under --max_minutes, which may still stop the run.
    #[arg(long, default_value_t = 0)]
    pub plan_steps: usize,
    /// Weighted 20-NN accuracy (T = 0.07, the cls token) of the teacher every N epochs (and
    /// when the time budget stops the run), logged with the epoch (0: never). Train features
    /// come from --data, which must be labelled; test features from --val_data.
    #[arg(long, default_value_t = 0)]
    pub knn_every: usize,
    /// Labelled images for the online k-NN (default: the t10k-* files when --data is an IDX
    /// directory).
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Use only N images of --data / --val_data for the online k-NN, drawn per class in
    /// proportion (0: all).
    #[arg(long, default_value_t = 0)]
    pub knn_train_subset: usize,
    #[arg(long, default_value_t = 0)]
    pub knn_val_subset: usize,
    /// Processes the run spans: not a flag, set from the MPI launcher (`mpirun -np N`); the
    /// global batch is --batch_size_per_gpu times this, and the learning rate scales with it.
    #[arg(skip = 1usize)]
    pub processes: usize,
    /// The reference's fp16 switch, so its command lines parse: false is f32 (the default);
    /// true is refused in one line (fp16 is not built; --precision bf16 is the mixed precision).
    #[arg(long, hide = true, action = clap::ArgAction::Set, value_parser = crate::cli::bool_value)]
    #[serde(skip)]
    pub use_fp16: Option<bool>,
    /// The reference's launcher plumbing, accepted so its command lines parse; meaningless
    /// here (several processes come from an MPI launcher, see the README).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub dist_url: Option<String>,
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub local_rank: Option<usize>,
}

impl TrainConfig {
    /// The training images (`validate` makes sure there are).
    pub fn data(&self) -> &std::path::Path {
        self.data.as_deref().expect("validated --data")
    }

    /// Images per step over all processes.
    pub fn global_batch(&self) -> usize {
        self.batch_size_per_gpu * self.processes
    }

    /// Applies the preset and the config file to every setting not given on the command line.
    pub fn resolve(self, matches: &ArgMatches) -> Result<Self> {
        if self.use_fp16 == Some(true) {
            bail!("--use_fp16 true: fp16 training is not built; --precision bf16 is the mixed precision (CPUs with AMX or AVX512-BF16, CUDA GPUs), f32 elsewhere");
        }
        let explicit = |key: &str| matches!(matches.value_source(key), Some(ValueSource::CommandLine));
        let config_path = self.config.clone();
        let mut values = match serde_json::to_value(&self)? {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        };
        let file = match &config_path {
            Some(path) => read_config_file(path)?,
            None => serde_json::Map::new(),
        };
        for key in file.keys() {
            if !values.contains_key(key) {
                bail!("{}: unknown setting '{key}'", config_path.as_ref().unwrap().display());
            }
        }
        let preset = match (explicit("preset"), file.get("preset")) {
            (false, Some(p)) => serde_json::from_value(p.clone()).with_context(|| format!("{}: bad preset", config_path.as_ref().unwrap().display()))?,
            _ => self.preset,
        };
        let mut defaults = preset.values();
        let arch = if explicit("arch") { Some(serde_json::json!(self.arch)) } else { file.get("arch").cloned() };
        let arch = arch.or_else(|| defaults.iter().find(|(k, _)| *k == "arch").map(|(_, v)| v.clone())).unwrap_or(serde_json::json!(self.arch));
        if arch.as_str().is_some_and(|a| ResNetConfig::from_arch(a).is_some()) {
            defaults.extend(resnet_recipe());
        }
        for (key, value) in defaults {
            if !explicit(key) && !file.contains_key(key) {
                values.insert(key.to_string(), value);
            }
        }
        for (key, value) in file {
            if !explicit(&key) {
                values.insert(key, value);
            }
        }
        let mut resolved: TrainConfig = serde_json::from_value(serde_json::Value::Object(values))
            .with_context(|| format!("{}: a setting has the wrong type", config_path.unwrap_or_default().display()))?;
        resolved.config = self.config;
        resolved.validate()?;
        Ok(resolved)
    }

    pub fn validate(&self) -> Result<()> {
        if self.data.is_none() {
            bail!("--data is required: the training images (an image folder or a directory of IDX files)");
        }
        let is_vit = VitConfig::from_arch(&self.arch, self.patch_size).is_some();
        if !is_vit && ResNetConfig::from_arch(&self.arch).is_none() {
            bail!("--arch: unknown architecture '{}' ({ARCHITECTURES})", self.arch);
        }
        if is_vit && (self.patch_size == 0 || self.local_crop_size < self.patch_size) {
            bail!("--patch_size {} is larger than --local_crop_size {}", self.patch_size, self.local_crop_size);
        }
        for (name, s) in [("--global_crops_scale", &self.global_crops_scale), ("--local_crops_scale", &self.local_crops_scale)] {
            if s.len() != 2 || !(0.0 < s[0] && s[0] <= s[1] && s[1] <= 1.0) {
                bail!("{name}: want two fractions 0 < min <= max <= 1, got {s:?}");
            }
        }
        if self.blur_sigma.len() != 2 || !(0.0 < self.blur_sigma[0] && self.blur_sigma[0] <= self.blur_sigma[1]) {
            bail!("--blur_sigma: want two values 0 < min <= max, got {:?}", self.blur_sigma);
        }
        if self.batch_size_per_gpu == 0 || self.epochs == 0 || self.out_dim == 0 {
            bail!("--batch_size_per_gpu, --epochs and --out_dim must be positive");
        }
        if self.head_hidden_dim == 0 || self.head_bottleneck_dim == 0 {
            bail!("--head_hidden_dim and --head_bottleneck_dim must be positive");
        }
        if !(0.0..=1.0).contains(&self.momentum_teacher) {
            bail!("--momentum_teacher must be within [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.center_momentum) {
            bail!("--center_momentum must be within [0, 1]");
        }
        if !(self.student_temp > 0.0 && self.teacher_temp > 0.0 && self.warmup_teacher_temp > 0.0) {
            bail!("--student_temp, --teacher_temp and --warmup_teacher_temp must be positive");
        }
        if self.device == DeviceKind::Cpu {
            crate::engine::cpu::Cpu::selected().map_err(anyhow::Error::msg)?;
        }
        if self.precision == PrecisionChoice::Bf16 && self.vit().is_none() {
            bail!("--precision bf16 trains ViTs only; use --precision f32 for --arch {}", self.arch);
        }
        Ok(())
    }

    /// The ViT's shape, or `None` when --arch is a ResNet.
    pub fn vit(&self) -> Option<VitConfig> {
        let mut vit = VitConfig::from_arch(&self.arch, self.patch_size)?;
        vit.img_size = self.global_crop_size;
        vit.drop_path_rate = self.drop_path_rate;
        Some(vit)
    }

    /// A randomly initialised backbone of --arch.
    pub fn init_backbone(&self, rng: &mut impl rand::Rng, device: &burn::tensor::Device) -> Network {
        match (self.vit(), ResNetConfig::from_arch(&self.arch)) {
            (Some(vit), _) => Network::Vit(vit.init(rng, device)),
            (None, Some(resnet)) => Network::ResNet(resnet.init(rng, device)),
            (None, None) => unreachable!("validated --arch {}", self.arch),
        }
    }

    pub fn head(&self, in_dim: usize) -> DinoHeadConfig {
        DinoHeadConfig {
            use_bn: self.use_bn_in_head,
            norm_last_layer: self.norm_last_layer,
            hidden_dim: self.head_hidden_dim,
            bottleneck_dim: self.head_bottleneck_dim,
            ..DinoHeadConfig::new(in_dim, self.out_dim)
        }
    }

    pub fn crops(&self) -> MultiCropConfig {
        MultiCropConfig {
            global_size: self.global_crop_size,
            local_size: self.local_crop_size,
            local_crops_number: self.local_crops_number,
            global_crops_scale: (self.global_crops_scale[0], self.global_crops_scale[1]),
            local_crops_scale: (self.local_crops_scale[0], self.local_crops_scale[1]),
            blur_sigma: (self.blur_sigma[0], self.blur_sigma[1]),
        }
    }
}

fn read_config_file(path: &PathBuf) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read config file", path.display()))?;
    let value: serde_json::Value = if path.extension().is_some_and(|e| e == "toml") {
        let t: toml::Value = toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
        serde_json::to_value(t)?
    } else {
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?
    };
    match value {
        serde_json::Value::Object(m) => Ok(m),
        _ => bail!("{}: expected a table of settings", path.display()),
    }
}

/// Parses and resolves `dino train` arguments as the command line does (for tests).
#[cfg(test)]
pub(crate) fn resolve_args(args: &[&str]) -> Result<TrainConfig> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = crate::cli::Cli::command().try_get_matches_from(args)?;
    match crate::cli::Cli::from_arg_matches(&matches)?.command {
        crate::cli::Command::Train(c) => c.resolve(matches.subcommand_matches("train").expect("a train command")),
        _ => bail!("not a train command"),
    }
}

#[cfg(test)]
mod tests {
    /// Resolves a `dino train` command line, with `--data /images` unless it names its data.
    fn resolve(args: &[&str]) -> anyhow::Result<super::TrainConfig> {
        let mut args = args.to_vec();
        if !args.iter().any(|a| *a == "--data" || *a == "--data_path") {
            args.splice(2..2, ["--data", "/images"]);
        }
        super::resolve_args(&args)
    }

    #[test]
    fn data_is_required() {
        let e = super::resolve_args(&["dino", "train"]).unwrap_err().to_string();
        assert!(e.starts_with("--data is required"), "{e}");
    }

    #[test]
    fn defaults_preset_file_and_flags_resolve_in_order() {
        let c = resolve(&["dino", "train"]).unwrap();
        assert_eq!((c.arch.as_str(), c.patch_size, c.out_dim, c.global_crop_size), ("vit_small", 16, 65536, 224));
        assert_eq!(c.global_crops_scale, vec![0.4, 1.0]);

        let c = resolve(&["dino", "train", "--preset", "small", "--out_dim", "1000"]).unwrap();
        assert_eq!((c.arch.as_str(), c.patch_size, c.global_crop_size, c.local_crop_size), ("vit_tiny", 4, 28, 12));
        assert_eq!(c.out_dim, 1000, "a flag beats the preset");
        let c = resolve(&["dino", "train", "--preset", "quick"]).unwrap();
        assert_eq!((c.arch.as_str(), c.patch_size, c.local_crop_size, c.head_hidden_dim, c.norm_last_layer), ("vit_micro", 7, 14, 512, false));
        assert_eq!((c.batch_size_per_gpu, c.lr, c.momentum_teacher), (32, 0.002, 0.97));
        let c = resolve(&["dino", "train", "--preset", "hour"]).unwrap();
        assert_eq!((c.arch.as_str(), c.patch_size, c.local_crop_size, c.out_dim, c.momentum_teacher), ("vit_mini", 7, 14, 1024, 0.97));
        assert_eq!(c.lr, 0.004, "the hour's learning rate is twice the quick one's");
        assert_eq!(c.global_crops_scale, vec![0.9, 1.0], "both small-image presets crop little of the image");
        assert_eq!(c.local_crops_scale, vec![0.2, 0.5], "the hour's local crops are larger than the reference's");
        let c = resolve(&["dino", "train", "--preset", "hour", "--local_crops_scale", "0.05", "0.4"]).unwrap();
        assert_eq!(c.local_crops_scale, vec![0.05, 0.4], "a flag beats the preset");

        let dir = std::env::temp_dir().join(format!("dino-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(&file, "preset = \"small\"\nlr = 0.01\npatch_size = 7\nlocal_crops_scale = [0.1, 0.3]\n").unwrap();
        let f = file.to_str().unwrap();
        let c = resolve(&["dino", "train", "--config", f, "--lr", "0.02"]).unwrap();
        assert_eq!(c.lr, 0.02, "a flag beats the file");
        assert_eq!(c.patch_size, 7, "the file beats the preset");
        assert_eq!(c.global_crop_size, 28, "the file's preset applies");
        assert_eq!(c.local_crops_scale, vec![0.1, 0.3]);

        let c = resolve(&["dino", "train", "--arch", "resnet50", "--lr", "0.1"]).unwrap();
        assert_eq!(c.optimizer, super::OptimizerKind::Sgd, "a ResNet brings its recipe");
        assert_eq!((c.lr, c.weight_decay, c.weight_decay_end), (0.1, 1e-4, 1e-4));
        assert_eq!((c.global_crops_scale.clone(), c.local_crops_scale.clone()), (vec![0.14, 1.0], vec![0.05, 0.14]));
        std::fs::write(&file, "arch = \"resnet_micro\"\nweight_decay = 0.05\n").unwrap();
        let c = resolve(&["dino", "train", "--config", f]).unwrap();
        assert_eq!((c.optimizer, c.lr, c.weight_decay), (super::OptimizerKind::Sgd, 0.03, 0.05), "the file's arch brings the recipe, its values win");

        std::fs::write(&file, "lr = \"fast\"\n").unwrap();
        assert!(resolve(&["dino", "train", "--config", f]).is_err());
        assert!(resolve(&["dino", "train", "--global_crops_scale", "0.5", "0.2"]).is_err());
    }

    /// The loss constants the reference fixes are flags with its values as defaults.
    #[test]
    fn loss_constants_are_flags_with_the_reference_values() {
        let c = resolve(&["dino", "train"]).unwrap();
        assert_eq!((c.student_temp, c.center_momentum), (0.1, 0.9));
        let c = resolve(&["dino", "train", "--student_temp", "0.2", "--center_momentum", "0.5"]).unwrap();
        assert_eq!((c.student_temp, c.center_momentum), (0.2, 0.5));
        assert!(resolve(&["dino", "train", "--student_temp", "0"]).unwrap_err().to_string().contains("--student_temp"));
        assert!(resolve(&["dino", "train", "--center_momentum", "1.5"]).unwrap_err().to_string().contains("--center_momentum"));
    }

    /// A reference command line's spellings: `--data_path`, booleans as True/off/1.
    #[test]
    fn reference_spellings_are_accepted() {
        let c = resolve(&["dino", "train", "--data_path", "/images", "--norm_last_layer", "False", "--use_bn_in_head", "on"]).unwrap();
        assert_eq!((c.data().to_str(), c.norm_last_layer, c.use_bn_in_head), (Some("/images"), false, true));
        assert!(resolve(&["dino", "train", "--norm_last_layer", "maybe"]).is_err());
        assert!(resolve(&["dino", "train", "--use_fp16", "False"]).is_ok());
        assert!(resolve(&["dino", "train", "--dist_url", "env://", "--local_rank", "0"]).is_ok());
        let deit = resolve(&["dino", "train", "--arch", "deit_small"]).unwrap();
        assert_eq!(deit.vit().map(|v| (v.embed_dim, v.num_heads)), Some((384, 6)), "DINO's first name for vit_small");
        assert!(resolve(&["dino", "train", "--use_fp16", "True"]).unwrap_err().to_string().contains("--precision bf16"));
        use clap::Parser;
        let extract = |extra: &[&str]| {
            let args = ["dino", "extract", "--data", "d", "--output_dir", "o"].iter().chain(extra).copied().collect::<Vec<_>>();
            match crate::cli::Cli::try_parse_from(args).unwrap().command {
                crate::cli::Command::Extract(a) => a.avgpool_patchtokens,
                _ => unreachable!("an extract command"),
            }
        };
        assert!(!extract(&[]));
        assert!(extract(&["--avgpool_patchtokens"]), "a bare switch, as before");
        assert!(extract(&["--avgpool_patchtokens", "True"]));
        assert!(!extract(&["--avgpool_patchtokens", "0"]));
    }
}
