//! The linear probe: a linear classifier on frozen features, trained with cross-entropy and
//! SGD with momentum (PyTorch's rule: v = m v + g, p -= lr v, no dampening) as the reference's
//! linear evaluation does. The gradient is written out by hand: for logits z = W x + b and
//! softmax p, dL/dz = (p - onehot) / batch.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::weights::HostTensor;

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
