//! Vectorised elementwise functions (AVX2 + FMA, eight lanes; `exp` also on sixteen) for the fused kernels: `exp`,
//! SiLU and the exact (erf) GELU. Each is within a few units in the last place of float32 (the
//! GELU's erfc within 1.2e-7 relative, Numerical Recipes' Chebyshev fit), as accurate as torch's
//! own vectorised CPU versions; callers check [`super::avx2`] first. Our own because the
//! fused kernels apply them to eight lanes at a time inside their loops, where candle's are
//! whole-tensor ops.

use std::arch::x86_64::*;

/// e^x (Cephes' single-precision polynomial, ≤ 2 ulp). Arguments are clamped to
/// [−87.33, 88.37]: below, e^x is under float32's normal range and comes out ~1e-38 rather
/// than a subnormal; above, it would overflow.
#[inline(always)]
pub unsafe fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33)), _mm256_set1_ps(88.37));
    let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // x − fx·ln2 with ln2 split in two parts, so the reduced argument is exact to f32
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_2e-4);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.398_2e-3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.333_452e-3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.166_579_6e-2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.166_666_65));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // 2^fx, built in the exponent field (fx ∈ [−126, 128] after the clamp)
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}

/// [`exp`] on sixteen lanes (AVX-512F): the same polynomial and steps, so each lane's result is
/// the eight-lane form's.
#[inline(always)]
pub unsafe fn exp512(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33)), _mm512_set1_ps(88.37));
    let fx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_2e-4);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.398_2e-3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.333_452e-3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.166_579_6e-2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.166_666_65));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)));
    _mm512_mul_ps(y, _mm512_castsi512_ps(pow2))
}

/// SiLU, x·σ(x) = x / (1 + e^−x).
#[inline(always)]
pub unsafe fn silu(x: __m256) -> __m256 {
    let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
    _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
}

/// GELU with the exact erf, ½x(1 + erf(x/√2)), as `F.gelu`: with z = |x|/√2, erfc(z) =
/// t·e^(−z² + P(t)), t = 1/(1 + z/2); x ≥ 0 gives x(1 − ½erfc(z)), x < 0 gives ½x·erfc(z)
/// (no cancellation on the negative side, where the value is small).
#[inline(always)]
pub unsafe fn gelu(x: __m256) -> __m256 {
    let sign_mask = _mm256_set1_ps(-0.0);
    let z = _mm256_mul_ps(_mm256_andnot_ps(sign_mask, x), _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let one = _mm256_set1_ps(1.0);
    let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.5), z, one));
    // Numerical Recipes' coefficients as published (rounded to f32 here).
    #[allow(clippy::excessive_precision)]
    const C: [f32; 10] = [
        -1.265_512_2,
        1.000_023_7,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let mut p = _mm256_set1_ps(C[9]);
    for &c in C[..9].iter().rev() {
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
    }
    let erfc = _mm256_mul_ps(t, exp(_mm256_fnmadd_ps(z, z, p)));
    let half = _mm256_set1_ps(0.5);
    let pos = _mm256_mul_ps(x, _mm256_fnmadd_ps(half, erfc, one));
    let neg = _mm256_mul_ps(_mm256_mul_ps(half, x), erfc);
    _mm256_blendv_ps(pos, neg, x)
}
