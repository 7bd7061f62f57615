//! Bicubic resampling written as matrices, equal to PyTorch's
//! `interpolate(mode="bicubic", align_corners=False)` with an explicit scale factor.
//!
//! Position embeddings are resized on every forward at a new resolution, and the resize must
//! stay differentiable on every backend; a matmul with a precomputed weight matrix is both.

use burn::tensor::{Device, Tensor};

use super::init::tensor_from_vec;

/// Keys' cubic convolution coefficient, as PyTorch (and OpenCV) use it.
const CUBIC_A: f64 = -0.75;

fn cubic_near(x: f64) -> f64 {
    ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
}

fn cubic_far(x: f64) -> f64 {
    ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A
}

/// The [out_size, in_size] matrix that resamples one axis. `scale_factor` is the factor given to
/// PyTorch (output/input); source positions are `(i + 0.5) / scale_factor - 0.5`, and taps past
/// the border repeat the edge sample.
pub fn bicubic_matrix(in_size: usize, out_size: usize, scale_factor: f64) -> Vec<f32> {
    // PyTorch turns the factor into a float32 step and computes positions in float32.
    let step = (1.0 / scale_factor) as f32;
    let mut m = vec![0f32; out_size * in_size];
    for i in 0..out_size {
        let src = step * (i as f32 + 0.5) - 0.5;
        let base = src.floor();
        let t = (src - base) as f64;
        let weights = [cubic_far(t + 1.0), cubic_near(t), cubic_near(1.0 - t), cubic_far(2.0 - t)];
        for (tap, w) in weights.iter().enumerate() {
            let j = (base as i64 - 1 + tap as i64).clamp(0, in_size as i64 - 1) as usize;
            m[i * in_size + j] += *w as f32;
        }
    }
    m
}

/// Resamples a [in_h, in_w, channels] grid to [out_h, out_w, channels], one matmul per axis.
pub fn resample_grid(
    grid: Tensor<3>,
    out_hw: [usize; 2],
    scale_factor_hw: [f64; 2],
    device: &Device,
) -> Tensor<3> {
    let [in_h, in_w, channels] = grid.dims();
    let [out_h, out_w] = out_hw;
    let rows = tensor_from_vec(bicubic_matrix(in_h, out_h, scale_factor_hw[0]), [out_h, in_h], device);
    let cols = tensor_from_vec(bicubic_matrix(in_w, out_w, scale_factor_hw[1]), [1, out_w, in_w], device);
    let along_h = rows.matmul(grid.reshape([in_h, in_w * channels]));
    cols.matmul(along_h.reshape([out_h, in_w, channels]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_identity_at_unit_scale() {
        for (n_in, n_out, s) in [(8, 4, 4.1 / 8.0), (14, 6, 6.1 / 14.0), (5, 9, 9.1 / 5.0)] {
            let m = bicubic_matrix(n_in, n_out, s);
            for row in m.chunks(n_in) {
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-6, "row sums to {sum}");
            }
        }
        let m = bicubic_matrix(5, 5, 1.0);
        for i in 0..5 {
            for j in 0..5 {
                assert!((m[i * 5 + j] - if i == j { 1.0 } else { 0.0 }).abs() < 1e-7);
            }
        }
    }

    #[test]
    fn halving_matches_hand_computed_taps() {
        // Factor 0.5: output 0 samples source position 0.5, so t = 0.5 and the taps are
        // (-0.09375, 0.59375, 0.59375, -0.09375) at indices -1, 0, 1, 2 (index -1 clamps to 0).
        let m = bicubic_matrix(4, 2, 0.5);
        let expected_row0 = [-0.09375 + 0.59375, 0.59375, -0.09375, 0.0];
        for (a, b) in m[..4].iter().zip(expected_row0) {
            assert!((a - b).abs() < 1e-7, "{a} vs {b}");
        }
    }
}
