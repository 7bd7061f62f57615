//! The engine's only contact with the instruction set: CPU detection, the [`Cpu`] token that
//! only detection can create, and every kernel that needs a CPU feature — the 32×32 block of a
//! matrix product (bf16 on AMX tiles or with AVX512-BF16 dot products, f32 with AVX-512 or
//! AVX2 FMAs, or plain code) and the compilations of the row kernels (`rows.rs`) for AVX-512,
//! AVX2+FMA and plain code — and the allocator setting that keeps the engine's freed buffers
//! for its next step.
//!
//! All `unsafe` of the engine is here. A kernel compiled for a feature is only called through
//! a token whose path detection granted, which is what makes those calls sound.
//!
//! `DINO_ENGINE_PATH` (amx, avx512bf16, avx2, portable) forces a path the CPU supports, so one
//! machine can test the lower paths; without it the best path is used. `DINO_ENGINE_PATH=burn`
//! turns the engine off: f32 ViTs run through burn's autodiff and tensor ops, as on GPUs.

use std::sync::OnceLock;

/// Environment variable that forces an engine path.
pub const PATH_VARIABLE: &str = "DINO_ENGINE_PATH";
/// Its value that turns the engine off.
const ENGINE_OFF: &str = "burn";

/// Depth of one k slice: packed B and A's rows are padded to whole slices (for bf16, one
/// 64-byte tile row).
pub(super) const K_STEP: usize = 32;
/// k-pairs in one packed bf16 tile (16 rows of 16).
const TILE_PAIRS: usize = 16 * 16;
/// Rows and columns of one product block.
pub const BLOCK: usize = 32;

/// How the engine computes, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// AMX tiles (Intel Sapphire Rapids and newer) for products, AVX-512 rows.
    Amx,
    /// AVX512-BF16 dot products (AMD Zen 4 and newer, Intel Cooper Lake) and AVX-512 rows.
    Avx512Bf16,
    /// Products and rows in f32 arithmetic on AVX2 and FMA: bf16 numbers without bf16
    /// hardware, for testing on any x86-64 of the last decade.
    Avx2,
    /// Plain code, correct on every target.
    Portable,
}

impl Path {
    pub const ALL: [Path; 4] = [Path::Amx, Path::Avx512Bf16, Path::Avx2, Path::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Path::Amx => "amx",
            Path::Avx512Bf16 => "avx512bf16",
            Path::Avx2 => "avx2",
            Path::Portable => "portable",
        }
    }

    /// Whether the CPU multiplies bf16 in hardware on this path.
    pub fn has_bf16_hardware(self) -> bool {
        matches!(self, Path::Amx | Path::Avx512Bf16)
    }

    /// Whether this CPU can run the path (and, for AMX, the kernel lets the process use tiles).
    fn supported(self) -> bool {
        match self {
            Path::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 => avx512_rows() && std::arch::is_x86_feature_detected!("avx512bf16"),
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Path::Amx => avx512_rows() && amx_granted(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// The AVX-512 subsets and FMA that the AVX-512 compilation of the row kernels uses.
#[cfg(target_arch = "x86_64")]
fn avx512_rows() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("fma")
}

/// AMX-BF16 and AMX-TILE present, and the large tile state granted (Linux gives it only on
/// request); asked once.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let amx = leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0;
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) takes two integers and touches no memory of
        // ours; it fails cleanly on kernels or CPUs without AMX.
        amx && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
    })
}

/// Keeps the memory the engine frees for its next allocations instead of handing it back to
/// the kernel. A training step allocates the same large buffers every step (the tape: each
/// block's activations), and pages fresh from the kernel cost a page fault and zeroing each:
/// 5-10% of a step (BENCHMARKS.md). glibc serves blocks over 128 KiB-32 MiB with mmap of their
/// own and unmaps them when freed; with mmap and trimming off, freed blocks go back to the
/// heap's free lists and the next step's buffers are carved from them, pages in place. The
/// peak is unchanged; the heap no longer shrinks after it.
pub(super) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's allocator parameters (under the allocator's own lock)
    // and touches no memory of ours; -1 is the documented value that turns trimming off.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Asks the CPU to bring the cache lines that hold `values` into L1 ahead of use, for accesses
/// a matrix row's width apart, which the hardware prefetchers do not follow: the packing of
/// weight-gradient operands, the destination rows of a product's next block (BENCHMARKS.md).
/// A hint only: it changes nothing but timing, and is a no-op off x86-64.
#[inline(always)]
pub(super) fn prefetch<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = size_of_val(values);
        // The first value's line, then every line that starts inside `values` (a slice that
        // does not start on a line boundary spans one line more than its length suggests).
        let next_line = 64 - values.as_ptr() as usize % 64;
        for offset in (bytes > 0).then_some(0).into_iter().chain((next_line..bytes).step_by(64)) {
            // SAFETY: `prefetcht0` (SSE, part of every x86-64) is a hint that never faults
            // and writes nothing; `offset` < the slice's length in bytes, so the address lies
            // within `values`.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(values.as_ptr().cast::<i8>().add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// Number types that kernels may move as raw words of another width.
///
/// # Safety
/// Implementors have no padding bytes and every bit pattern of their size is a value.
pub unsafe trait Plain: Copy {}
// SAFETY: integers and floats of these widths have no padding, and every bit pattern is one of
// their values (for f32, some are NaNs).
unsafe impl Plain for u16 {}
// SAFETY: as for u16.
unsafe impl Plain for u32 {}
// SAFETY: as for u16.
unsafe impl Plain for f32 {}

/// Proof that CPU detection granted a path: the only way to reach the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    path: Path,
}

/// How wide the row kernels run.
#[derive(Clone, Copy)]
pub(super) enum RowLevel {
    Avx512,
    Avx2,
    Portable,
}

impl Cpu {
    /// The paths this CPU can run, best first (the portable one always).
    pub fn supported() -> Vec<Path> {
        Path::ALL.into_iter().filter(|p| p.supported()).collect()
    }

    /// The path the engine uses: `DINO_ENGINE_PATH` when set, else the best this CPU has.
    /// An error names the variable when it asks for an unknown or unsupported path.
    pub fn selected() -> Result<Cpu, String> {
        static SELECTED: OnceLock<Result<Cpu, String>> = OnceLock::new();
        SELECTED.get_or_init(|| Self::select(std::env::var(PATH_VARIABLE).ok().as_deref())).clone()
    }

    /// Whether the selected path was forced by `DINO_ENGINE_PATH`.
    pub fn forced() -> bool {
        std::env::var_os(PATH_VARIABLE).is_some()
    }

    /// Whether `DINO_ENGINE_PATH=burn` turned the engine off.
    pub fn engine_off() -> bool {
        std::env::var(PATH_VARIABLE).is_ok_and(|v| v == ENGINE_OFF)
    }

    fn select(forced: Option<&str>) -> Result<Cpu, String> {
        let supported = Self::supported();
        let names = || supported.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ");
        let path = match forced {
            None | Some(ENGINE_OFF) => supported[0],
            Some(name) => {
                let path = Path::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| {
                    let all = Path::ALL.map(Path::name).join(", ");
                    format!("{PATH_VARIABLE}={name} is not an engine path (one of: {all}; or {ENGINE_OFF})")
                })?;
                if !supported.contains(&path) {
                    return Err(format!("{PATH_VARIABLE}={name}: this CPU cannot run that path (it can run: {})", names()));
                }
                path
            }
        };
        Ok(Cpu { path })
    }

    /// The selected path's token for kernels already behind a successful [`Cpu::selected`].
    pub(super) fn current() -> Cpu {
        Self::selected().expect("the engine is built only after its path was selected")
    }

    pub fn path(self) -> Path {
        self.path
    }

    pub(super) fn rows(self) -> RowLevel {
        match self.path {
            Path::Amx | Path::Avx512Bf16 => RowLevel::Avx512,
            Path::Avx2 => RowLevel::Avx2,
            Path::Portable => RowLevel::Portable,
        }
    }

    /// Transposes 16 rows of 32-bit words into `dst`: word w of row r lands at
    /// `dst[16 · w + r]`, for `words` words (a multiple of 16). Rows of bf16 are read as
    /// pairs (the low half the first value), so this packs a strip of B = Mᵀ from 16 of M's
    /// rows. Returns false, having written nothing, where the CPU has no fast transpose
    /// (callers then pack entry by entry).
    pub fn transpose_words<T: Plain, P: Plain>(self, rows: [&[T]; 16], words: usize, dst: &mut [P]) -> bool {
        assert!(size_of::<P>() == 4 && 4 % size_of::<T>() == 0, "words are 32 bits, rows hold whole words");
        assert!(words.is_multiple_of(16), "words come in whole 16-word tiles");
        // Divided rather than multiplied, so no size overflows into a passing check.
        assert!(rows.iter().all(|row| size_of_val(*row) / 4 >= words), "a row is shorter than {words} words");
        assert!(dst.len() / 16 >= words, "the strip holds 16 · {words} words");
        match self.rows() {
            #[cfg(target_arch = "x86_64")]
            RowLevel::Avx512 => {
                let starts = rows.map(|row| row.as_ptr().cast::<u8>());
                // SAFETY: the AVX-512 row level is granted only where AVX512F was detected;
                // the asserts above keep every load inside `rows` and every store inside
                // `dst`; T has no padding and every bit pattern is a value of P (`Plain`'s
                // contract).
                unsafe { transpose_words_avx512(starts, words, dst.as_mut_ptr().cast()) };
                true
            }
            #[cfg(target_arch = "x86_64")]
            RowLevel::Avx2 => {
                let starts = rows.map(|row| row.as_ptr().cast::<u8>());
                // SAFETY: the AVX2 row level is granted only where AVX2 was detected; bounds
                // and values as for AVX-512 above.
                unsafe { transpose_words_avx2(starts, words, dst.as_mut_ptr().cast()) };
                true
            }
            // Portable, and every level on other architectures (whose arms above are cfg'd
            // out).
            _ => false,
        }
    }

    /// Runs `f` with the products' per-thread state set up (AMX: the tile configuration,
    /// released after so context switches need not save it).
    pub(super) fn with_products<R>(self, f: impl FnOnce(Products) -> R) -> R {
        match self.path {
            #[cfg(target_arch = "x86_64")]
            Path::Amx => {
                // SAFETY: the token's path is AMX, so the process may use the tiles; the
                // configuration is a valid palette-1 layout in a 64-byte aligned static.
                unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly)) };
                let r = f(Products { cpu: self });
                // SAFETY: releasing the tile state is always allowed once it is configured.
                unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
                r
            }
            _ => f(Products { cpu: self }),
        }
    }
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
const TILE_CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// A thread's handle on the product kernels, alive while their state is set up.
pub struct Products {
    cpu: Cpu,
}

impl Products {
    /// One 32×32 block of A·B into `out` (row-major, 32 wide) from bf16 inputs: `a` holds A's
    /// 32 rows from the block's first, `a_stride` bf16 values apart, each at least `2 · pairs`
    /// wide; `b0` and `b1` are two 16-column strips of packed B (k-pairs interleaved, 16 per
    /// row, whole 16-row tiles), `pairs` k-pairs deep (a multiple of 16).
    pub fn block_bf16(&self, a: &[u16], a_stride: usize, b0: &[u32], b1: &[u32], pairs: usize, out: &mut [f32; BLOCK * BLOCK]) {
        assert!(pairs.is_multiple_of(16) && pairs > 0, "k-pairs come in whole tiles");
        assert!(a.len() >= (BLOCK - 1) * a_stride + 2 * pairs && a_stride >= 2 * pairs, "A's block is out of bounds");
        assert!(b0.len() >= 16 * pairs && b1.len() >= 16 * pairs, "B's strips are out of bounds");
        match self.cpu.path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token's path is AMX and `with_products` configured the tiles; the
            // asserts above keep every tile load inside `a`, `b0` and `b1`.
            Path::Amx => unsafe { block_amx(a.as_ptr(), a_stride, b0.as_ptr(), b1.as_ptr(), pairs, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token's path was granted only where AVX512-BF16 was detected; the
            // asserts above keep every load inside `a`, `b0` and `b1`.
            Path::Avx512Bf16 => unsafe { block_avx512bf16(a.as_ptr(), a_stride, b0.as_ptr(), b1.as_ptr(), pairs, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token's path was granted only where AVX2 and FMA were detected.
            Path::Avx2 => unsafe { block_avx2(a, a_stride, b0, b1, pairs, out) },
            _ => block_plain::<false>(a, a_stride, b0, b1, pairs, out),
        }
    }

    /// One 32×32 block of A·B into `out` from f32 inputs: as [`Products::block_bf16`] with
    /// one k value per entry and the two strips as one pair, `depth` deep (a multiple of 32),
    /// A laid out as `layout` says (by columns: A's k-th column is the 32 values at
    /// `a[k · a_stride..]`, so a product with the transpose of a row-major matrix needs no
    /// transposed copy). AMX and AVX512-BF16 machines use their AVX-512 units.
    pub fn block_f32(&self, a: &[f32], a_stride: usize, layout: Layout, [b0, b1]: [&[f32]; 2], depth: usize, out: &mut [f32; BLOCK * BLOCK]) {
        assert!(depth.is_multiple_of(16) && depth > 0, "k comes in whole slices");
        let (lines, line_len) = match layout {
            Layout::Rows => (BLOCK, depth),
            Layout::Columns => (depth, BLOCK),
        };
        assert!(a.len() >= (lines - 1) * a_stride + line_len && a_stride >= line_len, "A's block is out of bounds");
        assert!(b0.len() >= 16 * depth && b1.len() >= 16 * depth, "B's strips are out of bounds");
        match (self.cpu.path, layout) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AMX and AVX512-BF16 paths are granted only where AVX512F was detected;
            // the asserts above keep every load inside `a`, `b0` and `b1`.
            (Path::Amx | Path::Avx512Bf16, Layout::Rows) => unsafe { block_f32_avx512::<false>(a.as_ptr(), a_stride, b0.as_ptr(), b1.as_ptr(), depth, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for A by columns.
            (Path::Amx | Path::Avx512Bf16, Layout::Columns) => unsafe { block_f32_avx512::<true>(a.as_ptr(), a_stride, b0.as_ptr(), b1.as_ptr(), depth, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX2 path is granted only where AVX2 and FMA were detected; the
            // asserts above keep every load inside `a`, `b0` and `b1`.
            (Path::Avx2, Layout::Rows) => unsafe { block_f32_avx2::<false>(a.as_ptr(), a_stride, [b0.as_ptr(), b1.as_ptr()], depth, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for A by columns.
            (Path::Avx2, Layout::Columns) => unsafe { block_f32_avx2::<true>(a.as_ptr(), a_stride, [b0.as_ptr(), b1.as_ptr()], depth, out) },
            _ => block_f32_plain(a, a_stride, layout, b0, b1, depth, out),
        }
    }
}

impl Products {
    /// The 32-row band of A = Mᵀ whose columns are M's rows: writes A's 32 rows, `depth`
    /// values each, row-major into `panel` (rows `depth` apart) from M's first `depth` rows,
    /// each read for 32 values from `columns[k · stride..]`. `depth` is a multiple of 32.
    /// With AVX-512, as 16×16 transposes of k-pairs in registers.
    pub fn bf16_columns_to_rows(&self, columns: &[u16], stride: usize, depth: usize, panel: &mut [u16]) {
        assert!(depth.is_multiple_of(BLOCK) && depth > 0, "depth comes in whole 32-deep slices");
        assert!(stride >= BLOCK && columns.len() >= (depth - 1) * stride + BLOCK, "M's rows are out of bounds");
        assert!(panel.len() >= BLOCK * depth, "the panel holds 32 rows of the depth");
        match self.cpu.rows() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX-512 row level is granted only where AVX512F and AVX512BW were
            // detected; the asserts above keep every load inside `columns` and every store
            // inside `panel`.
            RowLevel::Avx512 => unsafe { bf16_columns_to_rows_avx512(columns.as_ptr(), stride, depth, panel.as_mut_ptr()) },
            _ => columns_to_rows_plain(columns, stride, depth, panel),
        }
    }
}

/// [`Products::bf16_columns_to_rows`] in plain code, for any element: through a 32×32 tile,
/// so that both reads and writes are whole 32-value runs.
pub fn columns_to_rows_plain<T: Copy + Default>(columns: &[T], stride: usize, depth: usize, panel: &mut [T]) {
    let mut tile = [[T::default(); BLOCK]; BLOCK];
    for k0 in (0..depth).step_by(BLOCK) {
        for (k, column) in columns[k0 * stride..].chunks(stride).take(BLOCK).enumerate() {
            for (row, &v) in tile.iter_mut().zip(&column[..BLOCK]) {
                row[k] = v;
            }
        }
        for (i, row) in tile.iter().enumerate() {
            panel[i * depth + k0..][..BLOCK].copy_from_slice(row);
        }
    }
}

/// [`Products::bf16_columns_to_rows`] with AVX-512: per 32-deep slice and 16-row half, the 16
/// k-pairs of each row packed into one u32 (the low half the even k) and the 16×16 u32 block
/// transposed in registers ([`transpose_16x16`]), so each of A's rows gets 32 consecutive k in
/// one store.
///
/// Safety: AVX512F and AVX512BW present; `columns` readable for `depth` rows of `stride`, 32
/// values each; `panel` writable for 32 rows of `depth`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn bf16_columns_to_rows_avx512(columns: *const u16, stride: usize, depth: usize, panel: *mut u16) {
    use std::arch::x86_64::*;
    for k0 in (0..depth).step_by(BLOCK) {
        // The next slice's rows, a row's width apart, are fetched while this one is transposed.
        if k0 + 2 * BLOCK <= depth {
            for k in k0 + BLOCK..k0 + 2 * BLOCK {
                // SAFETY: row k of `columns` is within the caller's bounds (k < depth), and a
                // prefetch writes nothing.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(columns.add(k * stride).cast()) };
            }
        }
        for half in 0..2 {
            // SAFETY: rows k0..k0 + 32 of `columns`, values 16·half..16·half + 16, are within
            // the caller's bounds.
            let t: [__m512i; 16] = std::array::from_fn(|pair| unsafe {
                let at = |k: usize| columns.add((k0 + k) * stride + 16 * half).cast::<__m256i>();
                let (even, odd) = (_mm256_loadu_si256(at(2 * pair)), _mm256_loadu_si256(at(2 * pair + 1)));
                _mm512_or_si512(_mm512_cvtepu16_epi32(even), _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(odd)))
            });
            for (i, row) in transpose_16x16(t).into_iter().enumerate() {
                // SAFETY: row 16·half + i of the panel, values k0..k0 + 32, is within the
                // caller's bounds.
                unsafe { _mm512_storeu_si512(panel.add((16 * half + i) * depth + k0).cast(), row) };
            }
        }
    }
}

/// The 16×16 block of 32-bit words `t` (t[r][i]) transposed: out[i][r] (32-bit and 64-bit
/// unpacks within 128-bit lanes, then two rounds of lane shuffles).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose_16x16(t: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // After the unpacks, b[4q + j] holds in its 128-bit lane L the words of output row
    // 4L + j (input column 4L + j) from input rows 4q..4q + 4.
    let a: [__m512i; 16] = std::array::from_fn(|x| if x % 2 == 0 { _mm512_unpacklo_epi32(t[x], t[x + 1]) } else { _mm512_unpackhi_epi32(t[x - 1], t[x]) });
    let b: [__m512i; 16] = std::array::from_fn(|x| {
        let (q, j) = (x / 4, x % 4);
        let (lo, hi) = (a[4 * q + j / 2], a[4 * q + 2 + j / 2]);
        if j % 2 == 0 { _mm512_unpacklo_epi64(lo, hi) } else { _mm512_unpackhi_epi64(lo, hi) }
    });
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let c0 = _mm512_shuffle_i32x4::<0x88>(b[j], b[4 + j]);
        let c1 = _mm512_shuffle_i32x4::<0xdd>(b[j], b[4 + j]);
        let c2 = _mm512_shuffle_i32x4::<0x88>(b[8 + j], b[12 + j]);
        let c3 = _mm512_shuffle_i32x4::<0xdd>(b[8 + j], b[12 + j]);
        let rows = [_mm512_shuffle_i32x4::<0x88>(c0, c2), _mm512_shuffle_i32x4::<0x88>(c1, c3), _mm512_shuffle_i32x4::<0xdd>(c0, c2), _mm512_shuffle_i32x4::<0xdd>(c1, c3)];
        for (lane, row) in rows.into_iter().enumerate() {
            out[4 * lane + j] = row;
        }
    }
    out
}

/// [`Cpu::transpose_words`] with AVX-512: 16 words of each row per load, a 16×16 transpose in
/// registers, 16 words per store.
///
/// Safety: AVX512F present; each of `rows` readable for `words` 32-bit words; `dst` writable
/// for 16 · `words` words; `words` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_words_avx512(rows: [*const u8; 16], words: usize, dst: *mut u8) {
    use std::arch::x86_64::*;
    for w0 in (0..words).step_by(16) {
        // SAFETY: words w0..w0 + 16 of each row are within the caller's bounds.
        let t: [__m512i; 16] = std::array::from_fn(|r| unsafe { _mm512_loadu_si512(rows[r].add(4 * w0).cast()) });
        for (i, out) in transpose_16x16(t).into_iter().enumerate() {
            // SAFETY: words 16·(w0 + i)..16·(w0 + i) + 16 of `dst` are within the caller's
            // bounds.
            unsafe { _mm512_storeu_si512(dst.add(64 * (w0 + i)).cast(), out) };
        }
    }
}

/// [`Cpu::transpose_words`] with AVX2: eight words of eight rows per 8×8 transpose in
/// registers (32-bit unpacks, 64-bit shuffles within 128-bit lanes, then lane swaps), the
/// 16 rows as two such halves of each stored 16-word row.
///
/// Safety: AVX2 present; bounds as [`transpose_words_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_words_avx2(rows: [*const u8; 16], words: usize, dst: *mut u8) {
    use std::arch::x86_64::*;
    for w0 in (0..words).step_by(8) {
        for half in 0..2 {
            // SAFETY: words w0..w0 + 8 of each row are within the caller's bounds.
            let t: [__m256; 8] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(rows[8 * half + r].add(4 * w0).cast()) });
            let a: [__m256; 8] = std::array::from_fn(|x| if x % 2 == 0 { _mm256_unpacklo_ps(t[x], t[x + 1]) } else { _mm256_unpackhi_ps(t[x - 1], t[x]) });
            // b[4q + j] holds, lane by lane, output rows j (low lane) and 4 + j (high lane)
            // from input rows 4q..4q + 4.
            let b: [__m256; 8] = std::array::from_fn(|x| {
                let (q, j) = (x / 4, x % 4);
                let (lo, hi) = (a[4 * q + j / 2], a[4 * q + 2 + j / 2]);
                if j % 2 == 0 { _mm256_shuffle_ps::<0x44>(lo, hi) } else { _mm256_shuffle_ps::<0xee>(lo, hi) }
            });
            for j in 0..4 {
                let (low, high) = (_mm256_permute2f128_ps::<0x20>(b[j], b[4 + j]), _mm256_permute2f128_ps::<0x31>(b[j], b[4 + j]));
                // SAFETY: words 16·(w0 + i) + 8·half..+ 8 of `dst`, i < 8, are within the
                // caller's bounds.
                unsafe {
                    _mm256_storeu_ps(dst.add(64 * (w0 + j) + 32 * half).cast(), low);
                    _mm256_storeu_ps(dst.add(64 * (w0 + 4 + j) + 32 * half).cast(), high);
                }
            }
        }
    }
}

/// How a product's left operand A lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Row-major: A[i][k] at `i · stride + k`.
    Rows,
    /// Column-major: A[i][k] at `k · stride + i`, A being the transpose of a row-major
    /// matrix (the weight gradients' layer inputs, the attention backward's weights).
    Columns,
}

/// Runs an AVX-512 row kernel over a 32-row block as three groups: rows 0..12, 12..24 and
/// 24..32 (12 rows × 32 columns of accumulators fill 24 of the 32 vector registers).
#[cfg(target_arch = "x86_64")]
macro_rules! in_row_groups {
    ($rows:ident, $a:expr, $a_stride:expr, $strips:expr, $depth:expr, $out:expr) => {{
        $rows::<12>($a, $a_stride, $strips, $depth, &mut $out[..]);
        $rows::<12>($a.add(12 * $a_stride), $a_stride, $strips, $depth, &mut $out[12 * BLOCK..]);
        $rows::<8>($a.add(24 * $a_stride), $a_stride, $strips, $depth, &mut $out[24 * BLOCK..]);
    }};
}

/// Stores `R` rows of two 16-lane accumulators as rows of 32 values, 32 apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn store_rows<const R: usize>(acc: &[[std::arch::x86_64::__m512; 2]; R], out: &mut [f32]) {
    use std::arch::x86_64::_mm512_storeu_ps;
    for (i, acc) in acc.iter().enumerate() {
        let row = &mut out[i * BLOCK..][..BLOCK];
        // SAFETY: `row` holds 32 f32, two unaligned 16-lane stores.
        unsafe {
            _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[1]);
        }
    }
}

/// Depth of one pass of the f32 blocks (AVX-512 and AVX2): the row groups run over the same
/// 128-deep slice of A's 32 rows and of the two strips (16 KB each) while it is in L1,
/// instead of each streaming the whole depth from L2 (the weight gradients are thousands
/// deep).
#[cfg(target_arch = "x86_64")]
const F32_SLICE: usize = 128;

/// The f32 block with AVX-512: twelve, twelve and eight rows at a time, each row in two
/// 16-lane accumulators (24 of the 32 registers at most), each A value broadcast against the
/// two strips' 16 columns, slice by slice of the depth. A by rows, or by columns where
/// `COLUMNS`.
///
/// Safety: AVX512F present; `a` readable for 32 rows of `a_stride` f32, `depth` wide (by
/// columns: `depth` columns of `a_stride`, 32 high); `b0`, `b1` readable for 16·`depth` f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_f32_avx512<const COLUMNS: bool>(a: *const f32, a_stride: usize, b0: *const f32, b1: *const f32, depth: usize, out: &mut [f32; BLOCK * BLOCK]) {
    let row_step = if COLUMNS { 1 } else { a_stride };
    for (a, strips, slice, added) in depth_slices::<COLUMNS>(a, a_stride, [b0, b1], depth) {
        // SAFETY: each group's rows and this slice of the depth lie within the caller's
        // bounds.
        unsafe {
            rows_f32_avx512::<12, COLUMNS>(a, a_stride, strips, slice, &mut out[..], added);
            rows_f32_avx512::<12, COLUMNS>(a.add(12 * row_step), a_stride, strips, slice, &mut out[12 * BLOCK..], added);
            rows_f32_avx512::<8, COLUMNS>(a.add(24 * row_step), a_stride, strips, slice, &mut out[24 * BLOCK..], added);
        }
    }
}

/// The f32 blocks' passes over the depth, [`F32_SLICE`] deep: where each starts in A and in
/// the two strips, how deep it is, and whether it adds to the results of the passes before
/// it. (Pointer arithmetic only: the kernels read through them.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn depth_slices<const COLUMNS: bool>(a: *const f32, a_stride: usize, strips: [*const f32; 2], depth: usize) -> impl Iterator<Item = (*const f32, [*const f32; 2], usize, bool)> {
    (0..depth).step_by(F32_SLICE).map(move |k0| (a.wrapping_add(a_offset::<COLUMNS>(0, k0, a_stride)), strips.map(|strip| strip.wrapping_add(16 * k0)), (depth - k0).min(F32_SLICE), k0 > 0))
}

/// Where A[i][k] lies from the start of `a`: by rows or, where `COLUMNS`, by columns.
#[inline(always)]
fn a_offset<const COLUMNS: bool>(i: usize, k: usize, a_stride: usize) -> usize {
    if COLUMNS { k * a_stride + i } else { i * a_stride + k }
}

/// `R` rows of the f32 block: out[i · 32 + c] for i < R, c < 32, or added to them where
/// `added` (the block's later depth slices).
///
/// Safety: AVX512F present; `a` readable for `R` rows of `a_stride`, `depth` wide (by
/// columns: `depth` columns of `a_stride`, `R` high); both strips for 16·`depth` f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_f32_avx512<const R: usize, const COLUMNS: bool>(a: *const f32, a_stride: usize, [b0, b1]: [*const f32; 2], depth: usize, out: &mut [f32], added: bool) {
    use std::arch::x86_64::*;
    assert!(out.len() >= R * BLOCK);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    if added {
        for (i, acc) in acc.iter_mut().enumerate() {
            let row = &out[i * BLOCK..][..BLOCK];
            // SAFETY: `row` holds 32 f32, two unaligned 16-lane loads.
            unsafe { *acc = [_mm512_loadu_ps(row.as_ptr()), _mm512_loadu_ps(row.as_ptr().add(16))] };
        }
    }
    // SAFETY: the caller's bounds cover every A value and B strip entry read here.
    unsafe {
        for r in 0..depth {
            let w0 = _mm512_loadu_ps(b0.add(16 * r));
            let w1 = _mm512_loadu_ps(b1.add(16 * r));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(a_offset::<COLUMNS>(i, r, a_stride)));
                acc[0] = _mm512_fmadd_ps(x, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, w1, acc[1]);
            }
        }
    }
    store_rows(&acc, out);
}

/// The f32 block with AVX2, slice by slice of the depth as [`block_f32_avx512`]: strip by
/// strip, six rows at a time in twelve 8-lane accumulators (the register file holds those,
/// the strip's two vectors and a broadcast), the last 20 rows five at a time. Every group
/// keeps at least ten accumulators, which covers two FMA units of five cycles' latency (Zen 2,
/// Haswell; four cycles on newer cores): groups of 6, 6, 6, 6, 4, 4 measured the same on
/// Sapphire Rapids, but four rows keep eight, and the former 6 × 5 + 2 kept four for its last
/// two rows. A by rows, or by columns where `COLUMNS`.
///
/// Safety: AVX2 and FMA present; bounds as [`block_f32_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_f32_avx2<const COLUMNS: bool>(a: *const f32, a_stride: usize, strips: [*const f32; 2], depth: usize, out: &mut [f32; BLOCK * BLOCK]) {
    let row_step = if COLUMNS { 1 } else { a_stride };
    for (a, strips, slice, added) in depth_slices::<COLUMNS>(a, a_stride, strips, depth) {
        for (s, &strip) in strips.iter().enumerate() {
            for first in [0, 6] {
                // SAFETY: rows first..first + 6, this strip and this slice of the depth are
                // within the caller's bounds.
                unsafe { rows_f32_avx2::<6, COLUMNS>(a.add(first * row_step), a_stride, strip, slice, &mut out[first * BLOCK + 16 * s..], added) };
            }
            for first in (12..32).step_by(5) {
                // SAFETY: rows first..first + 5, this strip and this slice of the depth are
                // within the caller's bounds.
                unsafe { rows_f32_avx2::<5, COLUMNS>(a.add(first * row_step), a_stride, strip, slice, &mut out[first * BLOCK + 16 * s..], added) };
            }
        }
    }
}

/// `R` rows of one 16-column strip: out[i · 32 + c] for i < R, c < 16, or added to them where
/// `added`.
///
/// Safety: AVX2 and FMA present; `a` readable for `R` rows of `a_stride`, `depth` wide (by
/// columns: `depth` columns of `a_stride`, `R` high); `strip` for 16·`depth` f32; `out` at
/// least (R - 1)·32 + 16 long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_f32_avx2<const R: usize, const COLUMNS: bool>(a: *const f32, a_stride: usize, strip: *const f32, depth: usize, out: &mut [f32], added: bool) {
    use std::arch::x86_64::*;
    assert!(out.len() >= (R - 1) * BLOCK + 16 && depth.is_multiple_of(4));
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if added {
        for (i, acc) in acc.iter_mut().enumerate() {
            let row = &out[i * BLOCK..][..16];
            // SAFETY: `row` holds 16 f32, two unaligned 8-lane loads.
            unsafe { *acc = [_mm256_loadu_ps(row.as_ptr()), _mm256_loadu_ps(row.as_ptr().add(8))] };
        }
    }
    // SAFETY: the caller's bounds cover every A value and strip entry read here.
    unsafe {
        // Four depth steps per turn of the loop: with one, the counter, compare and branch
        // took issue slots from the twelve FMAs (forward products +3-9%, BENCHMARKS.md).
        // Depths are whole 32-deep tiles.
        for r0 in (0..depth).step_by(4) {
            for r in r0..r0 + 4 {
                let w0 = _mm256_loadu_ps(strip.add(16 * r));
                let w1 = _mm256_loadu_ps(strip.add(16 * r + 8));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*a.add(a_offset::<COLUMNS>(i, r, a_stride)));
                    acc[0] = _mm256_fmadd_ps(x, w0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, w1, acc[1]);
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let row = &mut out[i * BLOCK..][..16];
        // SAFETY: `row` holds 16 f32, two unaligned 8-lane stores.
        unsafe {
            _mm256_storeu_ps(row.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[1]);
        }
    }
}

/// The f32 block in plain code.
fn block_f32_plain(a: &[f32], a_stride: usize, layout: Layout, b0: &[f32], b1: &[f32], depth: usize, out: &mut [f32; BLOCK * BLOCK]) {
    for (i, out_row) in out.chunks_exact_mut(BLOCK).enumerate() {
        let mut acc = [0f32; BLOCK];
        for r in 0..depth {
            let x = match layout {
                Layout::Rows => a[a_offset::<false>(i, r, a_stride)],
                Layout::Columns => a[a_offset::<true>(i, r, a_stride)],
            };
            for (c, (&p, &q)) in b0[16 * r..][..16].iter().zip(&b1[16 * r..][..16]).enumerate() {
                acc[c] += x * p;
                acc[16 + c] += x * q;
            }
        }
        out_row.copy_from_slice(&acc);
    }
}

/// The block on AMX: four 16×16 result tiles, A's two 16-row halves against the two strips.
///
/// Safety: tiles configured by [`Cpu::with_products`]; `a` readable for 32 rows of `a_stride`
/// bf16 from its start, 2·`pairs` wide; `b0`, `b1` readable for 16·`pairs` u32.
#[cfg(target_arch = "x86_64")]
unsafe fn block_amx(a: *const u16, a_stride: usize, b0: *const u32, b1: *const u32, pairs: usize, out: &mut [f32; BLOCK * BLOCK]) {
    let out = out.as_mut_ptr();
    // SAFETY: the caller's bounds cover each 16-row by 64-byte tile read here, and `out`
    // holds four 16×16 f32 tiles at the offsets written.
    unsafe {
        let a1 = a.add(16 * a_stride);
        std::arch::asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
        let (sa, sb) = (a_stride * 2, 64usize);
        // The first k-step's four tiles.
        std::arch::asm!(
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            a = in(reg) a, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1, sa = in(reg) sa, sb = in(reg) sb,
            options(nostack, readonly),
        );
        // Software-pipelined: each tile of the next k-step is loaded as soon as the last
        // product reading it has been issued (tiles are not renamed), so a load runs while
        // the products after it do: the first B tile's behind two, the others behind one or
        // two. Every accumulator still adds its k-steps in order.
        for kt in 1..pairs / 16 {
            std::arch::asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                a0 = in(reg) a.add(kt * K_STEP),
                a1 = in(reg) a1.add(kt * K_STEP),
                b0 = in(reg) b0.add(kt * TILE_PAIRS),
                b1 = in(reg) b1.add(kt * TILE_PAIRS),
                sa = in(reg) sa,
                sb = in(reg) sb,
                options(nostack, readonly),
            );
        }
        std::arch::asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            options(nostack, nomem),
        );
        std::arch::asm!(
            "tilestored [{o0} + {s}*1], tmm0",
            "tilestored [{o1} + {s}*1], tmm1",
            "tilestored [{o2} + {s}*1], tmm2",
            "tilestored [{o3} + {s}*1], tmm3",
            o0 = in(reg) out,
            o1 = in(reg) out.add(16),
            o2 = in(reg) out.add(16 * BLOCK),
            o3 = in(reg) out.add(16 * BLOCK + 16),
            s = in(reg) BLOCK * 4,
            options(nostack),
        );
    }
}

/// The block with AVX512-BF16: twelve, twelve and eight rows at a time, each row in two
/// 16-lane accumulators; each k-pair of a row is broadcast and dotted with the strips' pairs
/// (`vdpbf16ps`).
///
/// Safety: AVX512-BF16 and AVX512F present; bounds as [`block_amx`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block_avx512bf16(a: *const u16, a_stride: usize, b0: *const u32, b1: *const u32, pairs: usize, out: &mut [f32; BLOCK * BLOCK]) {
    // SAFETY: the split keeps each group within the caller's 32 rows.
    unsafe { in_row_groups!(rows_avx512bf16, a, a_stride, [b0, b1], pairs, out) }
}

/// `R` rows of the bf16 block: out[i · 32 + c] for i < R, c < 32.
///
/// Safety: AVX512-BF16 and AVX512F present; `a` readable for `R` rows of `a_stride` bf16,
/// 2·`pairs` wide; both strips for 16·`pairs` u32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rows_avx512bf16<const R: usize>(a: *const u16, a_stride: usize, [b0, b1]: [*const u32; 2], pairs: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(out.len() >= R * BLOCK);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY: the caller's bounds cover every A pair and B strip entry read here.
    unsafe {
        for r in 0..pairs {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(16 * r).cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(16 * r).cast()));
            for (i, acc) in acc.iter_mut().enumerate() {
                let pair = a.add(i * a_stride + 2 * r).cast::<i32>().read_unaligned();
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
            }
        }
    }
    store_rows(&acc, out);
}

/// The plain block compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(a: &[u16], a_stride: usize, b0: &[u32], b1: &[u32], pairs: usize, out: &mut [f32; BLOCK * BLOCK]) {
    block_plain::<true>(a, a_stride, b0, b1, pairs, out);
}

/// The block in plain code: each product of two bf16 is exact in f32, summed pair by pair
/// (with fused multiply-adds where `FUSED`).
#[inline(always)]
fn block_plain<const FUSED: bool>(a: &[u16], a_stride: usize, b0: &[u32], b1: &[u32], pairs: usize, out: &mut [f32; BLOCK * BLOCK]) {
    let madd = |x: f32, y: f32, acc: f32| if FUSED { x.mul_add(y, acc) } else { x * y + acc };
    let (lo, hi) = (|p: u32| f32::from_bits(p << 16), |p: u32| f32::from_bits(p & 0xffff_0000));
    for (i, out_row) in out.chunks_exact_mut(BLOCK).enumerate() {
        let row = &a[i * a_stride..][..2 * pairs];
        let mut acc = [0f32; BLOCK];
        for (r, x) in row.chunks_exact(2).enumerate() {
            let (x0, x1) = (f32::from_bits((x[0] as u32) << 16), f32::from_bits((x[1] as u32) << 16));
            let (w0, w1) = (&b0[16 * r..][..16], &b1[16 * r..][..16]);
            for (c, (&p, &q)) in w0.iter().zip(w1).enumerate() {
                acc[c] = madd(x1, hi(p), madd(x0, lo(p), acc[c]));
                acc[16 + c] = madd(x1, hi(q), madd(x0, lo(q), acc[16 + c]));
            }
        }
        out_row.copy_from_slice(&acc);
    }
}

/// Defines a row kernel of `rows.rs`: one body compiled for AVX-512, for AVX2+FMA and plain,
/// called at the level of the selected path.
macro_rules! row_kernel {
    ($(#[$doc:meta])* pub fn $name:ident $(<$g:ident: $bound:ident>)? ($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
                fn avx512 $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2 $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match super::cpu::Cpu::current().rows() {
                    // SAFETY: the token's row level is AVX-512 only where detection found these
                    // AVX-512 subsets and FMA.
                    super::cpu::RowLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: the token's row level is AVX2 only where detection found AVX2
                    // and FMA.
                    super::cpu::RowLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    super::cpu::RowLevel::Portable => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(super) use row_kernel;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_or_unsupported_forced_path_is_refused_by_name() {
        let err = Cpu::select(Some("sse9")).unwrap_err();
        assert!(err.contains("DINO_ENGINE_PATH=sse9") && err.contains("portable"), "{err}");
        assert_eq!(Cpu::select(Some("portable")).unwrap().path(), Path::Portable);
        assert_eq!(Cpu::select(None).unwrap().path(), Cpu::supported()[0]);
        for path in Path::ALL.into_iter().filter(|p| !Cpu::supported().contains(p)) {
            let err = Cpu::select(Some(path.name())).unwrap_err();
            assert!(err.contains("cannot run"), "{err}");
        }
    }
}
