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
//! a panel.
//!
//! The tile state: Linux hands it to a process only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
//! done once when the path is detected, [`request_tile_state`]); each product loads the tile
//! configuration on its thread (`ldtilecfg`) and releases the tiles after (`tilerelease`), so
//! that threads not in a product carry no tile state through context switches.

use std::arch::asm;
use std::arch::x86_64::*;

use super::packed_matmul::{Init, Lhs, PackedB, MR, NR};

/// Rows (and float32 columns) of a tile; pairs of a tile's row.
const T: usize = 16;
/// u32 (pairs or floats) in one tile.
const TILE: usize = T * T;
/// Depth tiles per packed block (512 pairs, 1,024 depths) and rows of A per packed block (64:
/// 128 KiB of A tiles, and a block of C that stays in L2 between depth blocks). Chosen by
/// `kernel_speed`'s "bf16 linear … product" rows on Emerald Rapids (GFLOP/s of the product alone,
/// 2 cores, best of 5, a noisy machine): from 16 tiles × 384 rows to 32 × 64,
/// 8192×320·320×2560 214–247 → 488–661, 2048×2560·2560×640 369–452 → 506–629,
/// 512×5120·5120×1280 473–494 → 565; 16 × 64, 32 × 32, 64 × 64 and 32 × 128 measured between.
const KT: usize = 32;
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
    static A_PACK: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
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
pub(super) fn tiles_of_panels(panels: &[u32], m: usize, kp: usize) -> Vec<u32> {
    let tiles = kp.div_ceil(T);
    let mut out = vec![0u32; m.div_ceil(T) * tiles * TILE];
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
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    // blocks of whole depth tiles, so that only the last one is ragged
    let nkb = kp.div_ceil(KT * T).max(1);
    let kcp = kp.div_ceil(nkb).div_ceil(T) * T;
    asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly, preserves_flags));
    let mut scratch = Scratch([0f32; 4 * TILE]);
    let mut bias_row = [0f32; 2 * T];
    let mut last = [[0u32; TILE]; 2];
    A_PACK.with(|ap| {
        let mut apack = ap.borrow_mut();
        let need = MC.div_ceil(T) * kcp * T;
        if apack.len() < need {
            apack.resize(need, 0);
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
                    Lhs::PanelsBf16(p, depth) => {
                        pack_panels(p, depth.div_ceil(2), i0, mc, kq0, klp, apack);
                        (apack as *const u32, kt)
                    }
                    Lhs::TilesBf16(p, groups_tiles) => {
                        (p.add(((i0 / T) * groups_tiles + kq0 / T) * TILE), groups_tiles)
                    }
                    Lhs::Panels(..) => unreachable!("a bfloat16 B goes with float32 rows or bfloat16 panels"),
                };
                let ragged = !klp.is_multiple_of(T);
                let mut jr = 0;
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
                            l.fill(0);
                            l[..have * T]
                                .copy_from_slice(std::slice::from_raw_parts(bp[j].add((kt - 1) * TILE), have * T));
                        }
                    }
                    let lp = [last[0].as_ptr(), last[1].as_ptr()];
                    let cols = (nb * NR).min(n - jr * NR);
                    // how C starts: from the bias row (stride 0: the same 32 values in every row),
                    // zero, or its own values (C's block, or the scratch block's copy of it)
                    let bias_start = match init {
                        Init::Bias(bias) if kb == 0 => {
                            bias_row.fill(0.0);
                            bias_row[..cols].copy_from_slice(&bias[jr * NR..jr * NR + cols]);
                            Some(bias_row.as_ptr())
                        }
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
                        let cp = c.add((i0 + it * T) * ldc + jr * NR);
                        let full = rows == ra * T && cols == nb * NR;
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
                        if !full {
                            for r in 0..rows {
                                std::ptr::copy_nonoverlapping(cb.add(r * ld), cp.add(r * ldc), cols);
                            }
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

/// A 32×32 block of float32, aligned for the tile stores.
#[repr(C, align(64))]
struct Scratch([f32; 4 * TILE]);

/// Whether [`conv3x3`] takes a convolution of these sizes: output channels in whole tiles and
/// image rows in whole 16-pixel groups (the UNet's 32² and 16² levels and every VAE level at
/// 256×256; narrower images take Winograd).
pub(crate) fn conv3x3_fits(cout: usize, w: usize) -> bool {
    cout > 0 && cout.is_multiple_of(T) && w > 0 && w.is_multiple_of(T)
}

/// Pairs of input channels of a 3×3 convolution, padded to whole depth tiles.
fn channel_pairs(cin: usize) -> usize {
    cin.div_ceil(2 * T) * T
}

/// The weights (cout, cin, 3, 3) as A tiles: row = output channel, depth = (tap, input channel),
/// `[16-channel group][tap · tiles a tap + channel tile][16][16]` pairs (channels past cin zero).
fn conv_weight_tiles(w: &[half::bf16], cin: usize, cout: usize) -> Vec<u32> {
    use rayon::prelude::*;
    let qp = channel_pairs(cin);
    let per_tap = qp / T;
    let ktiles = 9 * per_tap;
    let mut out = vec![0u32; cout.div_ceil(T) * ktiles * TILE];
    out.par_chunks_mut(ktiles * TILE).enumerate().for_each(|(g, dst)| {
        for r in 0..T.min(cout - g * T) {
            let row = &w[(g * T + r) * cin * 9..][..cin * 9];
            for tap in 0..9 {
                for q in 0..cin.div_ceil(2) {
                    let lo = row[2 * q * 9 + tap].to_bits() as u32;
                    let hi = if 2 * q + 1 < cin { row[(2 * q + 1) * 9 + tap].to_bits() as u32 } else { 0 };
                    let t = tap * per_tap + q / T;
                    dst[(t * T + r) * T + q % T] = lo | hi << 16;
                }
            }
        }
    });
    out
}

/// One image (cin planes of h×w) as rows of channel pairs with a border of one zero pixel:
/// `rows[((y + 1)·qp + q)·(w + 2) + x + 1]` = (x[2q][y][x], x[2q + 1][y][x]) rounded to bfloat16
/// (qp pairs padded to whole tiles), so that 16 consecutive pixels of a pair's row are one row
/// of a B tile and the next pair's row (w + 2 pixels on) the next: a tile spans a few KB, where
/// whole pair planes a tile row apart (tried first) put its 16 rows in 16 pages.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_rows(x: *const f32, cin: usize, h: usize, w: usize, rows: &mut [u32]) {
    let (pw, qp) = (w + 2, channel_pairs(cin));
    // (the buffer starts zeroed: borders, padded pairs)
    for y in 0..h {
        for q in 0..cin.div_ceil(2) {
            let d = rows.as_mut_ptr().add(((y + 1) * qp + q) * pw + 1);
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
                _mm512_storeu_si512(d.add(xx) as *mut __m512i, super::bf16::interleaved_pairs(lo, hi));
                xx += T;
            }
        }
    }
}

/// A 3×3 convolution (stride 1, padding 1) of n images (cin planes of h×w, float32) with
/// bfloat16 weights on the tiles, directly: out (n, cout, h, w) = bias + Σ over taps and input
/// channels, each product of bfloat16 operands summed in float32.
///
/// The output is the product W (cout × 9·cin) · X (9·cin × pixels) with X never unfolded: each
/// image becomes rows of channel pairs with a zero border ([`pair_rows`]), and the B tile of
/// tap (dy, dx), 16 channel pairs and 16 pixels of a row is read straight from them (16 pixels
/// shifted by the tap, one pair's row a tile row). C tiles are 16 output channels × 16 pixels of a
/// row, stored straight into the channel-major output. Tasks are bands of rows of an image
/// whose pair planes stay in L2 while every group of output channels passes over them.
///
/// Why by hand: see the module's notes; it replaces Winograd's float32 products where the
/// weights are bfloat16 and the CPU has AMX (`kernel_speed`'s VAE and UNet rows).
///
/// # Safety
/// [`super::amx`] is true (tile state granted); [`conv3x3_fits`]`(cout, w)`; x holds n·cin·h·w
/// floats, w cout·cin·9, out n·cout·h·w, bias cout.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn conv3x3(
    x: &[f32],
    w: &[half::bf16],
    bias: Option<&[f32]>,
    out: &mut [f32],
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    wd: usize,
) {
    use rayon::prelude::*;
    assert!(conv3x3_fits(cout, wd) && x.len() >= n * cin * h * wd && out.len() >= n * cout * h * wd);
    assert!(w.len() >= cout * cin * 9 && bias.is_none_or(|b| b.len() >= cout));
    let qp = channel_pairs(cin);
    let per_tap = qp / T;
    let ktiles = 9 * per_tap;
    let weights = conv_weight_tiles(w, cin, cout);
    // a 16×16 start tile per group of output channels: row r is that channel's bias
    let groups = cout / T;
    let starts: Vec<f32> = match bias {
        Some(b) => (0..groups * TILE).map(|i| b[(i / TILE) * T + (i % TILE) / T]).collect(),
        None => Vec::new(),
    };
    let pw = wd + 2;
    // an image's pair rows: h + 2 rows of qp pairs' rows of pw pixels
    let image = (h + 2) * qp * pw;
    // B's offset (in u32) for each depth tile: tap (dy, dx), channel tile cb
    let b_off: Vec<usize> = (0..ktiles)
        .map(|t| {
            let (tap, cb) = (t / per_tap, t % per_tap);
            ((tap / 3) * qp + cb * T) * pw + tap % 3
        })
        .collect();
    // bands of output rows whose input rows (band + 2) of every pair plane fit about 1 MB
    let row_bytes = qp * pw * 4;
    // (and at least four bands a thread in all, for one image of few rows)
    let band = ((1 << 20) / row_bytes).saturating_sub(2).clamp(1, h).min((n * h).div_ceil(4 * super::threads()));
    let bands = h.div_ceil(band);
    let mut planes = vec![0u32; n * image];
    planes.par_chunks_mut(image).enumerate().for_each(|(i, p)| {
        // SAFETY: features checked by the caller; image i has cin planes of h×w.
        unsafe { pair_rows(x.as_ptr().add(i * cin * h * wd), cin, h, wd, p) }
    });
    let hw = h * wd;
    let optr = super::SendPtr(out.as_mut_ptr());
    // (read-only in the tasks)
    let pp = super::SendPtr(planes.as_ptr() as *mut u32);
    let wp = super::SendPtr(weights.as_ptr() as *mut u32);
    let sp = super::SendPtr(starts.as_ptr() as *mut f32);
    let has_bias = bias.is_some();
    (0..n * bands).into_par_iter().for_each(|task| {
        let (img, bi) = (task / bands, task % bands);
        let (y0, y1) = (bi * band, ((bi + 1) * band).min(h));
        // SAFETY: the tile state was granted (caller); each task writes the output rows of its
        // band of its image only, for every channel.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly, preserves_flags));
            let planes = pp.get().add(img * image) as *const u32;
            let outi = optr.get().add(img * cout * hw);
            // pixel groups of the band: (row, first pixel)
            let per_row = wd / T;
            let pixel_groups = (y1 - y0) * per_row;
            let origin = |g: usize| {
                let (y, xg) = (y0 + g / per_row, g % per_row);
                (planes.add(y * qp * pw + xg * T), y * wd + xg * T)
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
                    block_of(ra, nb, ktiles, a, b_at, pw * 4, c, hw * 4, start);
                    p0 += nb;
                }
                g0 += ra;
            }
            asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }
    });
}
