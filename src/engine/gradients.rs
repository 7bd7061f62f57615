//! The student backbone's parameter gradients as the engine's backward pass sums them, and
//! their delivery, each with its parameter of the burn network (no names in between).

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::Tensor;

use crate::model::{LayerNorm, VisionTransformer};

/// A LayerNorm's parameter gradients.
pub(super) struct NormGrads {
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
}

/// A Linear layer's gradients, the weight as burn stores it ([in, out]).
pub(super) struct DenseGrads {
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
}

pub(super) struct BlockGrads {
    pub(super) norm1: NormGrads,
    pub(super) qkv: DenseGrads,
    pub(super) proj: DenseGrads,
    pub(super) norm2: NormGrads,
    pub(super) fc1: DenseGrads,
    pub(super) fc2: DenseGrads,
}

/// The backbone's parameter gradients, summed over the crop groups of a step.
pub struct Gradients {
    pub(super) cls_token: Vec<f32>,
    pub(super) pos_embed: Vec<f32>,
    /// The Conv2d layout [D, 3·p·p].
    pub(super) patch: DenseGrads,
    pub(super) blocks: Vec<BlockGrads>,
    pub(super) norm: NormGrads,
}

pub(super) fn zeros(n: usize) -> Vec<f32> {
    vec![0.0; n]
}

pub(super) fn add(acc: &mut [f32], v: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(v) {
        *a += x;
    }
}

/// a + b, reusing a (for reducing per-thread partial sums).
pub(super) fn summed(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    add(&mut a, &b);
    a
}

impl NormGrads {
    pub(super) fn zeros(dim: usize) -> Self {
        Self { weight: zeros(dim), bias: zeros(dim) }
    }

    fn deliver(self, norm: &LayerNorm, sink: &mut impl GradientSink) {
        sink.put(&norm.weight, self.weight);
        sink.put(&norm.bias, self.bias);
    }
}

impl DenseGrads {
    pub(super) fn zeros(d_in: usize, d_out: usize) -> Self {
        Self { weight: zeros(d_in * d_out), bias: zeros(d_out) }
    }

    fn deliver(self, linear: &Linear, sink: &mut impl GradientSink) {
        sink.put(&linear.weight, self.weight);
        let bias = linear.bias.as_ref().expect("the ViT's Linear layers have biases");
        sink.put(bias, self.bias);
    }
}

/// Where the engine's parameter gradients go: each with the parameter it belongs to.
pub trait GradientSink {
    /// `values` is the gradient of `param`, in its shape's row-major order.
    fn put<const D: usize>(&mut self, param: &Param<Tensor<D>>, values: Vec<f32>);
}

impl Gradients {
    /// Hands every gradient to `sink` with its parameter of `vit`, the network these
    /// gradients were computed for (its fields pair with ours one to one).
    pub fn deliver(self, vit: &VisionTransformer, sink: &mut impl GradientSink) {
        sink.put(&vit.cls_token, self.cls_token);
        sink.put(&vit.pos_embed, self.pos_embed);
        sink.put(&vit.patch_embed.weight, self.patch.weight);
        sink.put(&vit.patch_embed.bias, self.patch.bias);
        for (grads, block) in self.blocks.into_iter().zip(&vit.blocks) {
            grads.norm1.deliver(&block.norm1, sink);
            grads.qkv.deliver(&block.attn.qkv, sink);
            grads.proj.deliver(&block.attn.proj, sink);
            grads.norm2.deliver(&block.norm2, sink);
            grads.fc1.deliver(&block.mlp.fc1, sink);
            grads.fc2.deliver(&block.mlp.fc2, sink);
        }
        self.norm.deliver(&vit.norm, sink);
    }
}
