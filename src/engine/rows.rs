//! The engines' element-wise passes, one row at a time: LayerNorm, softmax, bias + exact GELU,
//! bias + residual, each writing its result in the element type `E` the next matrix product
//! reads (bf16 or f32),
//! and the backward passes of LayerNorm, softmax and GELU for training.
//! Each is compiled for AVX-512, AVX2+FMA and plain code (`cpu::row_kernel!`) and runs at the
//! level of the engine's path.

use super::matmul::Element;

use super::cpu::row_kernel;

/// e^x for the whole f32 range, written so that it vectorises: x = n·ln2 + r with |r| ≤ ln2/2,
/// e^r by its degree-6 Taylor polynomial (relative error below 2e-7), 2^n through the exponent
/// bits. Inputs below -87.3 give the smallest normal number instead of a subnormal or 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    // ln 2 split in two so that n·ln2 is exact to f32 precision.
    let r = n.mul_add(-0.693_145_75, x);
    let r = n.mul_add(-1.428_606_8e-6, r);
    let p = (1.0 / 720.0f32).mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    // 2^n: n + 127 is a whole number in [1, 254], so adding 2^23 leaves it in the low mantissa
    // bits, which the shift moves into the exponent (no float-to-int conversion, which would
    // not vectorise).
    p * f32::from_bits((n + 127.0 + 8_388_608.0).to_bits() << 23)
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
#[inline(always)]
fn erf(x: f32) -> f32 {
    erf_given_gaussian(x, exp(-x * x))
}

/// erf(x) when exp(-x²) is already known (the GELU slope needs it too).
#[inline(always)]
fn erf_given_gaussian(x: f32, gaussian: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = 1.061_405_4f32.mul_add(t, -1.453_152_1);
    let poly = poly.mul_add(t, 1.421_413_8);
    let poly = poly.mul_add(t, -0.284_496_74);
    let poly = poly.mul_add(t, 0.254_829_6);
    let y = 1.0 - poly * t * gaussian;
    y.copysign(x)
}

/// GELU with the exact (erf) form, as the ViT's MLP uses.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU(x) exactly as [`gelu`] computes it, and its slope d GELU / dx = Φ(x) + x·φ(x): Φ's
/// erf at x/√2 and φ share one exp(-x²/2).
#[inline(always)]
fn gelu_with_slope(x: f32) -> (f32, f32) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let y = x * std::f32::consts::FRAC_1_SQRT_2;
    let gaussian = exp(-y * y);
    let cdf = 0.5 * (1.0 + erf_given_gaussian(y, gaussian));
    (x * cdf, cdf + x * INV_SQRT_2PI * gaussian)
}

row_kernel! {
    /// dst = gelu(h) for pre-activations h, and h replaced by gelu'(h): the training forward
    /// pass keeps the slope for the backward pass instead of the pre-activations, so the
    /// backward pass multiplies instead of evaluating erf and exp again.
    pub fn gelu_keeping_slope<E: Element>(dst: &mut [E], h: &mut [E]) {
        for (d, x) in dst.iter_mut().zip(h) {
            let (value, slope) = gelu_with_slope(x.to_f32());
            (*d, *x) = (E::from_f32(value), E::from_f32(slope));
        }
    }
}

row_kernel! {
    /// dst = v · factor, element by element (the gradient through GELU: the output gradient
    /// times the kept slope).
    pub fn multiply_to<E: Element>(dst: &mut [E], v: &[f32], factor: &[E]) {
        for ((d, &g), &f) in dst.iter_mut().zip(v).zip(factor) {
            *d = E::from_f32(g * f.to_f32());
        }
    }
}

row_kernel! {
    /// dst = v · scale.
    pub fn scale_to<E: Element>(dst: &mut [E], v: &[f32], scale: f32) {
        for (d, &x) in dst.iter_mut().zip(v) {
            *d = E::from_f32(x * scale);
        }
    }
}

row_kernel! {
    /// dst = gelu(v + bias).
    pub fn bias_gelu_to<E: Element>(dst: &mut [E], v: &[f32], bias: &[f32]) {
        for ((d, &x), &b) in dst.iter_mut().zip(v).zip(bias) {
            *d = E::from_f32(gelu(x + b));
        }
    }
}

row_kernel! {
    /// dst = v + bias.
    pub fn bias_add(dst: &mut [f32], v: &[f32], bias: &[f32]) {
        for ((d, &x), &b) in dst.iter_mut().zip(v).zip(bias) {
            *d = x + b;
        }
    }
}

row_kernel! {
    /// dst += v + bias (a residual branch landing on the stream).
    pub fn bias_accumulate(dst: &mut [f32], v: &[f32], bias: &[f32]) {
        for ((d, &x), &b) in dst.iter_mut().zip(v).zip(bias) {
            *d += x + b;
        }
    }
}

row_kernel! {
    /// dst += scale · (v + bias): a residual branch under stochastic depth (scale 0 for a
    /// dropped sample, 1 / keep-rate otherwise).
    pub fn bias_accumulate_scaled(dst: &mut [f32], v: &[f32], bias: &[f32], scale: f32) {
        for ((d, &x), &b) in dst.iter_mut().zip(v).zip(bias) {
            *d = (x + b).mul_add(scale, *d);
        }
    }
}

row_kernel! {
    /// dst = v + bias.
    pub fn bias_to<E: Element>(dst: &mut [E], v: &[f32], bias: &[f32]) {
        for ((d, &x), &b) in dst.iter_mut().zip(v).zip(bias) {
            *d = E::from_f32(x + b);
        }
    }
}

row_kernel! {
    /// dst = (v + bias) · scale, column by column.
    pub fn bias_scale_to<E: Element>(dst: &mut [E], v: &[f32], bias: &[f32], scale: &[f32]) {
        for (((d, &x), &b), &s) in dst.iter_mut().zip(v).zip(bias).zip(scale) {
            *d = E::from_f32((x + b) * s);
        }
    }
}

row_kernel! {
    /// dst = v.
    pub fn convert_row<E: Element>(dst: &mut [E], v: &[f32]) {
        for (d, &x) in dst.iter_mut().zip(v) {
            *d = E::from_f32(x);
        }
    }
}

/// Σ f(x) with sixteen partial sums, so the loop vectorises (a single running sum cannot).
#[inline(always)]
fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let (chunks, tail) = x.as_chunks::<16>();
    let mut lanes = [0f32; 16];
    for chunk in chunks {
        lanes = std::array::from_fn(|l| lanes[l] + f(chunk[l]));
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

/// LayerNorm of one row (two-pass mean and biased variance, as PyTorch), handing the
/// normalised, affine-transformed values to `store` in chunks.
#[inline(always)]
fn normalise(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, mut store: impl FnMut(usize, f32)) {
    let n = x.len() as f32;
    let mean = sum_by(x, |v| v) / n;
    let var = sum_by(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (i, ((&v, &w), &b)) in x.iter().zip(weight).zip(bias).enumerate() {
        store(i, ((v - mean) * inv).mul_add(w, b));
    }
}

row_kernel! {
    /// The standardised row x̂ = (x - mean) / sqrt(var + eps) (LayerNorm without its affine
    /// part, kept for the backward pass); returns 1 / sqrt(var + eps).
    pub fn standardize(xhat: &mut [f32], x: &[f32], eps: f32) -> f32 {
        let n = x.len() as f32;
        let mean = sum_by(x, |v| v) / n;
        let var = sum_by(x, |v| (v - mean) * (v - mean)) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (d, &v) in xhat.iter_mut().zip(x) {
            *d = (v - mean) * inv;
        }
        inv
    }
}

row_kernel! {
    /// dst = x̂·weight + bias: the affine part of LayerNorm.
    pub fn affine_to<E: Element>(dst: &mut [E], xhat: &[f32], weight: &[f32], bias: &[f32]) {
        for (((d, &v), &w), &b) in dst.iter_mut().zip(xhat).zip(weight).zip(bias) {
            *d = E::from_f32(v.mul_add(w, b));
        }
    }
}

row_kernel! {
    /// LayerNorm's input gradient for one row, added to `dx`: with g = dn·weight,
    /// dx += inv · (g - mean(g) - x̂·mean(g·x̂)).
    pub fn layer_norm_backward(dx: &mut [f32], dn: &[f32], xhat: &[f32], weight: &[f32], inv: f32) {
        assert!(weight.len() == dn.len() && xhat.len() == dn.len(), "LayerNorm backward: rows of different lengths");
        let n = dn.len() as f32;
        // Sixteen partial sums over whole chunks (indexing one array by i % 16 kept the loop
        // scalar), the tail apart.
        let (mut g_sum, mut gx_sum) = ([0f32; 16], [0f32; 16]);
        let ((dn16, _), (weight16, _), (xhat16, _)) = (dn.as_chunks::<16>(), weight.as_chunks::<16>(), xhat.as_chunks::<16>());
        for ((d, w), x) in dn16.iter().zip(weight16).zip(xhat16) {
            let g: [f32; 16] = std::array::from_fn(|l| d[l] * w[l]);
            g_sum = std::array::from_fn(|l| g_sum[l] + g[l]);
            gx_sum = std::array::from_fn(|l| g[l].mul_add(x[l], gx_sum[l]));
        }
        for i in dn16.len() * 16..dn.len() {
            let g = dn[i] * weight[i];
            g_sum[0] += g;
            gx_sum[0] += g * xhat[i];
        }
        let g_mean = g_sum.iter().sum::<f32>() / n;
        let gx_mean = gx_sum.iter().sum::<f32>() / n;
        for (((o, &d), &w), &x) in dx.iter_mut().zip(dn).zip(weight).zip(xhat) {
            *o += inv * (d * w - g_mean - x * gx_mean);
        }
    }
}

row_kernel! {
    /// Softmax's input gradient for one row: dst = p · (dp - Σ dp·p) for weights p.
    pub fn softmax_backward_to<E: Element>(dst: &mut [E], dp: &[f32], p: &[E]) {
        assert_eq!(p.len(), dp.len(), "softmax backward: rows of different lengths");
        let mut lanes = [0f32; 16];
        let ((dp16, _), (p16, _)) = (dp.as_chunks::<16>(), p.as_chunks::<16>());
        for (d, w) in dp16.iter().zip(p16) {
            lanes = std::array::from_fn(|l| d[l].mul_add(w[l].to_f32(), lanes[l]));
        }
        for i in dp16.len() * 16..dp.len() {
            lanes[0] += dp[i] * p[i].to_f32();
        }
        let dot: f32 = lanes.iter().sum();
        for ((o, &d), &w) in dst.iter_mut().zip(dp).zip(p) {
            *o = E::from_f32(w.to_f32() * (d - dot));
        }
    }
}

row_kernel! {
    /// LayerNorm of a row as the next matrix product's input.
    pub fn layer_norm_to<E: Element>(dst: &mut [E], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) {
        normalise(x, weight, bias, eps, |i, v| dst[i] = E::from_f32(v));
    }
}

row_kernel! {
    /// LayerNorm of a row in f32 (the network's outputs).
    pub fn layer_norm(dst: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) {
        normalise(x, weight, bias, eps, |i, v| dst[i] = v);
    }
}

row_kernel! {
    /// Softmax of a row of scores into attention weights.
    pub fn softmax_to<E: Element>(dst: &mut [E], scores: &mut [f32]) {
        // The larger by a plain comparison (one vmaxps; f32::max's NaN rule costs a compare
        // and a blend more, and NaN scores give NaN weights either way).
        let larger = |m: f32, s: f32| if s > m { s } else { m };
        let (chunks, tail) = scores.as_chunks::<16>();
        let mut lanes = [f32::NEG_INFINITY; 16];
        for chunk in chunks {
            lanes = std::array::from_fn(|l| larger(lanes[l], chunk[l]));
        }
        let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &s| larger(m, s));
        for s in scores.iter_mut() {
            *s = exp(*s - max);
        }
        let inv = 1.0 / sum_by(scores, |s| s);
        for (d, &s) in dst.iter_mut().zip(scores.iter()) {
            *d = E::from_f32(s * inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        for i in 0..=20_000 {
            let x = -87.0 + i as f32 * (88.0 + 87.0) / 20_000.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
    }

    #[test]
    fn gelu_matches_the_erf_form() {
        // erf values from a table (A&S Table 7.1 / any libm): erf(0.5), erf(1), erf(2).
        for (x, erf_x) in [(0.5f64, 0.520_499_877_813_046_5), (1.0, 0.842_700_792_949_714_9), (2.0, 0.995_322_265_018_952_7)] {
            assert!((erf(x as f32) as f64 - erf_x).abs() < 2e-7);
            assert!((erf(-x as f32) as f64 + erf_x).abs() < 2e-7);
        }
        // GELU(1) = 0.5 (1 + erf(1/√2)) = 0.841344746...
        assert!((gelu(1.0) as f64 - 0.841_344_746_068_542_9).abs() < 2e-7);
        assert!((gelu(-3.0) as f64 + 0.004_049_694_202_6).abs() < 2e-7);
        assert_eq!(gelu(0.0), 0.0);
    }

    /// The GELU slope against a central difference of the erf form in f64, and the value
    /// beside it equal to `gelu`'s bit for bit (training and inference compute one network).
    #[test]
    fn gelu_slope_is_the_derivative() {
        let gelu_slope = |x: f32| gelu_with_slope(x).1;
        for i in -400..=400 {
            let x = i as f32 * 0.0125;
            assert_eq!(gelu_with_slope(x).0.to_bits(), gelu(x).to_bits(), "gelu({x})");
        }
        let gelu64 = |x: f64| 0.5 * x * (1.0 + libm_erf(x / std::f64::consts::SQRT_2));
        for i in -40..=40 {
            let x = i as f64 * 0.125;
            let h = 1e-4;
            let want = (gelu64(x + h) - gelu64(x - h)) / (2.0 * h);
            assert!((gelu_slope(x as f32) as f64 - want).abs() < 1e-6, "gelu'({x}): {} vs {want}", gelu_slope(x as f32));
        }
    }

    /// erf in f64 by its Maclaurin series (converges fast on |x| ≤ 4), for the tests.
    fn libm_erf(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
