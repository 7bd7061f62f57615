//! The reference's linear evaluation: the backbone stays frozen and a linear classifier on its
//! features is trained with cross-entropy and SGD with momentum (PyTorch's rule: v = m v + g,
//! p -= lr v, no dampening) under a per-epoch cosine schedule, on random-resized-crop + flip
//! views (or on centre-crop features computed once), and scored on the test set. The gradient
//! is written out by hand: for logits z = W x + b and softmax p, dL/dz = (p - onehot) / batch.

use std::io::Write;

use anyhow::{Result, bail};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use crate::data::augment::{flip_horizontal, normalize_to_chw, random_resized_crop_box, resize_crop};
use crate::data::dataset::Dataset;
use crate::data::loader::{epoch_order, mix_seed};
use crate::eval::features::{EvalTransform, FeatureKind, extract, progress_bar};
use crate::eval::knn::LabelledFeatures;
use crate::weights::HostTensor;

/// How the probe is trained (`dino linear`'s flags, where their defaults are documented).
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    pub epochs: usize,
    /// Learning rate at batch 256; scaled linearly with `batch_size`.
    pub lr: f64,
    pub batch_size: usize,
    pub momentum: f64,
    /// Random-resized-crop + flip views, their features recomputed each epoch (the
    /// reference); false: centre-crop features computed once.
    pub augment: bool,
    /// Evaluate every N epochs (and after the last).
    pub val_freq: usize,
    pub seed: u64,
}

impl ProbeSettings {
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 || self.val_freq == 0 {
            bail!("--epochs, --batch_size_per_gpu and --val_freq must be positive");
        }
        Ok(())
    }
}

/// A trained probe and its scores on the test set after the last epoch.
pub struct ProbeResult {
    pub probe: LinearProbe,
    pub top1: f64,
    pub top5: f64,
    /// The best top-1 over all evaluations.
    pub best_top1: f64,
}

/// Trains a probe on `kind`'s features of `train` (`classes` outputs, features of `dim`) and
/// scores it on `test` through `transform`, writing one JSON line per evaluation to `log`.
#[allow(clippy::too_many_arguments)]
pub fn train_probe(kind: FeatureKind, dim: usize, classes: usize, train: &Dataset, test: &Dataset, transform: EvalTransform, s: ProbeSettings, log: &mut impl Write, device: &Device) -> Result<ProbeResult> {
    s.validate()?;
    let extract_batch = s.batch_size.max(64);
    eprintln!("test features ({} images)...", test.len());
    let val = extract(kind, test, transform, extract_batch, device)?.into_labelled(test)?;
    let cached = if s.augment {
        None
    } else {
        eprintln!("train features ({} images, computed once: --augment false)...", train.len());
        let f = extract(kind, train, transform, extract_batch, device)?.into_labelled(train)?;
        if f.len() != train.len() {
            bail!("--train_data: {} of {} images unreadable; remove them for --augment false", train.len() - f.len(), train.len());
        }
        Some(f)
    };
    let mut probe = LinearProbe::new(dim, classes, s.momentum, &mut StdRng::seed_from_u64(s.seed), device);
    let base_lr = s.lr * s.batch_size as f64 / 256.0;
    let (mut last, mut best_top1) = ((0.0, 0.0), 0.0f64);
    for epoch in 0..s.epochs {
        let lr = cosine_lr(base_lr, epoch, s.epochs);
        let order = epoch_order(train.len(), s.seed, epoch);
        let bar = progress_bar(train.len() as u64);
        let (mut loss_sum, mut steps) = (0.0, 0);
        for chunk in order.chunks(s.batch_size) {
            if let Some((x, labels)) = batch_features(chunk, cached.as_ref(), (train, kind, transform.size), s.seed, epoch, device) {
                loss_sum += probe.step(x, &labels, lr);
                steps += 1;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        if !loss_sum.is_finite() {
            bail!("the linear probe's loss became non-finite in epoch {epoch}; lower --lr");
        }
        if (epoch + 1) % s.val_freq == 0 || epoch + 1 == s.epochs {
            let (top1, top5) = score(&probe, &val, extract_batch, device);
            best_top1 = best_top1.max(top1);
            last = (top1, top5);
            let mean_loss = loss_sum / steps.max(1) as f64;
            eprintln!("epoch {}/{}: train loss {mean_loss:.4}, lr {lr:.2e}, test top-1 {top1:.2}%, top-5 {top5:.2}%", epoch + 1, s.epochs);
            let line = serde_json::json!({ "epoch": epoch, "train_loss": mean_loss, "lr": lr, "test_acc1": top1, "test_acc5": top5 });
            writeln!(log, "{line}")?;
        }
    }
    Ok(ProbeResult { probe, top1: last.0, top5: last.1, best_top1 })
}

/// Top-1 and top-5 accuracy (%) of `probe` on `val`, `batch` rows at a time.
fn score(probe: &LinearProbe, val: &LabelledFeatures, batch: usize, device: &Device) -> (f64, f64) {
    let (mut top1, mut top5) = (0, 0);
    for (rows, labels) in val.values.chunks(batch * val.dim).zip(val.labels.chunks(batch)) {
        let x = Tensor::<2>::from_data(TensorData::new(rows.to_vec(), [labels.len(), val.dim]), device);
        let (h1, h5) = probe.hits(x, labels);
        top1 += h1;
        top5 += h5;
    }
    let percent = |hits: usize| 100.0 * hits as f64 / val.len() as f64;
    (percent(top1), percent(top5))
}

/// A training batch's features: looked up in the cached ones, or computed on augmented views
/// (crop boxes seeded per (seed, epoch, image)).
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

/// Linear classifier [classes, dim] + bias, with its momentum buffers.
pub struct LinearProbe {
    pub weight: Tensor<2>,
    pub bias: Tensor<1>,
    momentum: f64,
    velocity: Option<(Tensor<2>, Tensor<1>)>,
}

impl LinearProbe {
    /// Weights from N(0, 0.01), zero bias (the reference's initialisation).
    pub fn new(dim: usize, classes: usize, momentum: f64, rng: &mut impl Rng, device: &Device) -> Self {
        let normal = Normal::new(0.0f32, 0.01).expect("valid std");
        let weight: Vec<f32> = (0..dim * classes).map(|_| normal.sample(rng)).collect();
        Self {
            weight: Tensor::from_data(TensorData::new(weight, [classes, dim]), device),
            bias: Tensor::zeros([classes], device),
            momentum,
            velocity: None,
        }
    }

    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.weight.clone().transpose()) + self.bias.clone().unsqueeze::<2>()
    }

    /// One SGD step on a batch; returns the mean cross-entropy before the step.
    pub fn step(&mut self, x: Tensor<2>, labels: &[usize], lr: f64) -> f64 {
        let [batch, _] = x.dims();
        let classes = self.bias.dims()[0];
        let mut onehot = vec![0f32; batch * classes];
        for (i, &l) in labels.iter().enumerate() {
            onehot[i * classes + l] = 1.0;
        }
        let onehot = Tensor::<2>::from_data(TensorData::new(onehot, [batch, classes]), &x.device());
        let logits = self.logits(x.clone());
        let loss = (log_softmax(logits.clone(), 1) * onehot.clone()).sum().neg().div_scalar(batch as f64);
        let dlogits = (softmax(logits, 1) - onehot).div_scalar(batch as f64);
        let grad_w = dlogits.clone().transpose().matmul(x);
        let grad_b = dlogits.sum_dim(0).reshape([classes]);
        let (vw, vb) = match self.velocity.take() {
            None => (grad_w, grad_b),
            Some((vw, vb)) => (vw.mul_scalar(self.momentum) + grad_w, vb.mul_scalar(self.momentum) + grad_b),
        };
        self.weight = self.weight.clone() - vw.clone().mul_scalar(lr);
        self.bias = self.bias.clone() - vb.clone().mul_scalar(lr);
        self.velocity = Some((vw, vb));
        HostTensor::from_tensor(loss).values[0] as f64
    }

    /// Top-1 and top-5 hits of a batch.
    pub fn hits(&self, x: Tensor<2>, labels: &[usize]) -> (usize, usize) {
        let logits = HostTensor::from_tensor(self.logits(x)).values;
        let classes = self.bias.dims()[0];
        let (mut top1, mut top5) = (0, 0);
        for (row, &label) in logits.chunks(classes).zip(labels) {
            // Rank of the true class: how many classes score higher (ties to the smaller index).
            let rank = row.iter().enumerate().filter(|&(c, &v)| v > row[label] || (v == row[label] && c < label)).count();
            top1 += (rank == 0) as usize;
            top5 += (rank < 5) as usize;
        }
        (top1, top5)
    }
}

/// The reference's per-epoch cosine learning rate (CosineAnnealingLR down to 0).
pub fn cosine_lr(base: f64, epoch: usize, epochs: usize) -> f64 {
    base * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs as f64).cos()) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        HostTensor::from_tensor(t).values
    }

    #[test]
    fn first_step_follows_the_analytic_gradient() {
        let dev = Device::flex();
        // Zero weights: softmax is uniform, so the gradient is (1/C - onehot) x / B exactly.
        let x = vec![1.0f32, 2.0, -1.0, 0.5];
        let mut probe = LinearProbe::new(2, 2, 0.9, &mut StdRng::seed_from_u64(0), &dev);
        probe.weight = Tensor::zeros([2, 2], &dev);
        let loss = probe.step(Tensor::from_data(TensorData::new(x, [2, 2]), &dev), &[0, 1], 0.1);
        assert!((loss - 2f64.ln()).abs() < 1e-6);
        // dW[c] = sum_i (0.5 - [y_i = c]) x_i / 2; row 0: (-0.5*[1,2] + 0.5*[-1,0.5]) / 2.
        let expected_w = [-0.1 * -0.5, -0.1 * -0.375, -0.1 * 0.5, -0.1 * 0.375];
        for (a, e) in host(probe.weight.clone()).iter().zip(expected_w) {
            assert!((a - e).abs() < 1e-7, "{a} vs {e}");
        }
        assert_eq!(host(probe.bias.clone()), vec![0.0, 0.0]);
    }

    #[test]
    fn momentum_accumulates_like_pytorch() {
        let dev = Device::flex();
        let x = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.0], [1, 2]), &dev);
        let mut probe = LinearProbe::new(2, 2, 0.9, &mut StdRng::seed_from_u64(0), &dev);
        probe.weight = Tensor::zeros([2, 2], &dev);
        let lr = 0.5;
        probe.step(x.clone(), &[0], lr);
        let w1 = host(probe.weight.clone());
        // First step: p -= lr * g, g = (0.5 - 1) * x for class 0.
        assert!((w1[0] - 0.25).abs() < 1e-7);
        // Second step: v = 0.9 g1 + g2 with g2 from the updated weights.
        let b1 = host(probe.bias.clone());
        let z0 = (w1[0] + b1[0]) as f64;
        let z1 = (w1[2] + b1[1]) as f64;
        let p0 = z0.exp() / (z0.exp() + z1.exp());
        let g2 = p0 - 1.0;
        probe.step(x, &[0], lr);
        let expected = w1[0] as f64 - lr * (0.9 * -0.5 + g2);
        assert!((host(probe.weight.clone())[0] as f64 - expected).abs() < 1e-6);
    }

    #[test]
    fn learns_a_separable_problem_and_counts_hits() {
        let dev = Device::flex();
        let mut rng = StdRng::seed_from_u64(1);
        let (n, dim, classes) = (60, 3, 3);
        let labels: Vec<usize> = (0..n).map(|i| i % classes).collect();
        let x: Vec<f32> = labels.iter().flat_map(|&l| (0..dim).map(move |d| if d == l { 1.0 } else { 0.0 })).map(|v| v + rng.random_range(-0.2..0.2)).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [n, dim]), &dev);
        let mut probe = LinearProbe::new(dim, classes, 0.9, &mut rng, &dev);
        let first = probe.step(x.clone(), &labels, 0.5);
        let mut last = first;
        for _ in 0..50 {
            last = probe.step(x.clone(), &labels, 0.5);
        }
        assert!(last < first / 4.0, "{first} -> {last}");
        assert_eq!(probe.hits(x, &labels), (n, n));
    }

    #[test]
    fn cosine_lr_ends_at_zero() {
        assert_eq!(cosine_lr(0.1, 0, 10), 0.1);
        assert!((cosine_lr(0.1, 5, 10) - 0.05).abs() < 1e-12);
        assert!(cosine_lr(0.1, 10, 10).abs() < 1e-12);
    }
}
