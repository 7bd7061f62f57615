//! The ViT forward pass of `model::vit` in bf16, for feature extraction: weights packed
//! once, the residual stream kept in f32, every matrix product's input rounded to bf16 with f32
//! accumulation, and each product's bias, GELU or residual add fused into its store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::cpu::Cpu;
use super::matmul::{self, Element, Matrix, Packed, View};
use super::rows;
use crate::model::vit::{Block, position_embedding};
use crate::model::{LayerNorm, VisionTransformer};
use crate::weights::HostTensor;

/// A LayerNorm's parameters on the host.
pub(super) struct Norm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl Norm {
    pub fn new(norm: &LayerNorm) -> Self {
        Self { weight: host(norm.weight.val()), bias: host(norm.bias.val()), eps: norm.eps as f32 }
    }

    /// Normalises every row of `x` (width `dim`) into `out`, the next product's input.
    fn normalize_into<E: Element>(&self, x: &[f32], out: &mut Matrix<E>) {
        let (dim, stride) = (out.cols(), out.stride());
        out.data_mut().par_chunks_mut(stride).zip(x.par_chunks(dim)).for_each(|(dst, row)| {
            rows::layer_norm_to(&mut dst[..dim], row, &self.weight, &self.bias, self.eps);
        });
    }
}

/// A Linear layer packed for the bf16 products: W for the forward product and, for training, Wᵀ for the
/// input gradient.
pub(super) struct Dense<E: Element> {
    pub weight: Packed<E>,
    pub transposed: Option<Packed<E>>,
    pub bias: Vec<f32>,
}

impl<E: Element> Dense<E> {
    pub fn new(linear: &burn::nn::Linear) -> Self {
        Self::packed(linear, false)
    }

    /// Also packs Wᵀ, for `dx = dy·Wᵀ`.
    pub fn trainable(linear: &burn::nn::Linear) -> Self {
        Self::packed(linear, true)
    }

    fn packed(linear: &burn::nn::Linear, with_transposed: bool) -> Self {
        // burn keeps the weight as [in, out]: already the right-hand operand.
        let weight = HostTensor::from_tensor(linear.weight.val());
        let (k, n) = (weight.shape[0], weight.shape[1]);
        let row = |i: usize| &weight.values[i * n..(i + 1) * n];
        let bias = linear.bias.as_ref().map_or_else(|| vec![0.0; n], |b| host(b.val()));
        let transposed = with_transposed.then(|| Packed::pack_transposed(n, k, row));
        Self { weight: Packed::pack(k, n, row), transposed, bias }
    }

    pub fn out_dim(&self) -> usize {
        self.weight.n()
    }
}

/// A transformer block packed for the bf16 products.
pub(super) struct PackedBlock<E: Element> {
    pub norm1: Norm,
    pub qkv: Dense<E>,
    pub proj: Dense<E>,
    pub norm2: Norm,
    pub fc1: Dense<E>,
    pub fc2: Dense<E>,
    pub drop_path: f64,
}

impl<E: Element> PackedBlock<E> {
    /// `trainable` also packs each Wᵀ for the backward pass.
    pub fn new(b: &Block, trainable: bool) -> Self {
        let dense = |l| if trainable { Dense::trainable(l) } else { Dense::new(l) };
        Self {
            norm1: Norm::new(&b.norm1),
            qkv: dense(&b.attn.qkv),
            proj: dense(&b.attn.proj),
            norm2: Norm::new(&b.norm2),
            fc1: dense(&b.mlp.fc1),
            fc2: dense(&b.mlp.fc2),
            drop_path: b.drop_path,
        }
    }
}

/// A ViT's weights packed for the engine, what both networks hold alike. The heads are read
/// straight out of the qkv rows in whole 32-wide slices, so their width is checked; the qkv
/// product's column scales are head_dim^-0.5 on the queries (as the f32 path scales q before
/// QKᵀ) and 1 on keys and values.
pub(super) struct PackedVit<E: Element> {
    pub patch_size: usize,
    pub dim: usize,
    pub num_heads: usize,
    pub patch: Dense<E>,
    pub cls_token: Vec<f32>,
    /// At the trained grid size, resized per input as `model::vit` does.
    pub pos_embed: Tensor<3>,
    pub blocks: Vec<PackedBlock<E>>,
    pub norm: Norm,
    pub qkv_scale: Vec<f32>,
}

impl<E: Element> PackedVit<E> {
    /// Packs `vit`'s weights (`trainable` also packs each Wᵀ for the backward pass); an error
    /// naming `what` when `DINO_ENGINE_PATH` names a path this CPU cannot run, or the heads
    /// are not whole 32-wide slices.
    pub fn new(vit: &VisionTransformer, trainable: bool, what: &str) -> anyhow::Result<Self> {
        Cpu::selected().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        let dim = vit.embed_dim();
        let conv = host(vit.patch_embed.weight.val());
        let k = conv.len() / dim;
        let patch = Dense {
            // The Conv2d weight [dim, 3, p, p] flattened is B's transpose.
            weight: Packed::pack_transposed(k, dim, |j| &conv[j * k..(j + 1) * k]),
            transposed: None,
            bias: host(vit.patch_embed.bias.val()),
        };
        let num_heads = vit.blocks.first().map_or(1, |b| b.attn.num_heads);
        let head_dim = dim / num_heads;
        anyhow::ensure!(head_dim.is_multiple_of(32), "{what} needs a head width that is a multiple of 32, not {head_dim}");
        Ok(Self {
            patch_size: vit.patch_size(),
            dim,
            num_heads,
            patch,
            cls_token: host(vit.cls_token.val()),
            pos_embed: vit.pos_embed.val().without_autodiff().detach(),
            blocks: vit.blocks.iter().map(|b| PackedBlock::new(b, trainable)).collect(),
            norm: Norm::new(&vit.norm),
            qkv_scale: (0..3 * dim).map(|c| if c < dim { (head_dim as f32).powf(-0.5) } else { 1.0 }).collect(),
        })
    }
}

/// Host position embeddings [1 + patches, D] by input (height, width).
type PositionCache = HashMap<(usize, usize), Arc<Vec<f32>>>;

/// A ViT packed for inference with `E` (bf16 or f32) products.
pub struct InferenceVit<E: Element> {
    net: PackedVit<E>,
    /// Position embeddings already resized, by input height and width.
    resized_pos: Mutex<PositionCache>,
}

pub(super) fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    HostTensor::from_tensor(t).values
}

/// The inference engine at the precision asked for. Build it with [`EngineVit::new`] after
/// [`super::check_available`] for bf16.
pub enum EngineVit {
    F32(InferenceVit<f32>),
    Bf16(InferenceVit<u16>),
}

impl EngineVit {
    /// Whether the engine can compute this ViT: its heads are whole 32-wide slices. (The
    /// engine computes on the host, so it stands in for burn on the CPU device only.)
    pub fn fits(vit: &VisionTransformer) -> bool {
        let head_dim = vit.embed_dim() / vit.blocks.first().map_or(1, |b| b.attn.num_heads);
        head_dim.is_multiple_of(32)
    }

    /// Packs a ViT's weights for `precision`; an error when the engine's path cannot run or
    /// the heads are not a whole number of 32-wide slices.
    pub fn new(vit: &VisionTransformer, precision: super::Precision) -> anyhow::Result<Self> {
        Ok(match precision {
            super::Precision::F32 => Self::F32(InferenceVit::new(vit)?),
            super::Precision::Bf16 => Self::Bf16(InferenceVit::new(vit)?),
        })
    }

    pub fn patch_size(&self) -> usize {
        match self {
            Self::F32(v) => v.net.patch_size,
            Self::Bf16(v) => v.net.patch_size,
        }
    }

    /// See [`InferenceVit::intermediate_layers`].
    pub fn intermediate_layers(&self, images: Tensor<4>, n: usize) -> Vec<Tensor<3>> {
        match self {
            Self::F32(v) => v.intermediate_layers(images, n),
            Self::Bf16(v) => v.intermediate_layers(images, n),
        }
    }
}

impl<E: Element> InferenceVit<E> {
    /// Packs a ViT's weights; an error when the engine's path cannot run or the heads are
    /// not a whole number of 32-wide slices.
    pub fn new(vit: &VisionTransformer) -> anyhow::Result<Self> {
        Ok(Self { net: PackedVit::new(vit, false, "the inference engine")?, resized_pos: Mutex::new(HashMap::new()) })
    }

    /// As `VisionTransformer::intermediate_layers`: the normalised tokens [B, 1 + patches, D]
    /// after each of the last `n` blocks, for normalised images [B, 3, H, W].
    pub fn intermediate_layers(&self, images: Tensor<4>, n: usize) -> Vec<Tensor<3>> {
        let [batch, channels, h, w] = images.dims();
        assert_eq!(channels, 3, "images must have 3 channels");
        let device = images.device();
        let dim = self.net.dim;
        let tokens = 1 + (h / self.net.patch_size) * (w / self.net.patch_size);
        let streams = self.streams(&host(images), batch, (h, w), n);
        streams
            .into_iter()
            .map(|x| {
                let mut out = vec![0f32; x.len()];
                out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(dst, row)| {
                    rows::layer_norm(dst, row, &self.net.norm.weight, &self.net.norm.bias, self.net.norm.eps);
                });
                Tensor::from_data(TensorData::new(out, [batch, tokens, dim]), &device)
            })
            .collect()
    }

    /// As `VisionTransformer::forward`: the image features [B, D] (the cls token after the
    /// final norm) of normalised images [B, 3, H, W] given as host values.
    pub fn features(&self, pixels: &[f32], batch: usize, (h, w): (usize, usize)) -> Vec<f32> {
        let dim = self.net.dim;
        let tokens = 1 + (h / self.net.patch_size) * (w / self.net.patch_size);
        let x = self.streams(pixels, batch, (h, w), 1).pop().expect("a ViT has at least one block");
        let mut out = vec![0f32; batch * dim];
        for (dst, image) in out.chunks_mut(dim).zip(x.chunks(tokens * dim)) {
            rows::layer_norm(dst, &image[..dim], &self.net.norm.weight, &self.net.norm.bias, self.net.norm.eps);
        }
        out
    }

    /// The residual stream [B·(1 + patches), D] after each of the last `n` blocks.
    fn streams(&self, pixels: &[f32], batch: usize, (h, w): (usize, usize), n: usize) -> Vec<Vec<f32>> {
        let (dim, p) = (self.net.dim, self.net.patch_size);
        let tokens = 1 + (h / p) * (w / p);
        let rows = batch * tokens;
        let mut x = self.embed(pixels, batch, (h, w));
        let mut normed = Matrix::<E>::zeros(rows, dim);
        // One spare block of rows: each image's heads are read in whole 32-row blocks.
        let mut qkv = Matrix::<E>::zeros(rows + matmul::BLOCK, 3 * dim);
        let mut mixed = Matrix::<E>::zeros(rows, dim);
        let mut hidden = Matrix::<E>::zeros(rows, self.net.blocks.first().map_or(1, |b| b.fc1.out_dim()));
        let mut outputs = Vec::new();
        for (i, block) in self.net.blocks.iter().enumerate() {
            block.norm1.normalize_into(&x, &mut normed);
            let scale = &self.net.qkv_scale;
            matmul::matmul(normed.view(), &block.qkv.weight, qkv.data_mut(), 3 * dim, |dst, v, _, c| {
                rows::bias_scale_to(dst, v, &block.qkv.bias[c..], &scale[c..]);
            });
            self.attention(&qkv, batch, tokens, &mut mixed);
            matmul::matmul(mixed.view(), &block.proj.weight, &mut x, dim, |dst, v, _, c| rows::bias_accumulate(dst, v, &block.proj.bias[c..]));
            block.norm2.normalize_into(&x, &mut normed);
            let stride = hidden.stride();
            let hidden_rows = &mut hidden.data_mut()[..rows * stride];
            matmul::matmul(normed.view(), &block.fc1.weight, hidden_rows, stride, |dst, v, _, c| rows::bias_gelu_to(dst, v, &block.fc1.bias[c..]));
            matmul::matmul(hidden.view(), &block.fc2.weight, &mut x, dim, |dst, v, _, c| rows::bias_accumulate(dst, v, &block.fc2.bias[c..]));
            if self.net.blocks.len() - i <= n {
                outputs.push(x.clone());
            }
        }
        outputs
    }

    /// The token stream [B·(1 + patches), D]: patch projections and the cls token, plus the
    /// position embedding.
    fn embed(&self, pixels: &[f32], batch: usize, (h, w): (usize, usize)) -> Vec<f32> {
        let flat = patch_rows(pixels, batch, (h, w), self.net.patch_size);
        tokens(&flat, &self.net.patch, &self.net.cls_token, &self.position_embedding(h, w), batch)
    }

    fn position_embedding(&self, h: usize, w: usize) -> Arc<Vec<f32>> {
        let mut cache = self.resized_pos.lock().expect("position cache poisoned");
        cache.entry((h, w)).or_insert_with(|| Arc::new(host(position_embedding(self.net.pos_embed.clone(), self.net.patch_size, h, w)))).clone()
    }

    /// Multi-head self-attention of each image (one image per task), from the qkv rows
    /// [B·N, 3D] (queries already scaled) into the heads' concatenated outputs.
    fn attention(&self, qkv: &Matrix<E>, images: usize, tokens: usize, mixed: &mut Matrix<E>) {
        let shape = HeadShape { dim: self.net.dim, head_dim: self.net.dim / self.net.num_heads, tokens };
        let stride = mixed.stride();
        mixed.data_mut()[..images * tokens * stride].par_chunks_mut(tokens * stride).enumerate().for_each_init(
            || (HeadScratch::default(), Matrix::zeros(tokens, tokens)),
            |(scratch, weights), (image, out)| {
                for head in 0..self.net.num_heads {
                    head_attention(qkv, shape, (image, head), scratch, weights, &mut out[head * shape.head_dim..], stride);
                }
            },
        );
    }
}

/// The patches of normalised images [B, 3, H, W] as rows [B·patches, 3·p·p] in the
/// Conv2d weight's (channel, row, column) order. Pixels past the last whole patch are dropped,
/// as in the f32 path.
pub(super) fn patch_rows<E: Element>(pixels: &[f32], batch: usize, (h, w): (usize, usize), p: usize) -> Matrix<E> {
    let (gh, gw) = (h / p, w / p);
    let patches = gh * gw;
    let mut flat = Matrix::zeros(batch * patches, 3 * p * p);
    let stride = flat.stride();
    flat.data_mut()[..batch * patches * stride].par_chunks_mut(patches * stride).zip(pixels.par_chunks(3 * h * w)).for_each(|(rows, image)| {
        for (patch, row) in rows.chunks_mut(stride).enumerate() {
            let (gy, gx) = (patch / gw, patch % gw);
            for c in 0..3 {
                for py in 0..p {
                    let src = &image[(c * h + gy * p + py) * w + gx * p..][..p];
                    rows::convert_row(&mut row[(c * p + py) * p..][..p], src);
                }
            }
        }
    });
    flat
}

/// The token stream [B·(1 + patches), D]: each image's cls token then its projected patches
/// (`flat`, from [`patch_rows`]), plus the position embedding `pos` [(1 + patches)·D].
pub(super) fn tokens<E: Element>(flat: &Matrix<E>, patch: &Dense<E>, cls_token: &[f32], pos: &[f32], batch: usize) -> Vec<f32> {
    let dim = patch.out_dim();
    let patches = pos.len() / dim - 1;
    let mut projected = vec![0f32; batch * patches * dim];
    matmul::matmul(flat.view(), &patch.weight, &mut projected, dim, |dst, v, _, c| rows::bias_add(dst, v, &patch.bias[c..]));
    let mut x = vec![0f32; batch * (patches + 1) * dim];
    x.par_chunks_mut((patches + 1) * dim).zip(projected.par_chunks(patches * dim)).for_each(|(image, patch_rows)| {
        let (cls, rest) = image.split_at_mut(dim);
        for ((d, &c), &e) in cls.iter_mut().zip(cls_token).zip(&pos[..dim]) {
            *d = c + e;
        }
        for ((d, &v), &e) in rest.iter_mut().zip(patch_rows).zip(&pos[dim..]) {
            *d = v + e;
        }
    });
    x
}

/// Widths of one attention: model width, head width, tokens per image.
#[derive(Clone, Copy)]
pub(super) struct HeadShape {
    pub dim: usize,
    pub head_dim: usize,
    pub tokens: usize,
}

/// Buffers one thread reuses across heads.
pub(super) struct HeadScratch<E: Element> {
    pub scores: Vec<f32>,
    pub packed: Packed<E>,
}

impl<E: Element> Default for HeadScratch<E> {
    fn default() -> Self {
        Self { scores: Vec::new(), packed: Packed::default() }
    }
}

/// One head of one image: softmax(q·kᵀ) into `weights` [N, N], then weights·v into `out`
/// (rows `out_stride` apart). q, k and v are read from the qkv rows [B·N, 3D] (queries
/// already scaled), which need one spare block of rows past the last image.
pub(super) fn head_attention<E: Element>(qkv: &Matrix<E>, shape: HeadShape, (image, head): (usize, usize), scratch: &mut HeadScratch<E>, weights: &mut Matrix<E>, out: &mut [E], out_stride: usize) {
    let HeadShape { dim, head_dim, tokens } = shape;
    let qkv_stride = qkv.stride();
    let data = qkv.view_data();
    let part = |p: usize| image * tokens * qkv_stride + p * dim + head * head_dim;
    let row = |p: usize, t: usize| &data[part(p) + t * qkv_stride..][..head_dim];
    let queries = View::new(&data[part(0)..], tokens, head_dim, qkv_stride);
    scratch.scores.resize(tokens * tokens, 0.0);
    scratch.packed.repack_transposed(head_dim, tokens, |t| row(1, t));
    matmul::matmul_serial(queries, &scratch.packed, &mut scratch.scores, tokens, |dst, v, _, _| dst.copy_from_slice(v));
    for (t, scores_row) in scratch.scores.chunks_mut(tokens).enumerate() {
        rows::softmax_to(weights.row_mut(t), scores_row);
    }
    scratch.packed.repack(tokens, head_dim, |t| row(2, t));
    matmul::matmul_serial(weights.view(), &scratch.packed, out, out_stride, |dst, v, _, _| rows::convert_row(dst, v));
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use crate::model::VitConfig;

    /// Largest absolute difference and smallest per-token cosine similarity.
    fn compare(a: Tensor<3>, b: Tensor<3>) -> (f32, f32) {
        let [_, _, d] = a.dims();
        let (a, b) = (host(a), host(b));
        let max_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        let min_cos = a
            .chunks(d)
            .zip(b.chunks(d))
            .map(|(x, y)| {
                let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
                let norm = |v: &[f32]| v.iter().map(|p| p * p).sum::<f32>().sqrt();
                dot / (norm(x) * norm(y))
            })
            .fold(1.0, f32::min);
        (max_diff, min_cos)
    }

    /// The engine against the f32 burn path on a random ViT (trained-size and resized inputs,
    /// odd token counts): the same network up to the products' input rounding, which is
    /// `max_diff` for bf16 and float summation order for f32.
    fn check_against_burn(precision: crate::engine::Precision, max_allowed: f32, min_cosine: f32) {
        eprintln!("engine path: {}, {precision:?}", Cpu::current().path().name());
        let device = Device::flex();
        let config = VitConfig { img_size: 48, patch_size: 8, embed_dim: 96, depth: 3, num_heads: 3, mlp_ratio: 4, drop_path_rate: 0.0 };
        let vit = config.init(&mut StdRng::seed_from_u64(0), &device);
        let engine = EngineVit::new(&vit, precision).unwrap();
        for (batch, h, w) in [(5, 48, 48), (3, 40, 57)] {
            let images = Tensor::<4>::random([batch, 3, h, w], Distribution::Normal(0.0, 1.0), &device);
            let want = vit.intermediate_layers(images.clone(), 2);
            let got = engine.intermediate_layers(images, 2);
            assert_eq!(got.len(), 2);
            for (g, f32_path) in got.into_iter().zip(want) {
                assert_eq!(g.dims(), f32_path.dims());
                let (max_diff, min_cos) = compare(g, f32_path);
                eprintln!("{batch}x{h}x{w}: max |diff| {max_diff}, min cosine {min_cos}");
                assert!(max_diff < max_allowed && min_cos > min_cosine, "max |diff| {max_diff}, min cosine {min_cos}");
            }
        }
    }

    #[test]
    fn bf16_matches_the_f32_path_up_to_bf16_rounding() {
        check_against_burn(crate::engine::Precision::Bf16, 0.05, 0.9999);
    }

    #[test]
    fn f32_matches_the_f32_path_up_to_summation_order() {
        check_against_burn(crate::engine::Precision::F32, 2e-4, 0.999_999);
    }
}
