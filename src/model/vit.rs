//! Vision Transformer backbone (ViT-Tiny/Small/Base at any patch size), as DINO uses it:
//! pre-norm blocks, a cls token whose final-norm output is the image feature, and position
//! embeddings resized bicubically for inputs at other resolutions.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use anyhow::{Context, bail};

use super::init::{tensor_from_vec, trunc_normal, uniform};
use super::interpolate::resample_grid;
use super::{LayerNorm, linear, linear_at, matmul_at, rows_times_at};
use crate::engine::Precision;
use crate::weights::HostTensor;

/// Shape of a ViT. The presets follow the reference (`vit_tiny`, `vit_small`, `vit_base`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Side of the square images the position embedding is learned for.
    pub img_size: usize,
    /// Side of a square patch in pixels.
    pub patch_size: usize,
    /// Token width.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// MLP hidden width as a multiple of `embed_dim`.
    pub mlp_ratio: usize,
    /// Stochastic-depth rate of the last block; block i uses rate * i / (depth - 1).
    pub drop_path_rate: f64,
}

impl VitConfig {
    /// The named architecture at a patch size: `vit_tiny`, `vit_small`, `vit_base` (the
    /// reference's; `deit_tiny` and `deit_small` are their names in DINO's first releases),
    /// or ours for small images on a CPU: `vit_micro` (dim 64, 4 blocks, 2 heads: tests and
    /// minutes-long runs) and `vit_mini` (dim 128, 4 blocks, 4 heads: hour-long runs).
    pub fn from_arch(arch: &str, patch_size: usize) -> Option<Self> {
        let (embed_dim, depth, num_heads) = match arch {
            "vit_micro" => (64, 4, 2),
            "vit_mini" => (128, 4, 4),
            "vit_tiny" | "deit_tiny" => (192, 12, 3),
            "vit_small" | "deit_small" => (384, 12, 6),
            "vit_base" => (768, 12, 12),
            _ => return None,
        };
        Some(Self { img_size: 224, patch_size, embed_dim, depth, num_heads, mlp_ratio: 4, drop_path_rate: 0.0 })
    }

    /// Per-block drop-path rates, linear from 0 to `drop_path_rate`.
    pub fn drop_path_rates(&self) -> Vec<f64> {
        match self.depth {
            0 => vec![],
            1 => vec![0.0],
            d => (0..d).map(|i| self.drop_path_rate * i as f64 / (d - 1) as f64).collect(),
        }
    }

    /// Builds a randomly initialised ViT (trunc-normal .02 for linear layers and embeddings).
    pub fn init(&self, rng: &mut impl Rng, device: &Device) -> VisionTransformer {
        assert!(self.patch_size > 0 && self.img_size >= self.patch_size, "image smaller than a patch");
        assert!(self.embed_dim.is_multiple_of(self.num_heads), "embed_dim must divide into heads");
        let d = self.embed_dim;
        let grid = self.img_size / self.patch_size;
        let fan_in = 3 * self.patch_size * self.patch_size;
        // The patch projection keeps PyTorch's default Conv2d init, as in the reference.
        let bound = 1.0 / (fan_in as f64).sqrt();
        let patch_embed = PatchEmbed {
            weight: Param::from_tensor(uniform([d, 3, self.patch_size, self.patch_size], bound, rng, device)),
            bias: Param::from_tensor(uniform([d], bound, rng, device)),
            patch_size: self.patch_size,
        };
        let blocks = self
            .drop_path_rates()
            .into_iter()
            .map(|rate| Block {
                norm1: LayerNorm::new(d, device),
                attn: Attention {
                    qkv: linear(d, 3 * d, true, rng, device),
                    proj: linear(d, d, true, rng, device),
                    num_heads: self.num_heads,
                },
                norm2: LayerNorm::new(d, device),
                mlp: Mlp {
                    fc1: linear(d, d * self.mlp_ratio, true, rng, device),
                    fc2: linear(d * self.mlp_ratio, d, true, rng, device),
                },
                drop_path: rate,
            })
            .collect();
        VisionTransformer {
            cls_token: Param::from_tensor(trunc_normal([1, 1, d], 0.02, rng, device)),
            pos_embed: Param::from_tensor(trunc_normal([1, grid * grid + 1, d], 0.02, rng, device)),
            patch_embed,
            blocks,
            norm: LayerNorm::new(d, device),
        }
    }

    /// The shape a ViT state dict (official key names) describes: width and depth from the
    /// keys, patch size from the patch projection, training resolution from the position
    /// embedding, and heads from `arch` when given (checked against the width), else from the
    /// width (every DINO ViT uses 64-dim heads).
    pub fn from_state_dict(tensors: &HashMap<String, HostTensor>, arch: Option<&str>) -> anyhow::Result<Self> {
        let shape = |k: &str| tensors.get(k).map(|t| t.shape.as_slice());
        let Some(&[1, 1, dim]) = shape("cls_token") else {
            let mut keys: Vec<&String> = tensors.keys().collect();
            keys.sort();
            let some: Vec<&str> = keys.iter().take(4).map(|k| k.as_str()).collect();
            bail!("not a ViT backbone: no 'cls_token' of shape [1, 1, D] (keys start: {})", some.join(", "));
        };
        let Some(&[d, 3, p, p2]) = shape("patch_embed.proj.weight") else {
            bail!("key 'patch_embed.proj.weight': missing or not [D, 3, p, p]");
        };
        if d != dim || p != p2 {
            bail!("key 'patch_embed.proj.weight': shape [{d}, 3, {p}, {p2}] does not fit cls_token width {dim}");
        }
        let Some(&[1, tokens, _]) = shape("pos_embed") else { bail!("key 'pos_embed': missing or not [1, N, D]") };
        let side = ((tokens - 1) as f64).sqrt().round() as usize;
        if side * side != tokens - 1 {
            bail!("key 'pos_embed': {} patch positions do not form a square grid", tokens - 1);
        }
        let depth = tensors
            .keys()
            .filter_map(|k| k.strip_prefix("blocks.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1);
        if depth == 0 {
            bail!("no 'blocks.N.*' keys: not a ViT backbone");
        }
        let Some(&[hidden, _]) = shape("blocks.0.mlp.fc1.weight") else { bail!("key 'blocks.0.mlp.fc1.weight': missing or not 2-D") };
        if hidden % dim != 0 {
            bail!("key 'blocks.0.mlp.fc1.weight': hidden width {hidden} is not a multiple of {dim}");
        }
        let num_heads = match arch {
            Some(a) => {
                let reference = Self::from_arch(a, p).with_context(|| format!("--arch: unknown architecture '{a}'"))?;
                if reference.embed_dim != dim {
                    bail!("--arch {a} has width {}, but the weights have width {dim}", reference.embed_dim);
                }
                reference.num_heads
            }
            None if dim % 64 == 0 => dim / 64,
            None => bail!("cannot tell the number of heads of a {dim}-wide ViT; name the architecture with --arch"),
        };
        Ok(Self { img_size: side * p, patch_size: p, embed_dim: dim, depth, num_heads, mlp_ratio: hidden / dim, drop_path_rate: 0.0 })
    }
}

/// Non-overlapping patch projection (a Conv2d with stride = kernel = patch size), done as
/// a reshape and one matmul. The weight keeps the Conv2d layout [dim, 3, p, p].
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
    pub patch_size: usize,
}

impl PatchEmbed {
    /// [B, 3, H, W] -> [B, (H/p)*(W/p), dim], the product at `precision`; pixels past the
    /// last whole patch are dropped.
    pub fn forward(&self, x: Tensor<4>, precision: Precision) -> Tensor<3> {
        let p = self.patch_size;
        let [b, c, h, w] = x.dims();
        let (gh, gw) = (h / p, w / p);
        let x = if gh * p != h || gw * p != w { x.slice([0..b, 0..c, 0..gh * p, 0..gw * p]) } else { x };
        let patches = x
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c * p * p]);
        let [dim, ..] = self.weight.dims();
        let weight = self.weight.val().reshape([dim, c * p * p]).transpose();
        rows_times_at(patches, weight, precision) + self.bias.val().reshape([1, 1, dim])
    }
}

/// Multi-head self-attention with a fused qkv projection.
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: usize,
}

impl Attention {
    /// The mixed tokens, for inference (training goes through [`Attention::mix_trainable`],
    /// see `Block::forward`), the products at `precision`. On the CPU at f32 this is
    /// burn-flex's fused attention kernel (no [N, N] weights kept); elsewhere the plain
    /// matmul-softmax-matmul, as CubeCL's fused kernel measured 10× slower on GPUs (ViT-S/16
    /// extraction on an H200 through Vulkan: 819 vs 8634 img/s).
    pub fn forward(&self, x: Tensor<3>, precision: Precision) -> Tensor<3> {
        if x.device() != Device::flex() || precision != Precision::F32 {
            return self.forward_with_weights(x, precision).0;
        }
        let [b, n, c] = x.dims();
        let (q, k, v, scale) = self.heads(self.qkv.forward(x));
        let options = AttentionModuleOptions { scale: Some(scale), ..Default::default() };
        let mixed = attention(q, k, v, None, None, options);
        self.proj.forward(mixed.swap_dims(1, 2).reshape([b, n, c]))
    }

    /// Attention written so that the autodiff graph keeps one [N, N] tensor per block, as
    /// PyTorch's softmax does: the unnormalised weights E = exp(s - max s) are saved once (by
    /// exp and by E·V alike) and the rows are normalised after the product, on [N, head_dim].
    /// A softmax op would keep both E and E / ΣE. q, k and v stay views of the qkv output
    /// [B, N, 3D] this takes (the scale goes on the scores), so no scaled copy of q is kept.
    /// The products run at `precision`, the exponentials and sums at f32.
    fn mix_trainable(&self, qkv: Tensor<3>, precision: Precision) -> Tensor<3> {
        let [b, n, c3] = qkv.dims();
        let c = c3 / 3;
        let (q, k, v, scale) = self.heads(qkv);
        let scores = matmul_at(q, k.transpose(), precision).mul_scalar(scale);
        let max = scores.clone().detach().max_dim(3);
        let weights = (scores - max).exp();
        let mixed = matmul_at(weights.clone(), v, precision) / weights.sum_dim(3);
        linear_at(&self.proj, mixed.swap_dims(1, 2).reshape([b, n, c]), precision)
    }

    /// As `forward`, also returning the attention weights [B, heads, N, N] (attention maps).
    pub fn forward_with_weights(&self, x: Tensor<3>, precision: Precision) -> (Tensor<3>, Tensor<4>) {
        let [b, n, c] = x.dims();
        let (q, k, v, scale) = self.heads(linear_at(&self.qkv, x, precision));
        let weights = softmax(matmul_at(q.mul_scalar(scale), k.transpose(), precision), 3);
        let mixed = matmul_at(weights.clone(), v, precision).swap_dims(1, 2).reshape([b, n, c]);
        (linear_at(&self.proj, mixed, precision), weights)
    }

    /// q, k, v as [B, heads, N, head_dim] from the qkv output [B, N, 3D], and the score scale
    /// head_dim^-0.5.
    fn heads(&self, qkv: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>, f64) {
        let [b, n, c3] = qkv.dims();
        let heads = self.num_heads;
        let head_dim = c3 / 3 / heads;
        let qkv = qkv.reshape([b, n, 3, heads, head_dim]).permute([2, 0, 3, 1, 4]);
        let q = qkv.clone().slice_dim(0, 0..1).squeeze_dim::<4>(0);
        let k = qkv.clone().slice_dim(0, 1..2).squeeze_dim::<4>(0);
        let v = qkv.slice_dim(0, 2..3).squeeze_dim::<4>(0);
        (q, k, v, (head_dim as f64).powf(-0.5))
    }
}

/// Two-layer MLP with exact (erf) GELU.
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    /// The MLP's output, its products at `precision`.
    pub fn forward(&self, x: Tensor<3>, precision: Precision) -> Tensor<3> {
        self.after_fc1(linear_at(&self.fc1, x, precision), precision)
    }

    /// The rest of the MLP from fc1's output.
    fn after_fc1(&self, hidden: Tensor<3>, precision: Precision) -> Tensor<3> {
        linear_at(&self.fc2, gelu(hidden), precision)
    }
}

/// Pre-norm transformer block with stochastic depth on both residual branches.
#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub drop_path: f64,
}

impl Block {
    /// `rng` enables stochastic depth (training); `None` is the deterministic forward. The
    /// matrix products run at `precision`. Under autodiff each norm's affine part is folded
    /// into the projection after it ([`LayerNorm::forward_into`]), so the graph keeps one
    /// activation less per norm.
    fn forward(&self, x: Tensor<3>, rng: Option<&mut StdRng>, precision: Precision) -> Tensor<3> {
        let training = x.device().is_autodiff();
        let mixed = if training {
            self.attn.mix_trainable(self.norm1.forward_into(&self.attn.qkv, x.clone(), precision), precision)
        } else {
            self.attn.forward(self.norm1.forward(x.clone()), precision)
        };
        let (attn_keep, mlp_keep) = match rng {
            Some(rng) if self.drop_path > 0.0 => {
                let batch = x.dims()[0];
                (Some(self.keep_mask(batch, rng, &x.device())), Some(self.keep_mask(batch, rng, &x.device())))
            }
            _ => (None, None),
        };
        let x = x + apply_keep(mixed, attn_keep);
        let update = if training {
            self.mlp.after_fc1(self.norm2.forward_into(&self.mlp.fc1, x.clone(), precision), precision)
        } else {
            self.mlp.forward(self.norm2.forward(x.clone()), precision)
        };
        x + apply_keep(update, mlp_keep)
    }

    /// Per-sample residual scale as a [batch, 1, 1] tensor, see [`keep_factors`].
    fn keep_mask(&self, batch: usize, rng: &mut StdRng, device: &Device) -> Tensor<3> {
        tensor_from_vec(keep_factors(self.drop_path, batch, rng), [batch, 1, 1], device)
    }
}

/// Stochastic depth's per-sample residual scales: 0 with probability `drop_path`, else
/// 1 / (1 - drop_path). One draw per sample, in order (the bf16 student draws the same).
pub fn keep_factors(drop_path: f64, batch: usize, rng: &mut StdRng) -> Vec<f32> {
    let keep = 1.0 - drop_path;
    (0..batch).map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect()
}

fn apply_keep(update: Tensor<3>, keep: Option<Tensor<3>>) -> Tensor<3> {
    match keep {
        Some(mask) => update * mask,
        None => update,
    }
}

/// The ViT backbone. Field names follow the official checkpoints.
#[derive(Module, Debug)]
pub struct VisionTransformer {
    pub cls_token: Param<Tensor<3>>,
    pub pos_embed: Param<Tensor<3>>,
    pub patch_embed: PatchEmbed,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
}

impl VisionTransformer {
    pub fn embed_dim(&self) -> usize {
        self.cls_token.dims()[2]
    }

    pub fn patch_size(&self) -> usize {
        self.patch_embed.patch_size
    }

    /// The width of each attention head.
    pub fn head_width(&self) -> usize {
        self.embed_dim() / self.blocks.first().map_or(1, |b| b.attn.num_heads)
    }

    /// The image feature: the cls token after the final norm, [B, dim], at f32.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_train(x, None, Precision::F32)
    }

    /// The image feature with the matrix products at `precision` (see [`matmul_at`]) and
    /// stochastic depth drawn from `rng` when one is given.
    pub fn forward_train(&self, x: Tensor<4>, mut rng: Option<&mut StdRng>, precision: Precision) -> Tensor<2> {
        let mut tokens = self.prepare_tokens(x, precision);
        for block in &self.blocks {
            tokens = block.forward(tokens, rng.as_deref_mut(), precision);
        }
        let [b, _, d] = tokens.dims();
        self.norm.forward(tokens.slice_dim(1, 0..1)).reshape([b, d])
    }

    /// The image features [rows, dim] of crop groups ([B, 3, H, W] each, rows in group order)
    /// as training computes them, with stochastic depth drawn from `rng` when one is given and
    /// the matrix products at `precision`: on the engine where it computes this ViT (the CPU;
    /// the student's backbone then is one operation of burn's graph), through burn's ops
    /// elsewhere (`engine::check_precision` has checked the device can).
    pub fn forward_groups(&self, groups: &[Tensor<4>], mut rng: Option<&mut StdRng>, precision: Precision) -> Tensor<2> {
        let device = groups.first().expect("at least one crop group").device();
        if crate::engine::engine_runs(self, &device) {
            return crate::engine::graph::features(self, groups, rng, precision);
        }
        Tensor::cat(groups.iter().map(|g| self.forward_train(g.clone(), rng.as_deref_mut(), precision)).collect(), 0)
    }

    /// The normalised tokens [B, 1 + patches, dim] after each of the last `n` blocks, the
    /// matrix products at `precision`.
    pub fn intermediate_layers(&self, x: Tensor<4>, n: usize, precision: Precision) -> Vec<Tensor<3>> {
        let mut tokens = self.prepare_tokens(x, precision);
        let depth = self.blocks.len();
        let mut out = Vec::with_capacity(n.min(depth));
        for (i, block) in self.blocks.iter().enumerate() {
            tokens = block.forward(tokens, None, precision);
            if depth - i <= n {
                out.push(self.norm.forward(tokens.clone()));
            }
        }
        out
    }

    /// The last block's attention weights [B, heads, tokens, tokens] (softmax output), at f32.
    pub fn last_self_attention(&self, x: Tensor<4>) -> Tensor<4> {
        let mut tokens = self.prepare_tokens(x, Precision::F32);
        let (last, rest) = self.blocks.split_last().expect("a ViT has at least one block");
        for block in rest {
            tokens = block.forward(tokens, None, Precision::F32);
        }
        last.attn.forward_with_weights(last.norm1.forward(tokens), Precision::F32).1
    }

    /// Patch tokens with the cls token in front and position embeddings added.
    fn prepare_tokens(&self, x: Tensor<4>, precision: Precision) -> Tensor<3> {
        let [b, _, h, w] = x.dims();
        let patches = self.patch_embed.forward(x, precision);
        let d = self.embed_dim();
        let cls = self.cls_token.val().expand([b, 1, d]);
        let tokens = Tensor::cat(vec![cls, patches], 1);
        tokens + self.position_embedding(h, w)
    }

    /// The position embedding for an h x w input, see [`position_embedding`].
    fn position_embedding(&self, h: usize, w: usize) -> Tensor<3> {
        position_embedding(self.pos_embed.val(), self.patch_size(), h, w)
    }
}

/// The position embedding `pos` [1, 1 + grid², D] resized for an h x w input, as the reference
/// does: the grid is scaled bicubically by (grid + 0.1) / trained_side, so the kernel samples
/// slightly off the exact ratio and the output size never rounds down.
pub fn position_embedding(pos: Tensor<3>, patch_size: usize, h: usize, w: usize) -> Tensor<3> {
    let [_, n_plus_one, d] = pos.dims();
    let Some(GridResize { side, out, scale }) = GridResize::plan(n_plus_one - 1, patch_size, h, w) else {
        return pos;
    };
    let grid = pos.clone().slice_dim(1, 1..n_plus_one).reshape([side, side, d]);
    let resized = resample_grid(grid, out, scale, &pos.device()).reshape([1, out[0] * out[1], d]);
    Tensor::cat(vec![pos.slice_dim(1, 0..1), resized], 1)
}

/// How [`position_embedding`] resizes the trained side × side grid for an input.
pub struct GridResize {
    pub side: usize,
    /// Patch rows and columns of the input.
    pub out: [usize; 2],
    /// Bicubic scale factors (rows, columns): (out + 0.1) / side.
    pub scale: [f64; 2],
}

impl GridResize {
    /// The resize for an h × w input to a grid of `patches` positions; `None` when the
    /// input has the trained grid and the embedding is used as it is.
    pub fn plan(patches: usize, patch_size: usize, h: usize, w: usize) -> Option<Self> {
        let (gh, gw) = (h / patch_size, w / patch_size);
        if gh * gw == patches && h == w {
            return None;
        }
        let side = (patches as f64).sqrt().round() as usize;
        assert_eq!(side * side, patches, "position embedding grid is not square");
        Some(Self { side, out: [gh, gw], scale: [(gh as f64 + 0.1) / side as f64, (gw as f64 + 0.1) / side as f64] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn tiny(drop_path_rate: f64) -> VitConfig {
        VitConfig { img_size: 8, patch_size: 4, embed_dim: 8, depth: 3, num_heads: 2, mlp_ratio: 2, drop_path_rate }
    }

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// The training arrangement of attention (normalise after E·V) against the plain
    /// softmax: same outputs and same gradients.
    #[test]
    fn trainable_attention_equals_softmax_attention() {
        let dev = Device::flex().autodiff();
        let vit = tiny(0.0).init(&mut StdRng::seed_from_u64(0), &dev);
        let attn = &vit.blocks[0].attn;
        let x = Tensor::<3>::random([3, 5, 8], burn::tensor::Distribution::Normal(0.0, 2.0), &dev);
        let w = Tensor::<3>::random([3, 5, 8], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
        let plain = attn.forward_with_weights(x.clone(), Precision::F32).0;
        let trainable = attn.mix_trainable(attn.qkv.forward(x), Precision::F32);
        let values = |t: &Tensor<3>| t.clone().into_data().try_to_vec::<f32>().unwrap();
        for (a, b) in values(&plain).iter().zip(values(&trainable)) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let grad = |out: Tensor<3>| {
            let grads = (out * w.clone()).sum().backward();
            attn.qkv.weight.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap()
        };
        let (g_plain, g_trainable) = (grad(plain), grad(trainable));
        assert!(g_plain.iter().any(|g| g.abs() > 1e-3), "gradients flow");
        for (a, b) in g_plain.iter().zip(&g_trainable) {
            assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn drop_path_rates_rise_linearly_from_zero() {
        assert_eq!(tiny(0.1).drop_path_rates(), vec![0.0, 0.05, 0.1]);
    }

    #[test]
    fn keep_mask_is_unbiased_with_the_right_drop_frequency() {
        let dev = Device::flex();
        let vit = tiny(0.2).init(&mut StdRng::seed_from_u64(0), &dev);
        let block = &vit.blocks[2];
        let n = 20_000;
        let mask = block.keep_mask(n, &mut StdRng::seed_from_u64(1), &dev).into_data().try_to_vec::<f32>().unwrap();
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64;
        assert!(mask.iter().all(|&m| m == 0.0 || (m - 1.25).abs() < 1e-6));
        let sigma = (n as f64 * 0.2 * 0.8).sqrt();
        assert!((dropped - n as f64 * 0.2).abs() < 3.0 * sigma, "{dropped} dropped of {n}");
    }

    #[test]
    fn stochastic_depth_only_when_asked() {
        let dev = Device::flex();
        let x = Tensor::<4>::ones([4, 3, 8, 8], &dev);
        let vit = tiny(0.0).init(&mut StdRng::seed_from_u64(0), &dev);
        let plain = host(vit.forward(x.clone()));
        assert_eq!(plain, host(vit.forward_train(x.clone(), Some(&mut StdRng::seed_from_u64(2)), Precision::F32)));
        let vit = tiny(0.9).init(&mut StdRng::seed_from_u64(0), &dev);
        let plain = host(vit.forward(x.clone()));
        assert_eq!(plain, host(vit.forward(x.clone())), "deterministic without an rng");
        assert_ne!(plain, host(vit.forward_train(x, Some(&mut StdRng::seed_from_u64(2)), Precision::F32)));
    }
}
