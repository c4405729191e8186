//! The 16-bit forms of the packed matrix product ([`super::packed_matmul`]). bfloat16, for CPUs
//! with AVX512_BF16 ([`super::Isa::Avx512Bf16`]): both operands rounded to bfloat16 (round to
//! nearest even, as `vcvtne2ps2bf16` rounds), products summed in float32 by `vdpbf16ps`, float32
//! output; where the CPU has AMX-BF16 ([`super::Isa::Amx`]) the same packed operands multiply on
//! tiles instead ([`super::amx`]). float16 ([`Half::F16`], `--dtype f16` on
//! [`super::Isa::Avx512Fp16`]): the same layout of pairs holding float16 values, multiplied by
//! `vfmadd231ph` ([`super::fp16`], which says how its float16 sums are kept short); the packing
//! and the blocking below are shared, only the rounding and the micro-kernel differ.
//!
//! What `--dtype bf16` means on the CPU: the weight matrices and kernels are *stored* in
//! bfloat16 (half the memory of float32), while the activations between layers stay float32;
//! only the operands of the matrix products of the linear layers and of the 1×1, temporal and
//! unfolded (strided) convolutions are rounded to bfloat16, as they are packed. The 3×3
//! convolutions keep their float32 Winograd products (weights widened as they are transformed):
//! rounding the transformed planes costs too much accuracy (see `conv/winograd.rs`), and a direct
//! bfloat16 convolution would do four times Winograd's multiplications at twice the rate. On AMX
//! tiles, 16 times `vdpbf16ps`'s rate, the direct one pays: [`super::amx::conv_direct`]. Attention's
//! products (queries·keys, probabilities·values) stay float32 too: their operands are
//! activations, and they are a small part of a step at these sizes. Why: the time is in the products, where `vdpbf16ps` does twice the multiply-adds of a
//! float32 FMA per instruction and the packed operands take half the cache; the rest (norms,
//! softmax, residual adds, the schedulers) is memory-bound and gains nothing from narrower
//! arithmetic, but would lose accuracy with it (bfloat16 has 8 significant bits). Keeping those
//! in float32 keeps the deviation from the float32 frames small and each kernel testable
//! against a float64 product of the same rounded operands. Without AVX512_BF16 the same
//! bfloat16 weights are widened (exactly) as they are packed and multiply in float32, so every
//! CPU runs `--dtype bf16`; float32 weights never take this path. `--dtype f16` is the same
//! with float16 for bfloat16 (and attention's probabilities · values in float16 too, see
//! [`super::attention::ValueProduct`]), chosen per layer when the model is built
//! ([`super::with_f16_products`]), so that a float32 run of the published float16 weights keeps
//! float32's products.
//!
//! Layout: `vdpbf16ps` multiplies pairs along k. B is packed as `pairs[(panel·kp + kq)·NR + c]`
//! = (`B[2kq][col]` in the low 16 bits, `B[2kq+1][col]` in the high 16), kp = ⌈k/2⌉, a missing last
//! row zero; A as `pairs[(panel·kp + kq)·MR + r]` = (`A[row][2kq]`, `A[row][2kq+1]`), one u32 that the
//! micro-kernel broadcasts. Tiles are the AVX-512 path's 12×32 (two A micro-panels × two B
//! panels, 24 accumulators).

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::aligned::Aligned;
#[cfg(target_arch = "x86_64")]
use super::packed_matmul::MC;
use super::packed_matmul::{Init, Lhs, PackedA, PackedB, MR, NR};
use super::Src;

/// Depth of a packed block, in pairs: a B micro-panel pair (2·KCP·NR u32, 32 KiB) stays in a
/// 32–48 KiB L1, as the float32 AVX-512 path's 2·256·16 floats (twice the depth in elements,
/// since the operands are half the size).
const KCP: usize = 256;

/// The 16-bit floats of a packed operand's pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Half {
    /// bfloat16: products on `vdpbf16ps` or AMX tiles, float32 sums.
    Bf16,
    /// IEEE float16: products on `vfmadd231ph` ([`super::fp16`]), float16 sums of a few dozen
    /// terms added into float32.
    F16,
}

impl Half {
    /// The form a weight's products take on this path: its own 16-bit type where the CPU
    /// multiplies in it ([`Src::multiplies_in_bf16`], [`Src::multiplies_in_f16`]), `None` where
    /// it is widened to float32.
    pub fn of(w: Src) -> Option<Half> {
        if w.multiplies_in_bf16() {
            Some(Half::Bf16)
        } else if w.multiplies_in_f16() {
            Some(Half::F16)
        } else {
            None
        }
    }

    /// `x` rounded to this type, round to nearest even (NaN stays NaN; past float16's range,
    /// infinity), as `vcvtne2ps2bf16` and `vcvtps2ph` round.
    #[inline(always)]
    pub fn round_bits(self, x: f32) -> u16 {
        match self {
            Half::Bf16 => half::bf16::from_f32(x).to_bits(),
            Half::F16 => half::f16::from_f32(x).to_bits(),
        }
    }

    /// Element `i` of `w` as this type's bits (as stored where `w` is of this type, else rounded).
    #[inline(always)]
    fn bits_of(self, w: Src, i: usize) -> u16 {
        match (self, w) {
            (Half::Bf16, Src::Bf16(s)) => s[i].to_bits(),
            (Half::F16, Src::F16(s)) => s[i].to_bits(),
            (h, other) => h.round_bits(other.get(i)),
        }
    }

    /// `w`'s 16-bit storage where it is of this type.
    fn stored(self, w: Src) -> Option<*const u16> {
        match (self, w) {
            (Half::Bf16, Src::Bf16(s)) => Some(s.as_ptr() as *const u16),
            (Half::F16, Src::F16(s)) => Some(s.as_ptr() as *const u16),
            _ => None,
        }
    }

    /// Whether this CPU's vector code packs float32 into this type (and `vpermw` interleaves).
    fn packs_vectors(self) -> bool {
        match self {
            Half::Bf16 => super::bf16_instructions(),
            Half::F16 => super::avx512fp16(),
        }
    }
}

#[inline(always)]
fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

impl PackedB {
    /// B = Wᵀ in the 16-bit form `half` for a row-major `w` of n rows × k (a linear layer's
    /// weight, as stored where it is of that type, or rounded to it).
    pub fn from_transposed_half(w: Src, half: Half, n: usize, k: usize, parallel: bool) -> PackedB {
        Self::transposed_half_rows(w, half, n, k, parallel, |p| p * NR)
    }

    /// As [`PackedB::from_transposed_half`] in bfloat16 for a feed-forward projection whose
    /// output's two halves (value, gate) are multiplied by GEGLU: panels alternate between the
    /// halves (panel 2p: W's rows 16p.., panel 2p + 1: rows n/2 + 16p..), so that each pair of
    /// panels holds 16 gated columns' value and gate ([`super::amx::geglu_panels`]). n/2 is a
    /// multiple of 16.
    pub fn from_transposed_bf16_geglu(w: Src, n: usize, k: usize, parallel: bool) -> PackedB {
        Self::from_transposed_half_geglu(w, Half::Bf16, n, k, parallel)
    }

    /// As [`PackedB::from_transposed_bf16_geglu`] in `half` (float16 for the `avx512fp16` path).
    pub fn from_transposed_half_geglu(w: Src, half: Half, n: usize, k: usize, parallel: bool) -> PackedB {
        assert!(n.is_multiple_of(2 * NR), "GEGLU halves in whole panels");
        Self::transposed_half_rows(w, half, n, k, parallel, |p| super::packed_matmul::geglu_panel_row(p, n))
    }

    /// The 16-bit Wᵀ with panel p made of W's rows `first_row(p)..` (16, fewer past n).
    fn transposed_half_rows(
        w: Src,
        half: Half,
        n: usize,
        k: usize,
        parallel: bool,
        first_row: impl Fn(usize) -> usize + Sync,
    ) -> PackedB {
        assert!(w.len() >= n * k, "packed operand size");
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        // SAFETY: each panel's pairs are all written below (a ragged panel zeroed first).
        let mut pairs = unsafe { Aligned::<u32>::uninit(panels * kp * NR) };
        let pack = |(p, dst): (usize, &mut [u32])| {
            let r0 = first_row(p);
            #[cfg(target_arch = "x86_64")]
            if let (Some(s), true, true) = (half.stored(w), k.is_multiple_of(2) && NR * k < 1 << 30, r0 + NR <= n) {
                if super::avx512() {
                    // SAFETY: features checked; rows r0.. r0 + 16 of k values exist, and `dst`
                    // holds kp·NR pairs.
                    unsafe { gather_panel(s.add(r0 * k) as *const i32, kp, dst) };
                    return;
                }
            }
            if r0 + NR > n {
                dst.fill(0);
            }
            for c in 0..NR.min(n - r0) {
                let row = (r0 + c) * k;
                for kq in 0..kp {
                    let hi = if 2 * kq + 1 < k { half.bits_of(w, row + 2 * kq + 1) } else { 0 };
                    dst[kq * NR + c] = pair(half.bits_of(w, row + 2 * kq), hi);
                }
            }
        };
        if parallel && panels > 1 && n * k >= 1 << 16 {
            pairs.par_chunks_mut((kp * NR).max(1)).enumerate().for_each(pack);
        } else {
            pairs.chunks_mut((kp * NR).max(1)).enumerate().for_each(pack);
        }
        PackedB { data: Default::default(), pairs, half: Some(half), k, n }
    }

    /// B in the 16-bit form `half` from a row-major k×n float32 matrix whose rows are
    /// `row_stride` floats apart (the activations of the convolutions that are matrix
    /// products), rounded.
    pub fn from_rows_half(b: &[f32], half: Half, k: usize, n: usize, row_stride: usize, parallel: bool) -> PackedB {
        assert!(n == 0 || k == 0 || b.len() >= (k - 1) * row_stride + n, "packed operand size");
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        // SAFETY: each panel's pairs are all written below (a ragged panel zeroed first).
        let mut pairs = unsafe { Aligned::<u32>::uninit(panels * kp * NR) };
        let pack = |(p, dst): (usize, &mut [u32])| {
            let cols = NR.min(n - p * NR);
            #[cfg(target_arch = "x86_64")]
            if cols == NR && half.packs_vectors() {
                // SAFETY: features checked; rows 0..k of this panel's 16 columns exist, and
                // `dst` holds kp·NR pairs.
                unsafe { pack_rows_panel(half, b.as_ptr().add(p * NR), k, row_stride, dst) };
                return;
            }
            if cols < NR {
                dst.fill(0);
            }
            for kq in 0..kp {
                for c in 0..cols {
                    let at = p * NR + c;
                    let lo = half.round_bits(b[2 * kq * row_stride + at]);
                    let hi = if 2 * kq + 1 < k { half.round_bits(b[(2 * kq + 1) * row_stride + at]) } else { 0 };
                    dst[kq * NR + c] = pair(lo, hi);
                }
            }
        };
        if parallel && panels > 1 && n * k >= 1 << 16 {
            pairs.par_chunks_mut((kp * NR).max(1)).enumerate().for_each(pack);
        } else {
            pairs.chunks_mut((kp * NR).max(1)).enumerate().for_each(pack);
        }
        PackedB { data: Default::default(), pairs, half: Some(half), k, n }
    }
}

impl PackedA {
    /// A in the 16-bit form `half` from a row-major m×k `a` whose rows are `row_stride` apart (a
    /// 1×1 convolution's weight, as stored where it is of that type, or rounded to it).
    pub fn from_rows_half(a: Src, half: Half, m: usize, k: usize, row_stride: usize) -> PackedA {
        assert!(m == 0 || k == 0 || a.len() >= (m - 1) * row_stride + k, "packed operand size");
        let kp = k.div_ceil(2);
        let mut pairs = Aligned::<u32>::zeroed(m.div_ceil(MR) * MR * kp);
        for (p, dst) in pairs.chunks_mut((kp * MR).max(1)).enumerate() {
            for r in 0..MR.min(m - p * MR) {
                let row = (p * MR + r) * row_stride;
                for kq in 0..kp {
                    let hi = if 2 * kq + 1 < k { half.bits_of(a, row + 2 * kq + 1) } else { 0 };
                    dst[kq * MR + r] = pair(half.bits_of(a, row + 2 * kq), hi);
                }
            }
        }
        PackedA::of_pairs(pairs, half, m, k)
    }

    /// A 16-bit A from its micro-panels, in AMX tiles where bfloat16 products run on them.
    fn of_pairs(pairs: Aligned<u32>, half: Half, m: usize, k: usize) -> PackedA {
        #[cfg(target_arch = "x86_64")]
        if half == Half::Bf16 && super::amx() {
            let tiles = super::amx::tiles_of_panels(&pairs, m, k.div_ceil(2));
            return PackedA { data: Vec::new(), pairs: tiles, half: Some(half), tiles: true, m, k };
        }
        PackedA { data: Vec::new(), pairs, half: Some(half), tiles: false, m, k }
    }

    /// This float32 A in the 16-bit form `half`, rounded (the temporal convolution's transformed
    /// weights, computed in float32).
    pub fn to_half(&self, half: Half) -> PackedA {
        let (m, k) = (self.m, self.k);
        if let Some(h) = self.half {
            assert_eq!(h, half, "a packed A already in another 16-bit form");
            return PackedA { data: Vec::new(), pairs: self.pairs.clone(), half: Some(h), tiles: self.tiles, m, k };
        }
        let kp = k.div_ceil(2);
        // every value rounded at once (the slice conversions are vectorised: one value at a time,
        // float16's took a tenth of a 4-frame step's temporal convolutions), then paired
        let bits: Vec<u16> = match half {
            Half::Bf16 => {
                let mut b = vec![half::bf16::ZERO; self.data.len()];
                b.convert_from_f32_slice(&self.data);
                b.into_iter().map(half::bf16::to_bits).collect()
            }
            Half::F16 => {
                let mut b = vec![half::f16::ZERO; self.data.len()];
                b.convert_from_f32_slice(&self.data);
                b.into_iter().map(half::f16::to_bits).collect()
            }
        };
        let mut pairs = Aligned::<u32>::zeroed(m.div_ceil(MR) * MR * kp);
        pairs.par_chunks_mut((kp * MR).max(1)).enumerate().for_each(|(p, dst)| {
            let src = &bits[p * k * MR..][..k * MR];
            for kq in 0..kp {
                for r in 0..MR {
                    let hi = if 2 * kq + 1 < k { src[(2 * kq + 1) * MR + r] } else { 0 };
                    dst[kq * MR + r] = pair(src[2 * kq * MR + r], hi);
                }
            }
        });
        PackedA::of_pairs(pairs, half, m, k)
    }
}

/// One panel of a bfloat16 Wᵀ from 16 rows of W (even k: each row is kp pairs, as stored): per
/// pair of depths one gather of the 16 rows' pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_panel(rows: *const i32, kp: usize, dst: &mut [u32]) {
    let at = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(kp as i32),
    );
    let d = dst.as_mut_ptr() as *mut __m512i;
    for kq in 0..kp {
        _mm512_storeu_si512(d.add(kq), _mm512_i32gather_epi32::<4>(at, rows.add(kq)));
    }
}

/// 16 values of `lo` then 16 of `hi` rounded to `half` (round to nearest even): 32 words in
/// that order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn rounded32(half: Half, lo: __m512, hi: __m512) -> __m512i {
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    match half {
        Half::Bf16 => std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)),
        Half::F16 => _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm512_cvtps_ph::<NEAREST>(lo)),
            _mm512_cvtps_ph::<NEAREST>(hi),
        ),
    }
}

/// 16 values of `lo` and 16 of `hi` rounded to bfloat16 and interleaved into 16 pairs (`lo[i]` in
/// the low half of pair i, `hi[i]` in the high): one rounding of 32 values, one permutation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn interleaved_pairs(lo: __m512, hi: __m512) -> __m512i {
    interleaved_pairs_of(Half::Bf16, lo, hi)
}

/// [`interleaved_pairs`] in `half`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn interleaved_pairs_of(half: Half, lo: __m512, hi: __m512) -> __m512i {
    // word j of the result takes word idx[j] of [lo's 16 | hi's 16]
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    _mm512_permutexvar_epi16(idx, rounded32(half, lo, hi))
}

/// 16 columns × k rows of a row-major float32 B (rows `stride` apart, from `b`) as one panel of
/// pairs in `half`: per pair of rows one [`interleaved_pairs_of`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rows_panel(half: Half, b: *const f32, k: usize, stride: usize, dst: &mut [u32]) {
    let d = dst.as_mut_ptr() as *mut __m512i;
    for kq in 0..k.div_ceil(2) {
        let lo = _mm512_loadu_ps(b.add(2 * kq * stride));
        let hi = if 2 * kq + 1 < k { _mm512_loadu_ps(b.add((2 * kq + 1) * stride)) } else { _mm512_setzero_ps() };
        _mm512_storeu_si512(d.add(kq), interleaved_pairs_of(half, lo, hi));
    }
}

/// Packs rows [i0, i0 + mc) × depth [k0, k0 + kl) (k0 even) of a float32 A (row stride `lda`)
/// as micro-panels `[ir][kq][MR]` of ⌈kl/2⌉ pairs in `half` (rows past mc zero).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_a(half: Half, a: *const f32, lda: usize, i0: usize, mc: usize, k0: usize, kl: usize, dst: *mut u32) {
    let klp = kl.div_ceil(2);
    let mut buf = [0u32; 16];
    for ir in 0..mc.div_ceil(MR) {
        let d = dst.add(ir * klp * MR);
        for r in 0..MR {
            let row = ir * MR + r;
            if row >= mc {
                for kq in 0..klp {
                    *d.add(kq * MR + r) = 0;
                }
                continue;
            }
            let src = a.add((i0 + row) * lda + k0);
            let mut kq = 0;
            // 32 values (16 pairs) at a time: consecutive values of a row are a pair's halves
            while 2 * kq + 32 <= kl {
                let v = rounded32(half, _mm512_loadu_ps(src.add(2 * kq)), _mm512_loadu_ps(src.add(2 * kq + 16)));
                _mm512_storeu_si512(buf.as_mut_ptr() as *mut __m512i, v);
                for (j, &p) in buf.iter().enumerate() {
                    *d.add((kq + j) * MR + r) = p;
                }
                kq += 16;
            }
            while kq < klp {
                let hi = if 2 * kq + 1 < kl { half.round_bits(*src.add(2 * kq + 1)) } else { 0 };
                *d.add(kq * MR + r) = pair(half.round_bits(*src.add(2 * kq)), hi);
                kq += 1;
            }
        }
    }
}

thread_local! {
    static A_PACK: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The Goto/BLIS blocking of [`super::packed_matmul`] for a bfloat16 B: `C (m×n, row stride ldc)
/// = init + A · B` on the calling thread, A float32 rows (rounded as they are packed) or
/// bfloat16 panels.
///
/// # Safety
/// [`super::avx512bf16`] is true; `a` covers m rows (of ≥ k floats, or ⌈k/2⌉ pairs) and `c` m
/// rows of `ldc` (≥ n) floats.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn blocked(m: usize, a: Lhs, b: &PackedB, c: *mut f32, ldc: usize, init: Init) {
    let half = b.half.expect("a 16-bit B");
    // (tiles are made only where the CPU has AMX, so they may run there on any path)
    if half == Half::Bf16 && super::amx() || matches!(a, Lhs::TilesBf16(..)) {
        return super::amx::blocked(m, a, b, c, ldc, init);
    }
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    let nkb = kp.div_ceil(KCP).max(1);
    let kcp = kp.div_ceil(nkb);
    let mut scratch = [0f32; 2 * MR * 2 * NR];
    let mut bias_tile = [0f32; 2 * NR];
    A_PACK.with(|ap| {
        let mut apack = ap.borrow_mut();
        let need = MC.div_ceil(MR) * MR * kcp;
        if apack.len() < need {
            apack.resize(need, 0);
        }
        let apack = apack.as_mut_ptr();
        let mut i0 = 0;
        while i0 < m {
            let mc = MC.min(m - i0);
            let nir = mc.div_ceil(MR);
            let mut kq0 = 0;
            for kb in 0..nkb {
                let klp = kcp.min(kp - kq0);
                let (apack, ap_stride) = match a {
                    Lhs::Rows(a, lda) => {
                        let (k0, kl) = (2 * kq0, (2 * klp).min(k - 2 * kq0));
                        pack_a(half, a, lda, i0, mc, k0, kl, apack);
                        (apack as *const u32, klp * MR)
                    }
                    Lhs::PanelsHalf(p, depth) => {
                        let dp = depth.div_ceil(2);
                        (p.add(i0 * dp + kq0 * MR), dp * MR)
                    }
                    Lhs::Panels(..) | Lhs::TilesBf16(..) => {
                        unreachable!("a bfloat16 B goes with float32 rows or bfloat16 panels")
                    }
                };
                let acc = kb > 0 || matches!(init, Init::Accumulate);
                let mut jr = 0;
                while jr < panels {
                    let nb = 2.min(panels - jr);
                    let bp = [
                        b.pairs.as_ptr().add((jr * kp + kq0) * NR),
                        b.pairs.as_ptr().add(((jr + nb - 1) * kp + kq0) * NR),
                    ];
                    let cols = (nb * NR).min(n - jr * NR);
                    let bias_ptr = match init {
                        Init::Bias(bias) if kb == 0 => {
                            bias_tile[..cols].copy_from_slice(&bias[jr * NR..jr * NR + cols]);
                            bias_tile.as_ptr()
                        }
                        _ => std::ptr::null(),
                    };
                    let mut ir = 0;
                    while ir < nir {
                        let ra = 2.min(nir - ir);
                        let ap = [apack.add(ir * ap_stride), apack.add((ir + ra - 1) * ap_stride)];
                        let rows = (ra * MR).min(mc - ir * MR);
                        let cp = c.add((i0 + ir * MR) * ldc + jr * NR);
                        let tile_of = match half {
                            Half::Bf16 => tile_of,
                            Half::F16 => super::fp16::tile_of,
                        };
                        if rows == ra * MR && cols == nb * NR {
                            tile_of(ra, nb, klp, ap, bp, cp, ldc, NR, acc, bias_ptr);
                        } else {
                            let ld = nb * NR;
                            tile_of(ra, nb, klp, ap, bp, scratch.as_mut_ptr(), ld, NR, false, bias_ptr);
                            for r in 0..rows {
                                for cc in 0..cols {
                                    let d = cp.add(r * ldc + cc);
                                    let v = scratch[r * ld + cc];
                                    *d = if acc { *d + v } else { v };
                                }
                            }
                        }
                        ir += ra;
                    }
                    jr += nb;
                }
                kq0 += klp;
            }
            i0 += mc;
        }
    });
}

/// [`blocked`] with GEGLU fused in, for a 16-bit B whose panels alternate a value and a gate
/// panel ([`PackedB::from_transposed_half_geglu`]): the loops of
/// [`super::packed_matmul`]'s float32 `blocked_geglu` (each pair of panels summed over all
/// depths for a block of rows into a scratch block, then gated into `out`'s 16 columns of the
/// pair), on this path's tiles and depth blocks, so the same sums as [`blocked`].
///
/// # Safety
/// As [`blocked`] (not on AMX tiles); n a multiple of 2·[`NR`], `out` m rows of `ldo` (≥ n/2).
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn blocked_geglu(m: usize, a: Lhs, b: &PackedB, out: *mut f32, ldo: usize, init: Init) {
    let half = b.half.expect("a 16-bit B");
    let (k, n) = (b.k, b.n);
    debug_assert!(n.is_multiple_of(2 * NR) && !matches!(init, Init::Accumulate));
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let kp = k.div_ceil(2);
    let nkb = kp.div_ceil(KCP).max(1);
    let kcp = kp.div_ceil(nkb);
    let mc_max = (super::packed_matmul::GEGLU_A_BYTES / (4 * kp)).clamp(MR, MC) / MR * MR;
    let tile_of = match half {
        Half::Bf16 => tile_of,
        Half::F16 => super::fp16::tile_of,
    };
    let ld = 2 * NR;
    let mut sums = vec![0f32; mc_max * ld];
    let mut ragged = [0f32; 2 * MR * 2 * NR];
    let mut blocks = Vec::with_capacity(nkb);
    A_PACK.with(|ap| {
        let mut apack = ap.borrow_mut();
        if apack.len() < mc_max * kp {
            apack.resize(mc_max * kp, 0);
        }
        let apack = apack.as_mut_ptr();
        let mut i0 = 0;
        while i0 < m {
            let mc = mc_max.min(m - i0);
            let nir = mc.div_ceil(MR);
            blocks.clear();
            for kb in 0..nkb {
                let (kq0, klp) = (kb * kcp, kcp.min(kp - kb * kcp));
                blocks.push(match a {
                    Lhs::Rows(a, lda) => {
                        let dst = apack.add(nir * MR * kq0);
                        pack_a(half, a, lda, i0, mc, 2 * kq0, (2 * klp).min(k - 2 * kq0), dst);
                        (dst as *const u32, klp * MR)
                    }
                    Lhs::PanelsHalf(p, depth) => {
                        let dp = depth.div_ceil(2);
                        (p.add(i0 * dp + kq0 * MR), dp * MR)
                    }
                    Lhs::Panels(..) | Lhs::TilesBf16(..) => {
                        unreachable!("a 16-bit B goes with float32 rows or 16-bit panels")
                    }
                });
            }
            for j in 0..n / (2 * NR) {
                for (kb, &(block, ap_stride)) in blocks.iter().enumerate() {
                    let (kq0, klp) = (kb * kcp, kcp.min(kp - kb * kcp));
                    let bias = match init {
                        Init::Bias(bias) if kb == 0 => bias.as_ptr().add(2 * j * NR),
                        _ => std::ptr::null(),
                    };
                    let bp = [
                        b.pairs.as_ptr().add((2 * j * kp + kq0) * NR),
                        b.pairs.as_ptr().add(((2 * j + 1) * kp + kq0) * NR),
                    ];
                    let mut ir = 0;
                    while ir < nir {
                        let ra = 2.min(nir - ir);
                        let ap = [block.add(ir * ap_stride), block.add((ir + ra - 1) * ap_stride)];
                        let rows = (ra * MR).min(mc - ir * MR);
                        let cp = sums.as_mut_ptr().add(ir * MR * ld);
                        if rows == ra * MR {
                            tile_of(ra, 2, klp, ap, bp, cp, ld, NR, kb > 0, bias);
                        } else {
                            // a ragged tile as `blocked` does it (its sums from zero, then added:
                            // the float16 tile adds each chunk to where it starts, so this order
                            // is part of the bits)
                            tile_of(ra, 2, klp, ap, bp, ragged.as_mut_ptr(), ld, NR, false, bias);
                            for (i, &v) in ragged[..rows * ld].iter().enumerate() {
                                *cp.add(i) = if kb > 0 { *cp.add(i) + v } else { v };
                            }
                        }
                        ir += ra;
                    }
                }
                super::packed_matmul::gated_rows_512(sums.as_ptr(), mc, out.add(i0 * ldo + j * NR), ldo);
            }
            i0 += mc;
        }
    });
}

#[cfg(target_arch = "x86_64")]
super::packed_matmul::tile_by_count!(tile_of, tile, u32);

/// The micro-kernel: a tile of `RA`·6 rows × `NB`·16 columns, `c[r][..] = start + Σ_kq
/// a[kq][r] · b[kq][..]` where each term is a pair's two products (`vdpbf16ps`), with A in `RA`
/// micro-panels `[kq][MR]` of pairs and B in `NB` panels `[kq][NR]` of pairs; `start` is c's own
/// value (`acc`), `bias` (NB·16 per-column values) or zero. Rows of c are `ldc` apart, its
/// column panels `cjs`.
///
/// # Safety
/// AVX512_BF16 present; `a[..RA]` hold kp·6 pairs, `b[..NB]` kp·16, c `RA`·6 rows of `NB` panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
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
    let mut start = [_mm512_setzero_ps(); 2];
    if !bias.is_null() {
        for (j, s) in start.iter_mut().enumerate().take(NB) {
            *s = _mm512_loadu_ps(bias.add(j * NR));
        }
    }
    let mut sums = [[start[0], start[1]]; 2 * MR];
    for kq in 0..kp {
        let mut bv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); 2];
        for j in 0..NB {
            bv[j] = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b[j].add(kq * NR) as *const __m512i));
        }
        for p in 0..RA {
            let ak = a[p].add(kq * MR);
            for r in 0..MR {
                let x = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*ak.add(r) as i32));
                for j in 0..NB {
                    sums[p * MR + r][j] = _mm512_dpbf16_ps(sums[p * MR + r][j], x, bv[j]);
                }
            }
        }
    }
    for (r, row) in sums.iter().enumerate().take(RA * MR) {
        for (j, v) in row.iter().enumerate().take(NB) {
            let p = c.add(r * ldc + j * cjs);
            if acc {
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
            } else {
                _mm512_storeu_ps(p, *v);
            }
        }
    }
}

/// Never called off x86-64 (no bfloat16 B is packed there).
///
/// # Safety
/// Not callable.
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn blocked(_m: usize, _a: Lhs, _b: &PackedB, _c: *mut f32, _ldc: usize, _init: Init) {
    unreachable!("bfloat16 products run only on the avx512bf16 path")
}
