//! bf16 matrix products: C = A·B with bf16 inputs and f32 accumulation, the way AMX's
//! `tdpbf16ps` and AVX512-BF16's `vdpbf16ps` compute it. A is a row-major bf16 matrix padded to
//! whole 32×32 blocks; B is packed once into the layout both instructions read (pairs of k
//! interleaved per column, in 16×16 tiles); results come out 32×32 f32 blocks at a time
//! through a caller's closure, so bias, activation and residual passes fuse into the store.
//! The blocks themselves are computed by the selected path's kernel in `cpu.rs`.

use rayon::prelude::*;

pub use super::cpu::BLOCK;
use super::cpu::{Cpu, K_STEP, Products, TILE_PAIRS};

/// Matrices of at least this many values are packed on several threads.
const PARALLEL_PACK_MIN: usize = 1 << 16;

/// f32 to bf16 with round-to-nearest-even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return 0x7fc0;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// bf16 to f32 (exact).
#[inline(always)]
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// A row-major bf16 matrix, zero-padded to whole 32×32 blocks (tile loads read whole blocks).
pub struct BfMatrix {
    rows: usize,
    cols: usize,
    stride: usize,
    data: Vec<u16>,
}

impl BfMatrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        let stride = round_up(cols.max(1), K_STEP);
        Self { rows, cols, stride, data: vec![0; round_up(rows.max(1), BLOCK) * stride] }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Distance between rows, in values (`cols` rounded up to 32).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// All rows, padding included, for callers that fill rows in parallel.
    pub fn data_mut(&mut self) -> &mut [u16] {
        &mut self.data
    }

    pub fn row(&self, r: usize) -> &[u16] {
        &self.data[r * self.stride..r * self.stride + self.cols]
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [u16] {
        &mut self.data[r * self.stride..r * self.stride + self.cols]
    }

    /// All values, padding included, for building views.
    pub fn view_data(&self) -> &[u16] {
        &self.data
    }

    /// The whole matrix as a left-hand operand.
    pub fn view(&self) -> BfView<'_> {
        BfView { data: &self.data, rows: self.rows, cols: self.cols, stride: self.stride }
    }
}

/// A left-hand operand: `rows` rows of `cols` bf16 values, `stride` apart, in a slice that
/// holds every whole 32×32 block they touch (tile loads read whole blocks; rows past `rows`
/// only feed results that are never stored).
#[derive(Clone, Copy)]
pub struct BfView<'a> {
    data: &'a [u16],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> BfView<'a> {
    /// A window into a larger row-major bf16 matrix, such as one head's columns. `cols` must
    /// be a multiple of 32, as the columns past it would enter the product.
    pub fn new(data: &'a [u16], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(cols.is_multiple_of(K_STEP) && cols > 0 && stride >= cols, "a view needs whole 32-column slices within its stride");
        let needed = (round_up(rows.max(1), BLOCK) - 1) * stride + cols;
        assert!(data.len() >= needed, "a view of {rows} rows (stride {stride}) needs {needed} values, has {}", data.len());
        Self { data, rows, cols, stride }
    }
}

/// The right-hand operand, packed into tdpbf16ps's layout: for each 16-column strip and each
/// 32-deep k slice, a tile of 16 rows by 16 columns whose entries are k-pairs: row r, column c
/// holds (B[2r][c], B[2r+1][c]) as two bf16 in one u32. The pair (2r, 2r+1) of column j is at
/// ((j / 16) · k_tiles + r / 16) · 256 + (r % 16) · 16 + j % 16: each strip is one contiguous
/// run of tiles.
#[derive(Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    k_tiles: usize,
    n_strips: usize,
    pairs: Vec<u32>,
}

/// Rows of f32 as rows of bf16, on rayon's threads.
fn rows_to_bf16<'a>(count: usize, len: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Vec<u16> {
    let mut out = vec![0u16; count * len];
    out.par_chunks_mut(len.max(1)).enumerate().for_each(|(i, dst)| {
        for (d, &v) in dst.iter_mut().zip(&row(i)[..len]) {
            *d = to_bf16(v);
        }
    });
    out
}

impl PackedB {
    /// Packs the k×n matrix B whose row i is `row(i)` (n values).
    pub fn pack<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Self {
        let values = rows_to_bf16(k, n, row);
        let mut packed = Self::default();
        packed.repack_bf16(k, n, |i| &values[i * n..(i + 1) * n]);
        packed
    }

    /// Packs B = Mᵀ for the n×k matrix M whose row j is `row(j)` (k values).
    pub fn pack_transposed<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Self {
        let values = rows_to_bf16(n, k, row);
        let mut packed = Self::default();
        packed.repack_bf16_transposed(k, n, |j| &values[j * k..(j + 1) * k]);
        packed
    }

    fn reset(&mut self, k: usize, n: usize) {
        self.k = k;
        self.n = n;
        self.k_tiles = k.div_ceil(K_STEP).max(1);
        self.n_strips = round_up(n.max(1), BLOCK) / 16;
        self.pairs.clear();
        self.pairs.resize(self.n_strips * self.k_tiles * TILE_PAIRS, 0);
    }

    /// Packs the k×n bf16 matrix whose row i is `row(i)`, reusing this allocation: rows two at
    /// a time, interleaved into 16 contiguous pairs per strip. Large matrices are packed
    /// strip by strip on rayon's threads (each strip is one contiguous run of tiles).
    pub fn repack_bf16<'a>(&mut self, k: usize, n: usize, row: impl Fn(usize) -> &'a [u16] + Sync) {
        self.reset(k, n);
        let tile_rows = self.k_tiles * TILE_PAIRS;
        let zeros = [0u16; 16];
        let fill = |(strip, pairs): (usize, &mut [u32])| {
            let j0 = strip * 16;
            if j0 >= n {
                return;
            }
            let width = (n - j0).min(16);
            for r in 0..k.div_ceil(2) {
                let lo = &row(2 * r)[j0..j0 + width];
                let hi = if 2 * r + 1 < k { &row(2 * r + 1)[j0..j0 + width] } else { &zeros[..width] };
                let at = (r / 16) * TILE_PAIRS + (r % 16) * 16;
                for (dst, (&l, &h)) in pairs[at..at + width].iter_mut().zip(lo.iter().zip(hi)) {
                    *dst = l as u32 | (h as u32) << 16;
                }
            }
        };
        if k * n >= PARALLEL_PACK_MIN {
            self.pairs.par_chunks_mut(tile_rows).enumerate().for_each(fill);
        } else {
            self.pairs.chunks_mut(tile_rows).enumerate().for_each(fill);
        }
    }

    /// Packs Mᵀ for the n×k bf16 matrix M whose row j is `row(j)`, reusing this allocation: a
    /// row's consecutive pairs are already the u32 entries, so this is a transpose of pairs.
    /// Large matrices are packed strip by strip on rayon's threads.
    pub fn repack_bf16_transposed<'a>(&mut self, k: usize, n: usize, row: impl Fn(usize) -> &'a [u16] + Sync) {
        self.reset(k, n);
        let tile_rows = self.k_tiles * TILE_PAIRS;
        let fill = |(strip, pairs): (usize, &mut [u32])| {
            for j in strip * 16..(strip * 16 + 16).min(n) {
                for (r, two) in row(j)[..k].chunks(2).enumerate() {
                    pairs[(r / 16) * TILE_PAIRS + (r % 16) * 16 + j % 16] = two[0] as u32 | (two.get(1).copied().unwrap_or(0) as u32) << 16;
                }
            }
        };
        if k * n >= PARALLEL_PACK_MIN {
            self.pairs.par_chunks_mut(tile_rows).enumerate().for_each(fill);
        } else {
            self.pairs.chunks_mut(tile_rows).enumerate().for_each(fill);
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// Computes rows `row0..row0 + 32` of A·B one 32-column block at a time, handing each block
/// (row-major, 32 wide) to `emit(col0, block)`.
fn row_block(products: &Products, a: BfView, row0: usize, b: &PackedB, block: &mut [f32; BLOCK * BLOCK], mut emit: impl FnMut(usize, &[f32; BLOCK * BLOCK])) {
    let strip_len = b.k_tiles * TILE_PAIRS;
    let rows = &a.data[row0 * a.stride..];
    for pair in 0..b.n_strips / 2 {
        let strips = &b.pairs[2 * pair * strip_len..];
        products.block(rows, a.stride, &strips[..strip_len], &strips[strip_len..2 * strip_len], b.k_tiles * 16, block);
        emit(pair * BLOCK, block);
    }
}

/// Hands `rows` rows of A·B from `first_row` on to `emit(dst, values, row, col0)`, one destination
/// row segment at a time.
fn product_rows<T>(products: &Products, a: BfView, b: &PackedB, (first_row, rows): (usize, usize), out: &mut [T], out_stride: usize, emit: &impl Fn(&mut [T], &[f32], usize, usize)) {
    let mut block = [0f32; BLOCK * BLOCK];
    for local0 in (0..rows).step_by(BLOCK) {
        let valid_rows = (rows - local0).min(BLOCK);
        row_block(products, a, first_row + local0, b, &mut block, |col0, values| {
            let cols = (b.n - col0).min(BLOCK);
            for r in 0..valid_rows {
                let at = (local0 + r) * out_stride + col0;
                emit(&mut out[at..at + cols], &values[r * BLOCK..r * BLOCK + cols], first_row + local0 + r, col0);
            }
        });
    }
}

fn check_shapes<T>(a: BfView, b: &PackedB, out: &[T], out_stride: usize) {
    assert_eq!(round_up(a.cols, K_STEP), b.k_tiles * K_STEP, "A's width {} does not match B's depth {}", a.cols, b.k);
    let needed = a.rows.saturating_sub(1) * out_stride + b.n;
    assert!(out_stride >= b.n && out.len() >= needed, "output holds {} values, {} rows of stride {out_stride} need {needed}", out.len(), a.rows);
}

/// A·B for all rows of `a`, split over rayon's threads by 32-row blocks. Row i's product lands
/// through `emit(dst, values, i, col0)` where `dst` is `out[i * out_stride + col0..]` (as long
/// as `values`), so the caller decides what storing means (add a bias, apply GELU, accumulate).
/// `out` may end right after the last row's n values.
pub fn matmul<T: Send>(a: BfView, b: &PackedB, out: &mut [T], out_stride: usize, emit: impl Fn(&mut [T], &[f32], usize, usize) + Sync) {
    check_shapes(a, b, out, out_stride);
    let cpu = Cpu::current();
    // Up to four blocks per task (few tile reconfigurations), fewer when that would leave
    // less than two tasks per thread (the short products of weight gradients).
    let blocks = a.rows.div_ceil(BLOCK);
    let rows_per_task = (blocks / (2 * rayon::current_num_threads())).clamp(1, 4) * BLOCK;
    out.par_chunks_mut(rows_per_task * out_stride)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * rows_per_task;
            if first < a.rows {
                cpu.with_products(|products| product_rows(&products, a, b, (first, (a.rows - first).min(rows_per_task)), chunk, out_stride, &emit));
            }
        });
}

/// As `matmul` on the calling thread only (for callers already running one task per thread).
pub fn matmul_serial<T>(a: BfView, b: &PackedB, out: &mut [T], out_stride: usize, emit: impl Fn(&mut [T], &[f32], usize, usize)) {
    check_shapes(a, b, out, out_stride);
    Cpu::current().with_products(|products| product_rows(&products, a, b, (0, a.rows), out, out_stride, &emit));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn bf16_round(x: f32) -> f32 {
        from_bf16(to_bf16(x))
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up to even.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }

    /// Odd sizes (not multiples of 16 or 32) in every dimension, against a plain f64 product
    /// of the bf16-rounded inputs: only the summation order differs.
    #[test]
    fn matmul_matches_a_plain_product_of_the_rounded_inputs() {
        eprintln!("engine path: {}", Cpu::current().path().name());
        let (m, k, n) = (70, 45, 37);
        let mut rng = StdRng::seed_from_u64(0);
        let a_vals: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b_vals: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut a = BfMatrix::zeros(m, k);
        for i in 0..m {
            for (dst, &v) in a.row_mut(i).iter_mut().zip(&a_vals[i * k..(i + 1) * k]) {
                *dst = to_bf16(v);
            }
        }
        let b = PackedB::pack(k, n, |i| &b_vals[i * n..(i + 1) * n]);
        let b_cols: Vec<Vec<f32>> = (0..n).map(|j| (0..k).map(|i| b_vals[i * n + j]).collect()).collect();
        let b_transposed = PackedB::pack_transposed(k, n, |j| &b_cols[j]);
        assert_eq!(b.pairs, b_transposed.pairs, "the two packings differ");
        let stride = n + 3;
        let mut parallel = vec![f32::NAN; m * stride];
        matmul(a.view(), &b, &mut parallel, stride, |dst, v, _, _| dst.copy_from_slice(v));
        let mut serial = vec![f32::NAN; m * stride];
        matmul_serial(a.view(), &b, &mut serial, stride, |dst, v, _, _| dst.copy_from_slice(v));
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|t| bf16_round(a_vals[i * k + t]) as f64 * bf16_round(b_vals[t * n + j]) as f64).sum();
                let got = parallel[i * stride + j];
                assert!((got as f64 - want).abs() < 1e-5, "({i}, {j}): {got} vs {want}");
                assert_eq!(got.to_bits(), serial[i * stride + j].to_bits());
            }
            assert!(parallel[i * stride + n..(i + 1) * stride].iter().all(|v| v.is_nan()), "wrote past column {n}");
        }
    }
}
