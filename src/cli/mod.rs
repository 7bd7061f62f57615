//! Subcommands of the `dino` binary.

pub mod attention;
pub mod backbone;
pub mod copy_detection;
pub mod eval_args;
pub mod export;
pub mod extract;
pub mod knn;
pub mod linear;
pub mod retrieval;
pub mod video;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use clap::{ArgMatches, Parser, Subcommand};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::model::{ARCHITECTURES, DinoHeadConfig, ResNetConfig, VitConfig};
use crate::train::config::TrainConfig;
use crate::train::trainer;

#[derive(Debug, Parser)]
#[command(name = "dino", version, about = "DINO self-supervised vision transformers, in Rust")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pretrain a ViT with DINO on a folder of images or IDX files; resumes automatically
    /// from the checkpoint in --output_dir.
    Train(TrainConfig),
    /// Frozen features of a dataset as .npy (with labels and the file list).
    Extract(extract::ExtractArgs),
    /// Weighted k-NN accuracy of frozen features on a labelled train/test pair.
    Knn(knn::KnnArgs),
    /// Linear-probe accuracy: a linear classifier trained on the frozen backbone's features.
    Linear(linear::LinearArgs),
    /// Attention maps of the last block's cls token on one image (per head, mean, masks).
    Attention(attention::AttentionArgs),
    /// Video object segmentation: propagate a first-frame mask through a folder of frames.
    VideoSeg(video::VideoArgs),
    /// Image retrieval: mAP and mP@k of frozen features on revisited Oxford/Paris (Easy,
    /// Medium, Hard) or on a database and a query folder.
    Retrieval(retrieval::RetrievalArgs),
    /// Copy detection on Copydays: cls + GeM features, optional PCA whitening and distractors,
    /// mAP per block of queries.
    CopyDetection(copy_detection::CopyDetectionArgs),
    /// Write a backbone (from any weights file) as safetensors under the official key names.
    Export(export::ExportArgs),
    /// Print the CPU engine's paths on this CPU (best first) and which one runs.
    CpuInfo {
        /// Only the names of the paths this CPU runs, one per line (for scripts).
        #[arg(long)]
        paths: bool,
    },
    /// Print the size of a backbone and its DINO head.
    #[command(name = "model-info", rename_all = "snake_case")]
    ModelInfo {
        /// vit_micro, vit_mini, vit_tiny, vit_small, vit_base, resnet50 or resnet_micro.
        #[arg(long, default_value = crate::train::config::ARCH)]
        arch: String,
        /// Patch side (ViT only).
        #[arg(long, default_value_t = crate::train::config::PATCH_SIZE)]
        patch_size: usize,
        /// Side of the training images.
        #[arg(long, default_value_t = crate::train::config::GLOBAL_CROP_SIZE)]
        img_size: usize,
        /// Output dimension of the DINO head (its number of prototypes).
        #[arg(long, default_value_t = crate::train::config::OUT_DIM)]
        out_dim: usize,
    },
}

/// A boolean flag's value as the reference's command lines spell it: true/false, on/off or 1/0,
/// in any case (its `bool_flag`), so a pasted `--norm_last_layer False` works.
pub fn bool_value(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "on" | "1" => Ok(true),
        "false" | "off" | "0" => Ok(false),
        _ => Err(format!("'{text}' is not a boolean (true/false, on/off, 1/0)")),
    }
}

/// Runs a parsed command line; `matches` tells flags given explicitly from defaults.
pub fn run(cli: Cli, matches: &ArgMatches) -> Result<()> {
    // Training sizes its compute threads once it knows how many processes share the machine.
    if !matches!(cli.command, Command::Train(_)) {
        crate::engine::start_compute(0)?;
    }
    match cli.command {
        Command::Train(config) => {
            let sub = matches.subcommand_matches("train").expect("train subcommand");
            let config = config.resolve(sub)?;
            trainer::run(&config)
        }
        Command::Extract(args) => extract::run(args),
        Command::Knn(args) => knn::run(args),
        Command::Linear(args) => linear::run(args),
        Command::Attention(args) => attention::run(args),
        Command::VideoSeg(args) => video::run(args),
        Command::Retrieval(args) => retrieval::run(args),
        Command::CopyDetection(args) => copy_detection::run(args),
        Command::Export(args) => export::run(args),
        Command::CpuInfo { paths } => cpu_info(paths),
        Command::ModelInfo { arch, patch_size, img_size, out_dim } => {
            let device = Device::flex();
            let mut rng = StdRng::seed_from_u64(0);
            if let Some(config) = ResNetConfig::from_arch(&arch) {
                let backbone = config.init(&mut rng, &device);
                let head = DinoHeadConfig::new(backbone.out_dim(), out_dim).init(&mut rng, &device);
                println!("{arch}: stages {:?}, {}-d pooled output", backbone.stage_depths(), backbone.out_dim());
                println!("backbone parameters: {} (BatchNorm running statistics not counted)", backbone.parameter_count());
                println!("head parameters:     {}", head.num_params());
                return Ok(());
            }
            let mut vit = VitConfig::from_arch(&arch, patch_size)
                .with_context(|| format!("--arch: unknown architecture '{arch}' ({ARCHITECTURES})"))?;
            if patch_size == 0 || img_size < patch_size {
                bail!("--patch_size {patch_size} does not fit --img_size {img_size}");
            }
            vit.img_size = img_size;
            let backbone = vit.init(&mut rng, &device);
            let head = DinoHeadConfig::new(vit.embed_dim, out_dim).init(&mut rng, &device);
            let tokens = (img_size / patch_size).pow(2) + 1;
            println!("{arch}/{patch_size} at {img_size}px: {tokens} tokens, dim {}, depth {}, heads {}", vit.embed_dim, vit.depth, vit.num_heads);
            println!("backbone parameters: {}", backbone.num_params());
            println!("head parameters:     {}", head.num_params());
            Ok(())
        }
    }
}

fn cpu_info(names_only: bool) -> Result<()> {
    use crate::engine::cpu::{Cpu, PATH_VARIABLE, Path};
    let supported = Cpu::supported();
    if names_only {
        supported.iter().for_each(|p| println!("{}", p.name()));
        return Ok(());
    }
    let selected = Cpu::selected().map_err(anyhow::Error::msg)?.path();
    for path in Path::ALL {
        let state = if path == selected {
            "runs here (selected)"
        } else if supported.contains(&path) {
            "runs here"
        } else {
            "not on this CPU"
        };
        println!("{:<11} {state}", path.name());
    }
    if Cpu::engine_off() {
        println!("the engine is off ({PATH_VARIABLE}=burn): ViTs through burn, --precision bf16 on burn's bf16 products (widened to f32 on the CPU: slow)");
        return Ok(());
    }
    let bf16 = if selected.has_bf16_hardware() {
        "bf16 products in hardware (--precision auto picks bf16)"
    } else {
        "refused: no AMX-BF16 or AVX512-BF16 (--precision auto picks f32)"
    };
    println!("--precision bf16: {bf16}; {PATH_VARIABLE}=<path> forces a path, {PATH_VARIABLE}=burn turns the engine off");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn booleans_in_the_reference_spellings() {
        for (text, value) in [("true", true), ("True", true), ("ON", true), ("1", true), ("false", false), ("False", false), ("off", false), ("0", false)] {
            assert_eq!(super::bool_value(text), Ok(value), "{text}");
        }
        assert!(super::bool_value("yes").unwrap_err().contains("'yes' is not a boolean"));
    }
}
