//! The ViT of `model::vit` on the engine: one network type, packed for inference (features
//! and intermediate layers for `extract`, `knn`, `linear` and the teacher in training) or for
//! training (the student: the forward pass also keeps the [`Tape`] that `backward.rs` runs
//! back over). Weights are packed once per network, the residual stream stays in f32, every
//! matrix product takes `E` inputs (bf16 or f32) with f32 accumulation, and each product's
//! bias, GELU or residual add is fused into its store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::cpu::Cpu;
use super::gradients::zeros;
use super::matmul::{self, BLOCK, Element, Matrix, Packed, View};
use super::rows;
use crate::model::vit::{Block, keep_factors, position_embedding};
use crate::model::{LayerNorm, VisionTransformer};
use crate::weights::HostTensor;

/// What a network is packed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Features only: one set of buffers serves every block, and GELU is fused into fc1's store.
    Inference,
    /// The student's step: each Wᵀ is packed too, and the forward pass keeps a [`Tape`].
    Training,
}

/// A LayerNorm's parameters on the host.
pub(super) struct Norm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

/// A LayerNorm's input as its backward pass needs it: the standardised rows and 1/σ per row.
pub(super) struct Standardized {
    pub xhat: Vec<f32>,
    pub inv: Vec<f32>,
}

impl Standardized {
    /// Room for `rows` rows of width `dim`, or nothing when `kept` is false (inference).
    fn new(rows: usize, dim: usize, kept: bool) -> Self {
        if kept { Self { xhat: zeros(rows * dim), inv: zeros(rows) } } else { Self { xhat: Vec::new(), inv: Vec::new() } }
    }
}

impl Norm {
    pub fn new(norm: &LayerNorm) -> Self {
        Self { weight: host(norm.weight.val()), bias: host(norm.bias.val()), eps: norm.eps as f32 }
    }

    /// Normalises every row of `x` (width `dim`) into `out`, the next product's input; with
    /// `saved` (training) x̂ and 1/σ are kept there for the backward pass.
    fn forward_into<E: Element>(&self, x: &[f32], out: &mut Matrix<E>, saved: Option<&mut Standardized>) {
        let (dim, stride) = (out.cols(), out.stride());
        let rows = x.len() / dim;
        let pairs = out.data_mut()[..rows * stride].par_chunks_mut(stride).zip(x.par_chunks(dim));
        match saved {
            None => pairs.for_each(|(dst, row)| rows::layer_norm_to(&mut dst[..dim], row, &self.weight, &self.bias, self.eps)),
            Some(saved) => pairs.zip(saved.xhat.par_chunks_mut(dim)).zip(saved.inv.par_iter_mut()).for_each(|(((dst, row), xhat), inv)| {
                *inv = rows::standardize(xhat, row, self.eps);
                rows::affine_to(&mut dst[..dim], xhat, &self.weight, &self.bias);
            }),
        }
    }
}

/// A Linear layer packed for the engine's products: W for the forward product and, for
/// training, Wᵀ for the input gradient.
pub(super) struct Dense<E: Element> {
    pub weight: Packed<E>,
    pub transposed: Option<Packed<E>>,
    pub bias: Vec<f32>,
}

impl<E: Element> Dense<E> {
    /// Packs W, and Wᵀ (for `dx = dy·Wᵀ`) in training mode.
    fn new(linear: &burn::nn::Linear, mode: Mode) -> Self {
        // burn keeps the weight as [in, out]: already the right-hand operand.
        let weight = HostTensor::from_tensor(linear.weight.val());
        let (k, n) = (weight.shape[0], weight.shape[1]);
        let row = |i: usize| &weight.values[i * n..(i + 1) * n];
        let bias = linear.bias.as_ref().map_or_else(|| vec![0.0; n], |b| host(b.val()));
        let transposed = (mode == Mode::Training).then(|| Packed::pack_transposed(n, k, row));
        Self { weight: Packed::pack(k, n, row), transposed, bias }
    }

    pub fn out_dim(&self) -> usize {
        self.weight.n()
    }
}

/// A transformer block packed for the engine's products.
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
    fn new(b: &Block, mode: Mode) -> Self {
        Self {
            norm1: Norm::new(&b.norm1),
            qkv: Dense::new(&b.attn.qkv, mode),
            proj: Dense::new(&b.attn.proj, mode),
            norm2: Norm::new(&b.norm2),
            fc1: Dense::new(&b.mlp.fc1, mode),
            fc2: Dense::new(&b.mlp.fc2, mode),
            drop_path: b.drop_path,
        }
    }
}

/// What one block computes from its input: on the tape in training, for the backward pass;
/// in inference, buffers the next block overwrites. Every buffer is written whole (its
/// padding left zero) before it is read, so buffers of the same [`ActivationShape`] are
/// reused from one forward pass to the next as they are (see [`Spare`]).
pub(super) struct BlockActivations<E: Element> {
    shape: ActivationShape,
    /// Stochastic depth's per-image factors of the two residual branches (training only).
    pub keep_attn: Option<Vec<f32>>,
    pub keep_mlp: Option<Vec<f32>>,
    /// The two norms' inputs (training only).
    pub norm1: Standardized,
    pub norm2: Standardized,
    /// The two norms' outputs: the inputs of the qkv and fc1 products (and of their weight
    /// gradients).
    pub normed1: Matrix<E>,
    pub normed2: Matrix<E>,
    /// [rows + one spare block, 3D], queries scaled: each image's heads are read in whole
    /// 32-row blocks.
    pub qkv: Matrix<E>,
    /// Attention weights, image-major then head, [N, N] each (training only; inference
    /// computes them in per-thread scratch).
    pub weights: Vec<Matrix<E>>,
    pub mixed: Matrix<E>,
    /// GELU's slope at fc1's outputs (training only; inference applies GELU in fc1's store):
    /// fc1's product stores its outputs here, and the GELU pass replaces them by the slope.
    pub gelu_slope: Option<Matrix<E>>,
    /// fc1's output after GELU.
    pub activated: Matrix<E>,
}

/// What a block's activation buffers hold room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ActivationShape {
    images: usize,
    tokens: usize,
    dim: usize,
    hidden: usize,
    heads: usize,
    mode: Mode,
}

/// Activation buffers handed back by finished passes (a tape once its backward pass is done,
/// inference's one set), for the next forward pass of the same shape: a training step would
/// otherwise zero gigabytes of fresh buffers (4% of the ViT-Ti step on Sapphire Rapids).
/// Holds at most [`Spare::MAX`] sets, the oldest dropped first.
struct Spare;

impl Spare {
    const MAX: usize = 64;

    fn sets() -> std::sync::MutexGuard<'static, Vec<Box<dyn std::any::Any + Send>>> {
        static SETS: Mutex<Vec<Box<dyn std::any::Any + Send>>> = Mutex::new(Vec::new());
        SETS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A kept set of `shape`, if there is one. When there is none, the kept sets of the same
    /// element and mode (other shapes: a training run's last, smaller batch, or images of
    /// many sizes through the inference engine) are dropped, so sets of shapes that no longer
    /// come do not pile up.
    fn take<E: Element>(shape: ActivationShape) -> Option<BlockActivations<E>> {
        let mut sets = Self::sets();
        let same_kind = |set: &Box<dyn std::any::Any + Send>| set.downcast_ref::<BlockActivations<E>>().map(|a| a.shape);
        match sets.iter().position(|set| same_kind(set) == Some(shape)) {
            Some(at) => sets.remove(at).downcast().ok().map(|set| *set),
            None => {
                sets.retain(|set| same_kind(set).is_none_or(|kept| kept.mode != shape.mode));
                None
            }
        }
    }

    fn keep<E: Element>(set: BlockActivations<E>) {
        let mut sets = Self::sets();
        if sets.len() == Self::MAX {
            sets.remove(0);
        }
        sets.push(Box::new(set));
    }
}

/// The forward pass of one crop group, kept for its backward pass.
pub(super) struct Tape<E: Element> {
    pub images: usize,
    /// Tokens per image (cls and patches).
    pub tokens: usize,
    pub size: (usize, usize),
    pub patches: Matrix<E>,
    pub blocks: Vec<BlockActivations<E>>,
    /// The final norm's input at the cls rows.
    pub out: Standardized,
}

impl<E: Element> Drop for Tape<E> {
    fn drop(&mut self) {
        self.blocks.drain(..).for_each(Spare::keep);
    }
}

/// Host position embeddings [1 + patches, D] by input (height, width).
type PositionCache = HashMap<(usize, usize), Arc<Vec<f32>>>;

/// A ViT's weights packed for the engine in one [`Mode`]. The heads are read straight out of
/// the qkv rows in whole 32-wide slices, so their width is checked; the qkv product's column
/// scales are head_dim^-0.5 on the queries (as the f32 path scales q before QKᵀ) and 1 on
/// keys and values.
pub struct Vit<E: Element> {
    pub(super) mode: Mode,
    pub(super) patch_size: usize,
    pub(super) dim: usize,
    pub(super) num_heads: usize,
    pub(super) patch: Dense<E>,
    pub(super) cls_token: Vec<f32>,
    /// At the trained grid size, resized per input as `model::vit` does.
    pub(super) pos_embed: Tensor<3>,
    pub(super) blocks: Vec<PackedBlock<E>>,
    pub(super) norm: Norm,
    pub(super) qkv_scale: Vec<f32>,
    /// Position embeddings already resized, by input height and width.
    resized_pos: Mutex<PositionCache>,
}

pub(super) fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    HostTensor::from_tensor(t).values
}

/// The inference engine at the precision asked for. Build it with [`EngineVit::new`] after
/// [`super::check_precision`].
pub enum EngineVit {
    F32(Vit<f32>),
    Bf16(Vit<u16>),
}

impl EngineVit {
    /// Whether the engine can compute this ViT: its heads are whole 32-wide slices. (The
    /// engine computes on the host, so it stands in for burn on the CPU device only.)
    pub fn fits(vit: &VisionTransformer) -> bool {
        Self::fits_heads(vit.head_width())
    }

    /// Whether the engine computes attention heads `width` wide: whole 32-wide slices.
    pub fn fits_heads(width: usize) -> bool {
        width.is_multiple_of(32)
    }

    /// Packs a ViT's weights for inference at `precision`; an error when the engine's path
    /// cannot run or the heads are not a whole number of 32-wide slices.
    pub fn new(vit: &VisionTransformer, precision: super::Precision) -> anyhow::Result<Self> {
        Ok(match precision {
            super::Precision::F32 => Self::F32(Vit::new(vit, Mode::Inference)?),
            super::Precision::Bf16 => Self::Bf16(Vit::new(vit, Mode::Inference)?),
        })
    }

    pub fn patch_size(&self) -> usize {
        match self {
            Self::F32(v) => v.patch_size,
            Self::Bf16(v) => v.patch_size,
        }
    }

    /// See [`Vit::intermediate_layers`].
    pub fn intermediate_layers(&self, images: Tensor<4>, n: usize) -> Vec<Tensor<3>> {
        match self {
            Self::F32(v) => v.intermediate_layers(images, n),
            Self::Bf16(v) => v.intermediate_layers(images, n),
        }
    }
}

impl<E: Element> Vit<E> {
    /// Packs `vit`'s weights for `mode`; an error when `DINO_ENGINE_PATH` names a path this
    /// CPU cannot run, or the heads are not whole 32-wide slices.
    pub fn new(vit: &VisionTransformer, mode: Mode) -> anyhow::Result<Self> {
        let what = match mode {
            Mode::Inference => "the inference engine",
            Mode::Training => "the training engine",
        };
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
        let head_dim = vit.head_width();
        anyhow::ensure!(EngineVit::fits(vit), "{what} needs a head width that is a multiple of 32, not {head_dim}");
        let num_heads = dim / head_dim;
        Ok(Self {
            mode,
            patch_size: vit.patch_size(),
            dim,
            num_heads,
            patch,
            cls_token: host(vit.cls_token.val()),
            pos_embed: vit.pos_embed.val().without_autodiff().detach(),
            blocks: vit.blocks.iter().map(|b| PackedBlock::new(b, mode)).collect(),
            norm: Norm::new(&vit.norm),
            qkv_scale: (0..3 * dim).map(|c| if c < dim { (head_dim as f32).powf(-0.5) } else { 1.0 }).collect(),
            resized_pos: Mutex::new(HashMap::new()),
        })
    }

    /// The image features [B, D] (the cls token after the final norm) of one crop group of
    /// normalised images [B, 3, H, W] given as host values and, in training mode, the tape for
    /// [`Vit::backward`]. Stochastic depth is drawn from `rng` exactly as
    /// `VisionTransformer::forward_train` draws it (none without `rng`).
    pub(super) fn forward(&self, pixels: &[f32], images: usize, (h, w): (usize, usize), rng: Option<&mut StdRng>) -> (Vec<f32>, Option<Tape<E>>) {
        let dim = self.dim;
        let (x, patches, blocks) = self.stream(pixels, images, (h, w), rng, |_, _| {});
        let tokens = x.len() / (images * dim);
        // The final norm, at the cls rows only.
        let mut out = Standardized::new(images, dim, true);
        let mut features = zeros(images * dim);
        for ((i, xhat), feature) in out.xhat.chunks_mut(dim).enumerate().zip(features.chunks_mut(dim)) {
            out.inv[i] = rows::standardize(xhat, &x[i * tokens * dim..][..dim], self.norm.eps);
            rows::affine_to(feature, xhat, &self.norm.weight, &self.norm.bias);
        }
        let tape = (self.mode == Mode::Training).then_some(Tape { images, tokens, size: (h, w), patches, blocks, out });
        (features, tape)
    }

    /// As `VisionTransformer::intermediate_layers`: the normalised tokens [B, 1 + patches, D]
    /// after each of the last `n` blocks, for normalised images [B, 3, H, W].
    pub fn intermediate_layers(&self, images: Tensor<4>, n: usize) -> Vec<Tensor<3>> {
        let [batch, channels, h, w] = images.dims();
        assert_eq!(channels, 3, "images must have 3 channels");
        let device = images.device();
        let dim = self.dim;
        let tokens = 1 + (h / self.patch_size) * (w / self.patch_size);
        let first_kept = self.blocks.len().saturating_sub(n);
        let mut outputs = Vec::new();
        self.stream(&host(images), batch, (h, w), None, |block, x| {
            if block >= first_kept {
                let mut out = vec![0f32; x.len()];
                out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(dst, row)| {
                    rows::layer_norm(dst, row, &self.norm.weight, &self.norm.bias, self.norm.eps);
                });
                outputs.push(Tensor::from_data(TensorData::new(out, [batch, tokens, dim]), &device));
            }
        });
        outputs
    }

    /// The residual stream [B·(1 + patches), D] after the last block, each block's output
    /// handed to `after_block(block, x)` on the way; in training mode also the patch rows and
    /// every block's activations for the tape.
    fn stream(&self, pixels: &[f32], images: usize, (h, w): (usize, usize), mut rng: Option<&mut StdRng>, mut after_block: impl FnMut(usize, &[f32])) -> (Vec<f32>, Matrix<E>, Vec<BlockActivations<E>>) {
        let p = self.patch_size;
        let tokens_per_image = 1 + (h / p) * (w / p);
        let patches = patch_rows(pixels, images, (h, w), p);
        let mut x = tokens(&patches, &self.patch, &self.cls_token, &self.position_embedding(h, w), images);
        let mut kept = Vec::new();
        // Inference hands one block's buffers on to the next; training keeps each block's.
        let mut handed_on = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let mut a = handed_on.take().unwrap_or_else(|| self.activations(images, tokens_per_image));
            (a.keep_attn, a.keep_mlp) = match rng.as_deref_mut() {
                Some(rng) if block.drop_path > 0.0 => (Some(keep_factors(block.drop_path, images, rng)), Some(keep_factors(block.drop_path, images, rng))),
                _ => (None, None),
            };
            self.block_forward(block, &mut x, &mut a, images, tokens_per_image);
            after_block(i, &x);
            match self.mode {
                Mode::Training => kept.push(a),
                Mode::Inference => handed_on = Some(a),
            }
        }
        if let Some(a) = handed_on {
            Spare::keep(a);
        }
        (x, patches, kept)
    }

    /// Buffers for one block's activations over `images` images of `tokens` tokens: spare
    /// ones of the same shape, else new.
    fn activations(&self, images: usize, tokens: usize) -> BlockActivations<E> {
        let training = self.mode == Mode::Training;
        let (rows, dim) = (images * tokens, self.dim);
        let hidden_dim = self.blocks.first().map_or(0, |b| b.fc1.out_dim());
        let shape = ActivationShape { images, tokens, dim, hidden: hidden_dim, heads: self.num_heads, mode: self.mode };
        if let Some(spare) = Spare::take(shape) {
            return spare;
        }
        BlockActivations {
            shape,
            keep_attn: None,
            keep_mlp: None,
            norm1: Standardized::new(rows, dim, training),
            norm2: Standardized::new(rows, dim, training),
            normed1: Matrix::zeros(rows, dim),
            normed2: Matrix::zeros(rows, dim),
            qkv: Matrix::zeros(rows + BLOCK, 3 * dim),
            weights: if training { (0..images * self.num_heads).map(|_| Matrix::zeros(tokens, tokens)).collect() } else { Vec::new() },
            mixed: Matrix::zeros(rows, dim),
            gelu_slope: training.then(|| Matrix::zeros(rows, hidden_dim)),
            activated: Matrix::zeros(rows, hidden_dim),
        }
    }

    /// One block over the residual stream `x` [rows, D], in place, its activations written into `a`.
    fn block_forward(&self, block: &PackedBlock<E>, x: &mut [f32], a: &mut BlockActivations<E>, images: usize, tokens: usize) {
        let training = self.mode == Mode::Training;
        let dim = self.dim;
        let rows = images * tokens;
        // x += keep · (v + bias), keep the image's stochastic-depth factor (1 without).
        let residual = |keep: &Option<Vec<f32>>, bias: &[f32], dst: &mut [f32], v: &[f32], r: usize, c: usize| match keep {
            None => rows::bias_accumulate(dst, v, &bias[c..]),
            Some(keep) => rows::bias_accumulate_scaled(dst, v, &bias[c..], keep[r / tokens]),
        };

        block.norm1.forward_into(x, &mut a.normed1, training.then_some(&mut a.norm1));
        let qkv_stride = a.qkv.stride();
        matmul::matmul(a.normed1.view(), &block.qkv.weight, a.qkv.data_mut(), qkv_stride, |dst, v, _, c| {
            rows::bias_scale_to(dst, v, &block.qkv.bias[c..], &self.qkv_scale[c..]);
        });
        self.attention(&a.qkv, images, tokens, &mut a.mixed, &mut a.weights);
        matmul::matmul(a.mixed.view(), &block.proj.weight, x, dim, |dst, v, r, c| residual(&a.keep_attn, &block.proj.bias, dst, v, r, c));

        block.norm2.forward_into(x, &mut a.normed2, training.then_some(&mut a.norm2));
        let stride = a.activated.stride();
        match &mut a.gelu_slope {
            Some(slope) => {
                matmul::matmul(a.normed2.view(), &block.fc1.weight, slope.data_mut(), stride, |dst, v, _, c| rows::bias_to(dst, v, &block.fc1.bias[c..]));
                let (width, valid) = (slope.cols(), rows * stride);
                let pairs = a.activated.data_mut()[..valid].par_chunks_mut(stride).zip(slope.data_mut()[..valid].par_chunks_mut(stride));
                pairs.for_each(|(dst, h)| rows::gelu_keeping_slope(&mut dst[..width], &mut h[..width]));
            }
            None => {
                let activated = &mut a.activated.data_mut()[..rows * stride];
                matmul::matmul(a.normed2.view(), &block.fc1.weight, activated, stride, |dst, v, _, c| rows::bias_gelu_to(dst, v, &block.fc1.bias[c..]));
            }
        }
        matmul::matmul(a.activated.view(), &block.fc2.weight, x, dim, |dst, v, r, c| residual(&a.keep_mlp, &block.fc2.bias, dst, v, r, c));
    }

    fn position_embedding(&self, h: usize, w: usize) -> Arc<Vec<f32>> {
        let mut cache = self.resized_pos.lock().expect("position cache poisoned");
        cache.entry((h, w)).or_insert_with(|| Arc::new(host(position_embedding(self.pos_embed.clone(), self.patch_size, h, w)))).clone()
    }

    /// Multi-head self-attention of each image (one image per task), from the qkv rows
    /// [B·N, 3D] (queries already scaled) into the heads' concatenated outputs, the
    /// attention weights into `kept` (one [N, N] per image and head) in training, into
    /// per-thread scratch when `kept` is empty.
    fn attention(&self, qkv: &Matrix<E>, images: usize, tokens: usize, mixed: &mut Matrix<E>, kept: &mut [Matrix<E>]) {
        let heads = self.num_heads;
        let shape = HeadShape { dim: self.dim, head_dim: self.dim / heads, tokens };
        let stride = mixed.stride();
        let outputs = mixed.data_mut()[..images * tokens * stride].par_chunks_mut(tokens * stride).enumerate();
        let head = |scratch: &mut HeadScratch<E>, image: usize, head: usize, weights: &mut Matrix<E>, out: &mut [E]| {
            head_attention(qkv, shape, (image, head), scratch, weights, &mut out[head * shape.head_dim..], stride);
        };
        if kept.is_empty() {
            outputs.for_each_init(
                || (HeadScratch::default(), Matrix::zeros(tokens, tokens)),
                |(scratch, weights), (image, out)| (0..heads).for_each(|h| head(scratch, image, h, weights, out)),
            );
        } else {
            outputs.zip(kept.par_chunks_mut(heads)).for_each_init(HeadScratch::default, |scratch, ((image, out), weights)| {
                weights.iter_mut().enumerate().for_each(|(h, weights)| head(scratch, image, h, weights, out));
            });
        }
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
            let want = vit.intermediate_layers(images.clone(), 2, crate::engine::Precision::F32);
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
