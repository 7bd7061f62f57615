//! `dino linear`: the reference's linear evaluation. The backbone stays frozen; a linear layer
//! on the cls tokens of the last n blocks (optionally with the mean patch token) is trained with
//! SGD + momentum and a cosine schedule, on random-resized-crop + flip views (or, with
//! --augment false, on centre-crop features computed once), and scored on the test set.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::backbone::BackboneArgs;
use super::eval_args::{LabelledPairArgs, PrecisionArgs, ReferencePlumbing, check_last_blocks, eval_transform};
use crate::data::augment::{flip_horizontal, normalize_to_chw, random_resized_crop_box, resize_crop};
use crate::data::dataset::Dataset;
use crate::data::loader::{epoch_order, mix_seed};
use crate::eval::features::{FeatureKind, FeatureLayout, REFERENCE_CROP, extract, feature_dim, progress_bar};
use crate::eval::knn::LabelledFeatures;
use crate::eval::linear::{LinearProbe, cosine_lr};
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

/// A training batch's features: looked up in the cached ones, or computed on augmented views.
fn batch_features(
    indices: &[usize],
    cached: Option<&LabelledFeatures>,
    source: (&Dataset, FeatureKind, usize),
    seed: u64,
    epoch: usize,
    device: &Device,
) -> Option<(Tensor<2>, Vec<usize>)> {
    if let Some(f) = cached {
        let values: Vec<f32> = indices.iter().flat_map(|&i| f.values[i * f.dim..(i + 1) * f.dim].iter().copied()).collect();
        let labels = indices.iter().map(|&i| f.labels[i]).collect();
        return Some((Tensor::from_data(TensorData::new(values, [indices.len(), f.dim]), device), labels));
    }
    let (dataset, kind, size) = source;
    let views: Vec<(Vec<f32>, usize)> = indices
        .par_iter()
        .filter_map(|&i| {
            let img = dataset.load(i).map_err(|e| eprintln!("warning: skipped {}: {e:#}", dataset.describe(i))).ok()?;
            let mut rng = StdRng::seed_from_u64(mix_seed(seed, epoch as u64, i as u64));
            let (x, y, w, h) = random_resized_crop_box(img.width(), img.height(), (0.08, 1.0), &mut rng);
            let mut px = resize_crop(&img, (x as f64, y as f64, w as f64, h as f64), size);
            if rng.random_bool(0.5) {
                flip_horizontal(&mut px, size);
            }
            Some((normalize_to_chw(&px), dataset.label(i).expect("labelled")))
        })
        .collect();
    if views.is_empty() {
        return None;
    }
    let n = views.len();
    let (pixels, labels): (Vec<Vec<f32>>, Vec<usize>) = views.into_iter().unzip();
    let x = Tensor::<4>::from_data(TensorData::new(pixels.concat(), [n, 3, size, size]), device);
    Some((kind.features(x), labels))
}

pub fn run(args: LinearArgs) -> Result<()> {
    args.reference.note();
    let device = Device::flex();
    if args.epochs == 0 || args.batch_size_per_gpu == 0 || args.val_freq == 0 {
        bail!("--epochs, --batch_size_per_gpu and --val_freq must be positive");
    }
    let (train, test) = args.data.open((args.subset_train, args.subset_test))?;
    let backbone = args.backbone.load(&device)?;
    check_last_blocks(&backbone.network, args.n_last_blocks)?;
    let eval = eval_transform(args.image_size.or(backbone.trained_size).unwrap_or(224), args.center_crop)?;
    let size = eval.size;
    let layout = FeatureLayout { n_last_blocks: args.n_last_blocks, avgpool_patchtokens: args.avgpool_patchtokens, gem_patchtokens: None };
    let network = args.precision.prepare(&backbone.network)?;
    let kind = network.kind(layout);
    let extract_batch = args.batch_size_per_gpu.max(64);
    eprintln!("test features ({} images)...", test.len());
    let val = extract(kind, &test, eval, extract_batch, &device)?.into_labelled(&test)?;
    let cached = if args.augment {
        None
    } else {
        eprintln!("train features ({} images, computed once: --augment false)...", train.len());
        let f = extract(kind, &train, eval, extract_batch, &device)?.into_labelled(&train)?;
        if f.len() != train.len() {
            bail!("--train_data: {} of {} images unreadable; remove them for --augment false", train.len() - f.len(), train.len());
        }
        Some(f)
    };
    let classes = train.num_classes().unwrap_or(0).max(test.num_classes().unwrap_or(0));
    let dim = feature_dim(&backbone.network, layout);
    let mut probe = LinearProbe::new(dim, classes, args.momentum, &mut StdRng::seed_from_u64(args.seed), &device);
    let base_lr = args.lr * args.batch_size_per_gpu as f64 / 256.0;

    std::fs::create_dir_all(&args.output_dir).with_context(|| format!("--output_dir {}: cannot create", args.output_dir.display()))?;
    let log_path = args.output_dir.join("log.txt");
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("{}: cannot write", log_path.display()))?;
    let mut best = 0.0f64;
    let mut last = (0.0, 0.0);
    for epoch in 0..args.epochs {
        let lr = cosine_lr(base_lr, epoch, args.epochs);
        let order = epoch_order(train.len(), args.seed, epoch);
        let bar = progress_bar(train.len() as u64);
        let (mut loss_sum, mut steps) = (0.0, 0);
        for chunk in order.chunks(args.batch_size_per_gpu) {
            if let Some((x, labels)) = batch_features(chunk, cached.as_ref(), (&train, kind, size), args.seed, epoch, &device) {
                loss_sum += probe.step(x, &labels, lr);
                steps += 1;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        if !loss_sum.is_finite() {
            bail!("the linear probe's loss became non-finite in epoch {epoch}; lower --lr");
        }
        if (epoch + 1) % args.val_freq == 0 || epoch + 1 == args.epochs {
            let (mut top1, mut top5) = (0, 0);
            for (rows, labels) in val.values.chunks(extract_batch * dim).zip(val.labels.chunks(extract_batch)) {
                let x = Tensor::<2>::from_data(TensorData::new(rows.to_vec(), [labels.len(), dim]), &device);
                let (h1, h5) = probe.hits(x, labels);
                top1 += h1;
                top5 += h5;
            }
            let (acc1, acc5) = (100.0 * top1 as f64 / val.len() as f64, 100.0 * top5 as f64 / val.len() as f64);
            best = best.max(acc1);
            last = (acc1, acc5);
            let mean_loss = loss_sum / steps.max(1) as f64;
            eprintln!("epoch {}/{}: train loss {mean_loss:.4}, lr {lr:.2e}, test top-1 {acc1:.2}%, top-5 {acc5:.2}%", epoch + 1, args.epochs);
            let line = serde_json::json!({ "epoch": epoch, "train_loss": mean_loss, "lr": lr, "test_acc1": acc1, "test_acc5": acc5 });
            writeln!(log, "{line}")?;
        }
    }
    let tensors = vec![("linear.weight".to_string(), HostTensor::from_tensor(probe.weight.clone())), ("linear.bias".to_string(), HostTensor::from_tensor(probe.bias.clone()))];
    let meta = serde_json::json!({ "n_last_blocks": args.n_last_blocks, "avgpool_patchtokens": args.avgpool_patchtokens, "image_size": size, "classes": classes });
    write_safetensors(&args.output_dir.join("linear.safetensors"), tensors, HashMap::from([("dino_linear".to_string(), meta.to_string())]))?;
    println!("Linear probe: Top1: {:.2}, Top5: {:.2} (best top-1 over evaluations: {best:.2})", last.0, last.1);
    Ok(())
}
