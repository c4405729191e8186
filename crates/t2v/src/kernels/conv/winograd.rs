//! Winograd F(4×4, 3×3) for 3×3 convolutions of stride 1 and padding 1 (x86-64 with AVX2, FMA
//! and F16C): per chunk of 4×4 output tiles, the input tiles are transformed (V = Bᵀ d B, in
//! parallel over channels), then per block of output channels the weights are transformed
//! (U = G g Gᵀ), the 36 planes multiplied by the packed matrix product's micro-kernels (6×16 at
//! 256 bits; 12×32 at 512, two groups of 16 tiles a pass) with channel sums in blocks of [`KC`],
//! and the products transformed back (Aᵀ M A) into the output.
//! Interpolation points {0, 1, −1, ½, −2, ∞}. Weights may be float16 or bfloat16 (widened exactly
//! as they are transformed); the products stay float32 even for bfloat16 weights on the
//! AVX-512 + BF16 path: rounding the transformed planes to bfloat16 was measured at ~1e-2 of the
//! output's magnitude (F(4×4)'s output transform multiplies rounding errors by up to 64) and
//! took the tiny fixture's frames to 3.5e-2 from float32's, past the 2e-2 that `--dtype bf16` keeps.
//!
//! One file: the input, weight and output transforms and the multiply share one tile layout, which a
//! split would scatter.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use crate::kernels::vmath::F32s;

// MR: output channels per micro-kernel panel (the broadcast operand); NR: tiles per panel (two
// AVX vectors). The micro-kernel is the packed matrix product's.
use crate::kernels::packed_matmul::{self, MR, NR};
use crate::kernels::{threads, SendPtr, Src};

/// Input channels per accumulation block: partial sums over KC channels start from zero and
/// are then added, which keeps the f32 error of long channel sums small.
const KC: usize = 128;
/// Transformed-input chunk budget (floats): tiles are processed in chunks of at most this much
/// transformed data.
const V_BUDGET: usize = 8 << 20;
/// Largest output-channel block of one task (in panels).
const MAX_TASK_PANELS: usize = 8;
/// Groups of NR tiles sharing one pass over the weights in the GEMM loop, per path. 256-bit
/// tiles: 1 (measured best: the NR×KC block of transformed input then stays in L1 across all
/// panels). 512-bit tiles: 2, so that the micro-kernel runs its full 12×32 tile (24
/// accumulators, two vectors of B per broadcast) instead of 12×16: 1.15–1.6× on the UNet's and
/// the VAE decoder's shapes (`kernel_speed`, Emerald Rapids); 4 measured no better than 2.
const SG_NARROW: usize = 1;
const SG_WIDE: usize = 2;

/// Tile groups per pass over the weights ([`SG_NARROW`], [`SG_WIDE`]).
fn groups_per_pass(wide: bool) -> usize {
    if wide {
        SG_WIDE
    } else {
        SG_NARROW
    }
}

thread_local! {
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

#[derive(Clone, Copy)]
struct Geom {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    ty_n: usize,
    tx_n: usize,
    t_total: usize,
}

impl Geom {
    /// Whether the 16 tiles from `t` lie in one tile row (the 512-bit transforms' fast case).
    #[inline(always)]
    fn row16(&self, t: usize) -> bool {
        t + 16 <= self.t_total && (t % (self.ty_n * self.tx_n)) % self.tx_n + 16 <= self.tx_n
    }

    #[inline(always)]
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let per = self.ty_n * self.tx_n;
        let img = t / per;
        let r = t % per;
        (img, r / self.tx_n, r % self.tx_n)
    }
}

/// # Safety
/// AVX2 and FMA must be available; slices must have the NCHW sizes given.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn conv3x3(
    x: &[f32],
    w: Src,
    bias: Option<&[f32]>,
    out: &mut [f32],
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    wd: usize,
) {
    assert_eq!(x.len(), n * cin * h * wd);
    assert_eq!(w.len(), cout * cin * 9);
    assert_eq!(out.len(), n * cout * h * wd);
    let ty_n = h.div_ceil(4);
    let tx_n = wd.div_ceil(4);
    let g = Geom { cin, cout, h, w: wd, ty_n, tx_n, t_total: n * ty_n * tx_n };
    let nt = threads();
    // 512-bit tiles where this CPU runs them faster (kernels::tuning)
    let wide = super::super::wide(super::super::KernelKind::Conv3x3);
    let sg_max = groups_per_pass(wide);
    let t16 = g.t_total.div_ceil(NR) * NR;
    let tc_max = ((V_BUDGET / (36 * cin)) / NR * NR).max(NR);
    let n_chunks = t16.div_ceil(tc_max);
    let tc = (t16 / NR).div_ceil(n_chunks) * NR;
    let n_panels = cout.div_ceil(MR);
    // output-channel tasks: at least 2 per thread, at most MAX_TASK_PANELS panels each.
    let mut n_tasks = n_panels.div_ceil(MAX_TASK_PANELS).max(2 * nt).min(n_panels);
    if n_tasks > nt {
        n_tasks = n_tasks.div_ceil(nt) * nt;
    }
    let n_tasks = n_tasks.min(n_panels).max(1);
    let tasks: Vec<(usize, usize)> =
        (0..n_tasks).map(|i| (i * n_panels / n_tasks, (i + 1) * n_panels / n_tasks)).filter(|(a, b)| b > a).collect();

    // The transformed-input buffer is kept between calls (page faults on a fresh one cost
    // several % on the UNet shapes); every entry used is written before it is read.
    static V_CACHE: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());
    let mut v = std::mem::take(&mut *V_CACHE.lock().unwrap_or_else(|e| e.into_inner()));
    if v.len() < 36 * cin * tc {
        v = vec![0f32; 36 * cin * tc];
    }
    let vptr = SendPtr(v.as_mut_ptr());
    let optr = SendPtr(out.as_mut_ptr());
    let mut t0 = 0;
    while t0 < t16 {
        let tcc = tc.min(t16 - t0);
        let n_tsub = tcc / NR;
        // 1. input transform of tiles [t0, t0 + tcc) into v, parallel over channels.
        // Group-major, channel-minor order: the 36 output streams are written sequentially
        // (channel-major order is ~15 % slower overall on 128-channel layers).
        let groups: Vec<(usize, usize, usize)> = (0..tcc / 8).map(|gi| g.tile(t0 + gi * 8)).collect();
        let ci_blk = cin.div_ceil(4 * nt).max(1);
        (0..cin.div_ceil(ci_blk)).into_par_iter().for_each(|cb| {
            let (c_a, c_b) = (cb * ci_blk, ((cb + 1) * ci_blk).min(cin));
            let mut gi = 0;
            while gi < groups.len() {
                let tg = t0 + gi * 8;
                if wide && gi % 2 == 0 && g.row16(tg) {
                    input_row16(x, &g, groups[gi], c_a, c_b, vptr.get(), gi / 2);
                    gi += 2;
                } else {
                    input_group(x, &g, tg, groups[gi], c_a, c_b, vptr.get(), gi);
                    gi += 1;
                }
            }
        });
        // 2. GEMMs + output transform, parallel over output-channel blocks.
        tasks.par_iter().for_each(|&(pa, pb)| {
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let (ubuf, mbuf) = &mut *s;
                let np = pb - pa;
                let uxs = np * cin * MR + 8;
                let need_u = 36 * uxs;
                if ubuf.len() < need_u {
                    ubuf.resize(need_u, 0.0);
                }
                let need_m = sg_max * NR * np * MR * 36;
                if mbuf.len() < need_m {
                    mbuf.resize(need_m, 0.0);
                }
                transform_weights(w, &g, pa * MR, np, ubuf.as_mut_ptr(), uxs);
                task_gemm(
                    &g,
                    ubuf.as_ptr(),
                    uxs,
                    np,
                    vptr.get(),
                    n_tsub,
                    mbuf.as_mut_ptr(),
                    pa * MR,
                    t0,
                    bias,
                    optr.get(),
                    wide,
                );
            });
        });
        t0 += tcc;
    }
    let mut cache = V_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() < v.len() {
        *cache = v;
    }
}

// ----- weight transform: U = G g Gᵀ -------------------------------------------------------

#[inline(always)]
unsafe fn g3to6(a: __m256, b: __m256, c: __m256) -> [__m256; 6] {
    // G = [[1,0,0],[1/3,1/3,1/3],[-1/3,1/3,-1/3],[-16/15,-8/15,-4/15],[1/15,-2/15,4/15],[0,0,1]]
    let third = _mm256_set1_ps(1.0 / 3.0);
    let fif = _mm256_set1_ps(1.0 / 15.0);
    let ac = _mm256_add_ps(a, c);
    let r1 = _mm256_mul_ps(_mm256_add_ps(ac, b), third);
    let r2 = _mm256_mul_ps(_mm256_sub_ps(b, ac), third);
    // -(16a + 8b + 4c)/15
    let t3 = _mm256_fmadd_ps(
        _mm256_set1_ps(16.0),
        a,
        _mm256_fmadd_ps(_mm256_set1_ps(8.0), b, _mm256_mul_ps(_mm256_set1_ps(4.0), c)),
    );
    let r3 = _mm256_mul_ps(t3, _mm256_set1_ps(-1.0 / 15.0));
    // (a - 2b + 4c)/15
    let t4 = _mm256_fmadd_ps(_mm256_set1_ps(4.0), c, _mm256_fmadd_ps(_mm256_set1_ps(-2.0), b, a));
    let r4 = _mm256_mul_ps(t4, fif);
    [a, r1, r2, r3, r4, c]
}

/// Transform the weights of output channels [co0, co0 + np·MR) into `u`, laid out in the
/// order the GEMM loop reads them: `[ξ][channel block kb][panel][ci − kb][MR]` (channel blocks
/// of `KC` input channels; ξ planes `uxs` floats apart; channels past Cout are zero).
/// Vectorised with lane = output channel of a panel: lanes 6, 7 are scratch that a later
/// store overwrites (stores run in increasing address order within a ξ plane), so `uxs` must
/// leave 2 floats of slack after np·Cin·MR.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transform_weights(w: Src, g: &Geom, co0: usize, np: usize, u: *mut f32, uxs: usize) {
    let cin = g.cin;
    let mut kb = 0;
    while kb < cin {
        let kl = KC.min(cin - kb);
        for pl in 0..np {
            let cop = co0 + pl * MR;
            let nco = g.cout.saturating_sub(cop).min(MR);
            // address of (ξ = 0, ci) in this block and panel
            let at = |ci: usize| u.add(kb * np * MR + pl * kl * MR + (ci - kb) * MR);
            let mut ci = kb;
            while ci + 8 <= kb + kl {
                // rows[q][r]: 8 consecutive weights (ci.., k) of output channel r, block q of 9
                let mut rows = [[_mm256_setzero_ps(); 8]; 9];
                for r in 0..nco {
                    let base = ((cop + r) * cin + ci) * 9;
                    match w {
                        Src::F32(s) => {
                            let p = s.as_ptr().add(base);
                            for (q, rq) in rows.iter_mut().enumerate() {
                                rq[r] = _mm256_loadu_ps(p.add(8 * q));
                            }
                        }
                        Src::F16(s) => {
                            let p = s.as_ptr().add(base) as *const __m128i;
                            for (q, rq) in rows.iter_mut().enumerate() {
                                rq[r] = _mm256_cvtph_ps(_mm_loadu_si128(p.add(q)));
                            }
                        }
                        Src::Bf16(s) => {
                            let p = s.as_ptr().add(base) as *const __m128i;
                            for (q, rq) in rows.iter_mut().enumerate() {
                                rq[r] = packed_matmul::widen_bf16x8(p.add(q));
                            }
                        }
                    }
                }
                // after the transposes rows[q][m] holds flat index 8q + m = cl·9 + k, lane = r
                for rq in rows.iter_mut() {
                    packed_matmul::transpose8(rq);
                }
                let flat = rows.as_ptr() as *const __m256;
                for cl in 0..8 {
                    let gk = |k: usize| *flat.add(cl * 9 + k);
                    let c0 = g3to6(gk(0), gk(3), gk(6));
                    let c1 = g3to6(gk(1), gk(4), gk(7));
                    let c2 = g3to6(gk(2), gk(5), gk(8));
                    let dst = at(ci + cl);
                    for i in 0..6 {
                        let rr = g3to6(c0[i], c1[i], c2[i]);
                        for (j, &val) in rr.iter().enumerate() {
                            _mm256_storeu_ps(dst.add((i * 6 + j) * uxs), val);
                        }
                    }
                }
                ci += 8;
            }
            while ci < kb + kl {
                for r in 0..MR {
                    let mut gg = [0f32; 9];
                    if r < nco {
                        let base = ((cop + r) * cin + ci) * 9;
                        for (k, gv) in gg.iter_mut().enumerate() {
                            *gv = w.get(base + k);
                        }
                    }
                    let c0 = super::g3to6(gg[0], gg[3], gg[6]);
                    let c1 = super::g3to6(gg[1], gg[4], gg[7]);
                    let c2 = super::g3to6(gg[2], gg[5], gg[8]);
                    let dst = at(ci);
                    for i in 0..6 {
                        let rr = super::g3to6(c0[i], c1[i], c2[i]);
                        for j in 0..6 {
                            *dst.add((i * 6 + j) * uxs + r) = rr[j];
                        }
                    }
                }
                ci += 1;
            }
        }
        kb += kl;
    }
}

// ----- input transform: V = Bᵀ d B ----------------------------------------------------------

/// Bᵀ for the points {0, 1, −1, ½, −2, ∞} (8 or 16 lanes: one tile a lane).
#[inline(always)]
unsafe fn bt6<V: F32s>(v: [V; 6]) -> [V; 6] {
    let [v0, v1, v2, v3, v4, v5] = v;
    let h = V::splat(0.5);
    let h3 = V::splat(1.5);
    let two = V::splat(2.0);
    let h5 = V::splat(2.5);
    // r0 = v0 − 1.5 v1 − 2 v2 + 1.5 v3 + v4 = v0 + v4 + 1.5 (v3 − v1) − 2 v2
    let r0 = V::fnmadd(two, v2, V::fmadd(h3, v3.sub(v1), v0.add(v4)));
    // r5 = v1 − 1.5 v2 − 2 v3 + 1.5 v4 + v5 = v1 + v5 + 1.5 (v4 − v2) − 2 v3
    let r5 = V::fnmadd(two, v3, V::fmadd(h3, v4.sub(v2), v1.add(v5)));
    // r1 = −v1 + 0.5 v2 + 2.5 v3 + v4
    let r1 = V::fmadd(h5, v3, V::fmadd(h, v2, v4.sub(v1)));
    // r2 = v1 − 2.5 v2 + 0.5 v3 + v4
    let r2 = V::fnmadd(h5, v2, V::fmadd(h, v3, v4.add(v1)));
    // r3 = −2 v1 − v2 + 2 v3 + v4 = 2 (v3 − v1) + v4 − v2
    let r3 = V::fmadd(two, v3.sub(v1), v4.sub(v2));
    // r4 = 0.5 v1 − v2 − 0.5 v3 + v4 = 0.5 (v1 − v3) + v4 − v2
    let r4 = V::fmadd(h, v1.sub(v3), v4.sub(v2));
    [r0, r1, r2, r3, r4, r5]
}

/// Transform the 8 tiles [tg, tg + 8) (lane = tile; `pos` = `g.tile(tg)`) of channels
/// [c_a, c_b) into `v` (group `gi` of the chunk).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn input_group(
    x: &[f32],
    g: &Geom,
    tg: usize,
    pos: (usize, usize, usize),
    c_a: usize,
    c_b: usize,
    v: *mut f32,
    gi: usize,
) {
    let (h, w) = (g.h, g.w);
    let plane = h * w;
    let s = gi / 2;
    let half = gi % 2;
    let vstride_xi = g.cin * NR;
    let vbase = v.add(s * 36 * g.cin * NR + half * 8);
    let xp = x.as_ptr();
    // Fast path: 8 consecutive tiles of one tile row.
    let (img0, ty0, tx0) = pos;
    let row_path = tg + 8 <= g.t_total && tx0 + 8 <= g.tx_n;
    if row_path {
        let c0 = 4 * tx0 as isize - 1;
        let interior = c0 >= 0 && c0 as usize + 34 <= w;
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let wv = _mm256_set1_epi32(w as i32);
        let mk = |off: isize| {
            let col = _mm256_add_epi32(iota, _mm256_set1_epi32((c0 + off) as i32));
            _mm256_and_si256(_mm256_cmpgt_epi32(col, _mm256_set1_epi32(-1)), _mm256_cmpgt_epi32(wv, col))
        };
        let masks = [mk(0), mk(8), mk(16), mk(24)];
        let e_ok = [c0 + 32 >= 0 && ((c0 + 32) as usize) < w, c0 + 33 >= 0 && ((c0 + 33) as usize) < w];
        let shift = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 0);
        for ci in c_a..c_b {
            let pbase = xp.add((img0 * g.cin + ci) * plane);
            let mut d = [[_mm256_setzero_ps(); 6]; 6];
            for (r, dr) in d.iter_mut().enumerate() {
                let y = (4 * ty0 + r) as isize - 1;
                if y < 0 || y as usize >= h {
                    continue;
                }
                let row = pbase.add(y as usize * w);
                let (a0, a1, a2, a3, e4, e5);
                if interior {
                    let p = row.add(c0 as usize);
                    a0 = _mm256_loadu_ps(p);
                    a1 = _mm256_loadu_ps(p.add(8));
                    a2 = _mm256_loadu_ps(p.add(16));
                    a3 = _mm256_loadu_ps(p.add(24));
                    e4 = *p.add(32);
                    e5 = *p.add(33);
                    // the next group of this tile row reads the following 32 columns
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(48) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64) as *const i8);
                } else {
                    let p = row.wrapping_offset(c0);
                    a0 = _mm256_maskload_ps(p, masks[0]);
                    a1 = _mm256_maskload_ps(p.wrapping_add(8), masks[1]);
                    a2 = _mm256_maskload_ps(p.wrapping_add(16), masks[2]);
                    a3 = _mm256_maskload_ps(p.wrapping_add(24), masks[3]);
                    e4 = if e_ok[0] { *row.add((c0 + 32) as usize) } else { 0.0 };
                    e5 = if e_ok[1] { *row.add((c0 + 33) as usize) } else { 0.0 };
                }
                let u0 = _mm256_permute2f128_ps::<0x20>(a0, a2);
                let u1 = _mm256_permute2f128_ps::<0x31>(a0, a2);
                let u2 = _mm256_permute2f128_ps::<0x20>(a1, a3);
                let u3 = _mm256_permute2f128_ps::<0x31>(a1, a3);
                let t0 = _mm256_unpacklo_ps(u0, u1);
                let t1 = _mm256_unpackhi_ps(u0, u1);
                let t2 = _mm256_unpacklo_ps(u2, u3);
                let t3 = _mm256_unpackhi_ps(u2, u3);
                let col0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let col1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let col2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let col3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let col4 = _mm256_blend_ps::<0x80>(_mm256_permutevar8x32_ps(col0, shift), _mm256_set1_ps(e4));
                let col5 = _mm256_blend_ps::<0x80>(_mm256_permutevar8x32_ps(col1, shift), _mm256_set1_ps(e5));
                *dr = bt6([col0, col1, col2, col3, col4, col5]);
            }
            transform_store(&d, vbase.add(ci * NR), vstride_xi);
        }
    } else {
        // General path: any 8 tiles (straddling rows / images / the end), gathered in scalar.
        let mut lanes = [(false, 0usize, 0isize, 0isize); 8];
        for (l, ln) in lanes.iter_mut().enumerate() {
            let t = tg + l;
            if t < g.t_total {
                let (img, ty, tx) = g.tile(t);
                *ln = (true, img, 4 * ty as isize - 1, 4 * tx as isize - 1);
            }
        }
        let mut buf = [[[0f32; 8]; 6]; 6];
        for ci in c_a..c_b {
            for (l, &(ok, img, y0, x0)) in lanes.iter().enumerate() {
                let pbase = xp.add((img * g.cin + ci) * plane);
                for r in 0..6 {
                    let y = y0 + r as isize;
                    let yok = ok && y >= 0 && (y as usize) < h;
                    for c in 0..6 {
                        let xx = x0 + c as isize;
                        buf[r][c][l] = if yok && xx >= 0 && (xx as usize) < w {
                            *pbase.add(y as usize * w + xx as usize)
                        } else {
                            0.0
                        };
                    }
                }
            }
            let mut d = [[_mm256_setzero_ps(); 6]; 6];
            for r in 0..6 {
                let row = [0, 1, 2, 3, 4, 5].map(|c| _mm256_loadu_ps(buf[r][c].as_ptr()));
                d[r] = bt6(row);
            }
            transform_store(&d, vbase.add(ci * NR), vstride_xi);
        }
    }
}

/// `d` holds the rows of a 6×6 tile after the horizontal transform (d B); finish with the
/// vertical one (Bᵀ ·) and store plane ξ = 6·i + j at `dst + ξ·stride_xi`.
#[inline(always)]
unsafe fn transform_store<V: F32s>(d: &[[V; 6]; 6], dst: *mut f32, stride_xi: usize) {
    let s6 = 6 * stride_xi;
    let mut pj = dst;
    for j in 0..6 {
        let col = bt6([d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]]);
        let mut p = pj;
        for v in col {
            v.store(p);
            p = p.add(s6);
        }
        pj = pj.add(stride_xi);
    }
}

// ----- GEMM over the 36 planes + output transform -----------------------------------------

/// The products of one ξ plane and channel block in AVX-512 tiles of up to 12×32: pairs of
/// output-channel panels (`up`: np panels of kl·MR) against pairs of tile groups (V's panels for
/// groups s0.. of this plane), into the `m` scratch as [`task_gemm`] lays it out.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_plane_avx512(
    up: *const f32,
    kl: usize,
    np: usize,
    v: *const f32,
    s0: usize,
    sg: usize,
    xi: usize,
    cin: usize,
    kb: usize,
    m: *mut f32,
    mc: usize,
    acc: bool,
) {
    let vp = |s: usize| v.add((((s0 + s) * 36 + xi) * cin + kb) * NR);
    let (ldc, cjs) = (36 * NR, mc * 36 * NR);
    let mut p = 0;
    while p < np {
        let ra = 2.min(np - p);
        let a = [up.add(p * kl * MR), up.add((p + ra - 1) * kl * MR)];
        let mut s = 0;
        while s < sg {
            let nb = 2.min(sg - s);
            let b = [vp(s), vp(s + nb - 1)];
            let c = m.add(((s * mc + p * MR) * 36 + xi) * NR);
            packed_matmul::tile_avx512_of(ra, nb, kl, a, b, c, ldc, cjs, acc, std::ptr::null());
            s += nb;
        }
        p += ra;
    }
}

/// One task: output channels [co0, co0 + np·MR) × all tiles of the chunk.
/// `m` scratch layout: `[s in sg_max][co_local][ξ][NR]`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn task_gemm(
    g: &Geom,
    u: *const f32,
    uxs: usize,
    np: usize,
    v: *const f32,
    n_tsub: usize,
    m: *mut f32,
    co0: usize,
    t0: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    wide: bool,
) {
    let cin = g.cin;
    let mc = np * MR;
    let sg_max = groups_per_pass(wide);
    let mut s0 = 0;
    while s0 < n_tsub {
        let sg = sg_max.min(n_tsub - s0);
        for xi in 0..36 {
            let mut kb = 0;
            while kb < cin {
                let kl = KC.min(cin - kb);
                if wide {
                    gemm_plane_avx512(u.add(xi * uxs + kb * np * MR), kl, np, v, s0, sg, xi, cin, kb, m, mc, kb > 0);
                } else {
                    for p in 0..np {
                        let up = u.add(xi * uxs + kb * np * MR + p * kl * MR);
                        for s in 0..sg {
                            let vp = v.add((((s0 + s) * 36 + xi) * cin + kb) * NR);
                            let cp = m.add(((s * mc + p * MR) * 36 + xi) * NR);
                            packed_matmul::kernel_6x16(kl, up, vp, cp, 36 * NR, kb > 0, std::ptr::null());
                        }
                    }
                }
                kb += kl;
            }
        }
        for s in 0..sg {
            let row16 = wide && g.row16(t0 + (s0 + s) * NR);
            for col in 0..mc {
                let co = co0 + col;
                if co >= g.cout {
                    break;
                }
                let bv = bias.map_or(0.0, |b| b[co]);
                let mp = m.add((s * mc + col) * 36 * NR);
                if row16 {
                    output_row16(g, mp, t0 + (s0 + s) * NR, co, bv, out);
                    continue;
                }
                for half in 0..2 {
                    let tg = t0 + (s0 + s) * NR + half * 8;
                    if tg >= g.t_total {
                        break;
                    }
                    output_group(g, mp.add(half * 8), tg, co, bv, out);
                }
            }
        }
        s0 += sg;
    }
}

/// Aᵀ for the points {0, 1, −1, ½, −2, ∞}: 6 → 4 (8 or 16 lanes).
#[inline(always)]
unsafe fn at6<V: F32s>(m: [V; 6]) -> [V; 4] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let s12 = m1.add(m2);
    let d12 = m1.sub(m2);
    let o0 = m0.add(s12).add(m3.add(m4));
    let o1 = V::fmadd(V::splat(0.5), m3, V::fnmadd(V::splat(2.0), m4, d12));
    let o2 = V::fmadd(V::splat(0.25), m3, V::fmadd(V::splat(4.0), m4, s12));
    let o3 = V::fmadd(V::splat(0.125), m3, V::fnmadd(V::splat(8.0), m4, d12.add(m5)));
    [o0, o1, o2, o3]
}

/// Aᵀ M A + bias for the tiles in the lanes of `mp[ξ·NR + lane]` (8 or 16 of them): row i,
/// column j of each tile's 4×4 output in `[i][j]`.
#[inline(always)]
unsafe fn inverse_tiles<V: F32s>(mp: *const f32, bv: f32) -> [[V; 4]; 4] {
    let mut t = [[V::zero(); 6]; 4];
    for j in 0..6 {
        let mut col = [V::zero(); 6];
        for (i, ci) in col.iter_mut().enumerate() {
            *ci = V::load(mp.add((i * 6 + j) * NR));
        }
        let c = at6(col);
        for i in 0..4 {
            t[i][j] = c[i];
        }
    }
    let bvec = V::splat(bv);
    let mut o = [[V::zero(); 4]; 4];
    for i in 0..4 {
        let r = at6(t[i]);
        for j in 0..4 {
            o[i][j] = r[j].add(bvec);
        }
    }
    o
}

/// Output transform of 8 tiles [tg, tg + 8) (lane = tile) of channel `co`: `mp[ξ·NR + lane]`.
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_group(g: &Geom, mp: *const f32, tg: usize, co: usize, bv: f32, out: *mut f32) {
    let o: [[__m256; 4]; 4] = inverse_tiles(mp, bv);
    let (h, w) = (g.h, g.w);
    let plane = h * w;
    let (img0, ty0, tx0) = g.tile(tg);
    if tg + 8 <= g.t_total && tx0 + 8 <= g.tx_n {
        let x0 = 4 * tx0;
        let full = x0 + 32 <= w;
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let wv = _mm256_set1_epi32(w as i32);
        let mk = |off: usize| _mm256_cmpgt_epi32(wv, _mm256_add_epi32(iota, _mm256_set1_epi32((x0 + off) as i32)));
        let base = out.add((img0 * g.cout + co) * plane);
        for (i, oi) in o.iter().enumerate() {
            let y = 4 * ty0 + i;
            if y >= h {
                break;
            }
            let [o0, o1, o2, o3] = *oi;
            let t0 = _mm256_unpacklo_ps(o0, o1);
            let t1 = _mm256_unpackhi_ps(o0, o1);
            let t2 = _mm256_unpacklo_ps(o2, o3);
            let t3 = _mm256_unpackhi_ps(o2, o3);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let r0 = _mm256_permute2f128_ps::<0x20>(u0, u1);
            let r1 = _mm256_permute2f128_ps::<0x20>(u2, u3);
            let r2 = _mm256_permute2f128_ps::<0x31>(u0, u1);
            let r3 = _mm256_permute2f128_ps::<0x31>(u2, u3);
            let p = base.add(y * w + x0);
            if full {
                _mm256_storeu_ps(p, r0);
                _mm256_storeu_ps(p.add(8), r1);
                _mm256_storeu_ps(p.add(16), r2);
                _mm256_storeu_ps(p.add(24), r3);
            } else {
                _mm256_maskstore_ps(p, mk(0), r0);
                _mm256_maskstore_ps(p.wrapping_add(8), mk(8), r1);
                _mm256_maskstore_ps(p.wrapping_add(16), mk(16), r2);
                _mm256_maskstore_ps(p.wrapping_add(24), mk(24), r3);
            }
        }
    } else {
        let mut buf = [[[0f32; 8]; 4]; 4];
        for i in 0..4 {
            for j in 0..4 {
                _mm256_storeu_ps(buf[i][j].as_mut_ptr(), o[i][j]);
            }
        }
        for l in 0..8 {
            let t = tg + l;
            if t >= g.t_total {
                break;
            }
            let (img, ty, tx) = g.tile(t);
            let base = out.add((img * g.cout + co) * plane);
            for i in 0..4 {
                let y = 4 * ty + i;
                if y >= h {
                    break;
                }
                for j in 0..4 {
                    let xx = 4 * tx + j;
                    if xx >= w {
                        break;
                    }
                    *base.add(y * w + xx) = buf[i][j][l];
                }
            }
        }
    }
}

// ----- the 512-bit transforms: 16 tiles of one tile row, lane = tile ------------------------
//
// Images at least 16 tiles wide (the VAE decoder's 64² to 256² levels) take these: one 512-bit
// vector per row of 16 tiles halves the arithmetic of the 8-tile forms above, and the 16 tiles
// are one whole panel of the transformed input (full 64-byte stores).

/// Lanes of 16 consecutive columns from `c0 + off` that lie inside [0, w).
#[inline(always)]
fn col_mask(c0: isize, off: isize, w: usize) -> __mmask16 {
    let mut m = 0u16;
    for l in 0..16 {
        let col = c0 + off + l;
        if col >= 0 && (col as usize) < w {
            m |= 1 << l;
        }
    }
    m
}

/// Lanes t of `idx` (4·(t mod 8) + c) picked from u[0..2] for t < 8 and from u[2..4] above.
#[inline(always)]
unsafe fn pick16(u: &[__m512; 4], idx: __m512i) -> __m512 {
    let lo = _mm512_permutex2var_ps(u[0], idx, u[1]);
    let hi = _mm512_permutex2var_ps(u[2], idx, u[3]);
    _mm512_mask_blend_ps(0xFF00, lo, hi)
}

/// [`input_group`] for the 16 tiles from `pos` (all in one tile row) into panel `s` of the
/// chunk.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn input_row16(x: &[f32], g: &Geom, pos: (usize, usize, usize), c_a: usize, c_b: usize, v: *mut f32, s: usize) {
    let (h, w) = (g.h, g.w);
    let plane = h * w;
    let vstride_xi = g.cin * NR;
    let vbase = v.add(s * 36 * g.cin * NR);
    let (img0, ty0, tx0) = pos;
    // The tiles read columns c0 .. c0 + 66: vectors a[q] from c0 + 16q and b[q] from
    // c0 + 4 + 16q (q < 4), zero outside the image (masked loads touch no memory there).
    let c0 = 4 * tx0 as isize - 1;
    let ma = [0isize, 16, 32, 48].map(|o| col_mask(c0, o, w));
    let mb = [4isize, 20, 36, 52].map(|o| col_mask(c0, o, w));
    // Column c of tile t is element 4t + c of a (c < 4) or 4t + c − 4 of b: tiles 0..8 from
    // the first two vectors, 8..16 from the last two, in lanes 0..8 and 8..16 of their pick.
    let mut idx = [_mm512_setzero_si512(); 4];
    for (c, ic) in idx.iter_mut().enumerate() {
        let mut i = [0i32; 16];
        for (t, it) in i.iter_mut().enumerate() {
            *it = (4 * (t % 8) + c) as i32;
        }
        *ic = _mm512_loadu_si512(i.as_ptr() as *const _);
    }
    let xp = x.as_ptr();
    for ci in c_a..c_b {
        let pbase = xp.add((img0 * g.cin + ci) * plane);
        let mut d = [[_mm512_setzero_ps(); 6]; 6];
        for (r, dr) in d.iter_mut().enumerate() {
            let y = (4 * ty0 + r) as isize - 1;
            if y < 0 || y as usize >= h {
                continue;
            }
            let p = pbase.add(y as usize * w).wrapping_offset(c0);
            let mut a = [_mm512_setzero_ps(); 4];
            let mut b = [_mm512_setzero_ps(); 4];
            for q in 0..4 {
                a[q] = _mm512_maskz_loadu_ps(ma[q], p.wrapping_add(16 * q));
                b[q] = _mm512_maskz_loadu_ps(mb[q], p.wrapping_add(4 + 16 * q));
            }
            *dr = bt6([
                pick16(&a, idx[0]),
                pick16(&a, idx[1]),
                pick16(&a, idx[2]),
                pick16(&a, idx[3]),
                pick16(&b, idx[0]),
                pick16(&b, idx[1]),
            ]);
        }
        transform_store(&d, vbase.add(ci * NR), vstride_xi);
    }
}

/// [`output_group`] for the 16 tiles from `tg` (all in one tile row; `mp[ξ·NR + lane]`).
#[inline(never)]
#[target_feature(enable = "avx512f")]
unsafe fn output_row16(g: &Geom, mp: *const f32, tg: usize, co: usize, bv: f32, out: *mut f32) {
    let o: [[__m512; 4]; 4] = inverse_tiles(mp, bv);
    let (h, w) = (g.h, g.w);
    let (img0, ty0, tx0) = g.tile(tg);
    let x0 = 4 * tx0;
    let masks = [0isize, 16, 32, 48].map(|o| col_mask(x0 as isize, o, w));
    let base = out.add((img0 * g.cout + co) * h * w);
    for (i, &[o0, o1, o2, o3]) in o.iter().enumerate() {
        let y = 4 * ty0 + i;
        if y >= h {
            break;
        }
        // lane = tile → 64 consecutive columns: per 128-bit block k, u_r holds tile 4k + r's
        // four columns; then a 4×4 transpose of the blocks.
        let t0 = _mm512_unpacklo_ps(o0, o1);
        let t1 = _mm512_unpackhi_ps(o0, o1);
        let t2 = _mm512_unpacklo_ps(o2, o3);
        let t3 = _mm512_unpackhi_ps(o2, o3);
        let u0 = _mm512_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm512_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm512_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm512_shuffle_ps::<0xEE>(t1, t3);
        let v0 = _mm512_shuffle_f32x4::<0x44>(u0, u1);
        let v1 = _mm512_shuffle_f32x4::<0xEE>(u0, u1);
        let v2 = _mm512_shuffle_f32x4::<0x44>(u2, u3);
        let v3 = _mm512_shuffle_f32x4::<0xEE>(u2, u3);
        let r = [
            _mm512_shuffle_f32x4::<0x88>(v0, v2),
            _mm512_shuffle_f32x4::<0xDD>(v0, v2),
            _mm512_shuffle_f32x4::<0x88>(v1, v3),
            _mm512_shuffle_f32x4::<0xDD>(v1, v3),
        ];
        let p = base.add(y * w + x0);
        for (q, &rq) in r.iter().enumerate() {
            _mm512_mask_storeu_ps(p.wrapping_add(16 * q), masks[q], rq);
        }
    }
}
