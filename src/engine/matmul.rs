//! The engine's matrix products: C = A·B with f32 accumulation, on bf16 inputs (the way AMX's
//! `tdpbf16ps` and AVX512-BF16's `vdpbf16ps` compute it) or on f32 inputs. A is a row-major
//! matrix padded to whole 32×32 blocks, or the transpose of one (read by columns, so weight
//! gradients and the attention's backward pass need no transposed copies); B is packed once
//! into 16-column strips (for bf16, the pairs of k interleaved in 16×16 tiles as both
//! instructions read them); results come out 32×32 f32 blocks at a time through a caller's
//! closure, so bias, activation and residual passes fuse into the store. The blocks
//! themselves are computed by the selected path's kernel in `cpu.rs`.

use rayon::prelude::*;

pub use super::cpu::{BLOCK, Layout};
use super::cpu::{Cpu, K_STEP, Plain, Products, columns_to_rows_plain, prefetch};

/// Matrices of at least this many values are packed on several threads.
const PARALLEL_PACK_MIN: usize = 1 << 16;
/// How many packed entry rows ahead (8 matrix rows at f32, 16 at bf16) `repack` and
/// `pack_band` prefetch the rows they read (8 and 16 measured the same).
const PREFETCH_ROWS: usize = 8;

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

/// A number type the products take as input: bf16 (its bits, `u16`) or `f32`.
pub trait Element: Plain + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static {
    /// One packed entry of B: a k-pair of bf16 in a `u32`, or one `f32`.
    type Packed: Plain + Default + PartialEq + Send + Sync + std::fmt::Debug;
    /// k values per packed entry.
    const DEPTH: usize;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// The packed entry of `DEPTH` consecutive k values.
    fn pack(values: [Self; 2]) -> Self::Packed;
    /// Whether [`Element::block`] reads A by columns itself; otherwise a column-major A is
    /// transposed to rows 32 at a time first (bf16: both bf16 instructions take k-pairs from
    /// rows).
    const READS_COLUMNS: bool;
    /// One 32×32 block of A·B on the selected path (see [`Products`]) from two strips of B;
    /// `entries` packed entries deep.
    fn block(products: &Products, a: &[Self], a_stride: usize, layout: Layout, strips: [&[Self::Packed]; 2], entries: usize, out: &mut [f32; BLOCK * BLOCK]);
    /// The 32-row band of a column-major A as a row-major panel (see
    /// [`Products::bf16_columns_to_rows`]), for elements whose kernels read rows only (not
    /// `READS_COLUMNS`): in plain code unless the element has a faster one.
    fn columns_to_rows(_: &Products, columns: &[Self], stride: usize, depth: usize, panel: &mut [Self]) {
        columns_to_rows_plain(columns, stride, depth, panel);
    }
}

impl Element for u16 {
    type Packed = u32;
    const DEPTH: usize = 2;
    const READS_COLUMNS: bool = false;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        to_bf16(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        from_bf16(self)
    }
    #[inline(always)]
    fn pack([lo, hi]: [Self; 2]) -> u32 {
        lo as u32 | (hi as u32) << 16
    }
    fn block(products: &Products, a: &[u16], a_stride: usize, layout: Layout, [b0, b1]: [&[u32]; 2], entries: usize, out: &mut [f32; BLOCK * BLOCK]) {
        assert_eq!(layout, Layout::Rows, "bf16 blocks read A by rows");
        products.block_bf16(a, a_stride, b0, b1, entries, out);
    }
    fn columns_to_rows(products: &Products, columns: &[u16], stride: usize, depth: usize, panel: &mut [u16]) {
        products.bf16_columns_to_rows(columns, stride, depth, panel);
    }
}

impl Element for f32 {
    type Packed = f32;
    const DEPTH: usize = 1;
    const READS_COLUMNS: bool = true;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn pack([value, _]: [Self; 2]) -> f32 {
        value
    }
    fn block(products: &Products, a: &[f32], a_stride: usize, layout: Layout, strips: [&[f32]; 2], entries: usize, out: &mut [f32; BLOCK * BLOCK]) {
        products.block_f32(a, a_stride, layout, strips, entries, out);
    }
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// Bytes in a cache line.
const LINE: usize = 64;

/// A buffer of `len` values whose first value sits on a cache-line boundary. Rows of the
/// engine's matrices and strips of packed B are whole lines long, so with the start aligned
/// each tile row and each vector load reads one line instead of straddling two (the
/// allocator aligns to 16 bytes only).
struct Aligned<T> {
    buffer: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    fn new(len: usize) -> Self {
        const { assert!(size_of::<T>() > 0 && LINE.is_multiple_of(size_of::<T>()), "values must tile a cache line") };
        let mut aligned = Self { buffer: Vec::new(), start: 0, len: 0 };
        aligned.resize(len);
        aligned
    }

    /// Makes the buffer `len` values long. Its values are kept only while it does not grow
    /// past its allocation (a new allocation starts zeroed): callers rewrite it after a resize.
    fn resize(&mut self, len: usize) {
        let slack = LINE / size_of::<T>();
        if self.buffer.len() < len + slack {
            self.buffer = vec![T::default(); len + slack];
        }
        self.start = self.buffer.as_ptr().align_offset(LINE);
        assert!(self.start < slack, "a buffer of {} cannot start on a cache line", std::any::type_name::<T>());
        self.len = len;
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buffer[self.start..self.start + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buffer[self.start..self.start + self.len]
    }
}

/// A row-major matrix, zero-padded to whole 32×32 blocks (the kernels read whole blocks).
pub struct Matrix<E> {
    rows: usize,
    cols: usize,
    stride: usize,
    data: Aligned<E>,
}

impl<E: Element> Matrix<E> {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        let stride = round_up(cols.max(1), K_STEP);
        Self { rows, cols, stride, data: Aligned::new(round_up(rows.max(1), BLOCK) * stride) }
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
    pub fn data_mut(&mut self) -> &mut [E] {
        &mut self.data
    }

    pub fn row(&self, r: usize) -> &[E] {
        &self.data[r * self.stride..r * self.stride + self.cols]
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [E] {
        &mut self.data[r * self.stride..r * self.stride + self.cols]
    }

    /// All values, padding included, for building views.
    pub fn view_data(&self) -> &[E] {
        &self.data
    }

    /// The whole matrix as a left-hand operand.
    pub fn view(&self) -> View<'_, E> {
        View { data: &self.data, rows: self.rows, cols: self.cols, stride: self.stride, layout: Layout::Rows }
    }

    /// The transpose of the whole matrix as a left-hand operand (read by columns).
    pub fn transposed(&self) -> View<'_, E> {
        View::transposed(&self.data, self.cols, self.rows, self.stride)
    }
}

/// A left-hand operand: `rows` rows of `cols` values, `stride` apart (by columns: `cols`
/// columns of `rows` values, `stride` apart), in a slice that holds every whole 32×32 block
/// they touch (kernels read whole blocks; rows past `rows` only feed results that are never
/// stored, columns past `cols` up to the next multiple of 32 must be finite, as B's padding
/// rows are zeros).
pub struct View<'a, E> {
    data: &'a [E],
    rows: usize,
    cols: usize,
    stride: usize,
    layout: Layout,
}

impl<E> Clone for View<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for View<'_, E> {}

impl<'a, E> View<'a, E> {
    /// A window into a larger row-major matrix, such as one head's columns. `cols` must be a
    /// multiple of 32, as the columns past it would enter the product.
    pub fn new(data: &'a [E], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(cols.is_multiple_of(K_STEP) && cols > 0 && stride >= cols, "a view needs whole 32-column slices within its stride");
        let needed = (round_up(rows.max(1), BLOCK) - 1) * stride + cols;
        assert!(data.len() >= needed, "a view of {rows} rows (stride {stride}) needs {needed} values, has {}", data.len());
        Self { data, rows, cols, stride, layout: Layout::Rows }
    }

    /// The transpose of a row-major matrix M as a left-hand operand: A [rows, cols] with
    /// A[i][k] = M[k][i] at `data[k · stride + i]`, read by columns. M's rows past `cols` up
    /// to the next multiple of 32 enter the product (B's padding is zero there), so they must
    /// be finite; its columns past `rows`, up to the next multiple of 32, are read too.
    pub fn transposed(data: &'a [E], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(cols > 0 && stride >= round_up(rows.max(1), BLOCK), "a transposed view needs whole 32-row blocks within its stride");
        let needed = (round_up(cols, K_STEP) - 1) * stride + round_up(rows.max(1), BLOCK);
        assert!(data.len() >= needed, "a transposed view of {cols} columns (stride {stride}) needs {needed} values, has {}", data.len());
        Self { data, rows, cols, stride, layout: Layout::Columns }
    }
}

/// The right-hand operand, packed in 16-column strips, each strip one contiguous run of its
/// k rows: entry r of column j holds k values r·DEPTH.. (for bf16 the pair (B[2r][j],
/// B[2r+1][j]) in one u32, the 16×16 tile layout of `tdpbf16ps`) and sits at
/// (j / 16) · strip_len + r · 16 + j % 16. Depth is padded with zeros to whole 32-deep slices.
pub struct Packed<E: Element> {
    k: usize,
    n: usize,
    k_tiles: usize,
    n_strips: usize,
    entries: Aligned<E::Packed>,
}

impl<E: Element> Default for Packed<E> {
    fn default() -> Self {
        Self { k: 0, n: 0, k_tiles: 0, n_strips: 0, entries: Aligned::new(0) }
    }
}

/// Rows of f32 as rows of `E`, on rayon's threads.
fn rows_as<'a, E: Element>(count: usize, len: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Vec<E> {
    let mut out = vec![E::default(); count * len];
    out.par_chunks_mut(len.max(1)).enumerate().for_each(|(i, dst)| {
        for (d, &v) in dst.iter_mut().zip(&row(i)[..len]) {
            *d = E::from_f32(v);
        }
    });
    out
}

impl<E: Element> Packed<E> {
    /// Packs the k×n matrix B whose row i is `row(i)` (n values).
    pub fn pack<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Self {
        let values = rows_as::<E>(k, n, row);
        let mut packed = Self::default();
        packed.repack(k, n, |i| &values[i * n..(i + 1) * n]);
        packed
    }

    /// Packs B = Mᵀ for the n×k matrix M whose row j is `row(j)` (k values).
    pub fn pack_transposed<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32] + Sync) -> Self {
        let values = rows_as::<E>(n, k, row);
        let mut packed = Self::default();
        packed.repack_transposed(k, n, |j| &values[j * k..(j + 1) * k]);
        packed
    }

    /// Entries in one strip.
    fn strip_len(&self) -> usize {
        self.k_tiles * K_STEP / E::DEPTH * 16
    }

    /// Sizes the entries for a k×n matrix. They keep whatever they held: the packing writes
    /// every entry, padding included, on the packing threads (zeroing the whole buffer first,
    /// on the calling thread, took 1.3% of a step).
    fn reset(&mut self, k: usize, n: usize) {
        self.k = k;
        self.n = n;
        self.k_tiles = k.div_ceil(K_STEP).max(1);
        self.n_strips = round_up(n.max(1), BLOCK) / 16;
        self.entries.resize(self.n_strips * self.strip_len());
    }

    /// Packs the k×n matrix whose row i is `row(i)`, reusing this allocation: `DEPTH` rows at
    /// a time into 16 contiguous entries per strip. Large matrices are packed strip by strip
    /// on rayon's threads, each strip prefetching its rows a few ahead of use: one cache line
    /// a row's width apart, which the hardware prefetchers do not follow (small ones are in
    /// cache already, and the hints would only cost).
    pub fn repack<'a>(&mut self, k: usize, n: usize, row: impl Fn(usize) -> &'a [E] + Sync) {
        self.reset(k, n);
        let zeros = [E::default(); 16];
        let entry_rows = k.div_ceil(E::DEPTH);
        let large = k * n >= PARALLEL_PACK_MIN;
        let fill = |(strip, entries): (usize, &mut [E::Packed])| {
            let j0 = strip * 16;
            if j0 >= n {
                entries.fill(E::Packed::default());
                return;
            }
            let width = (n - j0).min(16);
            for (r, dst) in entries.chunks_exact_mut(16).take(entry_rows).enumerate() {
                if large && E::DEPTH * (r + PREFETCH_ROWS + 1) <= k {
                    for d in 0..E::DEPTH {
                        prefetch(&row(E::DEPTH * (r + PREFETCH_ROWS) + d)[j0..j0 + width]);
                    }
                }
                let at = |d: usize| if E::DEPTH * r + d < k { &row(E::DEPTH * r + d)[j0..j0 + width] } else { &zeros[..width] };
                let (lo, hi) = (at(0), at(E::DEPTH - 1));
                for (c, dst) in dst[..width].iter_mut().enumerate() {
                    *dst = E::pack([lo[c], hi[c]]);
                }
                dst[width..].fill(E::Packed::default());
            }
            entries[16 * entry_rows..].fill(E::Packed::default());
        };
        let strip_len = self.strip_len();
        if large {
            self.entries.par_chunks_mut(strip_len).enumerate().for_each(fill);
        } else {
            self.entries.chunks_mut(strip_len).enumerate().for_each(fill);
        }
    }

    /// Packs Mᵀ for the n×k matrix M whose row j is `row(j)`, reusing this allocation: a row's
    /// consecutive k values are already one entry, so this is a transpose of entries. Large
    /// matrices are packed strip by strip on rayon's threads.
    pub fn repack_transposed<'a>(&mut self, k: usize, n: usize, row: impl Fn(usize) -> &'a [E] + Sync) {
        self.reset(k, n);
        let entry_rows = k.div_ceil(E::DEPTH);
        let cpu = Cpu::current();
        let fill = |(strip, entries): (usize, &mut [E::Packed])| {
            let columns = strip * 16..(strip * 16 + 16).min(n);
            // A strip of 16 columns whose entries fill whole 16-row tiles is one transpose of
            // words (an entry is one f32 or one pair of bf16, as the rows hold them) where the
            // CPU has one; otherwise entry by entry.
            let whole_tiles = columns.len() == 16 && entry_rows.is_multiple_of(16) && k == entry_rows * E::DEPTH;
            let transposed = whole_tiles && cpu.transpose_words(std::array::from_fn(|c| &row(columns.start + c)[..k]), entry_rows, &mut entries[..16 * entry_rows]);
            if !transposed {
                if columns.len() < 16 {
                    entries.fill(E::Packed::default());
                }
                for j in columns {
                    for (r, values) in row(j)[..k].chunks(E::DEPTH).enumerate() {
                        entries[16 * r + j % 16] = E::pack([values[0], values.get(1).copied().unwrap_or_default()]);
                    }
                }
            }
            entries[16 * entry_rows..].fill(E::Packed::default());
        };
        let strip_len = self.strip_len();
        if k * n >= PARALLEL_PACK_MIN {
            self.entries.par_chunks_mut(strip_len).enumerate().for_each(fill);
        } else {
            self.entries.chunks_mut(strip_len).enumerate().for_each(fill);
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// Computes rows `row0..row0 + 32` of A·B one 32-column block at a time, handing each block
/// (row-major, 32 wide) to `emit(col0, block)`.
fn row_block<E: Element>(products: &Products, a: View<E>, row0: usize, b: &Packed<E>, block: &mut [f32; BLOCK * BLOCK], mut emit: impl FnMut(usize, &[f32; BLOCK * BLOCK])) {
    let strip_len = b.strip_len();
    let first = match a.layout {
        Layout::Rows => &a.data[row0 * a.stride..],
        Layout::Columns => &a.data[row0..],
    };
    for pair in 0..b.n_strips / 2 {
        let strips = &b.entries[2 * pair * strip_len..];
        E::block(products, first, a.stride, a.layout, [&strips[..strip_len], &strips[strip_len..2 * strip_len]], strip_len / 16, block);
        emit(pair * BLOCK, block);
    }
}

/// Copies rows `row0..row0 + 32` of a column-major A into `panel`, contiguous: by columns
/// 32 apart for kernels that read columns (a straight copy; the kernel then reads one
/// sequential stream instead of lines a whole source row apart, which at strides near a
/// multiple of 4 KB fall into a few cache sets), else as a row-major 32-row matrix
/// (transposed, [`Element::columns_to_rows`]).
fn pack_band<'p, E: Element>(products: &Products, a: View<E>, row0: usize, panel: &'p mut Aligned<E>) -> View<'p, E> {
    let depth = round_up(a.cols, K_STEP);
    panel.resize(BLOCK * depth);
    if E::READS_COLUMNS {
        for (i, (dst, column)) in panel.chunks_exact_mut(BLOCK).zip(a.data[row0..].chunks(a.stride)).enumerate() {
            if let Some(ahead) = a.data.get(row0 + (i + PREFETCH_ROWS) * a.stride..) {
                prefetch(&ahead[..BLOCK.min(ahead.len())]);
            }
            dst.copy_from_slice(&column[..BLOCK]);
        }
        return View { data: panel, rows: BLOCK, cols: a.cols, stride: BLOCK, layout: Layout::Columns };
    }
    E::columns_to_rows(products, &a.data[row0..], a.stride, depth, panel);
    View { data: panel, rows: BLOCK, cols: a.cols, stride: depth, layout: Layout::Rows }
}

/// One 32×32 block of results, on its own cache lines (the AMX kernel stores whole tile rows).
#[repr(align(64))]
struct Block([f32; BLOCK * BLOCK]);

/// Hands `rows` rows of A·B from `first_row` on to `emit(dst, values, row, col0)`, one destination
/// row segment at a time.
fn product_rows<E: Element, T>(products: &Products, a: View<E>, b: &Packed<E>, (first_row, rows): (usize, usize), out: &mut [T], out_stride: usize, emit: &impl Fn(&mut [T], &[f32], usize, usize)) {
    let mut block = Block([0f32; BLOCK * BLOCK]);
    let block = &mut block.0;
    let mut panel = Aligned::new(0);
    for local0 in (0..rows).step_by(BLOCK) {
        let valid_rows = (rows - local0).min(BLOCK);
        let (a, row0) = match a.layout {
            Layout::Columns => (pack_band(products, a, first_row + local0, &mut panel), 0),
            Layout::Rows => (a, first_row + local0),
        };
        row_block(products, a, row0, b, block, |col0, values| {
            let cols = (b.n - col0).min(BLOCK);
            // The next block's destination lines, fetched while this one is stored and the
            // next computed: the results of a layer outgrow the caches, and without this each
            // block's stores waited on 64 lines from memory (products 3-8% faster, extraction
            // 4%, BENCHMARKS.md).
            if col0 + BLOCK < b.n {
                let next = (b.n - col0 - BLOCK).min(BLOCK);
                for r in 0..valid_rows {
                    prefetch(&out[(local0 + r) * out_stride + col0 + BLOCK..][..next]);
                }
            }
            for r in 0..valid_rows {
                let (at, row) = ((local0 + r) * out_stride + col0, first_row + local0 + r);
                if cols == BLOCK {
                    // Whole segments as slices of constant length: a store that copies them
                    // compiles to vector moves, not a memmove call per 128 bytes.
                    emit(&mut out[at..][..BLOCK], &values[r * BLOCK..][..BLOCK], row, col0);
                } else {
                    emit(&mut out[at..at + cols], &values[r * BLOCK..r * BLOCK + cols], row, col0);
                }
            }
        });
    }
}

fn check_shapes<E: Element, T>(a: View<E>, b: &Packed<E>, out: &[T], out_stride: usize) {
    assert_eq!(round_up(a.cols, K_STEP), b.k_tiles * K_STEP, "A's width {} does not match B's depth {}", a.cols, b.k);
    let needed = a.rows.saturating_sub(1) * out_stride + b.n;
    assert!(out_stride >= b.n && out.len() >= needed, "output holds {} values, {} rows of stride {out_stride} need {needed}", out.len(), a.rows);
}

/// A·B for all rows of `a`, split over rayon's threads by 32-row blocks. Row i's product lands
/// through `emit(dst, values, i, col0)` where `dst` is `out[i * out_stride + col0..]` (as long
/// as `values`), so the caller decides what storing means (add a bias, apply GELU, accumulate).
/// `out` may end right after the last row's n values.
pub fn matmul<E: Element, T: Send>(a: View<E>, b: &Packed<E>, out: &mut [T], out_stride: usize, emit: impl Fn(&mut [T], &[f32], usize, usize) + Sync) {
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
pub fn matmul_serial<E: Element, T>(a: View<E>, b: &Packed<E>, out: &mut [T], out_stride: usize, emit: impl Fn(&mut [T], &[f32], usize, usize)) {
    check_shapes(a, b, out, out_stride);
    Cpu::current().with_products(|products| product_rows(&products, a, b, (0, a.rows), out, out_stride, &emit));
}

/// A linear layer's weight gradient: grad [in, out] += inputsᵀ · dy, with `inputs` the layer
/// input [rows, in] (read by columns, no transposed copy) and `dy` the output gradient
/// [rows, out]. The sum runs over the batch's token rows, thousands deep, so it is split into
/// chunks whose packed `dy` (about 1 MB) stays in cache while every row block of inputsᵀ
/// passes over it; one product over all rows would stream the whole `dy` from memory once per
/// 32 input channels. The chunks fix the order of the sums: a change of chunk size changes the
/// last bits of the gradients (runs stay deterministic).
pub fn add_weight_gradient<E: Element>(inputs: &Matrix<E>, dy: &Matrix<E>, rows: usize, packed: &mut Packed<E>, grad: &mut [f32]) {
    let out = dy.cols();
    let (data, stride) = (dy.view_data(), dy.stride());
    let (input_data, input_stride) = (inputs.view_data(), inputs.stride());
    let chunk = ((1 << 20) / (size_of::<E>() * out.max(1))).clamp(BLOCK, 2048) / BLOCK * BLOCK;
    for first in (0..rows).step_by(chunk) {
        let depth = (rows - first).min(chunk);
        packed.repack(depth, out, |i| &data[(first + i) * stride..][..out]);
        // Input rows past `depth` meet the zero padding of packed dy's depth: they add nothing.
        let a = View::transposed(&input_data[first * input_stride..], inputs.cols(), depth, input_stride);
        matmul(a, packed, grad, out, |dst, v, _, _| super::gradients::add(dst, v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

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

    /// Odd sizes (not multiples of 16 or 32) in every dimension, deeper than one depth slice
    /// of the f32 kernel, against a plain f64 product of the inputs as `E` holds them: only
    /// the summation order differs. A is read by rows and, stored as its transpose, by columns.
    fn check_product<E: Element>() {
        eprintln!("engine path: {}, inputs {}", Cpu::current().path().name(), std::any::type_name::<E>());
        let (m, k, n) = (70, 150, 37);
        let mut rng = StdRng::seed_from_u64(0);
        let a_vals: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b_vals: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let round = |x: f32| E::from_f32(x).to_f32() as f64;
        let mut a = Matrix::<E>::zeros(m, k);
        for i in 0..m {
            for (dst, &v) in a.row_mut(i).iter_mut().zip(&a_vals[i * k..(i + 1) * k]) {
                *dst = E::from_f32(v);
            }
        }
        let b = Packed::<E>::pack(k, n, |i| &b_vals[i * n..(i + 1) * n]);
        let b_cols: Vec<Vec<f32>> = (0..n).map(|j| (0..k).map(|i| b_vals[i * n + j]).collect()).collect();
        let b_transposed = Packed::<E>::pack_transposed(k, n, |j| &b_cols[j]);
        assert_eq!(b.entries[..], b_transposed.entries[..], "the two packings differ");
        // Depth in whole 16-entry tiles: strips of 16 columns are packed as one transpose of
        // words where the CPU has one (AVX-512, AVX2), the last 8 columns entry by entry; for f32,
        // 48 deep leaves 16 padding entries per strip.
        let (k3, n3) = (48 * E::DEPTH, 40);
        let m3: Vec<Vec<f32>> = (0..n3).map(|_| (0..k3).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
        let rows3: Vec<f32> = (0..k3).flat_map(|i| m3.iter().map(move |column| column[i])).collect();
        let by_rows = Packed::<E>::pack(k3, n3, |i| &rows3[i * n3..][..n3]);
        let by_columns = Packed::<E>::pack_transposed(k3, n3, |j| &m3[j]);
        let columns3: Vec<Vec<E>> = m3.iter().map(|c| c.iter().map(|&v| E::from_f32(v)).collect()).collect();
        assert_eq!(by_rows.entries[..], by_columns.entries[..], "whole tiles: the two packings differ");
        let mut reused = Packed::<E>::pack(k3 + 40, n3 + 40, |_| &[1.0; 1000][..]);
        reused.repack_transposed(k3, n3, |j| &columns3[j]);
        assert_eq!(reused.entries[..], by_rows.entries[..], "whole tiles: repack_transposed into a used buffer");
        // Packing into a buffer that held a larger matrix of ones leaves no trace of it.
        let (k2, n2) = (k + 40, n + 40);
        let ones = vec![1.0f32; k2 * n2];
        let rows: Vec<E> = b_vals.iter().map(|&v| E::from_f32(v)).collect();
        let columns: Vec<Vec<E>> = b_cols.iter().map(|c| c.iter().map(|&v| E::from_f32(v)).collect()).collect();
        let mut reused = Packed::<E>::pack(k2, n2, |i| &ones[i * n2..][..n2]);
        reused.repack(k, n, |i| &rows[i * n..][..n]);
        assert_eq!(reused.entries[..], b.entries[..], "repack into a used buffer");
        let mut reused = Packed::<E>::pack(k2, n2, |i| &ones[i * n2..][..n2]);
        reused.repack_transposed(k, n, |j| &columns[j]);
        assert_eq!(reused.entries[..], b.entries[..], "repack_transposed into a used buffer");
        // Large enough to be packed on several threads, each task a run of strips; an odd depth
        // leaves bf16's last pair half empty.
        let (k4, n4) = (301, 250);
        assert!(k4 * n4 >= PARALLEL_PACK_MIN);
        let m4: Vec<Vec<E>> = (0..n4).map(|_| (0..k4).map(|_| E::from_f32(rng.random_range(-1.0..1.0))).collect()).collect();
        let rows4: Vec<E> = (0..k4).flat_map(|i| m4.iter().map(move |column| column[i])).collect();
        let mut by_rows = Packed::<E>::pack(k2, n2, |i| &ones[i * n2..][..n2]);
        by_rows.repack(k4, n4, |i| &rows4[i * n4..][..n4]);
        let mut by_columns = Packed::<E>::default();
        by_columns.repack_transposed(k4, n4, |j| &m4[j]);
        assert_eq!(by_rows.entries[..], by_columns.entries[..], "on several threads: the two packings differ");
        // The same A stored as its transpose and read by columns.
        let mut a_t = Matrix::<E>::zeros(k, m);
        for i in 0..m {
            for t in 0..k {
                a_t.row_mut(t)[i] = E::from_f32(a_vals[i * k + t]);
            }
        }
        let stride = n + 3;
        let mut by_columns = vec![f32::NAN; m * stride];
        matmul(a_t.transposed(), &b, &mut by_columns, stride, |dst, v, _, _| dst.copy_from_slice(v));
        let mut parallel = vec![f32::NAN; m * stride];
        matmul(a.view(), &b, &mut parallel, stride, |dst, v, _, _| dst.copy_from_slice(v));
        let mut serial = vec![f32::NAN; m * stride];
        matmul_serial(a.view(), &b, &mut serial, stride, |dst, v, _, _| dst.copy_from_slice(v));
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|t| round(a_vals[i * k + t]) * round(b_vals[t * n + j])).sum();
                let got = parallel[i * stride + j];
                assert!((got as f64 - want).abs() < 3e-5, "({i}, {j}): {got} vs {want}");
                assert_eq!(got.to_bits(), serial[i * stride + j].to_bits());
                assert_eq!(got.to_bits(), by_columns[i * stride + j].to_bits(), "A by columns differs at ({i}, {j})");
            }
            assert!(parallel[i * stride + n..(i + 1) * stride].iter().all(|v| v.is_nan()), "wrote past column {n}");
        }
    }

    fn check_weight_gradient<E: Element>() {
        // Deep enough for two chunks of packed dy, added onto a gradient that holds values;
        // the matrices hold rows past `rows`, which must not count.
        let (rows, inputs_width, out) = (2100, 40, 37);
        let mut rng = StdRng::seed_from_u64(1);
        let mut random = |r: usize, c: usize| {
            let mut m = Matrix::<E>::zeros(r, c);
            for i in 0..r {
                m.row_mut(i).iter_mut().for_each(|v| *v = E::from_f32(rng.random_range(-1.0..1.0)));
            }
            m
        };
        let (inputs, dy) = (random(rows + 50, inputs_width), random(rows + 50, out));
        let mut grad: Vec<f32> = (0..inputs_width * out).map(|i| i as f32).collect();
        add_weight_gradient(&inputs, &dy, rows, &mut Packed::default(), &mut grad);
        for i in 0..inputs_width {
            for j in 0..out {
                let sum: f64 = (0..rows).map(|r| inputs.row(r)[i].to_f32() as f64 * dy.row(r)[j].to_f32() as f64).sum();
                let want = (i * out + j) as f64 + sum;
                assert!((grad[i * out + j] as f64 - want).abs() < 2e-3, "({i}, {j}): {} vs {want}", grad[i * out + j]);
            }
        }
    }

    #[test]
    fn weight_gradients_match_a_plain_sum() {
        check_weight_gradient::<f32>();
        check_weight_gradient::<u16>();
    }

    #[test]
    fn bf16_products_match_a_plain_product_of_the_rounded_inputs() {
        check_product::<u16>();
    }

    #[test]
    fn f32_products_match_a_plain_product() {
        check_product::<f32>();
    }
}
