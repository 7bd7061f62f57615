//! The student ViT's backward pass on the CPU, for `dino train`: from the [`Tape`] that
//! [`Vit::forward`] keeps in training mode, every matrix product — input gradients and weight
//! gradients — on `E` inputs (bf16 at `--precision bf16`, f32 otherwise) with f32
//! accumulation, while the LayerNorm and softmax statistics and the gradient sums stay in f32.
//! Every sum runs in a fixed order, so a step is the same on every run.
//!
//! Weights are packed from the burn student at every step and each gradient goes back with
//! its parameter (`graph.rs` registers them in burn's autodiff graph), so burn keeps owning
//! the weights, the optimiser state and the checkpoints.

use rayon::prelude::*;

use super::gradients::{BlockGrads, DenseGrads, Gradients, NormGrads, add, summed, zeros};
use super::matmul::{self, BLOCK, Element, Matrix, Packed, View};
use super::rows;
use super::vit::{BlockActivations, Dense, Norm, Standardized, Tape, Vit};
use crate::model::interpolate::bicubic_matrix;
use crate::model::vit::GridResize;

impl Norm {
    /// The backward pass from the output gradient `dn`: adds the input gradient to `dx` and
    /// the parameter gradients to `grads`.
    fn backward(&self, saved: &Standardized, dn: &[f32], dx: &mut [f32], grads: &mut NormGrads) {
        let dim = self.weight.len();
        const ROWS: usize = 64;
        let (dweight, dbias) = dx
            .par_chunks_mut(ROWS * dim)
            .zip(dn.par_chunks(ROWS * dim))
            .zip(saved.xhat.par_chunks(ROWS * dim))
            .zip(saved.inv.par_chunks(ROWS))
            .map(|(((dx, dn), xhat), inv)| {
                let (mut dweight, mut dbias) = (zeros(dim), zeros(dim));
                for (r, &inv) in inv.iter().enumerate() {
                    let (dn, xhat) = (&dn[r * dim..][..dim], &xhat[r * dim..][..dim]);
                    rows::layer_norm_backward(&mut dx[r * dim..][..dim], dn, xhat, &self.weight, inv);
                    for ((w, &d), &x) in dweight.iter_mut().zip(dn).zip(xhat) {
                        *w += d * x;
                    }
                    add(&mut dbias, dn);
                }
                (dweight, dbias)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold((zeros(dim), zeros(dim)), |(w, b), (w2, b2)| (summed(w, w2), summed(b, b2)));
        add(&mut grads.weight, &dweight);
        add(&mut grads.bias, &dbias);
    }
}

/// Buffers of one backward pass, reused from block to block.
struct Workspace<E: Element> {
    /// The output gradient of a D-wide product, [rows, D].
    dy: Matrix<E>,
    /// A LayerNorm's output gradient, f32 [rows, D].
    dn: Vec<f32>,
    d_hidden: Matrix<E>,
    /// With one spare block of rows, for per-image head views.
    d_mixed: Matrix<E>,
    d_qkv: Matrix<E>,
    packed: Packed<E>,
}

/// Column sums of the first `rows` rows of a matrix, added to `sums` (bias gradients). Partial
/// sums over fixed 64-row chunks, added in order: the same result on every run.
fn add_column_sums<E: Element>(m: &Matrix<E>, rows: usize, sums: &mut [f32]) {
    let (cols, stride) = (m.cols(), m.stride());
    let total = m.view_data()[..rows * stride]
        .par_chunks(64 * stride)
        .map(|chunk| {
            let mut acc = zeros(cols);
            for row in chunk.chunks(stride) {
                for (a, &v) in acc.iter_mut().zip(&row[..cols]) {
                    *a += v.to_f32();
                }
            }
            acc
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(zeros(cols), summed);
    add(sums, &total);
}

/// A residual branch's output gradient: keep · dx into `dy`, with `keep` the sample's
/// stochastic-depth scale (1 without), and its column sums (the branch's bias gradient) added
/// to `bias_grad`, summed as [`add_column_sums`] does.
fn branch_gradient<E: Element>(dx: &[f32], keep: Option<&[f32]>, tokens: usize, dy: &mut Matrix<E>, bias_grad: &mut [f32]) {
    const ROWS: usize = 64;
    let (dim, stride) = (dy.cols(), dy.stride());
    let rows = dx.len() / dim;
    let total = dy.data_mut()[..rows * stride]
        .par_chunks_mut(ROWS * stride)
        .zip(dx.par_chunks(ROWS * dim))
        .enumerate()
        .map(|(chunk, (dst, src))| {
            let mut acc = zeros(dim);
            for (i, (dst, row)) in dst.chunks_mut(stride).zip(src.chunks(dim)).enumerate() {
                let scale = keep.map_or(1.0, |k| k[(chunk * ROWS + i) / tokens]);
                rows::scale_to(&mut dst[..dim], row, scale);
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += scale * v;
                }
            }
            acc
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(zeros(dim), summed);
    add(bias_grad, &total);
}

/// Per-thread buffers of the attention backward pass.
struct AttentionScratch<E: Element> {
    d_weights: Vec<f32>,
    d_scores: Matrix<E>,
    packed: Packed<E>,
}

impl<E: Element> Vit<E> {
    /// Zero gradients for this network's parameters.
    pub(super) fn zero_gradients(&self) -> Gradients {
        let d = self.dim;
        let hidden = self.blocks.first().map_or(0, |b| b.fc1.out_dim());
        let block = || BlockGrads {
            norm1: NormGrads::zeros(d),
            qkv: DenseGrads::zeros(d, 3 * d),
            proj: DenseGrads::zeros(d, d),
            norm2: NormGrads::zeros(d),
            fc1: DenseGrads::zeros(d, hidden),
            fc2: DenseGrads::zeros(hidden, d),
        };
        Gradients {
            cls_token: zeros(d),
            pos_embed: zeros(self.pos_embed.dims()[1] * d),
            patch: DenseGrads::zeros(3 * self.patch_size * self.patch_size, d),
            blocks: (0..self.blocks.len()).map(|_| block()).collect(),
            norm: NormGrads::zeros(d),
        }
    }

    /// Adds the gradients of the parameters for the feature gradients `d_features` [B, D] of
    /// the forward pass that made `tape`.
    pub(super) fn backward(&self, tape: &Tape<E>, d_features: &[f32], grads: &mut Gradients) {
        let dim = self.dim;
        let (images, tokens_per_image) = (tape.images, tape.tokens);
        let rows = images * tokens_per_image;
        let mut dx = zeros(rows * dim);
        for i in 0..images {
            let (d, xhat) = (&d_features[i * dim..][..dim], &tape.out.xhat[i * dim..][..dim]);
            rows::layer_norm_backward(&mut dx[i * tokens_per_image * dim..][..dim], d, xhat, &self.norm.weight, tape.out.inv[i]);
            for ((w, &g), &x) in grads.norm.weight.iter_mut().zip(d).zip(xhat) {
                *w += g * x;
            }
            add(&mut grads.norm.bias, d);
        }

        let hidden_dim = self.blocks.first().map_or(0, |b| b.fc1.out_dim());
        let mut ws = Workspace {
            dy: Matrix::zeros(rows, dim),
            dn: zeros(rows * dim),
            d_hidden: Matrix::zeros(rows, hidden_dim),
            d_mixed: Matrix::zeros(rows + BLOCK, dim),
            d_qkv: Matrix::zeros(rows, 3 * dim),
            packed: Packed::default(),
        };
        for ((layers, saved), g) in self.blocks.iter().zip(&tape.blocks).zip(grads.blocks.iter_mut()).rev() {
            // MLP branch: x += keep · (gelu(h)·W2 + b2), h = n2·W1 + b1.
            branch_gradient(&dx, saved.keep_mlp.as_deref(), tokens_per_image, &mut ws.dy, &mut g.fc2.bias);
            let hidden_stride = saved.activated.stride();
            matmul::add_weight_gradient(&saved.activated, &ws.dy, rows, &mut ws.packed, &mut g.fc2.weight);
            let slope = saved.gelu_slope.as_ref().expect("a training tape keeps GELU's slope").view_data();
            matmul::matmul(ws.dy.view(), transposed_weight(&layers.fc2), ws.d_hidden.data_mut(), hidden_stride, |dst, v, r, c| {
                rows::multiply_to(dst, v, &slope[r * hidden_stride + c..]);
            });
            add_column_sums(&ws.d_hidden, rows, &mut g.fc1.bias);
            matmul::add_weight_gradient(&saved.normed2, &ws.d_hidden, rows, &mut ws.packed, &mut g.fc1.weight);
            matmul::matmul(ws.d_hidden.view(), transposed_weight(&layers.fc1), &mut ws.dn, dim, |dst, v, _, _| dst.copy_from_slice(v));
            layers.norm2.backward(&saved.norm2, &ws.dn, &mut dx, &mut g.norm2);

            // Attention branch: x += keep · (attention(n1·Wqkv + bqkv)·Wp + bp).
            branch_gradient(&dx, saved.keep_attn.as_deref(), tokens_per_image, &mut ws.dy, &mut g.proj.bias);
            matmul::add_weight_gradient(&saved.mixed, &ws.dy, rows, &mut ws.packed, &mut g.proj.weight);
            matmul::matmul(ws.dy.view(), transposed_weight(&layers.proj), ws.d_mixed.data_mut(), saved.mixed.stride(), |dst, v, _, _| rows::convert_row(dst, v));
            self.attention_backward(saved, &ws.d_mixed, images, tokens_per_image, &mut ws.d_qkv);
            add_column_sums(&ws.d_qkv, rows, &mut g.qkv.bias);
            matmul::add_weight_gradient(&saved.normed1, &ws.d_qkv, rows, &mut ws.packed, &mut g.qkv.weight);
            matmul::matmul(ws.d_qkv.view(), transposed_weight(&layers.qkv), &mut ws.dn, dim, |dst, v, _, _| dst.copy_from_slice(v));
            layers.norm1.backward(&saved.norm1, &ws.dn, &mut dx, &mut g.norm1);
        }
        self.embedding_backward(tape, &dx, grads);
    }

    /// Gradients of q, k and v [rows, 3D] from the heads' output gradient `d_mixed` [rows, D],
    /// one image per task: with P the kept weights, dP = dO·vᵀ, dS = P ⊙ (dP - rowsum(dP ⊙ P)),
    /// dq = dS·k · scale, dk = dSᵀ·q_scaled, dv = Pᵀ·dO.
    fn attention_backward(&self, saved: &BlockActivations<E>, d_mixed: &Matrix<E>, images: usize, tokens: usize, d_qkv: &mut Matrix<E>) {
        let (dim, heads) = (self.dim, self.num_heads);
        let head_dim = dim / heads;
        let scale = self.qkv_scale[0];
        let out_stride = d_qkv.stride();
        let (qkv, qkv_stride) = (saved.qkv.view_data(), saved.qkv.stride());
        let (d_out, d_stride) = (d_mixed.view_data(), d_mixed.stride());
        d_qkv.data_mut()[..images * tokens * out_stride].par_chunks_mut(tokens * out_stride).enumerate().for_each_init(
            || AttentionScratch {
                d_weights: zeros(tokens * tokens),
                d_scores: Matrix::zeros(tokens, tokens),
                packed: Packed::default(),
            },
            |s, (image, out)| {
                for head in 0..heads {
                    let weights = &saved.weights[image * heads + head];
                    let part = |p: usize| image * tokens * qkv_stride + p * dim + head * head_dim;
                    let row = |p: usize, t: usize| &qkv[part(p) + t * qkv_stride..][..head_dim];
                    let first = image * tokens * d_stride + head * head_dim;
                    let d_head = View::new(&d_out[first..], tokens, head_dim, d_stride);
                    let d_head_row = |t: usize| &d_out[first + t * d_stride..][..head_dim];

                    s.packed.repack_transposed(head_dim, tokens, |t| row(2, t));
                    matmul::matmul_serial(d_head, &s.packed, &mut s.d_weights, tokens, |dst, v, _, _| dst.copy_from_slice(v));
                    for t in 0..tokens {
                        rows::softmax_backward_to(s.d_scores.row_mut(t), &s.d_weights[t * tokens..][..tokens], weights.row(t));
                    }

                    s.packed.repack(tokens, head_dim, d_head_row);
                    let v_at = 2 * dim + head * head_dim;
                    matmul::matmul_serial(weights.transposed(), &s.packed, &mut out[v_at..], out_stride, |dst, v, _, _| rows::convert_row(dst, v));

                    s.packed.repack(tokens, head_dim, |t| row(1, t));
                    matmul::matmul_serial(s.d_scores.view(), &s.packed, &mut out[head * head_dim..], out_stride, |dst, v, _, _| rows::scale_to(dst, v, scale));

                    s.packed.repack(tokens, head_dim, |t| row(0, t));
                    let k_at = dim + head * head_dim;
                    matmul::matmul_serial(s.d_scores.transposed(), &s.packed, &mut out[k_at..], out_stride, |dst, v, _, _| rows::convert_row(dst, v));
                }
            },
        );
    }

    /// Gradients of the cls token, the position embedding (through the bicubic resize when
    /// the input was not at the trained size) and the patch projection from the token
    /// gradients `dx`.
    fn embedding_backward(&self, tape: &Tape<E>, dx: &[f32], grads: &mut Gradients) {
        let (dim, p) = (self.dim, self.patch_size);
        let (images, tokens_per_image) = (tape.images, tape.tokens);
        let patches = tokens_per_image - 1;
        let mut d_pos = zeros(tokens_per_image * dim);
        for image in dx.chunks(tokens_per_image * dim) {
            add(&mut d_pos, image);
        }
        add(&mut grads.cls_token, &d_pos[..dim]);
        for token in d_pos[dim..].chunks(dim) {
            add(&mut grads.patch.bias, token);
        }
        let (h, w) = tape.size;
        match GridResize::plan(grads.pos_embed.len() / dim - 1, p, h, w) {
            None => add(&mut grads.pos_embed, &d_pos),
            Some(GridResize { side, out: [gh, gw], scale }) => {
                // resized[a, b] = Σ_i Σ_j Rh[a, i]·Rw[b, j]·grid[i, j], so
                // d grid[i, j] = Σ_b Rw[b, j] · (Σ_a Rh[a, i]·d resized[a, b]).
                add(&mut grads.pos_embed[..dim], &d_pos[..dim]);
                let (rh, rw) = (bicubic_matrix(side, gh, scale[0]), bicubic_matrix(side, gw, scale[1]));
                let mut along_w = zeros(side * gw * dim);
                for a in 0..gh {
                    for i in 0..side {
                        let weight = rh[a * side + i];
                        for b in 0..gw {
                            let (src, dst) = (&d_pos[dim + (a * gw + b) * dim..][..dim], &mut along_w[(i * gw + b) * dim..][..dim]);
                            dst.iter_mut().zip(src).for_each(|(d, &s)| *d += weight * s);
                        }
                    }
                }
                for i in 0..side {
                    for b in 0..gw {
                        for j in 0..side {
                            let weight = rw[b * side + j];
                            let src = &along_w[(i * gw + b) * dim..][..dim];
                            let dst = &mut grads.pos_embed[dim + (i * side + j) * dim..][..dim];
                            dst.iter_mut().zip(src).for_each(|(d, &s)| *d += weight * s);
                        }
                    }
                }
            }
        }
        // d W_patch [D, 3p²] = d patchesᵀ · patches.
        let mut d_patches = Matrix::<E>::zeros(images * patches, dim);
        let stride = d_patches.stride();
        d_patches.data_mut()[..images * patches * stride].par_chunks_mut(stride).enumerate().for_each(|(r, row)| {
            let token = (r / patches) * tokens_per_image + 1 + r % patches;
            rows::convert_row(&mut row[..dim], &dx[token * dim..][..dim]);
        });
        matmul::add_weight_gradient(&d_patches, &tape.patches, images * patches, &mut Packed::default(), &mut grads.patch.weight);
    }
}

fn transposed_weight<E: Element>(dense: &Dense<E>) -> &Packed<E> {
    dense.transposed.as_ref().expect("training layers are packed with Wᵀ")
}
