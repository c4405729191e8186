//! A packed float32 matrix product for x86-64 with AVX2 + FMA (and AVX-512 tiles) and for AArch64
//! (NEON): `C (m×n) = A (m×k) · B (k×n)`,
//! the operand layout of the UNet's linear layers (A = activations, B = the transposed weight)
//! and of attention (A = queries or probabilities, B = keys or values).
//!
//! Our own because the shapes here are few and known: with the block sizes fixed for them and the
//! bias written as the first tile, it reaches about 85 % of the FMA units' peak on the UNet's
//! linear shapes (`t2v bench --profile`), where the `gemm` crate that candle uses reaches about
//! 55 %, and attention can run it on strided heads without copying them out.
//!
//! Goto/BLIS blocking: B is packed once per call into panels of [`NR`] columns (`[panel][k][NR]`,
//! where float16 weights are widened as they are packed), or streamed a few panels at a time
//! where A is the smaller ([`matmul_streamed`]); each task takes a block of rows of A,
//! packs `MC`×`KC` blocks of it into micro-panels of [`MR`] rows (`[ir][k][MR]`, kept in L2)
//! and runs the 6×16 register-blocked micro-kernel over every (B panel, A micro-panel) pair, so a
//! B micro-panel stays in L1 while the A micro-panels stream past it.
//!
//! Each output element sums its k products in blocks of ≤ `KC` (each block in order, blocks
//! added in order): a different but equally accurate rounding order from candle's matmul.

// Elsewhere than x86-64 and AArch64 only the packing exists (nothing calls it: `packed_product()`
// is false there).
#![cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use super::bf16::Half;
use super::{avx2, SendPtr, Src};

/// Rows of a micro-tile (broadcast from A).
pub const MR: usize = 6;
/// Columns of a micro-tile (two 8-wide vectors of B).
pub const NR: usize = 16;
/// Depth of a packed block: the B micro-panel (KC×NR floats, 24 KiB) fits L1.
const KC: usize = 384;
/// Rows of a packed A block (MC×KC floats, 288 KiB, fit L2).
pub(super) const MC: usize = 192;

/// B packed into panels of [`NR`] columns: `data[(panel·k + kk)·NR + c] = B[kk][panel·NR + c]`,
/// columns past `n` zero.
pub struct PackedB {
    /// (on cache lines: a panel's rows are whole 64-byte vectors, [`super::aligned`])
    pub(super) data: super::aligned::Aligned<f32>,
    /// The 16-bit form instead of `data` (empty otherwise): pairs of bfloat16 or float16 values
    /// along k, see [`super::bf16`] (x86-64 only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) pairs: super::aligned::Aligned<u32>,
    /// Which 16-bit floats `pairs` hold; `None` for the float32 form.
    pub(super) half: Option<Half>,
    pub(super) k: usize,
    pub(super) n: usize,
}

impl PackedB {
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Whether B is in the bfloat16 form (products on `vdpbf16ps` or AMX tiles).
    pub fn is_bf16(&self) -> bool {
        self.half == Some(Half::Bf16)
    }

    /// The 16-bit form B is in (`None`: float32).
    pub fn half(&self) -> Option<Half> {
        self.half
    }

    /// B = Wᵀ for a row-major `w` of n rows × k (a linear layer's weight). Panels are packed in
    /// parallel when `parallel`.
    pub fn from_transposed(w: Src, n: usize, k: usize, parallel: bool) -> PackedB {
        Self::from_transposed_rows(w, n, k, k, parallel)
    }

    /// B = Wᵀ for `w` holding n rows of k values, rows `row_stride` apart (attention's keys,
    /// one head of the (keys, heads·d) projection).
    pub fn from_transposed_rows(w: Src, n: usize, k: usize, row_stride: usize, parallel: bool) -> PackedB {
        assert!(n == 0 || w.len() >= (n - 1) * row_stride + k, "packed operand size");
        let panels = n.div_ceil(NR);
        let mut data = super::aligned::Aligned::<f32>::zeroed(panels * k * NR);
        let pack = |(p, dst): (usize, &mut [f32])| pack_transposed(w, n, k, row_stride, p * NR, dst);
        if parallel && panels > 1 && n * k >= 1 << 16 {
            data.par_chunks_mut((k * NR).max(1)).enumerate().for_each(pack);
        } else {
            data.chunks_mut((k * NR).max(1)).enumerate().for_each(pack);
        }
        PackedB { data, pairs: Default::default(), half: None, k, n }
    }

    /// B = Wᵀ for a GEGLU projection `w` (n rows × k: the value half, then the gate half) with
    /// its panels alternating a value and a gate panel (panel 2j: value rows 16j.., panel 2j + 1:
    /// gate rows n/2 + 16j..), as [`matmul_geglu`] reads it; float32 (widened) as
    /// [`PackedB::from_transposed`].
    pub fn from_transposed_geglu(w: Src, n: usize, k: usize, parallel: bool) -> PackedB {
        assert!(n.is_multiple_of(2 * NR) && w.len() >= n * k, "GEGLU halves in whole panels");
        let panels = n / NR;
        let mut data = super::aligned::Aligned::<f32>::zeroed(panels * k * NR);
        let pack = |(p, dst): (usize, &mut [f32])| pack_transposed(w, n, k, k, geglu_panel_row(p, n), dst);
        if parallel && n * k >= 1 << 16 {
            data.par_chunks_mut((k * NR).max(1)).enumerate().for_each(pack);
        } else {
            data.chunks_mut((k * NR).max(1)).enumerate().for_each(pack);
        }
        PackedB { data, pairs: Default::default(), half: None, k, n }
    }

    /// B as a row-major k×n matrix whose rows are `row_stride` floats apart (attention's values,
    /// the activations of convolutions that are matrix products). Panels are packed in parallel
    /// when `parallel`.
    pub fn from_rows(b: &[f32], k: usize, n: usize, row_stride: usize, parallel: bool) -> PackedB {
        assert!(n == 0 || k == 0 || b.len() >= (k - 1) * row_stride + n, "packed operand size");
        let panels = n.div_ceil(NR);
        let mut data = super::aligned::Aligned::<f32>::zeroed(panels * k * NR);
        let pack = |(p, dst): (usize, &mut [f32])| {
            let cols = NR.min(n - p * NR);
            for kk in 0..k {
                let src = &b[kk * row_stride + p * NR..kk * row_stride + p * NR + cols];
                dst[kk * NR..kk * NR + cols].copy_from_slice(src);
            }
        };
        if parallel && panels > 1 && n * k >= 1 << 16 {
            data.par_chunks_mut((k * NR).max(1)).enumerate().for_each(pack);
        } else {
            data.chunks_mut((k * NR).max(1)).enumerate().for_each(pack);
        }
        PackedB { data, pairs: Default::default(), half: None, k, n }
    }
}

/// A packed whole into micro-panels of [`MR`] rows (`data[(panel·k + kk)·MR + r] =
/// A[panel·MR + r][kk]`, rows past `m` zero), for an A used against many B: the temporal
/// convolution's transformed weights, which would otherwise be packed again for every block of
/// columns.
pub struct PackedA {
    pub(super) data: Vec<f32>,
    /// The 16-bit form instead of `data` (empty otherwise): see [`super::bf16`].
    pub(super) pairs: super::aligned::Aligned<u32>,
    /// Which 16-bit floats `pairs` hold; `None` for the float32 form.
    pub(super) half: Option<Half>,
    /// Whether `pairs` are in AMX tiles (`[16 rows][16 pairs]` blocks, [`super::amx`]) rather
    /// than micro-panels: made where the products run on tiles, so that an A used against many
    /// B is laid out for them once.
    pub(super) tiles: bool,
    pub(super) m: usize,
    pub(super) k: usize,
}

impl PackedA {
    /// A as a row-major m×k matrix whose rows are `row_stride` floats apart.
    pub fn from_rows(a: &[f32], m: usize, k: usize, row_stride: usize) -> PackedA {
        assert!(m == 0 || k == 0 || a.len() >= (m - 1) * row_stride + k, "packed operand size");
        let mut data = vec![0f32; m.div_ceil(MR) * MR * k];
        for (p, dst) in data.chunks_mut((k * MR).max(1)).enumerate() {
            pack_a_panel(a, m, k, row_stride, p, dst);
        }
        PackedA { data, pairs: Default::default(), half: None, tiles: false, m, k }
    }

    /// [`PackedA::from_rows`] with the micro-panels packed on all of rayon's threads.
    pub fn from_rows_parallel(a: &[f32], m: usize, k: usize, row_stride: usize) -> PackedA {
        assert!(m == 0 || k == 0 || a.len() >= (m - 1) * row_stride + k, "packed operand size");
        let mut data = vec![0f32; m.div_ceil(MR) * MR * k];
        data.par_chunks_mut((k * MR).max(1)).enumerate().for_each(|(p, dst)| pack_a_panel(a, m, k, row_stride, p, dst));
        PackedA { data, pairs: Default::default(), half: None, tiles: false, m, k }
    }

    /// An m×k A of zeros, to be written in place through [`PackedA::index`] and
    /// [`PackedA::data_mut`] (by whoever computes A row by row in parallel).
    pub fn zeroed(m: usize, k: usize) -> PackedA {
        PackedA { data: vec![0f32; m.div_ceil(MR) * MR * k], pairs: Default::default(), half: None, tiles: false, m, k }
    }

    /// Where `A[row][kk]` is in [`PackedA::data_mut`].
    pub fn index(&self, row: usize, kk: usize) -> usize {
        ((row / MR) * self.k + kk) * MR + row % MR
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn m(&self) -> usize {
        self.m
    }

    /// A's depth.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether A is in AMX tiles (products on tiles only).
    pub fn is_tiles(&self) -> bool {
        self.tiles
    }

    /// Whether A is in the bfloat16 form (products on `vdpbf16ps` or AMX tiles).
    pub fn is_bf16(&self) -> bool {
        self.half == Some(Half::Bf16)
    }

    /// The 16-bit form A is in (`None`: float32).
    pub fn half(&self) -> Option<Half> {
        self.half
    }
}

/// The first of W's rows in panel `p` of a GEGLU projection packed with its value and gate
/// panels alternating (n rows: the value half, then the gate half).
pub(crate) fn geglu_panel_row(p: usize, n: usize) -> usize {
    (p / 2) * NR + (p % 2) * (n / 2)
}

/// Micro-panel `p` of A (m rows of k values, `row_stride` apart) into `dst` (k·[`MR`] floats,
/// rows past m zero), as [`pack_a`] packs a block.
fn pack_a_panel(a: &[f32], m: usize, k: usize, row_stride: usize, p: usize, dst: &mut [f32]) {
    let rows = MR.min(m - p * MR);
    assert!(dst.len() >= k * MR && a.len() >= (p * MR + rows - 1) * row_stride + k, "micro-panel sizes");
    // SAFETY: the rows read and the panel written are within the slices (asserted above).
    unsafe { pack_a(a.as_ptr(), row_stride, p * MR, rows, 0, k, dst.as_mut_ptr()) }
}

/// Where the blocked product reads A: rows to pack block by block, or panels packed beforehand.
#[derive(Clone, Copy)]
pub(super) enum Lhs {
    /// Row-major rows `lda` floats apart.
    Rows(*const f32, usize),
    /// [`PackedA`]'s panels (of depth `k`), starting at a panel boundary.
    Panels(*const f32, usize),
    /// [`PackedA`]'s 16-bit panels (bfloat16 or float16 as B's, of depth `k`, in pairs: ⌈k/2⌉
    /// u32 per row), starting at a panel boundary.
    PanelsHalf(*const u32, usize),
    /// [`PackedA`]'s AMX tiles (`[16-row group][depth tile][16][16]`, of that many depth tiles
    /// a row group), starting at a row group.
    TilesBf16(*const u32, usize),
}

impl Lhs {
    /// The same operand from row `r` on (a multiple of [`MR`] for panels).
    unsafe fn skip_rows(self, r: usize) -> Lhs {
        match self {
            Lhs::Rows(p, lda) => Lhs::Rows(p.add(r * lda), lda),
            Lhs::Panels(p, depth) => Lhs::Panels(p.add(r * depth), depth),
            Lhs::PanelsHalf(p, depth) => Lhs::PanelsHalf(p.add(r * depth.div_ceil(2)), depth),
            Lhs::TilesBf16(p, tiles) => {
                debug_assert!(r.is_multiple_of(16), "tiles split at 16 rows");
                Lhs::TilesBf16(p.add(r * tiles * 16), tiles)
            }
        }
    }
}

/// [`Lhs`] shared by the tasks of a parallel loop, which only read through it.
#[derive(Clone, Copy)]
struct SharedLhs(Lhs);
// SAFETY: the pointers are only read, from buffers that outlive the parallel loop.
unsafe impl Send for SharedLhs {}
unsafe impl Sync for SharedLhs {}

impl SharedLhs {
    fn get(self) -> Lhs {
        self.0
    }
}

/// The panel of Wᵀ made of W's rows `r0..` (`w`: n rows of k values, `row_stride` apart) into
/// `dst` (k·[`NR`] floats): `dst[kk·NR + c] = w[r0 + c][kk]`, columns past n zero. Panel `p`
/// of Wᵀ is rows `p·NR..`; a GEGLU projection's panels alternate its two halves
/// ([`PackedB::from_transposed_geglu`]).
fn pack_transposed(w: Src, n: usize, k: usize, row_stride: usize, r0: usize, dst: &mut [f32]) {
    let cols = NR.min(n - r0);
    if avx2() && cols == NR {
        // SAFETY: features checked; `dst` holds k·NR floats and rows r0.. r0 + NR exist.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            pack_transposed_panel(w, r0, k, row_stride, dst)
        };
    } else {
        if cols < NR {
            dst[..k * NR].fill(0.0);
        }
        for c in 0..cols {
            let row = (r0 + c) * row_stride;
            for kk in 0..k {
                dst[kk * NR + c] = w.get(row + kk);
            }
        }
    }
}

/// Packs 16 rows [r0, r0 + 16) of `w` (rows of k values, `stride` apart) as one panel
/// `[k][16]`, 8×8 blocks at a time through register transposes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_transposed_panel(w: Src, r0: usize, k: usize, stride: usize, dst: &mut [f32]) {
    let d = dst.as_mut_ptr();
    let load8 = |row: usize, kk: usize| -> __m256 {
        let at = row * stride + kk;
        match w {
            Src::F32(s) => _mm256_loadu_ps(s.as_ptr().add(at)),
            Src::F16(s) => _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().add(at) as *const __m128i)),
            Src::Bf16(s) => widen_bf16x8(s.as_ptr().add(at) as *const __m128i),
        }
    };
    let mut kk = 0;
    while kk + 8 <= k {
        for half in 0..2 {
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, ri) in r.iter_mut().enumerate() {
                *ri = load8(r0 + half * 8 + i, kk);
            }
            transpose8(&mut r);
            for (j, rj) in r.iter().enumerate() {
                _mm256_storeu_ps(d.add((kk + j) * NR + half * 8), *rj);
            }
        }
        kk += 8;
    }
    for kk in kk..k {
        for c in 0..NR {
            *d.add(kk * NR + c) = w.get((r0 + c) * stride + kk);
        }
    }
}

/// Eight bfloat16 values widened to float32 (exact: the 16 bits become the high half).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn widen_bf16x8(p: *const __m128i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p))))
}

/// In-register transpose of an 8×8 block (`r[i]` is row i on entry, column i on exit).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn transpose8(r: &mut [__m256; 8]) {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    r[0] = _mm256_permute2f128_ps::<0x20>(s0, s4);
    r[1] = _mm256_permute2f128_ps::<0x20>(s1, s5);
    r[2] = _mm256_permute2f128_ps::<0x20>(s2, s6);
    r[3] = _mm256_permute2f128_ps::<0x20>(s3, s7);
    r[4] = _mm256_permute2f128_ps::<0x31>(s0, s4);
    r[5] = _mm256_permute2f128_ps::<0x31>(s1, s5);
    r[6] = _mm256_permute2f128_ps::<0x31>(s2, s6);
    r[7] = _mm256_permute2f128_ps::<0x31>(s3, s7);
}

/// How a product starts its output tile.
#[derive(Clone, Copy)]
pub enum Init<'a> {
    /// C = A·B.
    Overwrite,
    /// C += A·B.
    Accumulate,
    /// C = bias (one per column) + A·B.
    Bias(&'a [f32]),
}

/// What a product does with its output besides writing it.
#[derive(Clone, Copy)]
pub(crate) enum Epilogue {
    /// C as it is.
    Store,
    /// GEGLU fused in on AMX tiles ([`super::amx::geglu_panels`]): the output is the gated half.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Geglu,
    /// As [`Epilogue::Geglu`], the gated output rounded to bfloat16 into AMX tiles for the
    /// product that reads it ([`PackedA`] tiles, [`super::amx::gated_tiles_fit`]): C is that
    /// buffer's u32, its "row stride" 16 × its depth tiles a row group (the offset of row r, a
    /// multiple of 16, is then r × the stride, as for float32 rows).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    GegluTiles,
    /// A residual added once C is complete: `C = (init + A·B) + R`, R laid out as C (its rows
    /// `ldc` apart): the sums and the one addition of the product followed by an add, so the
    /// same bits, without a second output.
    Residual(*const f32),
}

// SAFETY: the residual is only read, from a buffer that outlives the product.
unsafe impl Send for Epilogue {}
unsafe impl Sync for Epilogue {}

impl Epilogue {
    /// The epilogue of the block of C that starts `offset` floats further on.
    pub(crate) fn at(self, offset: usize) -> Epilogue {
        match self {
            Epilogue::Residual(r) => Epilogue::Residual(r.wrapping_add(offset)),
            other => other,
        }
    }
}

/// `c[r][j] += residual[r][j]` for `m` rows of `n` columns, both `ldc` apart.
///
/// # Safety
/// Both cover m rows of ldc (≥ n) floats.
pub(crate) unsafe fn add_residual(m: usize, n: usize, c: *mut f32, residual: *const f32, ldc: usize) {
    for r in 0..m {
        let (c, res) = (c.add(r * ldc), residual.add(r * ldc));
        for j in 0..n {
            *c.add(j) += *res.add(j);
        }
    }
}

/// The micro-kernel: `c[r][0..16] = start + Σ_kk a[kk][r] · b[kk][0..16]` for r < 6, rows of c
/// `ldc` apart; `start` is c's own value (`acc`), `bias16` (16 per-column values) or zero.
///
/// # Safety
/// AVX2 and FMA present; `a` holds k·6, `b` k·16 floats, c six rows of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn kernel_6x16(
    k: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    acc: bool,
    bias16: *const f32,
) {
    let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21);
    let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51);
    if bias16.is_null() {
        c00 = _mm256_setzero_ps();
        c01 = _mm256_setzero_ps();
    } else {
        c00 = _mm256_loadu_ps(bias16);
        c01 = _mm256_loadu_ps(bias16.add(8));
    }
    (c10, c11, c20, c21, c30, c31, c40, c41, c50, c51) = (c00, c01, c00, c01, c00, c01, c00, c01, c00, c01);
    let mut ap = a;
    let mut bp = b;
    for _ in 0..k {
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        let x = _mm256_broadcast_ss(&*ap);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        c01 = _mm256_fmadd_ps(x, b1, c01);
        let x = _mm256_broadcast_ss(&*ap.add(1));
        c10 = _mm256_fmadd_ps(x, b0, c10);
        c11 = _mm256_fmadd_ps(x, b1, c11);
        let x = _mm256_broadcast_ss(&*ap.add(2));
        c20 = _mm256_fmadd_ps(x, b0, c20);
        c21 = _mm256_fmadd_ps(x, b1, c21);
        let x = _mm256_broadcast_ss(&*ap.add(3));
        c30 = _mm256_fmadd_ps(x, b0, c30);
        c31 = _mm256_fmadd_ps(x, b1, c31);
        let x = _mm256_broadcast_ss(&*ap.add(4));
        c40 = _mm256_fmadd_ps(x, b0, c40);
        c41 = _mm256_fmadd_ps(x, b1, c41);
        let x = _mm256_broadcast_ss(&*ap.add(5));
        c50 = _mm256_fmadd_ps(x, b0, c50);
        c51 = _mm256_fmadd_ps(x, b1, c51);
        ap = ap.add(MR);
        bp = bp.add(NR);
    }
    let rows = [(c00, c01), (c10, c11), (c20, c21), (c30, c31), (c40, c41), (c50, c51)];
    for (r, (lo, hi)) in rows.into_iter().enumerate() {
        let p = c.add(r * ldc);
        if acc {
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), lo));
            _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), hi));
        } else {
            _mm256_storeu_ps(p, lo);
            _mm256_storeu_ps(p.add(8), hi);
        }
    }
}

/// [`kernel_6x16`] for B panels of which only the first 8 columns are wanted, with twice the
/// rows: two A micro-panels (`a0`, `a1`: rows 0–5 and 6–11 of the tile) against 8 columns of B
/// (rows of B `ldb` floats apart), `c[r][0..8] = start + Σ_kk a[kk][r] · b[kk][0..8]` for r < 12,
/// `start` c's own value (`acc`) or zero. Each B load feeds 12 multiply-adds, as the 6×16 tile's
/// two loads feed 12 each: the Winograd products of a group of at most 8 tiles (the UNet's 4×4
/// planes, one tile an image) run at the 6×16 tile's rate instead of half of it. Each element's
/// sum is the 6×16 tile's, in the same order: the same bits.
///
/// # Safety
/// AVX2 and FMA present; `a0`, `a1` hold k·6 floats, `b` k rows of 8 (`ldb` apart), c twelve
/// rows of 8 (`ldc` apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_12x8(
    k: usize,
    a0: *const f32,
    a1: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let mut s = [_mm256_setzero_ps(); 12];
    let (mut p0, mut p1, mut bp) = (a0, a1, b);
    for _ in 0..k {
        let bv = _mm256_loadu_ps(bp);
        for r in 0..MR {
            s[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*p0.add(r)), bv, s[r]);
            s[MR + r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*p1.add(r)), bv, s[MR + r]);
        }
        p0 = p0.add(MR);
        p1 = p1.add(MR);
        bp = bp.add(ldb);
    }
    for (r, &v) in s.iter().enumerate() {
        let p = c.add(r * ldc);
        if acc {
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), v));
        } else {
            _mm256_storeu_ps(p, v);
        }
    }
}

/// Packs rows [i0, i0 + mc) × depth [k0, k0 + kl) of A (row stride `lda`) as micro-panels
/// `[ir][kk][MR]` (rows past mc zero).
unsafe fn pack_a(a: *const f32, lda: usize, i0: usize, mc: usize, k0: usize, kl: usize, dst: *mut f32) {
    for ir in 0..mc.div_ceil(MR) {
        let d = dst.add(ir * kl * MR);
        let src = a.add((i0 + ir * MR) * lda + k0);
        let rows = MR.min(mc - ir * MR);
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if rows == MR && avx2() {
            done = pack_a_panel_avx2(src, lda, kl, d);
        }
        // ragged panels, and the depths past the last whole 8
        for r in 0..MR {
            for kk in done..kl {
                *d.add(kk * MR + r) = if r < rows { *src.add(r * lda + kk) } else { 0.0 };
            }
        }
    }
}

/// The first ⌊kl/8⌋·8 depths of one whole micro-panel (six rows from `src`, `lda` apart) into
/// `d` (`[kk][MR]`), eight depths at a time through a register transpose: six loads and eight
/// vector stores where one scalar store per value took 2.2% of a 4-frame guided step on the
/// AVX2 path (`perf`). Returns the depths done.
///
/// # Safety
/// AVX2 present; six rows of kl floats from `src`, `d` holds kl·MR floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a_panel_avx2(src: *const f32, lda: usize, kl: usize, d: *mut f32) -> usize {
    let mut kk = 0;
    while kk + 8 <= kl {
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, ri) in r.iter_mut().enumerate().take(MR) {
            *ri = _mm256_loadu_ps(src.add(i * lda + kk));
        }
        // column j (depth kk + j) in r[j], lanes 6 and 7 zero
        transpose8(&mut r);
        let p = d.add(kk * MR);
        // each 8-wide store's last two lanes are overwritten by the next column's store
        for (j, &rj) in r.iter().enumerate().take(7) {
            _mm256_storeu_ps(p.add(j * MR), rj);
        }
        // the last column's six values only (what follows may be past the buffer)
        _mm_storeu_ps(p.add(7 * MR), _mm256_castps256_ps128(r[7]));
        _mm_storel_epi64(p.add(7 * MR + 4) as *mut __m128i, _mm_castps_si128(_mm256_extractf128_ps::<1>(r[7])));
        kk += 8;
    }
    kk
}

thread_local! {
    static A_PACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Depth of a packed block on the AVX-512 path: two B micro-panels (2·KC·NR floats, 40 KiB) are
/// read together and stay in a 48 KiB L1 (with some of A's 15 KiB beside them). 320 rather than
/// 256 so that the UNet's first level (depth 320: its attention's projections and the
/// feed-forward's first) sums in one block, with no pass that reads C back and adds to it, and
/// deeper products take fewer blocks (1280: 4 instead of 5). Emerald Rapids, 2026-12-07:
/// `kernel_speed`'s 8192×320·320×2560 on one core 125–126 → 145–146 GFLOP/s, the other shapes
/// within the run-to-run spread (384 and 512 no better); in 4-frame guided steps, the linear
/// layers' time over the 3×3 convolutions' (which do not use this product) 3.03 → 2.85, the mean
/// of 8 steps a setting, run alternately.
#[cfg(target_arch = "x86_64")]
const KC512: usize = 320;

/// `C (m×n, row stride ldc) = init + A (m×k, row stride lda) · B` on the calling thread.
///
/// With `wide` on the AVX-512 path ([`super::avx512`]; `wide` is [`super::wide`] of the caller's
/// kind of kernel, chosen per CPU) the tiles are up to 12×32: two A micro-panels ([`MR`]
/// rows each) against two B panels ([`NR`] columns each), 24 accumulators, so each 512-bit load of
/// B feeds 12 FMAs (the 6×16 AVX2 tile feeds 6 per 256-bit load); the ragged edges take the
/// smaller tiles of the same kernel. Otherwise the 6×16 AVX2 micro-kernel.
///
/// # Safety
/// [`avx2`] is true; `a` covers m rows of `lda` (≥ k) floats and `c` m rows of `ldc` (≥ n).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_rows(
    m: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    init: Init,
    wide: bool,
) {
    rows_of(m, Lhs::Rows(a, lda), b, c, ldc, init, wide)
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn rows_of(m: usize, a: Lhs, b: &PackedB, c: *mut f32, ldc: usize, init: Init, wide: bool) {
    if b.half.is_some() {
        return super::bf16::blocked(m, a, b, c, ldc, init);
    }
    #[cfg(target_arch = "aarch64")]
    {
        // one width on NEON: 128-bit vectors, the 6×16 tile
        let _ = wide;
        blocked(m, a, b, c, ldc, init, KC, 1, |kl, ap, _, bp, _, dst, ld, acc, bias| {
            neon::kernel_6x16(kl, ap[0], bp[0], dst, ld, acc, bias)
        })
    }
    #[cfg(target_arch = "x86_64")]
    if wide && super::avx512() {
        blocked(m, a, b, c, ldc, init, KC512, 2, |kl, ap, ra, bp, nb, dst, ld, acc, bias| {
            tile_avx512_of(ra, nb, kl, ap, bp, dst, ld, NR, acc, bias)
        })
    } else {
        blocked(m, a, b, c, ldc, init, KC, 1, |kl, ap, _, bp, _, dst, ld, acc, bias| {
            kernel_6x16(kl, ap[0], bp[0], dst, ld, acc, bias)
        })
    }
}

/// The Goto/BLIS blocking around a micro-kernel whose tiles are up to `step` A micro-panels ×
/// `step` B panels: `tile(kl, a panels, how many, b panels, how many, c, ldc, accumulate, bias)`
/// computes one tile of (a panels·[`MR`]) rows × (b panels·[`NR`]) columns; ragged edges go
/// through a scratch tile and are copied out.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    m: usize,
    a: Lhs,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    init: Init,
    kc_max: usize,
    step: usize,
    tile: impl Fn(usize, [*const f32; 2], usize, [*const f32; 2], usize, *mut f32, usize, bool, *const f32),
) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(NR);
    let nkb = k.div_ceil(kc_max).max(1);
    let kc = k.div_ceil(nkb);
    let mut scratch = [0f32; 2 * MR * 2 * NR];
    let mut bias_tile = [0f32; 2 * NR];
    A_PACK.with(|ap| {
        let mut apack = ap.borrow_mut();
        let need = MC.div_ceil(MR) * MR * kc;
        if apack.len() < need {
            apack.resize(need, 0.0);
        }
        let apack = apack.as_mut_ptr();
        let mut i0 = 0;
        while i0 < m {
            let mc = MC.min(m - i0);
            let nir = mc.div_ceil(MR);
            let mut k0 = 0;
            for kb in 0..nkb {
                let kl = kc.min(k - k0);
                // the block's first micro-panel, and the distance between its micro-panels
                let (apack, ap_stride) = match a {
                    Lhs::Rows(a, lda) => {
                        pack_a(a, lda, i0, mc, k0, kl, apack);
                        (apack as *const f32, kl * MR)
                    }
                    Lhs::Panels(p, depth) => (p.add(i0 * depth + k0 * MR), depth * MR),
                    Lhs::PanelsHalf(..) | Lhs::TilesBf16(..) => {
                        unreachable!("bfloat16 panels go with a bfloat16 B (rows_of)")
                    }
                };
                let acc = kb > 0 || matches!(init, Init::Accumulate);
                let mut jr = 0;
                while jr < panels {
                    let nb = step.min(panels - jr);
                    let bp =
                        [b.data.as_ptr().add((jr * k + k0) * NR), b.data.as_ptr().add(((jr + nb - 1) * k + k0) * NR)];
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
                        let ra = step.min(nir - ir);
                        let ap = [apack.add(ir * ap_stride), apack.add((ir + ra - 1) * ap_stride)];
                        let rows = (ra * MR).min(mc - ir * MR);
                        let cp = c.add((i0 + ir * MR) * ldc + jr * NR);
                        if rows == ra * MR && cols == nb * NR {
                            tile(kl, ap, ra, bp, nb, cp, ldc, acc, bias_ptr);
                        } else {
                            let ld = nb * NR;
                            tile(kl, ap, ra, bp, nb, scratch.as_mut_ptr(), ld, false, bias_ptr);
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
                k0 += kl;
            }
            i0 += mc;
        }
    });
}

/// Defines `$name(ra, nb, depth, a, b, c, ldc, cjs, acc, bias)`: the micro-kernel `$tile::<RA,
/// NB>` (a tile of up to two A micro-panels × two B panels of `$elem`) for `ra` micro-panels and
/// `nb` panels (1 or 2 each) known at run time. Each form of the product (float32, bfloat16,
/// float16) has one.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))]
macro_rules! tile_by_count {
    ($vis:vis $name:ident, $tile:ident, $elem:ty) => {
        #[doc = concat!("[`", stringify!($tile), "`] for `ra` A micro-panels and `nb` B panels (1 or 2 each) known at run time.")]
        ///
        /// # Safety
        #[doc = concat!("As [`", stringify!($tile), "`].")]
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name(
            ra: usize,
            nb: usize,
            depth: usize,
            a: [*const $elem; 2],
            b: [*const $elem; 2],
            c: *mut f32,
            ldc: usize,
            cjs: usize,
            acc: bool,
            bias: *const f32,
        ) {
            match (ra, nb) {
                (2, 2) => $tile::<2, 2>(depth, a, b, c, ldc, cjs, acc, bias),
                (2, _) => $tile::<2, 1>(depth, a, b, c, ldc, cjs, acc, bias),
                (_, 2) => $tile::<1, 2>(depth, a, b, c, ldc, cjs, acc, bias),
                _ => $tile::<1, 1>(depth, a, b, c, ldc, cjs, acc, bias),
            }
        }
    };
}
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(super) use tile_by_count;

#[cfg(target_arch = "x86_64")]
tile_by_count!(pub(crate) tile_avx512_of, tile_avx512, f32);

/// The AVX-512 micro-kernel: a tile of `RA`·6 rows × `NB`·16 columns,
/// `c[r][..] = start + Σ_kk a[kk][r] · b[kk][..]` with A in `RA` micro-panels `[kk][MR]` and B in
/// `NB` panels `[kk][NR]`; `start` is c's own value (`acc`), `bias` (NB·16 per-column values) or
/// zero. Rows of c are `ldc` apart, its column panels `cjs` (16 in a plain row-major c). The
/// per-element sums run in k order, as the AVX2 kernel's.
///
/// # Safety
/// AVX-512F present; `a[..RA]` hold k·6 floats, `b[..NB]` k·16, c `RA`·6 rows of `NB` panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512<const RA: usize, const NB: usize>(
    k: usize,
    a: [*const f32; 2],
    b: [*const f32; 2],
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
    for kk in 0..k {
        let mut bv = [_mm512_setzero_ps(); 2];
        for j in 0..NB {
            bv[j] = _mm512_loadu_ps(b[j].add(kk * NR));
        }
        for p in 0..RA {
            let ak = a[p].add(kk * MR);
            for r in 0..MR {
                let x = _mm512_set1_ps(*ak.add(r));
                for j in 0..NB {
                    sums[p * MR + r][j] = _mm512_fmadd_ps(x, bv[j], sums[p * MR + r][j]);
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

/// Whether a product of `m` rows against a weight of `n` outputs streams the weight
/// ([`matmul_streamed`]) rather than packing it whole first: where A is no larger than the
/// weight. Each of the streamed product's tasks reads all of A again (from cache while it is
/// small), where the packed weight is written once and read again per block of rows.
/// `kernel_speed`'s "linear per call" rows (Emerald Rapids, AVX-512, GFLOP/s, whole → streamed):
/// 128×1280·1280×10240 175 → 284, 512×1280·…×10240 232 → 304, 2048×1280·…×10240 251 → 313,
/// 512×1280·…×1280 273 → 290; with A larger, 2048×640·640×640 293 → 259 and 8192×1280·…×320
/// 262 → 202.
pub fn streams_weight(m: usize, n: usize) -> bool {
    m <= n
}

/// Bytes of the weight panels one task of [`matmul_streamed`] packs and runs at a time: within
/// L2 beside a micro-panel of A.
const STREAM_GROUP_BYTES: usize = 512 << 10;

thread_local! {
    static B_PACK: std::cell::RefCell<super::aligned::Aligned<f32>> = std::cell::RefCell::new(Default::default());
}

/// `C (m×n, row stride ldc) = init + A (m×k, row stride lda) · Wᵀ` for a weight `w` of n rows of
/// k values (float32, or float16/bfloat16 widened exactly), on all of rayon's threads, without
/// packing W whole: for products with few rows of A (a step's deepest levels, a few frames), where
/// packing the weight first writes out a float32 copy of it and reads it back, as much memory
/// traffic as the product's own arithmetic takes time. A is packed once into micro-panels that
/// every task reads; the tasks split W's columns into groups of panels, and each packs its group
/// into a buffer that stays in L2 and runs all of A's rows against it: W is read once, from its
/// own (narrow) storage. The same sums, in the same order, as [`matmul`] with W packed.
///
/// # Safety
/// As [`matmul_rows`]; `w` holds n rows of k values.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_streamed(
    m: usize,
    a: *const f32,
    lda: usize,
    w: Src,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    init: Init,
    wide: bool,
) {
    assert!(n == 0 || w.len() >= (n - 1) * k + k, "streamed weight size");
    if m == 0 || n == 0 {
        return;
    }
    let a = PackedA::from_rows_parallel(std::slice::from_raw_parts(a, (m - 1) * lda + k), m, k, lda);
    let panels = n.div_ceil(NR);
    // panels per task: within the L2 budget, an even count (the wide tiles take two), and small
    // enough that every thread gets a few tasks
    let by_bytes = (STREAM_GROUP_BYTES / (k * NR * 4).max(1)).max(2) / 2 * 2;
    let by_tasks = panels.div_ceil(4 * super::threads()).div_ceil(2) * 2;
    let group = by_bytes.min(by_tasks).max(2);
    let cp = SendPtr(c);
    let lhs = SharedLhs(Lhs::Panels(a.data.as_ptr(), k));
    (0..panels.div_ceil(group)).into_par_iter().for_each(|g| {
        let (p0, count) = (g * group, group.min(panels - g * group));
        let (col0, cols) = (p0 * NR, (count * NR).min(n - p0 * NR));
        B_PACK.with(|buf| {
            let mut data = std::mem::take(&mut *buf.borrow_mut());
            data.resize(count * k * NR);
            let part = w.slice(col0 * k, cols * k);
            for (p, dst) in data.chunks_mut((k * NR).max(1)).enumerate() {
                pack_transposed(part, cols, k, k, p * NR, dst);
            }
            let b = PackedB { data, pairs: Default::default(), half: None, k, n: cols };
            let init = match init {
                Init::Bias(bias) => Init::Bias(&bias[col0..col0 + cols]),
                other => other,
            };
            rows_of(m, lhs.get(), &b, cp.get().add(col0), ldc, init, wide);
            *buf.borrow_mut() = b.data;
        });
    });
}

/// [`matmul_rows`] on all of rayon's threads: rows split into equal blocks (a few per thread on
/// large products; one per thread otherwise, so that no thread idles on a short tail). With a
/// `residual` R laid out as C, `C = (init + A · B) + R` ([`Epilogue::Residual`]).
///
/// # Safety
/// As [`matmul_rows`]; a `residual` covers m rows of `ldc` floats.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    init: Init,
    wide: bool,
    residual: Option<*const f32>,
) {
    let epilogue = residual.map_or(Epilogue::Store, Epilogue::Residual);
    parallel_rows(m, Lhs::Rows(a, lda), b, c, ldc, init, wide, epilogue)
}

/// GEGLU fused into the feed-forward's projection on AMX tiles ([`super::amx::geglu_panels`]):
/// `out (m × n/2) = value · gelu(gate)` of `init + A · B` for a B packed with its value and
/// gate panels alternating ([`PackedB::from_transposed_bf16_geglu`]), on all of rayon's threads,
/// split as [`matmul`] splits a product on tiles (columns, in whole pairs of panels, for few
/// rows; rows otherwise).
///
/// # Safety
/// [`super::amx`] is true and [`super::amx::geglu_fits`] for B; `a` covers m rows of k floats
/// (`lda` apart) and `out` m rows of `ldo` (≥ n/2) floats.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_geglu(
    m: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    out: *mut f32,
    ldo: usize,
    init: Init,
) {
    parallel_rows(m, Lhs::Rows(a, lda), b, out, ldo, init, true, Epilogue::Geglu)
}

/// GEGLU fused into a product on vectors (float32 on the AVX2 and AVX-512 paths; a 16-bit B on
/// `vdpbf16ps` or `vfmadd231ph`): `out (m × n/2, row stride ldo) = value · gelu(gate)` of
/// `init + A · B` for a B packed with its value and gate panels alternating
/// ([`PackedB::from_transposed_geglu`], [`PackedB::from_transposed_half_geglu`]) and `init`'s
/// bias in its order, on all of rayon's threads (rows split as [`matmul`] splits them). The sums
/// are [`matmul`]'s and the GELU the separate pass's ([`super::geglu`]), so the same bits,
/// without the projection's output (twice as wide) written and read back.
///
/// # Safety
/// [`avx2`] is true (AVX-512 and the 16-bit products' instructions for a 16-bit B, not on AMX
/// tiles), n a multiple of 2·[`NR`]; `a` covers m rows of k floats (`lda` apart) and `out` m
/// rows of `ldo` (≥ n/2) floats.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_gated(
    m: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    out: *mut f32,
    ldo: usize,
    init: Init,
    wide: bool,
) {
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || m < 2 * MR {
        return geglu_rows_of(m, Lhs::Rows(a, lda), b, out, ldo, init, wide);
    }
    let tasks = threads * (m / (threads * 2048)).max(1);
    let block = m.div_ceil(tasks).div_ceil(MR) * MR;
    let (ap, op) = (SendPtr(a as *mut f32), SendPtr(out));
    (0..m.div_ceil(block)).into_par_iter().for_each(|t| {
        let r0 = t * block;
        let lhs = Lhs::Rows(ap.get().add(r0 * lda) as *const f32, lda);
        geglu_rows_of(block.min(m - r0), lhs, b, op.get().add(r0 * ldo), ldo, init, wide);
    });
}

/// [`matmul_gated`] for float32 products with the weight `w` (n rows of k: the value half, then the gate half)
/// streamed as [`matmul_streamed`] streams it, in groups of (value, gate) panel pairs, for
/// products with few rows; `init`'s bias in the packed order ([`PackedB::from_transposed_geglu`]).
///
/// # Safety
/// As [`matmul_gated`]; `w` holds n rows of k values.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_streamed_geglu(
    m: usize,
    a: *const f32,
    lda: usize,
    w: Src,
    n: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
    init: Init,
    wide: bool,
) {
    assert!(n.is_multiple_of(2 * NR) && w.len() >= n * k, "streamed GEGLU weight size");
    if m == 0 || n == 0 {
        return;
    }
    let a = PackedA::from_rows_parallel(std::slice::from_raw_parts(a, (m - 1) * lda + k), m, k, lda);
    let pairs = n / (2 * NR);
    let by_bytes = (STREAM_GROUP_BYTES / (2 * k * NR * 4).max(1)).max(1);
    let by_tasks = pairs.div_ceil(4 * super::threads());
    let group = by_bytes.min(by_tasks).max(1);
    let op = SendPtr(out);
    let lhs = SharedLhs(Lhs::Panels(a.data.as_ptr(), k));
    (0..pairs.div_ceil(group)).into_par_iter().for_each(|g| {
        let (j0, count) = (g * group, group.min(pairs - g * group));
        B_PACK.with(|buf| {
            let mut data = std::mem::take(&mut *buf.borrow_mut());
            data.resize(2 * count * k * NR);
            for (q, dst) in data.chunks_mut((k * NR).max(1)).enumerate() {
                pack_transposed(w, n, k, k, geglu_panel_row(2 * j0 + q, n), dst);
            }
            let b = PackedB { data, pairs: Default::default(), half: None, k, n: 2 * count * NR };
            let init = match init {
                Init::Bias(bias) => Init::Bias(&bias[2 * j0 * NR..2 * (j0 + count) * NR]),
                other => other,
            };
            geglu_rows_of(m, lhs.get(), &b, op.get().add(j0 * NR), ldo, init, wide);
            *buf.borrow_mut() = b.data;
        });
    });
}

/// Bytes of A's rows (all depths) that a block of [`blocked_geglu`] keeps packed: within L2
/// beside a pair of B panels.
#[cfg(target_arch = "x86_64")]
pub(super) const GEGLU_A_BYTES: usize = 768 << 10;

/// [`blocked_geglu`] on this thread with the micro-kernel [`rows_of`] takes for B's form.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn geglu_rows_of(m: usize, a: Lhs, b: &PackedB, out: *mut f32, ldo: usize, init: Init, wide: bool) {
    if b.half.is_some() {
        super::bf16::blocked_geglu(m, a, b, out, ldo, init)
    } else if wide && super::avx512() {
        blocked_geglu(m, a, b, out, ldo, init, KC512, 2, gated_rows_512, |kl, ap, ra, bp, nb, dst, ld, acc, bias| {
            tile_avx512_of(ra, nb, kl, ap, bp, dst, ld, NR, acc, bias)
        })
    } else {
        blocked_geglu(m, a, b, out, ldo, init, KC, 1, gated_rows_256, |kl, ap, _, bp, _, dst, ld, acc, bias| {
            kernel_6x16(kl, ap[0], bp[0], dst, ld, acc, bias)
        })
    }
}

/// As [`blocked`] (the same blocks of depth, so the same sums) for a B whose panels alternate a
/// value and a gate panel, with the loops turned so that each pair of panels is summed over all
/// depths for a block of rows into a scratch block (A's rows packed for all depths once a
/// block), then gated into `out`'s 16 columns of that pair by `gate(sums, rows, dst, ldo)`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn blocked_geglu(
    m: usize,
    a: Lhs,
    b: &PackedB,
    out: *mut f32,
    ldo: usize,
    init: Init,
    kc_max: usize,
    step: usize,
    gate: unsafe fn(*const f32, usize, *mut f32, usize),
    tile: impl Fn(usize, [*const f32; 2], usize, [*const f32; 2], usize, *mut f32, usize, bool, *const f32),
) {
    let (k, n) = (b.k, b.n);
    debug_assert!(n.is_multiple_of(2 * NR) && !matches!(init, Init::Accumulate));
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let nkb = k.div_ceil(kc_max).max(1);
    let kc = k.div_ceil(nkb);
    let mc_max = (GEGLU_A_BYTES / (4 * k)).clamp(MR, MC) / MR * MR;
    // a block of rows' sums for one pair: value columns 0..16, gate columns 16..32
    let ld = 2 * NR;
    let mut sums = vec![0f32; mc_max * ld];
    let mut blocks = Vec::with_capacity(nkb);
    A_PACK.with(|ap| {
        let mut apack = ap.borrow_mut();
        if apack.len() < mc_max * k {
            apack.resize(mc_max * k, 0.0);
        }
        let apack = apack.as_mut_ptr();
        let mut i0 = 0;
        while i0 < m {
            let mc = mc_max.min(m - i0);
            let nir = mc.div_ceil(MR);
            // each depth block's first micro-panel and the distance between its micro-panels
            blocks.clear();
            for kb in 0..nkb {
                let (k0, kl) = (kb * kc, kc.min(k - kb * kc));
                blocks.push(match a {
                    Lhs::Rows(a, lda) => {
                        let dst = apack.add(nir * MR * k0);
                        pack_a(a, lda, i0, mc, k0, kl, dst);
                        (dst as *const f32, kl * MR)
                    }
                    Lhs::Panels(p, depth) => (p.add(i0 * depth + k0 * MR), depth * MR),
                    Lhs::PanelsHalf(..) | Lhs::TilesBf16(..) => unreachable!("GEGLU on float32 products only"),
                });
            }
            for j in 0..n / (2 * NR) {
                let (value, gate_panel) =
                    (b.data.as_ptr().add(2 * j * k * NR), b.data.as_ptr().add((2 * j + 1) * k * NR));
                for (kb, &(block, ap_stride)) in blocks.iter().enumerate() {
                    let (k0, kl) = (kb * kc, kc.min(k - kb * kc));
                    let bias = match init {
                        Init::Bias(bias) if kb == 0 => bias.as_ptr().add(2 * j * NR),
                        _ => std::ptr::null(),
                    };
                    let bp = [value.add(k0 * NR), gate_panel.add(k0 * NR)];
                    // both panels a tile where the tiles take two (12×32), else the value panel
                    // over all rows, then the gate panel: one panel's depth block stays in L1
                    let passes: &[(usize, usize)] = if step == 2 { &[(0, 2)] } else { &[(0, 1), (1, 1)] };
                    for &(h, nb) in passes {
                        let bias = if bias.is_null() { bias } else { bias.add(h * NR) };
                        let b_tile = if nb == 2 { bp } else { [bp[h]; 2] };
                        let mut ir = 0;
                        while ir < nir {
                            let ra = step.min(nir - ir);
                            let ap = [block.add(ir * ap_stride), block.add((ir + ra - 1) * ap_stride)];
                            tile(
                                kl,
                                ap,
                                ra,
                                b_tile,
                                nb,
                                sums.as_mut_ptr().add(ir * MR * ld + h * NR),
                                ld,
                                kb > 0,
                                bias,
                            );
                            ir += ra;
                        }
                    }
                }
                gate(sums.as_ptr(), mc, out.add(i0 * ldo + j * NR), ldo);
            }
            i0 += mc;
        }
    });
}

/// `dst[r][c] = s[r][c] · gelu(s[r][16 + c])` for `rows` rows of a 32-wide block, on 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_rows_256(s: *const f32, rows: usize, dst: *mut f32, ld: usize) {
    use super::vmath::F32s;
    for r in 0..rows {
        for h in (0..NR).step_by(8) {
            let g = super::vmath::gelu(<__m256 as F32s>::load(s.add(r * 2 * NR + NR + h)));
            <__m256 as F32s>::load(s.add(r * 2 * NR + h)).mul(g).store(dst.add(r * ld + h));
        }
    }
}

/// [`gated_rows_256`] on 16 lanes (the same numbers: [`super::vmath::gelu`] is lane by lane).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn gated_rows_512(s: *const f32, rows: usize, dst: *mut f32, ld: usize) {
    use super::vmath::F32s;
    for r in 0..rows {
        let g = super::vmath::gelu(<__m512 as F32s>::load(s.add(r * 2 * NR + NR)));
        <__m512 as F32s>::load(s.add(r * 2 * NR)).mul(g).store(dst.add(r * ld));
    }
}

/// `C (a.m()×n, row stride ldc) = init + A · B` with A packed beforehand, on all of rayon's
/// threads when `parallel`, else on the calling thread.
///
/// # Safety
/// [`avx2`] is true; `c` covers a.m() rows of `ldc` (≥ n) floats.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub unsafe fn matmul_packed(a: &PackedA, b: &PackedB, c: *mut f32, ldc: usize, init: Init, parallel: bool, wide: bool) {
    assert_eq!(a.k, b.k, "packed operands' depths");
    assert_eq!(a.half, b.half, "packed operands' forms (float32, bfloat16 or float16)");
    let lhs = if a.tiles {
        Lhs::TilesBf16(a.pairs.as_ptr(), a.k.div_ceil(2).div_ceil(16))
    } else if a.half.is_some() {
        Lhs::PanelsHalf(a.pairs.as_ptr(), a.k)
    } else {
        Lhs::Panels(a.data.as_ptr(), a.k)
    };
    if parallel {
        parallel_rows(a.m, lhs, b, c, ldc, init, wide, Epilogue::Store)
    } else {
        rows_of(a.m, lhs, b, c, ldc, init, wide)
    }
}

/// `C (a.m()×n, row stride ldc) = init + A · B` for A in AMX tiles (a LayerNorm's output,
/// [`super::layer_norm::layer_norm_tiles`], or a gated feed-forward's) on all of rayon's threads,
/// with the `epilogue` of a product on float32 rows (GEGLU: C is the gated output).
///
/// # Safety
/// [`super::amx`] is true and A is in tiles (with [`super::amx::geglu_fits`] for GEGLU); `c`
/// covers a.m() rows of `ldc` floats (n, or n/2 with GEGLU), as does a residual.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn matmul_tiles(a: &PackedA, b: &PackedB, c: *mut f32, ldc: usize, init: Init, epilogue: Epilogue) {
    assert!(a.tiles && b.is_bf16() && a.k == b.k, "tiles of A for a bfloat16 B of the same depth");
    let lhs = Lhs::TilesBf16(a.pairs.as_ptr(), a.k.div_ceil(2).div_ceil(16));
    parallel_rows(a.m, lhs, b, c, ldc, init, true, epilogue)
}

/// The most rows for which a product on AMX tiles splits B's columns among the threads rather
/// than A's rows. `kernel_speed`'s bf16 linear rows, Emerald Rapids, 2 cores, GFLOP/s of the
/// product, interleaved best of 10 three times, rows split → columns split: 128×1280·1280×10240
/// 456–543 → 542–666, 512×1280·1280×10240 503–588 → 540–615, 512×1280·1280×1280 and
/// 512×5120·5120×1280 level; at 2048 rows (split at most 2048) 0.9–1.0×.
#[cfg(target_arch = "x86_64")]
const AMX_COLUMN_SPLIT_ROWS: usize = 1024;

/// The product on all of rayon's threads, its `epilogue` applied: with GEGLU (AMX tiles only,
/// [`super::amx::geglu_panels`]: C is the gated output, B's columns split in whole pairs of
/// panels); a residual added in the tiles' epilogue on AMX, after each thread's rows elsewhere.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn parallel_rows(
    m: usize,
    a: Lhs,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    init: Init,
    wide: bool,
    epilogue: Epilogue,
) {
    let panels = b.n.div_ceil(NR);
    let geglu = matches!(epilogue, Epilogue::Geglu | Epilogue::GegluTiles);
    // B's panels `range` for m rows from `a` into `c` (the epilogue's residual at c's offset),
    // on this thread
    let run = |m: usize, a: Lhs, c: *mut f32, epilogue: Epilogue, range: std::ops::Range<usize>| {
        #[cfg(target_arch = "x86_64")]
        if geglu {
            return super::amx::geglu_panels(m, a, b, c, ldc, init, range, epilogue);
        } else if range != (0..panels)
            || (matches!(epilogue, Epilogue::Residual(_))
                && b.is_bf16()
                && (super::amx() || matches!(a, Lhs::TilesBf16(..))))
        {
            return super::amx::blocked_panels(m, a, b, c, ldc, init, range, epilogue);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (range, geglu);
        match epilogue {
            // a block of rows at a time (the blocked product's own), its residual added while
            // the block is still in L2
            Epilogue::Residual(r) => {
                let mut r0 = 0;
                while r0 < m {
                    let rows = MC.min(m - r0);
                    rows_of(rows, a.skip_rows(r0), b, c.add(r0 * ldc), ldc, init, wide);
                    add_residual(rows, b.n, c.add(r0 * ldc), r.add(r0 * ldc), ldc);
                    r0 += rows;
                }
            }
            _ => rows_of(m, a, b, c, ldc, init, wide),
        }
    };
    let threads = rayon::current_num_threads().max(1);
    let work = m * b.n * b.k;
    if threads == 1 || work < 1 << 20 || m < 2 * MR {
        return run(m, a, c, epilogue, 0..panels);
    }
    #[cfg(target_arch = "x86_64")]
    if b.is_bf16() && (super::amx() || matches!(a, Lhs::TilesBf16(..))) && m <= AMX_COLUMN_SPLIT_ROWS {
        // on tiles, few rows: B's columns split among the threads, each over all rows, so that
        // the weight is read from memory once in all rather than once a thread (GEGLU: in
        // whole pairs of a value and a gate panel)
        let per = panels.div_ceil(threads).max(1).next_multiple_of(if geglu { 2 } else { 1 });
        let cp = SendPtr(c);
        let a = SharedLhs(a);
        (0..panels.div_ceil(per)).into_par_iter().for_each(|t| {
            run(m, a.get(), cp.get(), epilogue, t * per..((t + 1) * per).min(panels));
        });
        return;
    }
    let tasks = threads * (m / (threads * 2048)).max(1);
    // blocks of whole micro-panels (or tile row groups), so that packed A splits at their
    // boundaries
    let align = if matches!(a, Lhs::TilesBf16(..)) { 16 } else { MR };
    let block = m.div_ceil(tasks).div_ceil(align) * align;
    let cp = SendPtr(c);
    let a = SharedLhs(a);
    (0..m.div_ceil(block)).into_par_iter().for_each(|t| {
        let r0 = t * block;
        run(block.min(m - r0), a.get().skip_rows(r0), cp.get().add(r0 * ldc), epilogue.at(r0 * ldc), 0..panels);
    });
}

/// Never called off x86-64 and AArch64: [`super::packed_product`] is false there and callers take
/// candle's matmul.
///
/// # Safety
/// Not callable.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_rows(
    _m: usize,
    _a: *const f32,
    _lda: usize,
    _b: &PackedB,
    _c: *mut f32,
    _ldc: usize,
    _init: Init,
    _wide: bool,
) {
    unreachable!("the packed matrix product runs only where packed_product() is true (x86-64, AArch64)")
}

/// Never called off x86-64 and AArch64: [`super::packed_product`] is false there and callers take
/// candle's matmul.
///
/// # Safety
/// Not callable.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub unsafe fn matmul_packed(
    _a: &PackedA,
    _b: &PackedB,
    _c: *mut f32,
    _ldc: usize,
    _init: Init,
    _parallel: bool,
    _wide: bool,
) {
    unreachable!("the packed matrix product runs only where packed_product() is true (x86-64, AArch64)")
}

/// Never called off x86-64 and AArch64: [`super::packed_product`] is false there and callers take
/// candle's matmul.
///
/// # Safety
/// Not callable.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    _m: usize,
    _a: *const f32,
    _lda: usize,
    _b: &PackedB,
    _c: *mut f32,
    _ldc: usize,
    _init: Init,
    _wide: bool,
    _residual: Option<*const f32>,
) {
    unreachable!("the packed matrix product runs only where packed_product() is true (x86-64, AArch64)")
}

/// Never called off x86-64 and AArch64: [`super::packed_product`] is false there and callers take
/// candle's matmul.
///
/// # Safety
/// Not callable.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_streamed(
    _m: usize,
    _a: *const f32,
    _lda: usize,
    _w: Src,
    _n: usize,
    _k: usize,
    _c: *mut f32,
    _ldc: usize,
    _init: Init,
    _wide: bool,
) {
    unreachable!("the packed matrix product runs only where packed_product() is true (x86-64, AArch64)")
}

/// The AArch64 micro-kernel (NEON is part of every AArch64 CPU).
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{MR, NR};

    /// As the AVX2 [`super::kernel_6x16`], with 128-bit vectors: a 6×16 tile in 24 accumulators
    /// (four vectors a row), each step of k four loads of B and 24 multiply-adds by lanes of the
    /// six A values (one 4-wide and one 2-wide load). The per-element sums run in k order, fused,
    /// as on x86-64.
    ///
    /// # Safety
    /// `a` holds k·6, `b` k·16 floats, c six rows of 16 (`ldc` apart); `bias16` null or 16 floats.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn kernel_6x16(
        k: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        bias16: *const f32,
    ) {
        let start = if bias16.is_null() {
            [vdupq_n_f32(0.0); 4]
        } else {
            [vld1q_f32(bias16), vld1q_f32(bias16.add(4)), vld1q_f32(bias16.add(8)), vld1q_f32(bias16.add(12))]
        };
        let mut s = [start; MR];
        let (mut ap, mut bp) = (a, b);
        for _ in 0..k {
            let bv = [vld1q_f32(bp), vld1q_f32(bp.add(4)), vld1q_f32(bp.add(8)), vld1q_f32(bp.add(12))];
            let a03 = vld1q_f32(ap);
            let a45 = vld1_f32(ap.add(4));
            for j in 0..4 {
                s[0][j] = vfmaq_laneq_f32::<0>(s[0][j], bv[j], a03);
                s[1][j] = vfmaq_laneq_f32::<1>(s[1][j], bv[j], a03);
                s[2][j] = vfmaq_laneq_f32::<2>(s[2][j], bv[j], a03);
                s[3][j] = vfmaq_laneq_f32::<3>(s[3][j], bv[j], a03);
                s[4][j] = vfmaq_lane_f32::<0>(s[4][j], bv[j], a45);
                s[5][j] = vfmaq_lane_f32::<1>(s[5][j], bv[j], a45);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        for (r, row) in s.iter().enumerate() {
            let p = c.add(r * ldc);
            for (j, &v) in row.iter().enumerate() {
                let v = if acc { vaddq_f32(vld1q_f32(p.add(4 * j)), v) } else { v };
                vst1q_f32(p.add(4 * j), v);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Packing A puts every value where the micro-kernels read it, and zeros past the rows, on
    /// whole and ragged panels and depths (the 8-wide transposes and their scalar rest).
    #[test]
    fn packed_a_holds_each_value_in_its_panel() {
        let lda = 29;
        let a: Vec<f32> = (0..20 * lda).map(|i| i as f32 + 0.5).collect();
        for (i0, mc) in [(0usize, 6usize), (1, 13), (3, 5), (0, 18), (7, 1)] {
            for (k0, kl) in [(0usize, 8usize), (2, 16), (1, 17), (0, 29), (5, 3), (4, 24)] {
                let panels = mc.div_ceil(MR);
                let mut got = vec![f32::NAN; panels * kl * MR + 7];
                // SAFETY: rows i0..i0 + mc of lda floats exist and k0 + kl ≤ lda; `got` holds
                // the panels (and a tail that must stay untouched).
                unsafe { pack_a(a.as_ptr(), lda, i0, mc, k0, kl, got.as_mut_ptr()) };
                for ir in 0..panels {
                    for kk in 0..kl {
                        for r in 0..MR {
                            let row = ir * MR + r;
                            let want = if row < mc { a[(i0 + row) * lda + k0 + kk] } else { 0.0 };
                            assert_eq!(got[(ir * kl + kk) * MR + r], want, "rows {i0}+{mc}, depths {k0}+{kl}");
                        }
                    }
                }
                assert!(got[panels * kl * MR..].iter().all(|v| v.is_nan()), "written past the panels");
            }
        }
    }

    /// The 12×8 tile gives the bits of two 6×16 tiles' first 8 columns, written and accumulated.
    #[test]
    fn tile_12x8_gives_the_bits_of_the_6x16_tile() {
        if !avx2() {
            eprintln!("SKIPPED: no AVX2 and FMA on this CPU");
            return;
        }
        let k = 37;
        let val = |i: usize, m: usize| ((i * 7919 + m) % 1000) as f32 / 300.0 - 1.6;
        let a: Vec<f32> = (0..2 * k * MR).map(|i| val(i, 1)).collect();
        let b: Vec<f32> = (0..k * NR).map(|i| val(i, 2)).collect();
        let start: Vec<f32> = (0..2 * MR * NR).map(|i| val(i, 3)).collect();
        for acc in [false, true] {
            let (mut wide, mut narrow) = (start.clone(), start.clone());
            // SAFETY: AVX2 and FMA checked; a holds two panels of k·6, b k rows of 16, the
            // outputs 12 rows of 16.
            unsafe {
                for p in 0..2 {
                    let c = wide.as_mut_ptr().add(p * MR * NR);
                    kernel_6x16(k, a.as_ptr().add(p * k * MR), b.as_ptr(), c, NR, acc, std::ptr::null());
                }
                kernel_12x8(k, a.as_ptr(), a.as_ptr().add(k * MR), b.as_ptr(), NR, narrow.as_mut_ptr(), NR, acc);
            }
            for r in 0..2 * MR {
                assert_eq!(narrow[r * NR..r * NR + 8], wide[r * NR..r * NR + 8], "row {r}, accumulate {acc}");
                assert_eq!(
                    narrow[r * NR + 8..(r + 1) * NR],
                    start[r * NR + 8..(r + 1) * NR],
                    "row {r}: columns 8.. untouched"
                );
            }
        }
    }
}
