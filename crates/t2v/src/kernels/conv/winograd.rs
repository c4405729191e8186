//! Winograd F(4×4, 3×3) for 3×3 convolutions of stride 1 and padding 1 (x86-64 with AVX2, FMA
//! and F16C): per chunk of 4×4 output tiles, the input tiles are transformed (V = Bᵀ d B, in
//! parallel over channels), then per block of output channels the weights are transformed
//! (U = G g Gᵀ), the 36 planes multiplied by the packed matrix product's micro-kernels (6×16 at
//! 256 bits; 12×32 at 512, two groups of 16 tiles a pass) with channel sums in blocks of [`KC`],
//! and the products transformed back (Aᵀ M A) into the output. At most 8 tiles on the 256-bit
//! path (the UNet's 4×4 planes) only the weights' first stage is stored and each plane of U is
//! finished in the product loop ([`Planes`]).
//! Interpolation points {0, 1, −1, ½, −2, ∞}. Weights may be float16 or bfloat16 (widened exactly
//! as they are transformed); the products stay float32 even for bfloat16 weights on the
//! AVX-512 + BF16 path: rounding the transformed planes to bfloat16 was measured at ~1e-2 of the
//! output's magnitude (F(4×4)'s output transform multiplies rounding errors by up to 64) and
//! took the tiny fixture's frames to 3.5e-2 from float32's, past the 2e-2 that `--dtype bf16` keeps.
//!
//! The same machinery runs the temporal convolution's 1-D F(4, 3) along frames (float32
//! products at 256 bits), with its own transforms.
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

/// The transformed-input buffer, kept between calls (page faults on a fresh one cost several %
/// on the UNet shapes); every entry used is written before it is read.
static V_CACHE: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());

/// The kept transformed-input buffer, at least `len` floats (a new one if it is smaller).
fn take_v(len: usize) -> Vec<f32> {
    let v = std::mem::take(&mut *V_CACHE.lock().unwrap_or_else(|e| e.into_inner()));
    if v.len() < len {
        vec![0f32; len]
    } else {
        v
    }
}

/// `v` kept for the next call, where it is larger than the buffer kept.
fn keep_v(v: Vec<f32>) {
    let mut cache = V_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() < v.len() {
        *cache = v;
    }
}

/// `n_panels` panels of output channels split into tasks of at most `max_panels` panels, at least
/// `min_tasks` of them (where there are that many panels), in a multiple of the `nt` threads.
fn channel_tasks(n_panels: usize, max_panels: usize, min_tasks: usize, nt: usize) -> Vec<(usize, usize)> {
    let mut n_tasks = n_panels.div_ceil(max_panels.max(1)).max(min_tasks).min(n_panels);
    if n_tasks > nt {
        n_tasks = n_tasks.div_ceil(nt) * nt;
    }
    let n_tasks = n_tasks.min(n_panels).max(1);
    (0..n_tasks).map(|i| (i * n_panels / n_tasks, (i + 1) * n_panels / n_tasks)).filter(|(a, b)| b > a).collect()
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
    conv3x3_in_order(x, w, bias, out, (n, cin, cout, h, wd), None)
}

/// [`conv3x3`] with the tasks' loop order chosen by [`Order::of`], or `order` (tests: every
/// order gives the same bits).
///
/// # Safety
/// As [`conv3x3`]; a forced `ChannelBlocks` holds a multiple of the path's groups a pass.
unsafe fn conv3x3_in_order(
    x: &[f32],
    w: Src,
    bias: Option<&[f32]>,
    out: &mut [f32],
    (n, cin, cout, h, wd): (usize, usize, usize, usize, usize),
    order: Option<Order>,
) {
    assert_eq!(x.len(), n * cin * h * wd);
    assert_eq!(w.len(), cout * cin * 9);
    assert_eq!(out.len(), n * cout * h * wd);
    // 512-bit tiles where this CPU runs them faster (kernels::tuning)
    let wide = super::super::wide(super::super::KernelKind::Conv3x3);
    let ty_n = h.div_ceil(4);
    let tx_n = wd.div_ceil(4);
    let g = Geom { cin, cout, h, w: wd, ty_n, tx_n, t_total: n * ty_n * tx_n };
    let nt = threads();
    let sg_max = groups_per_pass(wide);
    let t16 = g.t_total.div_ceil(NR) * NR;
    let tc_max = ((V_BUDGET / (36 * cin)) / NR * NR).max(NR);
    let n_chunks = t16.div_ceil(tc_max);
    let tc = (t16 / NR).div_ceil(n_chunks) * NR;
    let n_panels = cout.div_ceil(MR);
    // output-channel tasks: at least 2 per thread, at most MAX_TASK_PANELS panels each.
    let tasks = channel_tasks(n_panels, MAX_TASK_PANELS, 2 * nt, nt);
    // few tiles on the 256-bit path: the weights' second transform stage in the products
    let planes = match order {
        Some(order) => order == Order::Planes,
        None => !wide && g.t_total <= PLANES_MAX_TILES,
    };

    let mut v = take_v(36 * cin * tc);
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
        if planes {
            Planes { g: &g, w, bias, v: vptr.get(), t0, n_tsub, out: optr.get() }.run();
            t0 += tcc;
            continue;
        }
        tasks.par_iter().for_each(|&(pa, pb)| {
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let (ubuf, mbuf) = &mut *s;
                let np = pb - pa;
                let order = order.unwrap_or_else(|| Order::of(&g, np, n_tsub, sg_max));
                let (need_u, need_m) = order.scratch(&g, np, sg_max);
                if ubuf.len() < need_u {
                    ubuf.resize(need_u, 0.0);
                }
                if mbuf.len() < need_m {
                    mbuf.resize(need_m, 0.0);
                }
                let task = Task { g: &g, w, np, co0: pa * MR, v: vptr.get(), t0, bias, out: optr.get(), wide };
                task.run(order, n_tsub, ubuf.as_mut_ptr(), mbuf.as_mut_ptr());
            });
        });
        t0 += tcc;
    }
    keep_v(v);
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
#[allow(clippy::too_many_arguments)]
unsafe fn transform_weights(w: Src, g: &Geom, co0: usize, np: usize, ci0: usize, ci1: usize, u: *mut f32, uxs: usize) {
    let cin = g.cin;
    let mut rows = [[_mm256_setzero_ps(); 8]; 9];
    let mut kb = ci0;
    while kb < ci1 {
        let kl = KC.min(ci1 - kb);
        for pl in 0..np {
            let cop = co0 + pl * MR;
            let nco = g.cout.saturating_sub(cop).min(MR);
            // address of (ξ = 0, ci) in this block and panel
            let at = |ci: usize| u.add((kb - ci0) * np * MR + pl * kl * MR + (ci - kb) * MR);
            let mut ci = kb;
            while ci + 8 <= kb + kl {
                taps9(w, cin, cop, nco, ci, &mut rows);
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

/// The 3×3 kernels of input channels [ci, ci + 8) of output channels [cop, cop + nco) (nco ≤ 8),
/// lane = output channel (lanes past nco zero), into `rows`: `flat[cl·9 + k]` for channel ci + cl
/// and tap k, `flat` being the 72 vectors in order. Into the caller's buffer rather than returned:
/// a returned 2.3 KB array was zeroed (`memset`) and copied out (`memcpy`) at every call.
#[inline(always)]
unsafe fn taps9(w: Src, cin: usize, cop: usize, nco: usize, ci: usize, rows: &mut [[__m256; 8]; 9]) {
    // rows[q][r]: 8 consecutive weights (ci.., k) of output channel r, block q of 9
    for r in nco..8 {
        for rq in rows.iter_mut() {
            rq[r] = _mm256_setzero_ps();
        }
    }
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

/// The loop order of a task ([`Task::run`]).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Order {
    /// The task's whole transformed weight (36·Cin·np·MR floats) computed once, then for each
    /// group of tiles all 36 planes over all channel blocks: for weights of at most
    /// [`U_RESIDENT`] bytes.
    WholeWeights,
    /// For each block of `groups` tile groups and each block of [`KC`] input channels, that
    /// block's transformed weight (36·KC·np·MR floats, L2-sized) computed and multiplied with
    /// all the block's tile groups, their products accumulated in `m` across channel blocks.
    /// The whole weight of a deep layer (1280 channels: 8.5 MB a task) would otherwise be
    /// written to memory and read back once per group of tiles.
    ChannelBlocks { groups: usize },
    /// Not a task's order but the whole call's: [`Planes`] (256-bit path).
    Planes,
}

/// The most bytes of a task's whole transformed weight for [`Order::WholeWeights`]: above it
/// (1280 channels and more, 8.5 MB a task) the channel blocks. AVX2 path, Emerald Rapids,
/// 8 images (4 frames under guidance), ms a call, whole → blocks: 1280 channels at 8²
/// 38.6–40.1 → 36.0–36.8; at 320 channels (2.2 MB) 32.1 → 36.1 and 640 (4.4 MB) 30.5 → 32.0,
/// where transforming the weights once per block of groups cost more than it saved.
const U_RESIDENT: usize = 6 << 20;
/// The products of tile groups accumulated across channel blocks (bytes): a block of groups.
const M_BUDGET: usize = 1 << 20;

impl Order {
    fn of(g: &Geom, np: usize, n_tsub: usize, sg_max: usize) -> Order {
        let mc = np * MR;
        if 36 * g.cin * mc * 4 <= U_RESIDENT {
            return Order::WholeWeights;
        }
        let per_group = mc * 36 * NR * 4;
        let groups = (M_BUDGET / per_group).max(1).div_ceil(sg_max) * sg_max;
        // blocks of equal size: fewer weight transforms for the same budget
        let blocks = n_tsub.div_ceil(groups);
        Order::ChannelBlocks { groups: n_tsub.div_ceil(blocks).div_ceil(sg_max) * sg_max }
    }

    /// Floats of transformed weight and of products a task needs.
    fn scratch(self, g: &Geom, np: usize, sg_max: usize) -> (usize, usize) {
        let mc = np * MR;
        match self {
            Order::WholeWeights => (36 * (mc * g.cin + 8), sg_max * NR * mc * 36),
            Order::ChannelBlocks { groups } => (36 * (mc * KC.min(g.cin) + 8), groups * NR * mc * 36),
            Order::Planes => unreachable!("the planes form has no channel tasks"),
        }
    }
}

/// One task: output channels [co0, co0 + np·MR) × all tiles of the chunk from `t0`.
/// `m` scratch layout: `[group][co_local][ξ][NR]`.
struct Task<'a> {
    g: &'a Geom,
    w: Src<'a>,
    np: usize,
    co0: usize,
    v: *const f32,
    t0: usize,
    bias: Option<&'a [f32]>,
    out: *mut f32,
    wide: bool,
}

impl Task<'_> {
    /// # Safety
    /// AVX2 and FMA (AVX-512F where `wide`); `u` and `m` hold [`Order::scratch`] floats, `v`
    /// the chunk's transformed input, `out` the output.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run(&self, order: Order, n_tsub: usize, u: *mut f32, m: *mut f32) {
        let (g, np) = (self.g, self.np);
        let cin = g.cin;
        let mc = np * MR;
        let sg_max = groups_per_pass(self.wide);
        let group_floats = mc * 36 * NR;
        match order {
            Order::WholeWeights => {
                let uxs = mc * cin + 8;
                transform_weights(self.w, g, self.co0, np, 0, cin, u, uxs);
                let mut s0 = 0;
                while s0 < n_tsub {
                    let sg = sg_max.min(n_tsub - s0);
                    for xi in 0..36 {
                        let mut kb = 0;
                        while kb < cin {
                            let kl = KC.min(cin - kb);
                            self.plane(u.add(xi * uxs + kb * mc), kl, s0, sg, xi, kb, m, kb > 0);
                            kb += kl;
                        }
                    }
                    self.outputs(s0, sg, m);
                    s0 += sg;
                }
            }
            Order::ChannelBlocks { groups } => {
                let mut b0 = 0;
                while b0 < n_tsub {
                    let nb = groups.min(n_tsub - b0);
                    let mut kb = 0;
                    while kb < cin {
                        let kl = KC.min(cin - kb);
                        let uxs = mc * kl + 8;
                        transform_weights(self.w, g, self.co0, np, kb, kb + kl, u, uxs);
                        let mut s0 = b0;
                        while s0 < b0 + nb {
                            let sg = sg_max.min(b0 + nb - s0);
                            let ms = m.add((s0 - b0) * group_floats);
                            for xi in 0..36 {
                                self.plane(u.add(xi * uxs), kl, s0, sg, xi, kb, ms, kb > 0);
                            }
                            s0 += sg;
                        }
                        kb += kl;
                    }
                    let mut s0 = b0;
                    while s0 < b0 + nb {
                        let sg = sg_max.min(b0 + nb - s0);
                        self.outputs(s0, sg, m.add((s0 - b0) * group_floats));
                        s0 += sg;
                    }
                    b0 += nb;
                }
            }
            Order::Planes => unreachable!("the planes form has no channel tasks"),
        }
    }

    /// Plane ξ's products over input channels [kb, kb + kl) for tile groups [s0, s0 + sg): `up`
    /// is the transformed weight of that plane and block (np panels of kl·MR), `m` the
    /// products of group s0.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn plane(
        &self,
        up: *const f32,
        kl: usize,
        s0: usize,
        sg: usize,
        xi: usize,
        kb: usize,
        m: *mut f32,
        acc: bool,
    ) {
        let (cin, np) = (self.g.cin, self.np);
        let mc = np * MR;
        if self.wide {
            gemm_plane_avx512(up, kl, np, self.v, s0, sg, xi, cin, kb, m, mc, acc);
        } else {
            let vp = |s: usize| self.v.add((((s0 + s) * 36 + xi) * cin + kb) * NR);
            let cp = |s: usize, p: usize| m.add(((s * mc + p * MR) * 36 + xi) * NR);
            // a group of at most 8 tiles (the chunk's ragged last one; every group at 4×4 planes
            // with 8 images) half-fills the 6×16 tile: pairs of panels on the 12×8 tile instead
            let narrow = |s: usize| self.g.t_total.saturating_sub(self.t0 + (s0 + s) * NR) <= 8;
            for p in 0..np {
                let up = up.add(p * kl * MR);
                for s in (0..sg).filter(|&s| !narrow(s)) {
                    packed_matmul::kernel_6x16(kl, up, vp(s), cp(s, p), 36 * NR, acc, std::ptr::null());
                }
            }
            for s in (0..sg).filter(|&s| narrow(s)) {
                let mut p = 0;
                while p + 2 <= np {
                    let (u0, u1) = (up.add(p * kl * MR), up.add((p + 1) * kl * MR));
                    packed_matmul::kernel_12x8(kl, u0, u1, vp(s), NR, cp(s, p), 36 * NR, acc);
                    p += 2;
                }
                if p < np {
                    let u0 = up.add(p * kl * MR);
                    packed_matmul::kernel_6x16(kl, u0, vp(s), cp(s, p), 36 * NR, acc, std::ptr::null());
                }
            }
        }
    }

    /// The output transform of tile groups [s0, s0 + sg) from their products at `m`.
    #[inline(always)]
    unsafe fn outputs(&self, s0: usize, sg: usize, m: *const f32) {
        let g = self.g;
        let mc = self.np * MR;
        for s in 0..sg {
            let first = self.t0 + (s0 + s) * NR;
            let row16 = self.wide && g.row16(first);
            for col in 0..mc {
                let co = self.co0 + col;
                if co >= g.cout {
                    break;
                }
                let bv = self.bias.map_or(0.0, |b| b[co]);
                let mp = m.add((s * mc + col) * 36 * NR);
                if row16 {
                    output_row16(g, mp, first, co, bv, self.out);
                    continue;
                }
                for half in 0..2 {
                    let tg = first + half * 8;
                    if tg >= g.t_total {
                        break;
                    }
                    output_group(g, mp.add(half * 8), tg, co, bv, self.out);
                }
            }
        }
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

// ----- few tiles: the weights' second stage in the products ---------------------------------
//
// Where the tiles are few (the UNet's deepest levels: 8 images of 4×4 are 8 tiles, of 8×8 are
// 32), the weight transform above costs more than the products it feeds: U (36 planes, 4× the
// weights) is computed, written to L2 and read back for every call, to be used by only 8–32
// tiles (`perf`, one thread: 62% of a 4×4 call in the weight transform). Here only the first stage
// T = G g (6×3 per input and output channel, lanes = 8 output channels) is stored; each plane
// ξ = (i, j) of U is finished from row i of T in the product loop (0–4 operations a vector, the
// `g3to6` output j), and multiplied against the tiles broadcast from V, 8 tiles a pass, eight
// accumulators. The values of U and the order of every sum are those of the tasks above (blocks
// of [`KC`] channels, each summed from zero in channel order, then added), so the same bits.

/// The most tiles for which [`Planes`] is taken on the 256-bit path: one pass of 8.
/// `kernel_speed`, AVX2 path, Emerald Rapids, 2 cores, 3×3 at 1280 channels, GFLOP/s of the
/// direct form, tasks → planes, three alternating rounds: 8 images of 4×4 (8 tiles) 203–208 →
/// 252–260; of 8×8 (32 tiles, four passes, each finishing U again) 412–416 → 368–372.
const PLANES_MAX_TILES: usize = 8;
/// Output-channel octets a task of [`Planes`] takes: their first-stage weights
/// (a block of KC channels: 74 KB an octet) stay in L2 while a block of V (KC channels of one
/// plane, 8 KB) is read once from memory for all of them.
const PLANES_TASK_OCTETS: usize = 8;

/// Products and output transform of every tile of a chunk of at most [`PLANES_MAX_TILES`] tiles
/// (V at `v`, its groups [0, n_tsub) from tile `t0`), all output channels, in parallel over
/// tasks of output-channel octets ([`Planes::run`]).
struct Planes<'a> {
    g: &'a Geom,
    w: Src<'a>,
    bias: Option<&'a [f32]>,
    v: *const f32,
    t0: usize,
    n_tsub: usize,
    out: *mut f32,
}

// SAFETY: tasks only read `v` and write disjoint output channels of `out`.
unsafe impl Sync for Planes<'_> {}

impl Planes<'_> {
    /// # Safety
    /// AVX2, FMA and F16C present; `v` holds the chunk's transformed input, `out` the output.
    unsafe fn run(&self) {
        let octets = self.g.cout.div_ceil(8);
        let tasks = channel_tasks(octets, PLANES_TASK_OCTETS, 2 * threads(), threads());
        tasks.par_iter().for_each(|&(oa, ob)| {
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let (tbuf, mbuf) = &mut *s;
                let need_t = (ob - oa) * 18 * 8 * KC.min(self.g.cin);
                let need_m = (ob - oa) * 8 * self.n_tsub * 36 * NR;
                if tbuf.len() < need_t {
                    tbuf.resize(need_t, 0.0);
                }
                if mbuf.len() < need_m {
                    mbuf.resize(need_m, 0.0);
                }
                self.task((oa, ob), tbuf.as_mut_ptr(), mbuf.as_mut_ptr());
            });
        });
    }

    /// One task: octets [oa, ob) of output channels. `t` holds the octets' first-stage weights
    /// of a channel block (`[octet][i][ci − kb][b][8]`), `m` their products
    /// (`[octet][group][co − 8·octet][ξ][NR]`, as [`output_group`] reads them).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn task(&self, (oa, ob): (usize, usize), t: *mut f32, m: *mut f32) {
        let (g, cin) = (self.g, self.g.cin);
        let tiles = g.t_total - self.t0;
        let passes = tiles.min(self.n_tsub * NR).div_ceil(8);
        let m_octet = self.n_tsub * 8 * 36 * NR;
        let mut kb = 0;
        while kb < cin {
            let kl = KC.min(cin - kb);
            let t_octet = 18 * 8 * kl;
            for o in oa..ob {
                first_stage(self.w, g, 8 * o, kb, kl, t.add((o - oa) * t_octet));
            }
            for xi in 0..36 {
                let (i, j) = (xi / 6, xi % 6);
                for pass in 0..passes {
                    let (sg, half) = (pass / 2, pass % 2);
                    // V of plane ξ, channels kb.., this pass's 8 tiles
                    let vrow = self.v.add(((sg * 36 + xi) * cin + kb) * NR + half * 8);
                    for o in oa..ob {
                        let ti = t.add((o - oa) * t_octet + i * kl * 24);
                        let mut acc = plane_pass(j, ti, vrow, kl);
                        // lane = output channel → lane = tile, as the products' layout has it
                        packed_matmul::transpose8(&mut acc);
                        let nco = (g.cout - 8 * o).min(8);
                        let mo = m.add((o - oa) * m_octet + sg * 8 * 36 * NR + xi * NR + half * 8);
                        for (c, &sum) in acc.iter().enumerate().take(nco) {
                            let p = mo.add(c * 36 * NR);
                            if kb > 0 {
                                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), sum));
                            } else {
                                _mm256_storeu_ps(p, sum);
                            }
                        }
                    }
                }
            }
            kb += kl;
        }
        for o in oa..ob {
            for c in 0..(g.cout - 8 * o).min(8) {
                let co = 8 * o + c;
                let bv = self.bias.map_or(0.0, |b| b[co]);
                for pass in 0..passes {
                    let (sg, half) = (pass / 2, pass % 2);
                    let mp = m.add((o - oa) * m_octet + (sg * 8 + c) * 36 * NR + half * 8);
                    output_group(g, mp, self.t0 + pass * 8, co, bv, self.out);
                }
            }
        }
    }
}

/// `acc[tile] (lane = output channel) = Σ_ci U_ξ[ci] · V_ξ[ci][tile]` over `kl` channels from
/// zero, for the plane ξ = (i, j) whose row i of the first stage is at `ti` (`[ci][b][8]`) and
/// the 8 tiles of V at `vrow` (channels NR floats apart). U is [`g3to6`]'s output j of that row;
/// with j a constant in each arm, its other outputs (and the loads they alone need) fold away.
#[inline(always)]
unsafe fn plane_pass(j: usize, ti: *const f32, vrow: *const f32, kl: usize) -> [__m256; 8] {
    #[inline(always)]
    unsafe fn sum<const J: usize>(ti: *const f32, vrow: *const f32, kl: usize) -> [__m256; 8] {
        let mut acc = [_mm256_setzero_ps(); 8];
        for cl in 0..kl {
            let p = ti.add(cl * 24);
            let u = g3to6(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)))[J];
            let vr = vrow.add(cl * NR);
            for (tl, s) in acc.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(_mm256_broadcast_ss(&*vr.add(tl)), u, *s);
            }
        }
        acc
    }
    match j {
        0 => sum::<0>(ti, vrow, kl),
        1 => sum::<1>(ti, vrow, kl),
        2 => sum::<2>(ti, vrow, kl),
        3 => sum::<3>(ti, vrow, kl),
        4 => sum::<4>(ti, vrow, kl),
        _ => sum::<5>(ti, vrow, kl),
    }
}

/// The first stage T = G g of output channels [co0, co0 + 8) (lanes; past Cout zero) and input
/// channels [kb, kb + kl) into `t` as `[i][ci − kb][b][8]`: column b of the 3×3 kernel through
/// `g3to6`, as [`transform_weights`] computes it.
#[inline(always)]
unsafe fn first_stage(w: Src, g: &Geom, co0: usize, kb: usize, kl: usize, t: *mut f32) {
    let nco = g.cout.saturating_sub(co0).min(8);
    let at = |i: usize, cl: usize, b: usize| t.add(((i * kl + cl) * 3 + b) * 8);
    let mut rows = [[_mm256_setzero_ps(); 8]; 9];
    let mut ci = kb;
    while ci + 8 <= kb + kl {
        taps9(w, g.cin, co0, nco, ci, &mut rows);
        let flat = rows.as_ptr() as *const __m256;
        for cl in 0..8 {
            let gk = |k: usize| *flat.add(cl * 9 + k);
            let cols = [g3to6(gk(0), gk(3), gk(6)), g3to6(gk(1), gk(4), gk(7)), g3to6(gk(2), gk(5), gk(8))];
            for i in 0..6 {
                for (b, col) in cols.iter().enumerate() {
                    _mm256_storeu_ps(at(i, ci - kb + cl, b), col[i]);
                }
            }
        }
        ci += 8;
    }
    while ci < kb + kl {
        let mut cols = [[[0f32; 8]; 6]; 3];
        for r in 0..nco {
            let base = ((co0 + r) * g.cin + ci) * 9;
            let gg: [f32; 9] = std::array::from_fn(|k| w.get(base + k));
            for (b, col) in cols.iter_mut().enumerate() {
                let c = super::g3to6(gg[b], gg[3 + b], gg[6 + b]);
                for i in 0..6 {
                    col[i][r] = c[i];
                }
            }
        }
        for i in 0..6 {
            for (b, col) in cols.iter().enumerate() {
                _mm256_storeu_ps(at(i, ci - kb, b), _mm256_loadu_ps(col[i].as_ptr()));
            }
        }
        ci += 1;
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

// ----- 1-D F(4, 3) along frames: the temporal (3, 1, 1) convolution ---------------------------
//
// The same points, tiles of 4 frames (windows of 6, zero outside [0, F)), and the same product
// as the 2-D form with 6 planes instead of 36: a column of the transformed input is one pixel
// of one (batch, frame tile), NR pixels of one frame tile a panel. Where the products are in
// float32 at 256 bits, this replaces six `gemm`-crate products over a transformed copy of the
// input: those ran at ~120 GFLOP/s of their multiplications against the micro-kernel's ~160,
// and the transformed input and the products each made a round trip through memory
// (`perf`, AVX2 path, Emerald Rapids: 68% in the `gemm` crate's kernel, 15% in the transforms).

/// The columns of a temporal call: groups of NR pixels of one (batch, frame tile).
#[derive(Clone, Copy)]
struct Frames {
    cin: usize,
    cout: usize,
    f: usize,
    hw: usize,
    /// Frame tiles (of 4) per batch entry.
    nt: usize,
    /// Pixel groups (of NR) per frame tile.
    pg: usize,
}

impl Frames {
    /// Group `s`'s batch entry, frame tile, first pixel and pixel count.
    #[inline(always)]
    fn group(&self, s: usize) -> (usize, usize, usize, usize) {
        let (bt, q) = (s / self.pg, s % self.pg);
        let p0 = q * NR;
        (bt / self.nt, bt % self.nt, p0, NR.min(self.hw - p0))
    }
}

/// Lanes `lane0..lane0 + 8` that are below `len` (a ragged group's last pixels).
#[inline(always)]
unsafe fn lanes_below(lane0: usize, len: usize) -> __m256i {
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32 - lane0 as i32), iota)
}

/// `nn.Conv3d` with kernel (3, 1, 1), padding (1, 0, 0) on x (B, Cin, F, HW) into out
/// (B, Cout, F, HW), by 1-D Winograd F(4, 3) along frames with float32 products at 256 bits.
///
/// # Safety
/// AVX2, FMA and F16C must be available; slices must have the sizes given.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn temporal(
    x: &[f32],
    w: Src,
    bias: Option<&[f32]>,
    out: &mut [f32],
    b: usize,
    cin: usize,
    cout: usize,
    f: usize,
    hw: usize,
) {
    assert_eq!(x.len(), b * cin * f * hw);
    assert_eq!(w.len(), cout * cin * 3);
    assert_eq!(out.len(), b * cout * f * hw);
    if b * f * hw == 0 || cout == 0 {
        return;
    }
    let fr = Frames { cin, cout, f, hw, nt: f.div_ceil(4), pg: hw.div_ceil(NR) };
    let groups = b * fr.nt * fr.pg;
    let nt = threads();
    // groups a chunk: its transformed input within the budget
    let per_group = 6 * cin * NR;
    let chunk = (T_BUDGET / per_group.max(1)).clamp(1, groups);
    let n_panels = cout.div_ceil(MR);
    // output-channel tasks as large as their transformed weights allow (each block of the
    // transformed input is then reused by more panels), at least one a thread
    let task_panels = (T_TASK_WEIGHTS / (6 * cin * MR * 4).max(1)).max(1);
    let tasks = channel_tasks(n_panels, task_panels, nt, nt);
    let mut v = take_v(per_group * chunk);
    let vptr = SendPtr(v.as_mut_ptr());
    let optr = SendPtr(out.as_mut_ptr());
    let ci_blk = cin.div_ceil(4 * nt).max(1);
    let mut g0 = 0;
    while g0 < groups {
        let gn = chunk.min(groups - g0);
        // 1. the input transform of groups [g0, g0 + gn), parallel over input channels
        (0..cin.div_ceil(ci_blk)).into_par_iter().for_each(|cb| {
            let (c_a, c_b) = (cb * ci_blk, ((cb + 1) * ci_blk).min(cin));
            for s in 0..gn {
                temporal_input(x, &fr, g0 + s, c_a, c_b, vptr.get().add(s * per_group));
            }
        });
        // 2. products and the output transform, parallel over blocks of output channels
        tasks.par_iter().for_each(|&(pa, pb)| {
            SCRATCH.with(|sc| {
                let mut sc = sc.borrow_mut();
                let (ubuf, mbuf) = &mut *sc;
                let np = pb - pa;
                let mc = np * MR;
                let uxs = mc * cin + 8;
                if ubuf.len() < 6 * uxs {
                    ubuf.resize(6 * uxs, 0.0);
                }
                if mbuf.len() < mc * 6 * NR {
                    mbuf.resize(mc * 6 * NR, 0.0);
                }
                let (u, m) = (ubuf.as_mut_ptr(), mbuf.as_mut_ptr());
                temporal_weights(w, &fr, pa * MR, np, u, uxs);
                for s in 0..gn {
                    let vs = vptr.get().add(s * per_group) as *const f32;
                    for xi in 0..6 {
                        let mut kb = 0;
                        while kb < cin {
                            let kl = TKC.min(cin - kb);
                            let vp = vs.add((xi * cin + kb) * NR);
                            for p in 0..np {
                                let up = u.add(xi * uxs + kb * mc + p * kl * MR);
                                let cp = m.add((p * MR * 6 + xi) * NR);
                                packed_matmul::kernel_6x16(kl, up, vp, cp, 6 * NR, kb > 0, std::ptr::null());
                            }
                            kb += kl;
                        }
                    }
                    temporal_output(&fr, m, g0 + s, pa * MR, mc, bias, optr.get());
                }
            });
        });
        g0 += gn;
    }
    keep_v(v);
}

/// Input channels per accumulation block of the temporal products: the packed product's depth
/// (a block of the transformed input, TKC·NR floats, stays in L1 across a task's panels).
const TKC: usize = 384;
/// Bytes of transformed weight a temporal task may hold (L2-resident across its groups):
/// tasks of more panels reuse each block of the transformed input more. `kernel_speed`-like
/// timing (AVX2 path, Emerald Rapids, 4 frames under guidance, ms a call) with 8 panels a task
/// → 16 → 32: 320 channels at 32² 21.5 → 20.9 → 19.7, 640 at 16² 18.6 → 18.0 → 17.6, 1280 at 8²
/// 18.6 → 17.9 → 18.7 (1.2, 2.9, 5.9 MB at 1280 channels).
const T_TASK_WEIGHTS: usize = 3 << 20;

/// Transformed input of a temporal chunk (floats): as the 2-D form's, a few MB.
const T_BUDGET: usize = 2 << 20;

/// The input transform of group `s` for channels [c_a, c_b): `v[(ξ·Cin + ci)·NR + lane]`.
#[inline(always)]
unsafe fn temporal_input(x: &[f32], fr: &Frames, s: usize, c_a: usize, c_b: usize, v: *mut f32) {
    let (bb, tau, p0, len) = fr.group(s);
    let full = len == NR;
    let masks = [lanes_below(0, len), lanes_below(8, len)];
    let xp = x.as_ptr();
    for ci in c_a..c_b {
        let plane = xp.add((bb * fr.cin + ci) * fr.f * fr.hw + p0);
        let mut lo = [_mm256_setzero_ps(); 6];
        let mut hi = [_mm256_setzero_ps(); 6];
        for k in 0..6 {
            let frame = (4 * tau + k) as isize - 1;
            if frame < 0 || frame as usize >= fr.f {
                continue;
            }
            let p = plane.add(frame as usize * fr.hw);
            if full {
                lo[k] = _mm256_loadu_ps(p);
                hi[k] = _mm256_loadu_ps(p.add(8));
            } else {
                lo[k] = _mm256_maskload_ps(p, masks[0]);
                hi[k] = _mm256_maskload_ps(p.wrapping_add(8), masks[1]);
            }
        }
        let (lo, hi) = (bt6(lo), bt6(hi));
        for xi in 0..6 {
            let dst = v.add((xi * fr.cin + ci) * NR);
            _mm256_storeu_ps(dst, lo[xi]);
            _mm256_storeu_ps(dst.add(8), hi[xi]);
        }
    }
}

/// The weights of output channels [co0, co0 + np·MR) transformed (U_ξ = Σ_k G[ξ][k] W_k) into
/// `u` as the micro-kernel reads them: `[ξ][channel block kb][panel][ci − kb][MR]`, ξ planes
/// `uxs` floats apart, channels past Cout zero. Lane = output channel of a panel, as the 2-D
/// form's [`transform_weights`] (lanes 6 and 7 are scratch a later store overwrites, so `uxs`
/// leaves 2 floats of slack).
#[inline(always)]
unsafe fn temporal_weights(w: Src, fr: &Frames, co0: usize, np: usize, u: *mut f32, uxs: usize) {
    let (cin, mc) = (fr.cin, np * MR);
    let mut kb = 0;
    while kb < cin {
        let kl = TKC.min(cin - kb);
        for pl in 0..np {
            let cop = co0 + pl * MR;
            let nco = fr.cout.saturating_sub(cop).min(MR);
            let at = |ci: usize| u.add(kb * mc + pl * kl * MR + (ci - kb) * MR);
            let mut ci = kb;
            while ci + 8 <= kb + kl {
                // rows[q][r]: taps 8q.. of the 24 (8 input channels × 3) of output channel r
                let mut rows = [[_mm256_setzero_ps(); 8]; 3];
                for r in 0..nco {
                    let base = ((cop + r) * cin + ci) * 3;
                    for (q, rq) in rows.iter_mut().enumerate() {
                        rq[r] = match w {
                            Src::F32(s) => _mm256_loadu_ps(s.as_ptr().add(base + 8 * q)),
                            Src::F16(s) => {
                                _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().add(base + 8 * q) as *const __m128i))
                            }
                            Src::Bf16(s) => packed_matmul::widen_bf16x8(s.as_ptr().add(base + 8 * q) as *const __m128i),
                        };
                    }
                }
                // after the transposes, flat index 3·cl + k (lane = r)
                for rq in rows.iter_mut() {
                    packed_matmul::transpose8(rq);
                }
                let flat = rows.as_ptr() as *const __m256;
                for cl in 0..8 {
                    let t = g3to6(*flat.add(3 * cl), *flat.add(3 * cl + 1), *flat.add(3 * cl + 2));
                    let dst = at(ci + cl);
                    for (xi, &tv) in t.iter().enumerate() {
                        _mm256_storeu_ps(dst.add(xi * uxs), tv);
                    }
                }
                ci += 8;
            }
            while ci < kb + kl {
                let dst = at(ci);
                for r in 0..MR {
                    let t = if r < nco {
                        let base = ((cop + r) * cin + ci) * 3;
                        super::g3to6(w.get(base), w.get(base + 1), w.get(base + 2))
                    } else {
                        [0.0; 6]
                    };
                    for (xi, &tv) in t.iter().enumerate() {
                        *dst.add(xi * uxs + r) = tv;
                    }
                }
                ci += 1;
            }
        }
        kb += kl;
    }
}

/// The output transform of group `s` for output channels [co0, co0 + mc) from its products
/// (`m[(co − co0)·6·NR + ξ·NR + lane]`): `y[4τ + i] = bias + Σ_ξ Aᵀ[i][ξ] M_ξ`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn temporal_output(
    fr: &Frames,
    m: *const f32,
    s: usize,
    co0: usize,
    mc: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let (bb, tau, p0, len) = fr.group(s);
    let full = len == NR;
    let masks = [lanes_below(0, len), lanes_below(8, len)];
    let frames = 4.min(fr.f - 4 * tau);
    for col in 0..mc {
        let co = co0 + col;
        if co >= fr.cout {
            break;
        }
        let bv = _mm256_set1_ps(bias.map_or(0.0, |b| b[co]));
        let mp = m.add(col * 6 * NR);
        let base = out.add(((bb * fr.cout + co) * fr.f + 4 * tau) * fr.hw + p0);
        for (h, &mask) in masks.iter().enumerate() {
            let y = at6::<__m256>(std::array::from_fn(|xi| _mm256_loadu_ps(mp.add(xi * NR + 8 * h))));
            for (i, &yi) in y.iter().enumerate().take(frames) {
                let p = base.add(i * fr.hw + 8 * h);
                if full {
                    _mm256_storeu_ps(p, _mm256_add_ps(yi, bv));
                } else {
                    _mm256_maskstore_ps(p, mask, _mm256_add_ps(yi, bv));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3×3 convolution of `shape` (n, Cin, Cout, h, w) on deterministic inputs, float16
    /// weights and a bias, its tasks in `order`.
    fn conv_in_order((n, cin, cout, h, wd): (usize, usize, usize, usize, usize), order: Order) -> Vec<f32> {
        let val = |i: usize, m: usize| ((i * 7919 + m) % 1000) as f32 / 500.0 - 1.0;
        let x: Vec<f32> = (0..n * cin * h * wd).map(|i| val(i, 3)).collect();
        let wt: Vec<half::f16> = (0..cout * cin * 9).map(|i| half::f16::from_f32(0.05 * val(i, 11))).collect();
        let bias: Vec<f32> = (0..cout).map(|i| val(i, 5)).collect();
        let mut out = vec![0f32; n * cout * h * wd];
        // SAFETY: callers check AVX2 and FMA; the slices have the sizes given.
        unsafe { conv3x3_in_order(&x, Src::F16(&wt), Some(&bias), &mut out, (n, cin, cout, h, wd), Some(order)) };
        assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|&v| v != 0.0));
        out
    }

    /// The loop orders of a task give the same bits: each tile's sums run over the same
    /// channel blocks in the same order, the transformed weights are the same per block.
    #[test]
    fn loop_orders_give_the_same_bits() {
        if !crate::kernels::avx2() {
            eprintln!("SKIPPED: no AVX2 and FMA on this CPU");
            return;
        }
        let sg = groups_per_pass(super::super::super::wide(super::super::super::KernelKind::Conv3x3));
        // 136 input channels: a whole block of KC and a ragged one, with channels past a whole 8
        let shape = (9, 136, 50, 8, 12);
        let whole = conv_in_order(shape, Order::WholeWeights);
        for groups in [sg, 3 * sg, 64 * sg] {
            assert_eq!(
                conv_in_order(shape, Order::ChannelBlocks { groups }),
                whole,
                "channel blocks of {groups} groups"
            );
        }
        assert_eq!(conv_in_order(shape, Order::Planes), whole, "the planes form");
    }

    /// The planes form (the weights' second stage in the products) gives the tasks' bits on
    /// the deepest levels' shapes: one 4×4 tile an image (8 and 3 images), 8×8 planes (4 tiles
    /// an image), with ragged channel blocks, channels past a whole 8 and output octets.
    #[test]
    fn the_planes_form_gives_the_same_bits() {
        if !crate::kernels::avx2() {
            eprintln!("SKIPPED: no AVX2 and FMA on this CPU");
            return;
        }
        for shape in [(8, 136, 50, 4, 4), (3, 20, 13, 4, 4), (8, 264, 22, 8, 8), (2, 9, 8, 5, 7)] {
            let whole = conv_in_order(shape, Order::WholeWeights);
            assert_eq!(conv_in_order(shape, Order::Planes), whole, "{shape:?}");
        }
    }
}
