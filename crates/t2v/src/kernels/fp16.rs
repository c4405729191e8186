//! The float16 micro-kernel of the packed matrix product for CPUs with AVX512_FP16
//! ([`super::Isa::Avx512Fp16`], Intel since Sapphire Rapids): what `--dtype f16` runs on the CPU.
//!
//! Why our own, and why this form: `vfmadd231ph` does 32 multiply-adds an instruction at the rate
//! of `vfmadd231ps`'s 16 (Emerald Rapids, one core: 376 against 176 GFLOP/s, `amx_ceiling`),
//! twice the float32 products' peak where no AMX is present. Its sums are float16, so each
//! lane sums at most [`CHUNK`] products in float16 before they are widened and added into the
//! float32 output: float16's 11 significant bits then cost about as much as rounding the
//! operands does (a sum of c terms rounds with an error growing as √c), and the float32
//! output carries the whole depth. With float16 operands (three more bits than bfloat16) the
//! products deviate from float32 by less than the bfloat16 ones, at twice the bfloat16
//! `vdpbf16ps`'s rate on these cores.
//!
//! Operands are [`super::bf16`]'s pairs, in float16: B panels `[kq][16]` of (even, odd depth)
//! pairs, A micro-panels `[kq][6]` of pairs broadcast whole. Each lane of an accumulator then
//! sums one column's even-depth (low half) or odd-depth (high half) products; at a flush the two
//! halves are added (float16), narrowed to 16 columns and widened to float32.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::packed_matmul::{MR, NR};

/// Pairs of depths summed in float16 before a flush into float32: each half-lane sums this many
/// products. 32 (a depth of 64) keeps the float16 sums' rounding below the operands' (see the
/// module's note); a flush takes five vector instructions per accumulator against its 32
/// multiply-adds (about 15% more instructions, not all on the FMA ports).
pub(super) const CHUNK: usize = 32;

super::packed_matmul::tile_by_count!(pub(super) tile_of, tile, u32);

/// The micro-kernel: a tile of `RA`·6 rows × `NB`·16 columns, `c[r][..] = start + Σ_kq
/// a[kq][r] · b[kq][..]` where each term is a pair's two products, summed in float16 a
/// [`CHUNK`] of pairs at a time and then added into c in float32; A in `RA` micro-panels
/// `[kq][MR]` of pairs, B in `NB` panels `[kq][NR]` of pairs, `start` c's own value (`acc`),
/// `bias` (NB·16 per-column values) or zero. Rows of c are `ldc` apart, its column panels `cjs`.
///
/// # Safety
/// AVX512_FP16 present; `a[..RA]` hold kp·6 pairs, `b[..NB]` kp·16, c `RA`·6 rows of `NB` panels.
#[target_feature(enable = "avx512f,avx512bw,avx512fp16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const RA: usize, const NB: usize>(
    kp: usize,
    a: [*const u32; 2],
    b: [*const u32; 2],
    c: *mut f32,
    ldc: usize,
    cjs: usize,
    acc: bool,
    bias: *const f32,
) {
    let mut kq0 = 0;
    let mut first = true;
    loop {
        let kl = CHUNK.min(kp - kq0);
        let mut sums = [[_mm512_setzero_ph(); 2]; 2 * MR];
        for kq in kq0..kq0 + kl {
            let mut bv = [_mm512_setzero_ph(); 2];
            for j in 0..NB {
                bv[j] = _mm512_castsi512_ph(_mm512_loadu_si512(b[j].add(kq * NR) as *const __m512i));
            }
            for p in 0..RA {
                let ak = a[p].add(kq * MR);
                for r in 0..MR {
                    let x = _mm512_castsi512_ph(_mm512_set1_epi32(*ak.add(r) as i32));
                    for j in 0..NB {
                        sums[p * MR + r][j] = _mm512_fmadd_ph(x, bv[j], sums[p * MR + r][j]);
                    }
                }
            }
        }
        for (r, row) in sums.iter().enumerate().take(RA * MR) {
            for (j, v) in row.iter().enumerate().take(NB) {
                // even + odd depths in each pair's low half, then the 16 low halves as float32
                let odd = _mm512_castsi512_ph(_mm512_srli_epi32::<16>(_mm512_castph_si512(*v)));
                let both = _mm512_castph_si512(_mm512_add_ph(*v, odd));
                let sum = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(both));
                let p = c.add(r * ldc + j * cjs);
                let start = if !first || acc {
                    _mm512_loadu_ps(p)
                } else if !bias.is_null() {
                    _mm512_loadu_ps(bias.add(j * NR))
                } else {
                    _mm512_setzero_ps()
                };
                _mm512_storeu_ps(p, _mm512_add_ps(start, sum));
            }
        }
        first = false;
        kq0 += kl;
        if kq0 >= kp {
            break;
        }
    }
}
