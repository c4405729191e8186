//! The bfloat16 products ([`super::bf16`]) on AMX tiles, for Intel CPUs that have AMX-BF16
//! (Sapphire Rapids and later, [`super::Isa::Amx`]): the same operands as the `vdpbf16ps` path
//! (bfloat16 pairs, float32 sums and output), multiplied by `tdpbf16ps`, which does a 16×16 tile
//! of float32 sums over 32 depths (8,192 multiply-adds) per instruction where `vdpbf16ps` does 32.
//!
//! Why written by hand, in inline assembly: Rust's AMX intrinsics are unstable
//! (`x86_amx_intrinsics`), and no maintained crate offers a bfloat16 product that takes this
//! project's packed operands. Each `asm!` names its tile registers; the compiler never allocates
//! them, so the kernel owns all eight while it runs: tmm0–3 the four 16×16 float32 tiles of C
//! (a 32×32 block), tmm4–5 two A tiles (16 rows × 16 pairs), tmm6–7 two B tiles (16 pairs × 16
//! columns).
//!
//! Layouts: B is [`PackedB`]'s bfloat16 form as it is (`pairs[(panel·kp + kq)·16 + column]`): 16
//! consecutive pairs of a panel are one B tile, 64 bytes a row, exactly the layout `tdpbf16ps`
//! reads (a pair of depths per 32-bit element). A is repacked per block of rows and depths into
//! tiles `[16-row tile][depth tile][row][16 pairs]` (1 KiB each, contiguous), rounded from
//! float32 rows (32 values a vector: `vcvtne2ps2bf16` leaves them in pair order) or gathered from
//! bfloat16 panels. A last depth tile shorter than 16 pairs is padded with zeros, in A as it is
//! packed and in B through a zeroed copy of the panel's last rows, so that no product reads past
//! a panel. Every buffer that tiles are loaded from starts on a 64-byte cache line
//! ([`super::aligned`]) and every tile row lies on one: rows that straddle two lines feed the
//! tiles at a quarter to a third of the rate (`amx_ceiling`).
//!
//! The tile state: Linux hands it to a process only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
//! done once when the path is detected, [`request_tile_state`]); each product loads the tile
//! configuration on its thread (`ldtilecfg`) and releases the tiles after (`tilerelease`), so
//! that threads not in a product carry no tile state through context switches.

use std::arch::asm;
use std::arch::x86_64::*;

use super::aligned::Aligned;
use super::packed_matmul::{Epilogue, Init, Lhs, PackedB, MR, NR};

/// Rows (and float32 columns) of a tile; pairs of a tile's row.
const T: usize = 16;
/// u32 (pairs or floats) in one tile.
const TILE: usize = T * T;
/// Depth tiles per packed block (1,536 pairs, 3,072 depths: the model's depths up to 2,560 in
/// one block, 5,120 in two) and rows of A per packed block (64: up to 384 KiB of A tiles, and a
/// block of C that stays in L2 between depth blocks). Chosen by `kernel_speed`'s "bf16 linear …
/// product" rows on Emerald Rapids (GFLOP/s of the product alone, 2 cores, a noisy machine):
/// first from 16 tiles × 384 rows to 32 × 64 (best of 5: 8192×320·320×2560 214–247 → 488–661,
/// 2048×2560·2560×640 369–452 → 506–629, 512×5120·5120×1280 473–494 → 565); then, timed
/// interleaved (best of 10, twice), 32 → 96 tiles: 2048×2560·2560×640 549–609 → 594–684,
/// 512×5120·5120×1280 544–607 → 611–649, 512×1280·1280×1280 534–572 → 592–703, the 320-deep
/// rows level (one block either way); 64 and 160 tiles between, 8 and 16 below; 32, 128 and 256
/// rows no better than 64.
const KT: usize = 96;
const MC: usize = 64;

/// The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes a row (u16, little-endian)
        c[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(c)
};

/// Asks Linux for the AMX tile state for this process (`ARCH_REQ_XCOMP_PERM` for
/// `XFEATURE_XTILEDATA`); true when granted. Without it the first tile instruction faults.
pub(super) fn request_tile_state() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it changes only which state the
        // kernel lets this process use.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Whether the CPU has AMX-BF16 and AMX-TILE (CPUID leaf 7: EDX bits 22 and 24) and the OS
/// saves their state (XCR0 bits 17 and 18, checked through the OS's grant on Linux).
pub(super) fn cpu_has_amx_bf16() -> bool {
    // leaf 7 exists on every CPU with AVX-512 (the caller checks that first)
    let leaf7 = __cpuid_count(7, 0);
    leaf7.edx >> 22 & 1 == 1 && leaf7.edx >> 24 & 1 == 1
}

macro_rules! tile_load {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $stride,
             options(nostack, readonly, preserves_flags))
    };
}

macro_rules! tile_store {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $stride,
             options(nostack, preserves_flags))
    };
}

macro_rules! tile_dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem, preserves_flags))
    };
}

macro_rules! tile_zero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nostack, nomem, preserves_flags))
    };
}

thread_local! {
    /// A band's input rows for [`conv_direct`], kept for the thread's next task.
    static BAND_ROWS: std::cell::Cell<Aligned<u32>> = std::cell::Cell::new(Aligned::default());
    /// (on a cache line, as every operand the tiles load: see [`super::aligned`])
    static A_PACK: std::cell::RefCell<Aligned<u32>> = std::cell::RefCell::new(Aligned::default());
}

/// Rows [i0, i0 + mc) × pairs [kq0, kq0 + klp) of float32 rows `a` (`lda` apart) as A tiles
/// `[ir][t][16][16]` of `kt` depth tiles (rows past mc and pairs past klp zero).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_rows(a: *const f32, lda: usize, k: usize, i0: usize, mc: usize, kq0: usize, klp: usize, dst: *mut u32) {
    let kt = klp.div_ceil(T);
    // values of this block: [2·kq0, min(k, 2·(kq0 + klp)))
    let k0 = 2 * kq0;
    let kl = (2 * (kq0 + klp)).min(k) - k0;
    for ir in 0..mc.div_ceil(T) {
        for r in 0..T {
            let row = ir * T + r;
            let base = dst.add(ir * kt * TILE + r * T);
            if row >= mc {
                for t in 0..kt {
                    _mm512_storeu_si512(base.add(t * TILE) as *mut __m512i, _mm512_setzero_si512());
                }
                continue;
            }
            let src = a.add((i0 + row) * lda + k0);
            for t in 0..kt {
                let at = 32 * t;
                let left = kl.saturating_sub(at);
                let (lo, hi) = if left >= 32 {
                    (_mm512_loadu_ps(src.add(at)), _mm512_loadu_ps(src.add(at + 16)))
                } else {
                    let mask = |n: usize| if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as __mmask16 };
                    // masked lanes are not read: the row may end here
                    (
                        _mm512_maskz_loadu_ps(mask(left), src.wrapping_add(at)),
                        _mm512_maskz_loadu_ps(mask(left.saturating_sub(16)), src.wrapping_add(at + 16)),
                    )
                };
                // 32 values in order: pair q = (value 2q, value 2q + 1), as a tile row holds them
                let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(base.add(t * TILE) as *mut __m512i, v);
            }
        }
    }
}

/// As [`pack_rows`] from [`super::packed_matmul::PackedA`]'s bfloat16 panels (`[panel][kq][MR]`,
/// `dp` pairs deep, starting at a panel boundary).
#[allow(clippy::too_many_arguments)]
unsafe fn pack_panels(p: *const u32, dp: usize, i0: usize, mc: usize, kq0: usize, klp: usize, dst: *mut u32) {
    let kt = klp.div_ceil(T);
    for ir in 0..mc.div_ceil(T) {
        for r in 0..T {
            let row = ir * T + r;
            let base = dst.add(ir * kt * TILE + r * T);
            for t in 0..kt {
                let d = base.add(t * TILE);
                for q in 0..T {
                    let kq = t * T + q;
                    *d.add(q) = if row < mc && kq < klp {
                        let at = i0 + row;
                        *p.add((at / MR) * dp * MR + (kq0 + kq) * MR + at % MR)
                    } else {
                        0
                    };
                }
            }
        }
    }
}

/// A's micro-panels (`[panel][kq][MR]` pairs, m rows, kp pairs deep) as AMX tiles
/// `[16-row group][depth tile][16][16]` (⌈kp/16⌉ tiles a group; rows and pairs past the matrix
/// zero), for [`Lhs::TilesBf16`].
pub(super) fn tiles_of_panels(panels: &[u32], m: usize, kp: usize) -> Aligned<u32> {
    let tiles = kp.div_ceil(T);
    let mut out = Aligned::<u32>::zeroed(m.div_ceil(T) * tiles * TILE);
    for row in 0..m {
        let (g, r) = (row / T, row % T);
        let src = &panels[(row / MR) * kp * MR + row % MR..];
        for kq in 0..kp {
            out[((g * tiles + kq / T) * T + r) * T + kq % T] = src[kq * MR];
        }
    }
    out
}

/// How a block of C starts: zero, or loaded tile by tile (tile (p, j) from `at[p][j]`, its rows
/// `stride` bytes apart: C itself to accumulate, a bias row repeated with stride 0, or a tile of
/// per-row values).
#[derive(Clone, Copy)]
enum Start {
    Zero,
    Load([[*const f32; 2]; 2], usize),
}

/// The micro-kernel: a block of `RA` × `NB` tiles of C, `C = start + Σ_t A_t · B_t` over `kt`
/// depth tiles: A tile (p, t) at `a[p] + t·256` (rows 64 bytes apart), B tile (j, t) at
/// `b_at(j, t)` (rows `b_stride` bytes apart), C tile (p, j) at `c[p][j]` (rows `c_stride` bytes
/// apart). The matrix product and the direct 3×3 convolution differ only in where their B tiles
/// and C tiles lie.
///
/// # Safety
/// The tile configuration is loaded on this thread; every tile addressed lies in its buffer.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<const RA: usize, const NB: usize>(
    kt: usize,
    a: [*const u32; 2],
    b_at: impl Fn(usize, usize) -> *const u32,
    b_stride: usize,
    c: [[*mut f32; 2]; 2],
    c_stride: usize,
    start: Start,
) {
    match start {
        Start::Zero => {
            tile_zero!("0");
            tile_zero!("1");
            tile_zero!("2");
            tile_zero!("3");
        }
        Start::Load(at, stride) => {
            tile_load!("0", at[0][0], stride);
            if NB == 2 {
                tile_load!("1", at[0][1], stride);
            }
            if RA == 2 {
                tile_load!("2", at[1][0], stride);
                if NB == 2 {
                    tile_load!("3", at[1][1], stride);
                }
            }
        }
    }
    let [a0, a1] = a;
    if RA == 2 && NB == 2 {
        // Software-pipelined: a tile register is loaded again as soon as its last product of
        // this depth has been issued, so that the loads of depth t overlap the products of
        // t − 1 (tiles are not renamed: a load waits for the products reading its register).
        // Measured on Emerald Rapids with A in L2: 360–415 → 480–634 GFLOP/s a core.
        tile_load!("4", a0, 64usize);
        tile_load!("6", b_at(0, 0), b_stride);
        tile_load!("7", b_at(1, 0), b_stride);
        tile_load!("5", a1, 64usize);
        for t in 1..kt {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{b0} + {bs}*1]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm7, [{b1} + {bs}*1]",
                "tileloadd tmm5, [{a1} + {s}*1]",
                a0 = in(reg) a0.add(t * TILE),
                a1 = in(reg) a1.add(t * TILE),
                b0 = in(reg) b_at(0, t),
                b1 = in(reg) b_at(1, t),
                s = in(reg) 64usize,
                bs = in(reg) b_stride,
                options(nostack, readonly, preserves_flags)
            );
        }
        tile_dot!("0", "4", "6");
        tile_dot!("1", "4", "7");
        tile_dot!("2", "5", "6");
        tile_dot!("3", "5", "7");
    } else {
        for t in 0..kt {
            tile_load!("4", a0.add(t * TILE), 64usize);
            tile_load!("6", b_at(0, t), b_stride);
            tile_dot!("0", "4", "6");
            if NB == 2 {
                tile_load!("7", b_at(1, t), b_stride);
                tile_dot!("1", "4", "7");
            }
            if RA == 2 {
                tile_load!("5", a1.add(t * TILE), 64usize);
                tile_dot!("2", "5", "6");
                if NB == 2 {
                    tile_dot!("3", "5", "7");
                }
            }
        }
    }
    tile_store!("0", c[0][0], c_stride);
    if NB == 2 {
        tile_store!("1", c[0][1], c_stride);
    }
    if RA == 2 {
        tile_store!("2", c[1][0], c_stride);
        if NB == 2 {
            tile_store!("3", c[1][1], c_stride);
        }
    }
}

/// [`block`] for `ra` × `nb` tiles (1 or 2 each) known at run time.
#[allow(clippy::too_many_arguments)]
unsafe fn block_of(
    ra: usize,
    nb: usize,
    kt: usize,
    a: [*const u32; 2],
    b_at: impl Fn(usize, usize) -> *const u32,
    b_stride: usize,
    c: [[*mut f32; 2]; 2],
    c_stride: usize,
    start: Start,
) {
    match (ra, nb) {
        (2, 2) => block::<2, 2>(kt, a, b_at, b_stride, c, c_stride, start),
        (2, _) => block::<2, 1>(kt, a, b_at, b_stride, c, c_stride, start),
        (_, 2) => block::<1, 2>(kt, a, b_at, b_stride, c, c_stride, start),
        _ => block::<1, 1>(kt, a, b_at, b_stride, c, c_stride, start),
    }
}

/// `C (m×n, row stride ldc) = init + A · B` on the calling thread for a bfloat16 B, A float32
/// rows (rounded as they are packed) or bfloat16 panels: the blocking of
/// [`super::packed_matmul`] (blocks of rows and depths of A packed, B panels read in place) with
/// 32×32 blocks of C on the tiles. Blocks of C that the matrix does not fill go through a
/// scratch block and are copied out.
///
/// # Safety
/// [`super::amx`] is true; `a` covers m rows (of ≥ k floats, or ⌈k/2⌉ pairs) and `c` m rows of
/// `ldc` (≥ n) floats.
pub(super) unsafe fn blocked(m: usize, a: Lhs, b: &PackedB, c: *mut f32, ldc: usize, init: Init) {
    blocked_panels(m, a, b, c, ldc, init, 0..b.n.div_ceil(NR), Epilogue::Store)
}

/// Whether [`geglu_panels`] takes a feed-forward projection `k` deep and `n` wide: its
/// depths in one block and each half of its output in whole panels.
pub(crate) fn geglu_fits(k: usize, n: usize) -> bool {
    k > 0 && k.div_ceil(2) <= KT * T && n.is_multiple_of(2 * NR)
}

/// GEGLU fused into the feed-forward's first projection: `out (m × n/2, row stride ldo) =
/// value · gelu(gate)` where B's panels alternate between the value half's and the gate half's
/// columns (panel 2p: value columns 16p.., panel 2p + 1: gate columns 16p..) and `init` is
/// the bias in that order. Each 32×32 block of the product (16 value and 16 gate columns) goes
/// through a scratch block in L1 and only its 16 gated columns are written: the projection's
/// output, twice the width of the gated one, never reaches memory and is not read back. The
/// same sums and the same GELU (`vmath::gelu`) as the projection and then `geglu`, so the same
/// bits. B's `range` of panels starts and ends on a pair. With [`Epilogue::GegluTiles`] the
/// gated columns are rounded into the next product's A tiles instead ([`gated_tile_rows`]).
///
/// # Safety
/// As [`blocked`], with [`geglu_fits`] true, AVX-512F present, and `out` m rows of `ldo`
/// (≥ n/2) floats (with `GegluTiles`, [`gated_tiles_fit`] and ⌈m/16⌉ row groups of tiles, `ldo`
/// a group's u32 / 16).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn geglu_panels(
    m: usize,
    a: Lhs,
    b: &PackedB,
    out: *mut f32,
    ldo: usize,
    init: Init,
    range: std::ops::Range<usize>,
    epilogue: Epilogue,
) {
    debug_assert!(geglu_fits(b.k, b.n) && range.start.is_multiple_of(2) && range.end.is_multiple_of(2));
    debug_assert!(matches!(epilogue, Epilogue::Geglu) || gated_tiles_fit(b.n));
    blocked_panels(m, a, b, out, ldo, init, range, epilogue)
}

/// Whether [`Epilogue::GegluTiles`] takes a projection `n` wide: its gated half in whole depth
/// tiles of the next product (32 columns a tile row), so that no tile holds padding to clear.
pub(crate) fn gated_tiles_fit(n: usize) -> bool {
    n.is_multiple_of(4 * T)
}

/// As [`gated_rows`], each row's 16 gated values rounded to 8 bfloat16 pairs (`vcvtneps2bf16`,
/// the rounding of [`pack_rows`]) and stored as half a tile row: row r of the block at
/// `dst + (r / 16)·group + (r % 16)·16` (u32), `group` the u32 of a 16-row group.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn gated_tile_rows(s: *const f32, rows: usize, dst: *mut u32, group: usize) {
    for r in 0..rows {
        let v = _mm512_loadu_ps(s.add(r * 2 * T));
        let g = super::vmath::gelu(_mm512_loadu_ps(s.add(r * 2 * T + T)));
        let pairs = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(v, g)));
        _mm256_storeu_si256(dst.add((r / T) * group + (r % T) * T) as *mut __m256i, pairs);
    }
}

/// `dst[r][c] = s[r][c] · gelu(s[r][16 + c])` for `rows` rows of a 32-wide scratch block: a
/// row's 16 gated columns on one 512-bit vector (the GELU on 8 lanes took twice the instructions,
/// 4.7% of a 4-frame step's `perf` samples on Emerald Rapids).
#[target_feature(enable = "avx512f")]
unsafe fn gated_rows(s: *const f32, rows: usize, dst: *mut f32, ld: usize) {
    for r in 0..rows {
        let v = _mm512_loadu_ps(s.add(r * 2 * T));
        let g = super::vmath::gelu(_mm512_loadu_ps(s.add(r * 2 * T + T)));
        _mm512_storeu_ps(dst.add(r * ld), _mm512_mul_ps(v, g));
    }
}

/// [`blocked`] for B's panels `range` only (C's columns `range.start·16 ..`), C's other columns
/// left as they are; with [`Epilogue::Geglu`], as [`geglu_panels`]; with a residual, each block
/// of C gets its rows of the residual added once its last depths are summed, while it is in L1.
///
/// # Safety
/// As [`blocked`] (and [`geglu_panels`] with GEGLU); a residual covers C's rows and columns.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn blocked_panels(
    m: usize,
    a: Lhs,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    init: Init,
    range: std::ops::Range<usize>,
    epilogue: Epilogue,
) {
    let (k, n) = (b.k, b.n);
    let geglu = matches!(epilogue, Epilogue::Geglu | Epilogue::GegluTiles);
    let to_tiles = matches!(epilogue, Epilogue::GegluTiles);
    if m == 0 || n == 0 || range.is_empty() {
        return;
    }
    let kp = k.div_ceil(2);
    let panels = range.end.min(n.div_ceil(NR));
    // blocks of whole depth tiles, so that only the last one is ragged
    let nkb = kp.div_ceil(KT * T).max(1);
    let kcp = kp.div_ceil(nkb).div_ceil(T) * T;
    asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly, preserves_flags));
    let mut scratch = Scratch([0f32; 4 * TILE]);
    // the bias of B's panels `range`, zero-padded to whole pairs of panels, copied once: copying
    // it per block of C stalled the products (the copy's loads wait behind the tile stores)
    let bias_row = match init {
        Init::Bias(bias) => {
            let first = range.start * NR;
            let mut row = Aligned::<f32>::zeroed((panels - range.start + 1) * NR);
            let have = (panels * NR).min(n) - first;
            row[..have].copy_from_slice(&bias[first..first + have]);
            Some(row)
        }
        _ => None,
    };
    let mut last = [Tile([0u32; TILE]), Tile([0u32; TILE])];
    A_PACK.with(|ap| {
        let mut apack = ap.borrow_mut();
        let need = MC.div_ceil(T) * kcp * T;
        if apack.len() < need {
            *apack = Aligned::zeroed(need);
        }
        let apack = apack.as_mut_ptr();
        let mut i0 = 0;
        while i0 < m {
            let mc = MC.min(m - i0);
            let nit = mc.div_ceil(T);
            let mut kq0 = 0;
            for kb in 0..nkb {
                let klp = kcp.min(kp - kq0);
                let kt = klp.div_ceil(T);
                // A's tiles of this block: the first of each row group, and the tiles between
                // consecutive row groups
                let (a_tiles, a_stride) = match a {
                    Lhs::Rows(a, lda) => {
                        pack_rows(a, lda, k, i0, mc, kq0, klp, apack);
                        (apack as *const u32, kt)
                    }
                    Lhs::PanelsHalf(p, depth) => {
                        pack_panels(p, depth.div_ceil(2), i0, mc, kq0, klp, apack);
                        (apack as *const u32, kt)
                    }
                    Lhs::TilesBf16(p, groups_tiles) => {
                        (p.add(((i0 / T) * groups_tiles + kq0 / T) * TILE), groups_tiles)
                    }
                    Lhs::Panels(..) => unreachable!("a bfloat16 B goes with float32 rows or bfloat16 panels"),
                };
                let ragged = !klp.is_multiple_of(T);
                let mut jr = range.start;
                while jr < panels {
                    let nb = 2.min(panels - jr);
                    let bp = [
                        b.pairs.as_ptr().add((jr * kp + kq0) * NR),
                        b.pairs.as_ptr().add(((jr + nb - 1) * kp + kq0) * NR),
                    ];
                    if ragged {
                        // the last depth tile's pairs that exist, then zeros
                        let have = klp - (kt - 1) * T;
                        for (j, l) in last.iter_mut().enumerate() {
                            l.0.fill(0);
                            l.0[..have * T]
                                .copy_from_slice(std::slice::from_raw_parts(bp[j].add((kt - 1) * TILE), have * T));
                        }
                    }
                    let lp = [last[0].0.as_ptr(), last[1].0.as_ptr()];
                    let cols = (nb * NR).min(n - jr * NR);
                    // how C starts: from the bias row (stride 0: the same 32 values in every row),
                    // zero, or its own values (C's block, or the scratch block's copy of it)
                    let bias_start = match &bias_row {
                        Some(row) if kb == 0 => Some(row.as_ptr().add((jr - range.start) * NR)),
                        _ => None,
                    };
                    let own = !matches!((init, kb), (Init::Overwrite, 0)) && bias_start.is_none();
                    let b_at = |j: usize, t: usize| if ragged && t + 1 == kt { lp[j] } else { bp[j].add(t * TILE) };
                    let mut it = 0;
                    while it < nit {
                        let ra = 2.min(nit - it);
                        let rows = (ra * T).min(mc - it * T);
                        let ap = a_tiles.add(it * a_stride * TILE);
                        let a = [ap, ap.add(a_stride * TILE)];
                        // (GEGLU: the gated output has one panel's columns per pair of B's; in
                        // tiles, 8 pairs: half a row of depth tile jr / 4, ldc a row group / 16)
                        let at = if to_tiles {
                            (i0 + it * T) * ldc + (jr / 4) * TILE + (jr / 2 % 2) * (T / 2)
                        } else {
                            (i0 + it * T) * ldc + if geglu { jr / 2 } else { jr } * NR
                        };
                        let cp = c.add(at);
                        // the residual's blocks go through the scratch block too, and are added as
                        // they are copied out, rather than read back from C right behind the
                        // tiles' stores to it (the stall that the bias's copy met above)
                        let residual = match epilogue {
                            Epilogue::Residual(res) if kb + 1 == nkb => Some(res.add(at)),
                            _ => None,
                        };
                        let full = rows == ra * T && cols == nb * NR && !geglu && residual.is_none();
                        // the block's C: in place, or through a 32×32 scratch block
                        let (cb, ld) = if full { (cp, ldc) } else { (scratch.0.as_mut_ptr(), 2 * T) };
                        if !full && own {
                            for r in 0..rows {
                                std::ptr::copy_nonoverlapping(cp.add(r * ldc), cb.add(r * ld), cols);
                            }
                        }
                        let ct = [[cb, cb.add(T)], [cb.add(T * ld), cb.add(T * ld + T)]];
                        let start = match bias_start {
                            Some(bias) => Start::Load([[bias, bias.add(T)], [bias, bias.add(T)]], 0),
                            None if own => Start::Load(ct.map(|row| row.map(|p| p as *const f32)), ld * 4),
                            None => Start::Zero,
                        };
                        block_of(ra, nb, kt, a, b_at, 64, ct, ld * 4, start);
                        if to_tiles {
                            gated_tile_rows(cb, rows, cp as *mut u32, T * ldc);
                        } else if geglu {
                            gated_rows(cb, rows, cp, ldc);
                        } else if !full {
                            copy_out(cb, rows, cols, cp, ldc, residual);
                        }
                        it += ra;
                    }
                    jr += nb;
                }
                kq0 += klp;
            }
            i0 += mc;
        }
    });
    asm!("tilerelease", options(nostack, nomem, preserves_flags));
}

/// `c[r][j] = block[r][j] (+ residual[r][j])` for `rows` × `cols` (≤ 32) of a 32-wide scratch
/// block, C and the residual rows `ld` apart.
#[target_feature(enable = "avx512f")]
unsafe fn copy_out(block: *const f32, rows: usize, cols: usize, c: *mut f32, ld: usize, residual: Option<*const f32>) {
    for h in (0..cols).step_by(T) {
        let mask: __mmask16 = if cols - h >= T { 0xffff } else { (1 << (cols - h)) - 1 };
        for r in 0..rows {
            let mut v = _mm512_maskz_loadu_ps(mask, block.add(r * 2 * T + h));
            if let Some(res) = residual {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, res.add(r * ld + h)));
            }
            _mm512_mask_storeu_ps(c.add(r * ld + h), mask, v);
        }
    }
}

/// A 32×32 block of float32, aligned for the tile stores.
#[repr(C, align(64))]
struct Scratch([f32; 4 * TILE]);

/// One tile of pairs on a cache line (a ragged last depth tile of B, zero-padded).
#[repr(C, align(64))]
struct Tile([u32; TILE]);

/// Whether [`conv_direct`] takes a convolution of these sizes: output channels in
/// whole tiles and image rows in whole 16-pixel groups (the UNet's 32² and 16² levels and every
/// VAE level at 256×256; narrower images take Winograd; the temporal convolutions' frames of
/// 16 pixels and more).
pub(crate) fn conv_direct_fits(cout: usize, w: usize) -> bool {
    cout > 0 && cout.is_multiple_of(T) && w > 0 && w.is_multiple_of(T)
}

/// Pairs of input channels of a convolution, padded to whole depth tiles.
fn channel_pairs(cin: usize) -> usize {
    cin.div_ceil(2 * T) * T
}

/// The weights (cout, cin, taps) as A tiles: row = output channel, depth = (tap, input channel),
/// `[16-channel group][tap · tiles a tap + channel tile][16][16]` pairs (channels past cin zero).
fn conv_weight_tiles(w: &[half::bf16], cin: usize, cout: usize, taps: usize) -> Aligned<u32> {
    use rayon::prelude::*;
    let qp = channel_pairs(cin);
    let per_tap = qp / T;
    let ktiles = taps * per_tap;
    let mut out = Aligned::<u32>::zeroed(cout.div_ceil(T) * ktiles * TILE);
    out.par_chunks_mut(ktiles * TILE).enumerate().for_each(|(g, dst)| {
        for r in 0..T.min(cout - g * T) {
            let row = &w[(g * T + r) * cin * taps..][..cin * taps];
            for tap in 0..taps {
                for q in 0..cin.div_ceil(2) {
                    let lo = row[2 * q * taps + tap].to_bits() as u32;
                    let hi = if 2 * q + 1 < cin { row[(2 * q + 1) * taps + tap].to_bits() as u32 } else { 0 };
                    let t = tap * per_tap + q / T;
                    dst[(t * T + r) * T + q % T] = lo | hi << 16;
                }
            }
        }
    });
    out
}

/// A convolution's bfloat16 weights (cout, cin, taps) as [`conv_direct`]'s A tiles
/// ([`conv_weight_tiles`]): made per call, or once at load for the layers that keep them
/// ([`super::conv::TemporalTiles`]).
pub struct ConvTiles {
    tiles: Aligned<u32>,
    cout: usize,
    cin: usize,
    taps: usize,
}

impl ConvTiles {
    /// The tiles of `w` (cout, cin, taps), cout a multiple of 16.
    pub(crate) fn new(w: &[half::bf16], cin: usize, cout: usize, taps: usize) -> Self {
        assert!(cout.is_multiple_of(T) && w.len() >= cout * cin * taps, "convolution weight tiles");
        ConvTiles { tiles: conv_weight_tiles(w, cin, cout, taps), cout, cin, taps }
    }

    /// (output channels, input channels, taps).
    pub(crate) fn dims(&self) -> (usize, usize, usize) {
        (self.cout, self.cin, self.taps)
    }

    /// The weights back in their own layout (cout, cin, taps), exactly.
    pub(crate) fn weights(&self) -> Vec<half::bf16> {
        let (qp, taps) = (channel_pairs(self.cin), self.taps);
        let per_tap = qp / T;
        let ktiles = taps * per_tap;
        let mut w = vec![half::bf16::ZERO; self.cout * self.cin * taps];
        for (o, row) in w.chunks_mut(self.cin * taps).enumerate() {
            let (g, r) = (o / T, o % T);
            for tap in 0..taps {
                for q in 0..self.cin.div_ceil(2) {
                    let t = tap * per_tap + q / T;
                    let pair = self.tiles[(g * ktiles + t) * TILE + r * T + q % T];
                    row[2 * q * taps + tap] = half::bf16::from_bits(pair as u16);
                    if 2 * q + 1 < self.cin {
                        row[(2 * q + 1) * taps + tap] = half::bf16::from_bits((pair >> 16) as u16);
                    }
                }
            }
        }
        w
    }
}

/// Input row y of one image (cin planes of h×w, w a multiple of 16; rows outside the image are
/// zeros) as qp rows of channel pairs, three times: once for each horizontal tap dx, shifted by
/// it: `rows[dx·copy + q·w + x]` = (x[2q][y][x + dx − 1], x[2q + 1][y][x + dx − 1]) rounded to
/// bfloat16, zero outside the image and for the pairs past cin that pad qp to whole tiles. The
/// B tile of tap (dy, dx), 16 channel pairs × 16 pixels of an output row, is then 16 rows of 64
/// bytes that each start on a cache line (one pair's row a tile row, w pixels apart): one padded
/// copy read at the three shifts (tried first) put two of every three tiles' rows across two
/// lines, and a tile row across two lines loads at a third of the rate (`amx_ceiling`,
/// [`super::aligned`]).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_rows(x: *const f32, cin: usize, h: usize, w: usize, y: Option<usize>, rows: *mut u32, copy: usize) {
    let qp = channel_pairs(cin);
    let filled = match y {
        Some(y) if y < h => cin.div_ceil(2),
        _ => 0,
    };
    for q in filled..qp {
        for dx in 0..3 {
            std::ptr::write_bytes(rows.add(dx * copy + q * w), 0, w);
        }
    }
    let Some(y) = y else { return };
    for q in 0..filled {
        let centre = rows.add(copy + q * w);
        let lo_row = x.add((2 * q * h + y) * w);
        let hi_row = if 2 * q + 1 < cin { Some(x.add(((2 * q + 1) * h + y) * w)) } else { None };
        let mut xx = 0;
        while xx < w {
            let lo = _mm512_loadu_ps(lo_row.add(xx));
            let hi = match hi_row {
                Some(p) => _mm512_loadu_ps(p.add(xx)),
                None => _mm512_setzero_ps(),
            };
            // pairs in pixel order
            _mm512_storeu_si512(centre.add(xx) as *mut __m512i, super::bf16::interleaved_pairs(lo, hi));
            xx += T;
        }
        // dx = 0 reads the pixel to the left (x − 1), dx = 2 the one to the right
        let (left, right) = (rows.add(q * w), rows.add(2 * copy + q * w));
        *left = 0;
        std::ptr::copy_nonoverlapping(centre, left.add(1), w - 1);
        std::ptr::copy_nonoverlapping(centre.add(1), right, w - 1);
        *right.add(w - 1) = 0;
    }
}

/// Row y of one image (cin planes of h×w, w a multiple of 16) as B tiles for kernels one pixel wide:
/// `chunks[(((y + 1)·(w/16) + xc)·qp + q)·16 + i]` = (x[2q][y][16xc + i], x[2q + 1][y][16xc + i])
/// rounded to bfloat16, with a zero row above and below. Without horizontal taps a tile never
/// straddles two 16-pixel chunks, so each B tile (16 pairs × 16 pixels) is 1 KB in one piece:
/// rows of the [`pair_rows`] layout are a whole row's length apart, which for the temporal
/// convolution's rows of 1,024 pixels put every row of a tile in its own page.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_chunks(x: *const f32, cin: usize, h: usize, w: usize, y: usize, out: *mut u32) {
    let (chunks, qp) = (w / T, channel_pairs(cin));
    // (the buffer starts zeroed: the rows above and below, padded pairs)
    for q in 0..cin.div_ceil(2) {
        let lo_row = x.add((2 * q * h + y) * w);
        let hi_row = if 2 * q + 1 < cin { Some(x.add(((2 * q + 1) * h + y) * w)) } else { None };
        for xc in 0..chunks {
            let lo = _mm512_loadu_ps(lo_row.add(xc * T));
            let hi = match hi_row {
                Some(p) => _mm512_loadu_ps(p.add(xc * T)),
                None => _mm512_setzero_ps(),
            };
            let d = out.add((((y + 1) * chunks + xc) * qp + q) * T);
            _mm512_storeu_si512(d as *mut __m512i, super::bf16::interleaved_pairs(lo, hi));
        }
    }
}

/// A `kh`×`kw` convolution (stride 1, padding `kh/2` rows and `kw/2` columns, kernels of 1 or 3)
/// of n images (cin planes of h×w, float32) with bfloat16 weights (cout, cin, kh, kw) on the
/// tiles, directly: out (n, cout, h, w) = bias + Σ over taps and input channels, each product of
/// bfloat16 operands summed in float32. The 3×3 convolutions, and the temporal ones as a 3×1
/// kernel over images of frames × pixels.
///
/// The output is the product W (cout × taps·cin) · X (taps·cin × pixels) with X never unfolded
/// by the vertical taps: each task makes its band's input rows into rows of channel pairs, one
/// copy per horizontal tap ([`pair_rows`]: three copies for 3×3, so that every tile row starts
/// on a cache line), or, for kernels one pixel wide, each image into whole 1 KB tiles once
/// ([`pair_chunks`]); the B tile of tap (dy, dx), 16 channel pairs and 16 pixels of a row, is
/// read straight from them. C tiles are 16 output channels × 16 pixels of a row, stored straight
/// into the channel-major output. Tasks are bands of rows of an image (and spans of pixels of
/// rows too long for that) whose input stays in L2 while every group of output channels passes
/// over it: the band's copies are made there and never go out to memory.
///
/// Why by hand: see the module's notes; it replaces Winograd's float32 products where the
/// weights are bfloat16 and the CPU has AMX (`kernel_speed`'s VAE and UNet rows).
///
/// # Safety
/// [`super::amx`] is true (tile state granted); [`conv_direct_fits`]`(cout, w)`; kh and kw are 1 or
/// 3, the weights' taps kh·kw; x holds n·cin·h·w floats, out n·cout·h·w, bias cout.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn conv_direct(
    x: &[f32],
    weights: &ConvTiles,
    bias: Option<&[f32]>,
    out: &mut [f32],
    n: usize,
    (h, wd): (usize, usize),
    (kh, kw): (usize, usize),
) {
    use rayon::prelude::*;
    let taps = kh * kw;
    let (cout, cin, wtaps) = weights.dims();
    assert!(conv_direct_fits(cout, wd) && x.len() >= n * cin * h * wd && out.len() >= n * cout * h * wd);
    assert!(matches!(kh, 1 | 3) && matches!(kw, 1 | 3) && wtaps == taps, "kernels of 1 or 3");
    assert!(bias.is_none_or(|b| b.len() >= cout));
    let qp = channel_pairs(cin);
    let per_tap = qp / T;
    let ktiles = taps * per_tap;
    let weights = &weights.tiles;
    // a 16×16 start tile per group of output channels: row r is that channel's bias
    let groups = cout / T;
    let mut starts = Aligned::<f32>::zeroed(if bias.is_some() { groups * TILE } else { 0 });
    if let Some(b) = bias {
        for (i, s) in starts.iter_mut().enumerate() {
            *s = b[(i / TILE) * T + (i % TILE) / T];
        }
    }
    // kernels one pixel wide read whole tiles made once for all ([`pair_chunks`]), wider ones
    // rows shifted by each horizontal tap, made by each task for its band ([`pair_rows`])
    let chunked = kw == 1;
    let chunks = wd / T;
    // bands of output rows whose input (band + kh − 1 rows of every pair plane, in kw copies)
    // fits about 1 MB, and spans of whole pixel groups of each row where a row alone is more
    let per_row = wd / T;
    let group_bytes = kh * kw * qp * T * 4;
    let span = ((1 << 20) / group_bytes).clamp(1, per_row);
    let spans = per_row.div_ceil(span);
    let row_bytes = kw * qp * wd * 4;
    // (and at least four tasks a thread in all, for one image of few rows)
    let band = if spans > 1 {
        1
    } else {
        ((1 << 20) / row_bytes).saturating_sub(kh - 1).clamp(1, h).min((n * h).div_ceil(4 * super::threads()))
    };
    let bands = h.div_ceil(band);
    // an image's pairs: h + 2 rows of chunks of qp·16 pairs; a band's: kw copies of band + 2
    // rows of qp pairs' rows of w pixels
    let image = (h + 2) * chunks * qp * T;
    let copy = (band + 2) * qp * wd;
    // B's offset (in u32) for each depth tile, from the pairs of the output row's top-left
    // padded pixel: tap (dy, dx) of a kernel centred by its padding, channel tile cb
    let (ph, pwd) = (kh / 2, kw / 2);
    let b_off: Vec<usize> = (0..ktiles)
        .map(|t| {
            let (tap, cb) = (t / per_tap, t % per_tap);
            let (dy, dx) = (tap / kw + 1 - ph, tap % kw + 1 - pwd);
            if chunked {
                (dy * chunks * qp + cb * T) * T
            } else {
                (dx * copy) + (dy * qp + cb * T) * wd
            }
        })
        .collect();
    let b_stride = if chunked { T * 4 } else { wd * 4 };
    let mut planes = Aligned::<u32>::zeroed(if chunked { n * image } else { 0 });
    if chunked {
        // row by row on every thread
        let pp = super::SendPtr(planes.as_mut_ptr());
        (0..n * h).into_par_iter().for_each(|r| {
            let (i, y) = (r / h, r % h);
            // SAFETY: features checked by the caller; image i has cin planes of h×w and its
            // pairs `image` u32 from i·image; each row y writes its own rows of the layout.
            unsafe { pair_chunks(x.as_ptr().add(i * cin * h * wd), cin, h, wd, y, pp.get().add(i * image)) }
        });
    }
    let hw = h * wd;
    let optr = super::SendPtr(out.as_mut_ptr());
    // (read-only in the tasks)
    let pp = super::SendPtr(planes.as_ptr() as *mut u32);
    let wp = super::SendPtr(weights.as_ptr() as *mut u32);
    let sp = super::SendPtr(starts.as_ptr() as *mut f32);
    let has_bias = bias.is_some();
    (0..n * bands * spans).into_par_iter().for_each(|task| {
        let (img, bi, si) = (task / (bands * spans), (task / spans) % bands, task % spans);
        let (y0, y1) = (bi * band, ((bi + 1) * band).min(h));
        let (x0, x1) = (si * span, ((si + 1) * span).min(per_row));
        // SAFETY: the tile state was granted (caller); each task writes the output pixels of
        // its band and span of its image only, for every channel.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly, preserves_flags));
            let outi = optr.get().add(img * cout * hw);
            // this band's input rows y0 − 1 .. y1 + 1, in the kw shifted copies (on this
            // thread, in L2 while every group of output channels passes over them)
            let mut local = BAND_ROWS.with(|b| b.take());
            let planes = if chunked {
                pp.get().add(img * image) as *const u32
            } else {
                if local.len() < kw * copy {
                    local = Aligned::zeroed(kw * copy);
                }
                let xi = x.as_ptr().add(img * cin * h * wd);
                for r in 0..y1 - y0 + 2 {
                    let y = (y0 + r).checked_sub(1);
                    pair_rows(xi, cin, h, wd, y, local.as_mut_ptr().add(r * qp * wd), copy);
                }
                local.as_ptr()
            };
            // pixel groups of the task: (row, first pixel)
            let across = x1 - x0;
            let pixel_groups = (y1 - y0) * across;
            let origin = |g: usize| {
                let (y, xg) = (y0 + g / across, x0 + g % across);
                let at = if chunked { (y * chunks + xg) * qp * T } else { (y - y0) * qp * wd + xg * T };
                (planes.add(at), y * wd + xg * T)
            };
            let mut g0 = 0;
            while g0 < groups {
                let ra = 2.min(groups - g0);
                let a = wp.get().add(g0 * ktiles * TILE) as *const u32;
                // C starts from each channel group's tile of biases, or zero
                let start = if has_bias {
                    let s = [sp.get().add(g0 * TILE) as *const f32, sp.get().add((g0 + ra - 1) * TILE) as *const f32];
                    Start::Load([[s[0], s[0]], [s[1], s[1]]], 64)
                } else {
                    Start::Zero
                };
                let a = [a, a.add(ktiles * TILE)];
                let mut p0 = 0;
                while p0 < pixel_groups {
                    let nb = 2.min(pixel_groups - p0);
                    let (b0, o0) = origin(p0);
                    let (b1, o1) = origin(p0 + nb - 1);
                    let c = [
                        [outi.add(g0 * T * hw + o0), outi.add(g0 * T * hw + o1)],
                        [outi.add((g0 + ra - 1) * T * hw + o0), outi.add((g0 + ra - 1) * T * hw + o1)],
                    ];
                    let b = [b0, b1];
                    let b_at = |j: usize, t: usize| b[j].add(b_off[t]);
                    block_of(ra, nb, ktiles, a, b_at, b_stride, c, hw * 4, start);
                    p0 += nb;
                }
                g0 += ra;
            }
            asm!("tilerelease", options(nostack, nomem, preserves_flags));
            BAND_ROWS.with(|b| b.replace(local));
        }
    });
}
