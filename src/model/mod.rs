//! The networks: the backbones (ViT, ResNet), the DINO projection head, and the
//! student/teacher pair that puts a multi-crop batch through both.

pub mod batch_norm;
pub mod head;
pub mod init;
pub mod interpolate;
pub mod pretrained;
pub mod resnet;
pub mod vit;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, FloatDType, Tensor};
use rand::Rng;

use crate::dist::Group;
use crate::engine::Precision;

pub use head::{DinoHead, DinoHeadConfig};
pub use resnet::{ResNet, ResNetConfig};
pub use vit::{VisionTransformer, VitConfig};

/// Side of a network's input when neither a flag nor the weights give one (the reference's
/// 224, the size its official weights were trained at).
pub const FALLBACK_IMAGE_SIZE: usize = 224;

/// Every `--arch` name, for error messages.
pub const ARCHITECTURES: &str = "vit_micro, vit_mini, vit_tiny, vit_small, vit_base, resnet50, resnet_micro";

/// A feature extractor of either family.
#[derive(Module, Debug)]
pub enum Network {
    Vit(VisionTransformer),
    ResNet(ResNet),
}

impl Network {
    /// Width of the image feature.
    pub fn embed_dim(&self) -> usize {
        match self {
            Network::Vit(v) => v.embed_dim(),
            Network::ResNet(r) => r.out_dim(),
        }
    }

    /// Image features [rows, D] of crop groups ([B, 3, H, W] each, rows in group order) as
    /// training computes them: a ViT with stochastic depth drawn from `rng` when one is given,
    /// its products at `precision`; a ResNet (f32) with BatchNorm on each group's statistics
    /// (the reference keeps the teacher in train mode too) over the batches of `group`'s
    /// processes.
    pub fn forward_groups(&self, groups: &[Tensor<4>], rng: Option<&mut rand::rngs::StdRng>, group: Group, precision: Precision) -> Tensor<2> {
        match self {
            Network::Vit(v) => v.forward_groups(groups, rng, precision),
            Network::ResNet(r) => Tensor::cat(groups.iter().map(|g| r.forward_train(g.clone(), group)).collect(), 0),
        }
    }

    /// The ViT, or an error naming `what` needs one.
    pub fn vit(&self, what: &str) -> anyhow::Result<&VisionTransformer> {
        match self {
            Network::Vit(v) => Ok(v),
            Network::ResNet(_) => anyhow::bail!("{what} needs a ViT; these weights are a ResNet"),
        }
    }
}

/// LayerNorm over the last axis with PyTorch's parameter names and the ViT's eps of 1e-6.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            bias: Param::from_tensor(Tensor::zeros([dim], device)),
            eps: 1e-6,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        burn::tensor::module::layer_norm(x, self.weight.val(), Some(self.bias.val()), self.eps)
    }

    /// (x - mean) / sqrt(var + eps) over the last axis, the norm without its affine part. Under
    /// autodiff the graph keeps x - mean (shared by the variance and the division) and the
    /// [.., 1] denominator.
    pub fn standardize(&self, x: Tensor<3>) -> Tensor<3> {
        let centered = x.clone() - x.mean_dim(2);
        let var = (centered.clone() * centered.clone()).mean_dim(2);
        centered / var.add_scalar(self.eps).sqrt()
    }

    /// `linear.forward(self.forward(x))` with the affine part folded into the linear layer:
    /// (x̂γ + β)W + b = x̂(diag(γ)W) + (βW + b), the folding done on the weights. Equal in
    /// value; for training, the graph then keeps x - mean and x̂ (the matmul's input) instead
    /// of those plus the affine output: one activation-sized tensor less per norm. The product
    /// x̂(diag(γ)W) runs at `precision`.
    pub fn forward_into(&self, linear: &Linear, x: Tensor<3>, precision: Precision) -> Tensor<3> {
        let weight = linear.weight.val();
        let [d_in, d_out] = weight.dims();
        let bias = self.bias.val().reshape([1, d_in]).matmul(weight.clone()).reshape([d_out]);
        let bias = match &linear.bias {
            Some(b) => bias + b.val(),
            None => bias,
        };
        let weight = weight * self.weight.val().reshape([d_in, 1]);
        rows_times_at(self.standardize(x), weight, precision) + bias.reshape([1, 1, d_out])
    }
}

/// `a · b` with its operands at `precision`, the result in f32. At bf16 both operands are
/// rounded to bf16 and the backend multiplies them with f32 accumulation and rounds the
/// result to bf16 (cubek's kernels on GPUs; flex on the CPU widens the operands to f32), as a
/// product under PyTorch's autocast does; the backward pass computes the operands' gradients
/// the same way and hands them back in f32, so parameters, optimiser state and loss stay f32.
pub fn matmul_at<const D: usize>(a: Tensor<D>, b: Tensor<D>, precision: Precision) -> Tensor<D> {
    match precision {
        Precision::F32 => a.matmul(b),
        Precision::Bf16 => a.cast(FloatDType::BF16).matmul(b.cast(FloatDType::BF16)).cast(FloatDType::F32),
    }
}

/// `x` [.., d_in] times `weight` [d_in, d_out] at `precision`, as one 2-D product over all of
/// x's rows. A product broadcast over the batch axis would leave the weight's gradient as one
/// partial product per image, summed afterwards (in bf16 on the bf16 path); this way it is one
/// product accumulated over every row.
pub fn rows_times_at<const D: usize>(x: Tensor<D>, weight: Tensor<2>, precision: Precision) -> Tensor<D> {
    let mut dims = x.dims();
    let [d_in, d_out] = weight.dims();
    let rows = dims[..D - 1].iter().product();
    dims[D - 1] = d_out;
    matmul_at(x.reshape([rows, d_in]), weight, precision).reshape(dims)
}

/// A Linear layer's output with its product at `precision` (see [`rows_times_at`]; the bias
/// is added in f32).
pub fn linear_at<const D: usize>(layer: &Linear, x: Tensor<D>, precision: Precision) -> Tensor<D> {
    let out = rows_times_at(x, layer.weight.val(), precision);
    match &layer.bias {
        Some(bias) => out + bias.val().unsqueeze::<D>(),
        None => out,
    }
}

/// A Linear layer (weight stored [in, out], burn's layout) with the reference's init:
/// trunc-normal std .02 weights and zero bias.
pub fn linear(d_in: usize, d_out: usize, bias: bool, rng: &mut impl Rng, device: &Device) -> Linear {
    Linear {
        weight: Param::from_tensor(init::trunc_normal([d_in, d_out], 0.02, rng, device)),
        bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
    }
}

/// Backbone plus head: the whole student (or teacher) network.
#[derive(Module, Debug)]
pub struct DinoModel {
    pub backbone: Network,
    pub head: DinoHead,
}

impl DinoModel {
    /// Runs crops through the network. Each element of `crop_groups` holds all crops of one
    /// resolution, stacked view-major ([views * B, 3, H, W]); each group is one backbone
    /// batch (so a ResNet's BatchNorm sees one resolution at a time, as in the reference), and
    /// the head runs once on all features. Output rows keep the input order. BatchNorm's
    /// batch statistics span the batches of `group`'s processes; a ViT's matrix products run
    /// at `precision`.
    pub fn forward(&self, crop_groups: &[Tensor<4>], rng: Option<&mut rand::rngs::StdRng>, group: Group, precision: Precision) -> Tensor<2> {
        self.head.forward(self.backbone.forward_groups(crop_groups, rng, group, precision), group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// The folded norm + linear against the plain pair: same values and gradients for the
    /// norm's γ and β, the linear weight and bias, and the input.
    #[test]
    fn folded_norm_equals_norm_then_linear() {
        let dev = Device::flex().autodiff();
        let mut norm = LayerNorm::new(6, &dev);
        norm.weight = Param::from_tensor(Tensor::random([6], Distribution::Normal(1.0, 0.5), &dev));
        norm.bias = Param::from_tensor(Tensor::random([6], Distribution::Normal(0.0, 0.5), &dev));
        let fc = linear(6, 5, true, &mut StdRng::seed_from_u64(0), &dev);
        let fc = Linear { bias: Some(Param::from_tensor(Tensor::random([5], Distribution::Normal(0.0, 0.5), &dev))), ..fc };
        let x = Tensor::<3>::random([2, 3, 6], Distribution::Normal(1.0, 2.0), &dev).require_grad();
        let w = Tensor::<3>::random([2, 3, 5], Distribution::Normal(0.0, 1.0), &dev);
        let host = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
        let run = |out: Tensor<3>| {
            let grads = (out.clone() * w.clone()).sum().backward();
            let flat = |t: Tensor<2>| host(t.reshape([-1]));
            [
                host(out.reshape([-1])),
                host(x.grad(&grads).unwrap().reshape([-1])),
                host(norm.weight.grad(&grads).unwrap()),
                host(norm.bias.grad(&grads).unwrap()),
                flat(fc.weight.grad(&grads).unwrap()),
                host(fc.bias.as_ref().unwrap().grad(&grads).unwrap()),
            ]
        };
        let plain = run(fc.forward(norm.forward(x.clone())));
        let folded = run(norm.forward_into(&fc, x.clone(), Precision::F32));
        for (what, (p, f)) in ["output", "dx", "dγ", "dβ", "dW", "db"].iter().zip(plain.iter().zip(&folded)) {
            assert!(p.iter().any(|v| v.abs() > 1e-3), "{what} is all zero");
            for (a, b) in p.iter().zip(f) {
                assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "{what}: {a} vs {b}");
            }
        }
    }
}
