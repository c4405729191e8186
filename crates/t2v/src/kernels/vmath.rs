//! Vectorised elementwise functions for the fused kernels: `exp` (on 8 or 16 lanes, through
//! [`F32s`]), SiLU and the exact (erf) GELU (8 lanes, AVX2 + FMA). Each is within a few units in
//! the last place of float32 (the
//! GELU's erfc within 1.2e-7 relative, Numerical Recipes' Chebyshev fit), as accurate as torch's
//! own vectorised CPU versions; callers check [`super::avx2`] first. Our own because the
//! fused kernels apply them to eight lanes at a time inside their loops, where candle's are
//! whole-tensor ops.

use std::arch::x86_64::*;

/// Float32 vectors of 8 (AVX2 + FMA) or 16 (AVX-512F) lanes, so that a kernel's arithmetic is
/// written once for both widths: the same operations in the same order, lane by lane (so the two
/// widths give the same numbers). Callers run inside functions compiled for the width's features.
pub(crate) trait F32s: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn div(self, b: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
    unsafe fn min(self, b: Self) -> Self;
    /// a·b + c
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    /// a·b − c
    unsafe fn fmsub(a: Self, b: Self, c: Self) -> Self;
    /// c − a·b
    unsafe fn fnmadd(a: Self, b: Self, c: Self) -> Self;
    /// Rounded to the nearest integer (ties to even).
    unsafe fn round(self) -> Self;
    /// 2^n for integral n in [−126, 128], built in the exponent field.
    unsafe fn pow2(self) -> Self;
    /// |x|: the sign bit cleared.
    unsafe fn abs(self) -> Self;
    /// Lane by lane, `neg` where `sign`'s sign bit is set, else `pos`.
    unsafe fn by_sign(sign: Self, pos: Self, neg: Self) -> Self;
}

macro_rules! f32s {
    ($t:ty, $lanes:expr, $zero:ident, $set1:ident, $load:ident, $store:ident, $add:ident, $sub:ident,
     $mul:ident, $div:ident, $max:ident, $min:ident, $fmadd:ident, $fmsub:ident, $fnmadd:ident,
     round: |$r:ident| $round:expr, pow2: |$p:ident| $pow2:expr, abs: |$a:ident| $abs:expr,
     by_sign: |$s:ident, $pos:ident, $neg:ident| $by_sign:expr) => {
        impl F32s for $t {
            const LANES: usize = $lanes;
            #[inline(always)]
            unsafe fn zero() -> Self {
                $zero()
            }
            #[inline(always)]
            unsafe fn splat(x: f32) -> Self {
                $set1(x)
            }
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                $load(p)
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                $store(p, self)
            }
            #[inline(always)]
            unsafe fn add(self, b: Self) -> Self {
                $add(self, b)
            }
            #[inline(always)]
            unsafe fn sub(self, b: Self) -> Self {
                $sub(self, b)
            }
            #[inline(always)]
            unsafe fn mul(self, b: Self) -> Self {
                $mul(self, b)
            }
            #[inline(always)]
            unsafe fn div(self, b: Self) -> Self {
                $div(self, b)
            }
            #[inline(always)]
            unsafe fn max(self, b: Self) -> Self {
                $max(self, b)
            }
            #[inline(always)]
            unsafe fn min(self, b: Self) -> Self {
                $min(self, b)
            }
            #[inline(always)]
            unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
                $fmadd(a, b, c)
            }
            #[inline(always)]
            unsafe fn fmsub(a: Self, b: Self, c: Self) -> Self {
                $fmsub(a, b, c)
            }
            #[inline(always)]
            unsafe fn fnmadd(a: Self, b: Self, c: Self) -> Self {
                $fnmadd(a, b, c)
            }
            #[inline(always)]
            unsafe fn round(self) -> Self {
                let $r = self;
                $round
            }
            #[inline(always)]
            unsafe fn pow2(self) -> Self {
                let $p = self;
                $pow2
            }
            #[inline(always)]
            unsafe fn abs(self) -> Self {
                let $a = self;
                $abs
            }
            #[inline(always)]
            unsafe fn by_sign(sign: Self, pos: Self, neg: Self) -> Self {
                let ($s, $pos, $neg) = (sign, pos, neg);
                $by_sign
            }
        }
    };
}

f32s!(__m256, 8, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, _mm256_sub_ps,
    _mm256_mul_ps, _mm256_div_ps, _mm256_max_ps, _mm256_min_ps, _mm256_fmadd_ps, _mm256_fmsub_ps, _mm256_fnmadd_ps,
    round: |x| _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x),
    pow2: |n| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)))),
    abs: |x| _mm256_andnot_ps(_mm256_set1_ps(-0.0), x),
    by_sign: |s, pos, neg| _mm256_blendv_ps(pos, neg, s));

f32s!(__m512, 16, _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps, _mm512_sub_ps,
    _mm512_mul_ps, _mm512_div_ps, _mm512_max_ps, _mm512_min_ps, _mm512_fmadd_ps, _mm512_fmsub_ps, _mm512_fnmadd_ps,
    round: |x| _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x),
    pow2: |n| _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)))),
    abs: |x| _mm512_abs_ps(x),
    by_sign: |s, pos, neg| _mm512_mask_blend_ps(
        _mm512_test_epi32_mask(_mm512_castps_si512(s), _mm512_set1_epi32(i32::MIN)), pos, neg));

/// e^x (Cephes' single-precision polynomial, ≤ 2 ulp). Arguments are clamped to
/// [−87.33, 88.37]: below, e^x is under float32's normal range and comes out ~1e-38 rather
/// than a subnormal; above, it would overflow.
#[inline(always)]
pub(crate) unsafe fn exp<V: F32s>(x: V) -> V {
    let x = x.max(V::splat(-87.33)).min(V::splat(88.37));
    let fx = x.mul(V::splat(std::f32::consts::LOG2_E)).round();
    // x − fx·ln2 with ln2 split in two parts, so the reduced argument is exact to f32
    let r = V::fnmadd(fx, V::splat(0.693_359_4), x);
    let r = V::fnmadd(fx, V::splat(-2.121_944_4e-4), r);
    let mut y = V::splat(1.987_569_2e-4);
    y = V::fmadd(y, r, V::splat(1.398_2e-3));
    y = V::fmadd(y, r, V::splat(8.333_452e-3));
    y = V::fmadd(y, r, V::splat(4.166_579_6e-2));
    y = V::fmadd(y, r, V::splat(0.166_666_65));
    y = V::fmadd(y, r, V::splat(0.5));
    y = V::fmadd(y, r.mul(r), r.add(V::splat(1.0)));
    // 2^fx (fx ∈ [−126, 128] after the clamp)
    y.mul(fx.pow2())
}

/// SiLU, x·σ(x) = x / (1 + e^−x).
#[inline(always)]
pub unsafe fn silu(x: __m256) -> __m256 {
    let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
    _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
}

/// GELU with the exact erf, ½x(1 + erf(x/√2)), as `F.gelu`: with z = |x|/√2, erfc(z) =
/// t·e^(−z² + P(t)), t = 1/(1 + z/2); x ≥ 0 gives x(1 − ½erfc(z)), x < 0 gives ½x·erfc(z)
/// (no cancellation on the negative side, where the value is small). The same operations on 8
/// or 16 lanes, so the same numbers at either width.
#[inline(always)]
pub(crate) unsafe fn gelu<V: F32s>(x: V) -> V {
    let z = x.abs().mul(V::splat(std::f32::consts::FRAC_1_SQRT_2));
    let one = V::splat(1.0);
    let t = one.div(V::fmadd(V::splat(0.5), z, one));
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
    let mut p = V::splat(C[9]);
    for &c in C[..9].iter().rev() {
        p = V::fmadd(p, t, V::splat(c));
    }
    let erfc = t.mul(exp(V::fnmadd(z, z, p)));
    let half = V::splat(0.5);
    let pos = x.mul(V::fnmadd(half, erfc, one));
    let neg = half.mul(x).mul(erfc);
    V::by_sign(x, pos, neg)
}
