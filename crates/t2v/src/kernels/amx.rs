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
/// Depth tiles per packed block: two B panels of 16·16 pairs (32 KiB) stay in L1 while every
/// A tile pair of the block passes.
const KT: usize = 16;
/// Rows of A per packed block (`MC` × 256 pairs × 4 bytes = 384 KiB, in L2).
const MC: usize = 384;

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

/// How a block of C starts.
#[derive(Clone, Copy)]
enum Start {
    /// Zero.
    Zero,
    /// C's own values (accumulate).
    Own,
    /// One per-column value repeated down every row (32 floats: the block's columns).
    Bias(*const f32),
}

/// The micro-kernel: a block of `RA`·16 rows × `NB`·16 columns of C (rows `ldc` floats apart),
/// `C = start + Σ_t A_t · B_t` over `kt` depth tiles: A tiles at `a + (p·a_stride + t)·256`, B
/// tiles at `b[j] + t·256` (the last at `last[j]` where `ragged`).
///
/// # Safety
/// The tile configuration is loaded on this thread; the pointers cover what is said above.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<const RA: usize, const NB: usize>(
    kt: usize,
    a: *const u32,
    a_stride: usize,
    b: [*const u32; 2],
    last: [*const u32; 2],
    ragged: bool,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    let row_bytes = ldc * 4;
    let c_at = |p: usize, j: usize| c.add(p * T * ldc + j * T);
    match start {
        Start::Zero => {
            tile_zero!("0");
            tile_zero!("1");
            tile_zero!("2");
            tile_zero!("3");
        }
        Start::Own => {
            tile_load!("0", c_at(0, 0), row_bytes);
            if NB == 2 {
                tile_load!("1", c_at(0, 1), row_bytes);
            }
            if RA == 2 {
                tile_load!("2", c_at(1, 0), row_bytes);
                if NB == 2 {
                    tile_load!("3", c_at(1, 1), row_bytes);
                }
            }
        }
        Start::Bias(bias) => {
            // stride 0: the same 16 values in every row
            tile_load!("0", bias, 0usize);
            tile_load!("1", bias.add(T), 0usize);
            tile_load!("2", bias, 0usize);
            tile_load!("3", bias.add(T), 0usize);
        }
    }
    let a1 = a.add(a_stride * TILE);
    let b_at = |j: usize, t: usize| if ragged && t + 1 == kt { last[j] } else { b[j].add(t * TILE) };
    if RA == 2 && NB == 2 {
        // Software-pipelined: a tile register is loaded again as soon as its last product of
        // this depth has been issued, so that the loads of depth t overlap the products of
        // t − 1 (tiles are not renamed: a load waits for the products reading its register).
        // Measured on Emerald Rapids with A in L2: 360–415 → 480–634 GFLOP/s a core.
        tile_load!("4", a, 64usize);
        tile_load!("6", b_at(0, 0), 64usize);
        tile_load!("7", b_at(1, 0), 64usize);
        tile_load!("5", a1, 64usize);
        for t in 1..kt {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tileloadd tmm5, [{a1} + {s}*1]",
                a0 = in(reg) a.add(t * TILE),
                a1 = in(reg) a1.add(t * TILE),
                b0 = in(reg) b_at(0, t),
                b1 = in(reg) b_at(1, t),
                s = in(reg) 64usize,
                options(nostack, readonly, preserves_flags)
            );
        }
        tile_dot!("0", "4", "6");
        tile_dot!("1", "4", "7");
        tile_dot!("2", "5", "6");
        tile_dot!("3", "5", "7");
    } else {
        for t in 0..kt {
            tile_load!("4", a.add(t * TILE), 64usize);
            tile_load!("6", b_at(0, t), 64usize);
            tile_dot!("0", "4", "6");
            if NB == 2 {
                tile_load!("7", b_at(1, t), 64usize);
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
    tile_store!("0", c_at(0, 0), row_bytes);
    if NB == 2 {
        tile_store!("1", c_at(0, 1), row_bytes);
    }
    if RA == 2 {
        tile_store!("2", c_at(1, 0), row_bytes);
        if NB == 2 {
            tile_store!("3", c_at(1, 1), row_bytes);
        }
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
                match a {
                    Lhs::Rows(a, lda) => pack_rows(a, lda, k, i0, mc, kq0, klp, apack),
                    Lhs::PanelsBf16(p, depth) => pack_panels(p, depth.div_ceil(2), i0, mc, kq0, klp, apack),
                    Lhs::Panels(..) => unreachable!("a bfloat16 B goes with float32 rows or bfloat16 panels"),
                }
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
                            l[..have * T].copy_from_slice(std::slice::from_raw_parts(bp[j].add((kt - 1) * TILE), have * T));
                        }
                    }
                    let lp = [last[0].as_ptr(), last[1].as_ptr()];
                    let cols = (nb * NR).min(n - jr * NR);
                    let start = match init {
                        Init::Bias(bias) if kb == 0 => {
                            bias_row.fill(0.0);
                            bias_row[..cols].copy_from_slice(&bias[jr * NR..jr * NR + cols]);
                            Start::Bias(bias_row.as_ptr())
                        }
                        Init::Overwrite if kb == 0 => Start::Zero,
                        _ => Start::Own,
                    };
                    let mut it = 0;
                    while it < nit {
                        let ra = 2.min(nit - it);
                        let rows = (ra * T).min(mc - it * T);
                        let ap = apack.add(it * kt * TILE) as *const u32;
                        let cp = c.add((i0 + it * T) * ldc + jr * NR);
                        if rows == ra * T && cols == nb * NR {
                            block_of(ra, nb, kt, ap, kt, bp, lp, ragged, cp, ldc, start);
                        } else {
                            // through a 32×32 scratch block: C's part copied in to accumulate
                            let s = scratch.0.as_mut_ptr();
                            if let Start::Own = start {
                                for r in 0..rows {
                                    std::ptr::copy_nonoverlapping(cp.add(r * ldc), s.add(r * 2 * T), cols);
                                }
                            }
                            block_of(ra, nb, kt, ap, kt, bp, lp, ragged, s, 2 * T, start);
                            for r in 0..rows {
                                std::ptr::copy_nonoverlapping(s.add(r * 2 * T), cp.add(r * ldc), cols);
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

/// [`block`] for `ra` A tiles and `nb` B panels (1 or 2 each) known at run time.
#[allow(clippy::too_many_arguments)]
unsafe fn block_of(
    ra: usize,
    nb: usize,
    kt: usize,
    a: *const u32,
    a_stride: usize,
    b: [*const u32; 2],
    last: [*const u32; 2],
    ragged: bool,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    match (ra, nb) {
        (2, 2) => block::<2, 2>(kt, a, a_stride, b, last, ragged, c, ldc, start),
        (2, _) => block::<2, 1>(kt, a, a_stride, b, last, ragged, c, ldc, start),
        (_, 2) => block::<1, 2>(kt, a, a_stride, b, last, ragged, c, ldc, start),
        _ => block::<1, 1>(kt, a, a_stride, b, last, ragged, c, ldc, start),
    }
}
