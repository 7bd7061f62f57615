//! DINO projection head: an MLP to a bottleneck, L2 normalisation, and a weight-normalised
//! linear layer to `out_dim` prototypes whose softmax is the distribution the loss compares.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::batch_norm::{BatchNorm, Stats};
use super::init::uniform;
use super::linear;
use crate::dist::Group;

/// Shape of the head; defaults are the reference's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DinoHeadConfig {
    pub in_dim: usize,
    /// Number of prototypes K (65536 in the reference).
    pub out_dim: usize,
    /// BatchNorm after each hidden Linear.
    pub use_bn: bool,
    /// Fix the weight-norm gain at 1, making the last layer a cosine layer.
    pub norm_last_layer: bool,
    /// Linear layers in the MLP (at least 1).
    pub nlayers: usize,
    pub hidden_dim: usize,
    pub bottleneck_dim: usize,
}

/// Width of the head's hidden layers (the reference's DINOHead default; `--head_hidden_dim`).
pub const HIDDEN_DIM: usize = 2048;
/// Width of the bottleneck before the last layer (the reference's; `--head_bottleneck_dim`).
pub const BOTTLENECK_DIM: usize = 256;

impl DinoHeadConfig {
    pub fn new(in_dim: usize, out_dim: usize) -> Self {
        Self { in_dim, out_dim, use_bn: false, norm_last_layer: true, nlayers: 3, hidden_dim: HIDDEN_DIM, bottleneck_dim: BOTTLENECK_DIM }
    }

    pub fn init(&self, rng: &mut impl Rng, device: &Device) -> DinoHead {
        assert!(self.nlayers >= 1, "the head needs at least one layer");
        let mut dims = vec![self.in_dim];
        dims.extend(std::iter::repeat_n(self.hidden_dim, self.nlayers - 1));
        dims.push(self.bottleneck_dim);
        let mlp = dims.windows(2).map(|w| linear(w[0], w[1], true, rng, device)).collect();
        let bn = if self.use_bn {
            (0..self.nlayers - 1).map(|_| BatchNorm::new(self.hidden_dim, device)).collect()
        } else {
            Vec::new()
        };
        // The reference leaves the last layer at PyTorch's default Linear init, gain g = 1.
        let bound = 1.0 / (self.bottleneck_dim as f64).sqrt();
        let weight_v = Param::from_tensor(uniform([self.out_dim, self.bottleneck_dim], bound, rng, device));
        let weight_g = Param::from_tensor(Tensor::ones([self.out_dim, 1], device));
        let weight_g = if self.norm_last_layer { weight_g.set_require_grad(false) } else { weight_g };
        DinoHead { mlp, bn, last_layer: WeightNormLinear { weight_g, weight_v } }
    }
}

/// Linear without bias under weight normalisation: weight = g * v / ||v|| per output row.
/// Stored as PyTorch stores it: g [out, 1], v [out, in].
#[derive(Module, Debug)]
pub struct WeightNormLinear {
    pub weight_g: Param<Tensor<2>>,
    pub weight_v: Param<Tensor<2>>,
}

impl WeightNormLinear {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let v = self.weight_v.val();
        let [out, _] = v.dims();
        let row_norm = v.clone().square().sum_dim(1).sqrt();
        let gain = (self.weight_g.val() / row_norm).reshape([1, out]);
        x.matmul(v.transpose()) * gain
    }
}

#[derive(Module, Debug)]
pub struct DinoHead {
    pub mlp: Vec<Linear>,
    pub bn: Vec<BatchNorm>,
    pub last_layer: WeightNormLinear,
}

impl DinoHead {
    /// The head's output. Its BatchNorm (with `use_bn`) always normalises with the batch's
    /// statistics: the head only runs in training, where the reference keeps student and
    /// teacher in train mode; `group` holds the processes whose batches form the batch.
    pub fn forward(&self, x: Tensor<2>, group: Group) -> Tensor<2> {
        let last = self.mlp.len() - 1;
        let mut x = x;
        for (i, layer) in self.mlp.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                if let Some(bn) = self.bn.get(i) {
                    x = bn.forward(x, Stats::Batch(group));
                }
                x = gelu(x);
            }
        }
        self.last_layer.forward(l2_normalize(x))
    }
}

/// x / max(||x||, 1e-12) along the last axis, as `F.normalize`.
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}
