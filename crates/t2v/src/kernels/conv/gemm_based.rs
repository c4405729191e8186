//! The convolutions that are matrix products, run by the `gemm` crate (candle's own matmul
//! backend, which takes strided operands: the frame-shifted views below need no copy), or on the
//! AVX-512 path by our packed product ([`packed_matmul`]: the `gemm` crate's AVX-512 kernels need
//! a feature that would also take them on the AVX2 path):
//!
//! * 1×1 convolutions: one product per image.
//!
//! bfloat16 and float16 weights multiply in their own type where the path does
//! ([`crate::kernels::bf16`], [`crate::kernels::fp16`]) in the 1×1 and the Winograd temporal
//! convolution; the direct temporal form (small inputs only) widens them.
//! * The temporal (3, 1, 1) convolution: three accumulated products over frame-shifted views of
//!   the input, or 1-D Winograd F(4, 3) along frames (six products with half the
//!   multiplications; with float32 products at 256 bits, the fused form in `winograd.rs`).

use rayon::prelude::*;

use crate::kernels::bf16::Half;
use crate::kernels::packed_matmul::{self, Init, PackedA, PackedB, NR};
use crate::kernels::{threads, KernelKind, SendPtr, Src};

/// `dst (m×n, row stride dst_rs) (+)= lhs (m×k, row stride lhs_rs, col stride lhs_cs) · rhs (k×n,
/// row stride rhs_rs)`; all columns of dst and rhs contiguous.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    par: gemm::Parallelism,
    kind: KernelKind,
) {
    if use_packed(kind) {
        return sgemm_packed(m, n, k, dst, dst_rs, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, par);
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        1,
        rhs_rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    )
}

/// [`sgemm`] through the packed product: B (the activations) packed, A (the weights) made
/// row-major where it is strided (the temporal taps), the products added to `dst` or written.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_packed(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let parallel = !matches!(par, gemm::Parallelism::None);
    let a_rows: Vec<f32>;
    let (a, lda) = if lhs_cs == 1 {
        (lhs, lhs_rs)
    } else {
        a_rows = (0..m * k).map(|i| *lhs.add((i / k) * lhs_rs + (i % k) * lhs_cs)).collect();
        (a_rows.as_ptr(), k)
    };
    let b = std::slice::from_raw_parts(rhs, if k == 0 { 0 } else { (k - 1) * rhs_rs + n });
    let packed = PackedB::from_rows(b, k, n, rhs_rs, parallel);
    let init = if accumulate { Init::Accumulate } else { Init::Overwrite };
    if parallel {
        packed_matmul::matmul(m, a, lda, &packed, dst, dst_rs, init, true, None)
    } else {
        packed_matmul::matmul_rows(m, a, lda, &packed, dst, dst_rs, init, true)
    }
}

/// Our packed product (its 512-bit tiles) where they beat the `gemm` crate's: on the AVX-512
/// path, for the kinds of convolution that the CPU runs faster at 512 bits
/// ([`crate::kernels::tuning`]).
fn use_packed(kind: KernelKind) -> bool {
    crate::kernels::wide(kind)
}

/// The weights as float32: borrowed, or widened into `buf`.
fn weights_f32<'a>(w: Src<'a>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match w {
        Src::F32(s) => s,
        Src::F16(_) | Src::Bf16(_) => {
            *buf = w.to_f32_vec();
            buf
        }
    }
}

fn fill_bias(out: &mut [f32], bias: Option<&[f32]>, plane: usize) {
    if let Some(b) = bias {
        for (chunk, &bv) in out.chunks_mut(plane.max(1)).zip(b.iter().cycle()) {
            chunk.fill(bv);
        }
    }
}

/// The temporal (3, 1, 1) convolution as one 1×1 convolution over (channel, frame) rows: the
/// input (B, Cin, F, HW) is B images of Cin·F channels, and the output's Cout·F channels take the
/// weight Wf ((Cout·F) × (Cin·F)) whose block (fo, fi) is tap fi − fo + 1 of the kernel (zero
/// where |fi − fo| > 1). Exact for any F, but it multiplies F² blocks against the direct form's
/// 3F − 2: [`super::TemporalAlgo::Auto`] takes it for F ≤ 2 (two frames: the zeroscope XL size,
/// 2 frames of 1024×576), where every block is a tap, so that those frames run on the 1×1
/// path's packed product (and its 16-bit products) instead of three shifted GEMMs.
#[allow(clippy::too_many_arguments)]
pub(super) fn temporal_stacked(
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
    // Wf in the weight's own type, so that the 1×1 path treats it as it would the weight
    fn stacked<T: Copy + Default>(w: &[T], cin: usize, cout: usize, f: usize) -> Vec<T> {
        let mut wf = vec![T::default(); cout * f * cin * f];
        for co in 0..cout {
            for fo in 0..f {
                let row = &mut wf[(co * f + fo) * cin * f..][..cin * f];
                for fi in (fo.max(1) - 1)..(fo + 2).min(f) {
                    let tap = fi + 1 - fo;
                    for ci in 0..cin {
                        row[ci * f + fi] = w[(co * cin + ci) * 3 + tap];
                    }
                }
            }
        }
        wf
    }
    let bias_f: Option<Vec<f32>> = bias.map(|bv| bv.iter().flat_map(|&v| std::iter::repeat_n(v, f)).collect());
    let mut run = |wf: Src| pointwise(x, wf, bias_f.as_deref(), out, b, cin * f, cout * f, hw);
    match w {
        Src::F32(s) => run(Src::F32(&stacked(s, cin, cout, f))),
        Src::F16(s) => run(Src::F16(&stacked(s, cin, cout, f))),
        Src::Bf16(s) => run(Src::Bf16(&stacked(s, cin, cout, f))),
    }
}

/// 1×1 convolution: `out[n] = W · x[n] (+ bias)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn pointwise(
    x: &[f32],
    w: Src,
    bias: Option<&[f32]>,
    out: &mut [f32],
    n: usize,
    cin: usize,
    cout: usize,
    hw: usize,
) {
    let half = Half::of(w);
    let mut wf = Vec::new();
    let wp: &[f32] = if half.is_some() { &[] } else { weights_f32(w, &mut wf) };
    fill_bias(out, bias, hw);
    let init = if bias.is_some() { Init::Accumulate } else { Init::Overwrite };
    let nt = threads();
    let optr = SendPtr(out.as_mut_ptr());
    // the weights packed once for every image where our product runs (bfloat16 weights in the
    // bfloat16 form, the images then rounded as they are packed)
    let packed = if let Some(half) = half {
        Some(PackedA::from_rows_half(w, half, cout, cin, cin))
    } else {
        use_packed(KernelKind::Conv1x1).then(|| PackedA::from_rows(wp, cout, cin, cin))
    };
    if let Some(wa) = &packed {
        // Tasks of (image, block of columns): each packs its block of the image (about
        // [`POINTWISE_BLOCK`] bytes, which stays in L2) and multiplies every output channel's
        // weights against it. The image is read once in all; splitting the output channels
        // between threads instead (they are few beside the columns: 128 to 512 against 16,384
        // to 65,536 pixels in the VAE) had every thread stream the whole packed image from
        // memory (`t2v bench --profile`, Emerald Rapids: the VAE decoder's 1×1 ~110 → ~155
        // GFLOP/s, the UNet's 167 → 216).
        let cols = (POINTWISE_BLOCK / (4 * cin.max(1)) / NR * NR).clamp(NR, hw.div_ceil(NR) * NR);
        let blocks = hw.div_ceil(cols);
        (0..n * blocks).into_par_iter().for_each(|task| {
            let (i, c0) = (task / blocks, (task % blocks) * cols);
            let nc = cols.min(hw - c0);
            let xi = &x[i * cin * hw + c0..][..(cin - 1) * hw + nc];
            let xb = if let Some(half) = half {
                PackedB::from_rows_half(xi, half, cin, nc, hw, false)
            } else {
                PackedB::from_rows(xi, cin, nc, hw, false)
            };
            // SAFETY: the packed path's instructions are present; image i's output holds
            // cout rows of hw floats, this task alone writes columns [c0, c0 + nc).
            unsafe { packed_matmul::matmul_packed(wa, &xb, optr.get().add(i * cout * hw + c0), hw, init, false, true) };
        });
        return;
    }
    let per_image_flops = 2 * cout * cin * hw;
    // one image per task while there are images enough for every thread, else each image on all
    let per_image = n >= nt && nt > 1 && per_image_flops < (64 << 20);
    let image = |i: usize, parallel: bool| {
        let (xi, oi) = (&x[i * cin * hw..][..cin * hw], unsafe { optr.get().add(i * cout * hw) });
        let par = if parallel { gemm::Parallelism::Rayon(nt) } else { gemm::Parallelism::None };
        let acc = bias.is_some();
        // SAFETY: w holds cout×cin, the image cin×hw and its output cout×hw floats.
        unsafe { sgemm(cout, hw, cin, oi, hw, acc, wp.as_ptr(), cin, 1, xi.as_ptr(), hw, par, KernelKind::Conv1x1) };
    };
    if per_image {
        (0..n).into_par_iter().for_each(|i| image(i, false));
    } else {
        for i in 0..n {
            image(i, nt > 1);
        }
    }
}

/// Bytes of one image's block of columns that a 1×1 convolution task packs ([`pointwise`]).
const POINTWISE_BLOCK: usize = 512 << 10;

/// Temporal convolution over (B, C, F, HW): three accumulated GEMMs per video, each over a
/// frame-shifted view of the input.
#[allow(clippy::too_many_arguments)]
pub(super) fn temporal(
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
    let mut wf = Vec::new();
    let wp = weights_f32(w, &mut wf);
    let fhw = f * hw;
    fill_bias(out, bias, fhw);
    let nt = threads();
    let optr = SendPtr(out.as_mut_ptr());
    let run = |bi: usize, par: gemm::Parallelism| unsafe {
        let o = optr.get().add(bi * cout * fhw);
        let xi = x.as_ptr().add(bi * cin * fhw);
        let wk = |k: usize| wp.as_ptr().add(k);
        // centre tap: all frames
        let kind = KernelKind::TemporalConv;
        sgemm(cout, fhw, cin, o, fhw, bias.is_some(), wk(1), 3 * cin, 3, xi, fhw, par, kind);
        if f > 1 {
            let n = (f - 1) * hw;
            // k = 0: y[f] += W0 · x[f − 1] for f ≥ 1
            sgemm(cout, n, cin, o.add(hw), fhw, true, wk(0), 3 * cin, 3, xi, fhw, par, kind);
            // k = 2: y[f] += W2 · x[f + 1] for f ≤ F − 2
            sgemm(cout, n, cin, o, fhw, true, wk(2), 3 * cin, 3, xi.add(hw), fhw, par, kind);
        }
    };
    let par = if nt > 1 { gemm::Parallelism::Rayon(nt) } else { gemm::Parallelism::None };
    for bi in 0..b {
        run(bi, par);
    }
}

/// The weight transform of one output channel: `taps` (cin × 3, a channel's three taps together)
/// to its six rows `U_ξ[ci]` ([`super::g3to6`] per input channel, the same operations in the same order,
/// over whole rows so that they vectorise: a scalar loop over (co, ci) took 8 ms of a 26 ms
/// 1280-channel call, `kernel_speed`, AVX2 path, Emerald Rapids). `by_k` is 3·cin floats of
/// scratch.
fn g3to6_rows<'a>(taps: &[f32], by_k: &mut [f32], rows: impl Iterator<Item = &'a mut [f32]>) {
    let cin = taps.len() / 3;
    let (a, bc) = by_k.split_at_mut(cin);
    let (b, c) = bc.split_at_mut(cin);
    for (ci, t) in taps.chunks_exact(3).enumerate() {
        (a[ci], b[ci], c[ci]) = (t[0], t[1], t[2]);
    }
    let (a, b, c) = (&*a, &*b, &*c);
    for (xi, row) in rows.enumerate().take(6) {
        let row = &mut row[..cin];
        match xi {
            0 => row.copy_from_slice(a),
            1 => row
                .iter_mut()
                .zip(a.iter().zip(b).zip(c))
                .for_each(|(r, ((&a, &b), &c))| *r = (a + c + b) * (1.0 / 3.0)),
            2 => row
                .iter_mut()
                .zip(a.iter().zip(b).zip(c))
                .for_each(|(r, ((&a, &b), &c))| *r = (b - (a + c)) * (1.0 / 3.0)),
            3 => row
                .iter_mut()
                .zip(a.iter().zip(b).zip(c))
                .for_each(|(r, ((&a, &b), &c))| *r = (16.0 * a + (8.0 * b + 4.0 * c)) * (-1.0 / 15.0)),
            4 => row
                .iter_mut()
                .zip(a.iter().zip(b).zip(c))
                .for_each(|(r, ((&a, &b), &c))| *r = (4.0 * c + (-2.0 * b + a)) * (1.0 / 15.0)),
            _ => row.copy_from_slice(c),
        }
    }
}

/// Whether [`temporal_wino`] runs the fused form (`winograd::temporal`: the transforms beside
/// the packed product's micro-kernel, no transformed copies through memory): float32 products
/// at 256 bits (the AVX2 path, and the AVX-512 one where the temporal convolution is tuned to
/// 256 bits). Elsewhere the six products run on our 512-bit packed product or in 16-bit types.
pub(super) fn temporal_fused(w: Src) -> bool {
    cfg!(target_arch = "x86_64")
        && Half::of(w).is_none()
        && !use_packed(KernelKind::TemporalConv)
        && crate::kernels::avx2()
}

/// 1-D Winograd F(4, 3) along frames (points {0, 1, −1, ½, −2, ∞}): frames in tiles of 4
/// (input windows of 6, zero outside [0, F)); `V_ξ = Σ_k Bᵀ[ξ][k] x[4τ − 1 + k]`,
/// `U_ξ = Σ_k G[ξ][k] W_k`, `M_ξ = U_ξ · V_ξ` (six GEMMs, half the multiplications of the direct
/// form), `y[4τ + i] = bias + Σ_ξ Aᵀ[i][ξ] M_ξ`.
#[allow(clippy::too_many_arguments)]
pub(super) fn temporal_wino(
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
    const BT: [[f32; 6]; 6] = [
        [1.0, -1.5, -2.0, 1.5, 1.0, 0.0],
        [0.0, -1.0, 0.5, 2.5, 1.0, 0.0],
        [0.0, 1.0, -2.5, 0.5, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 0.5, -1.0, -0.5, 1.0, 0.0],
        [0.0, 1.0, -1.5, -2.0, 1.5, 1.0],
    ];
    const AT: [[f32; 6]; 4] = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 0.5, -2.0, 0.0],
        [0.0, 1.0, 1.0, 0.25, 4.0, 0.0],
        [0.0, 1.0, -1.0, 0.125, -8.0, 1.0],
    ];
    #[cfg(target_arch = "x86_64")]
    if temporal_fused(w) {
        // SAFETY: AVX2, FMA and F16C checked (temporal_fused); the sizes are the callers'
        // (candle's shapes).
        unsafe { super::winograd::temporal(x, w, bias, out, b, cin, cout, f, hw) };
        return;
    }
    let nt = f.div_ceil(4);
    let fhw = f * hw;
    let nthreads = threads();
    let par = if nthreads > 1 { gemm::Parallelism::Rayon(nthreads) } else { gemm::Parallelism::None };
    // U[ξ][co][ci], packed once for every block of columns where our product runs (in the
    // bfloat16 form for bfloat16 weights: U rounded once computed, V as it is packed)
    let half = Half::of(w);
    // (16-bit products need our packed product, whatever the width of the float32 ones)
    let packed = half.is_some() || use_packed(KernelKind::TemporalConv);
    // every element of `u` is written below (each (ξ, co, ci) once)
    let mut u = if packed { Vec::new() } else { crate::kernels::output_buffer(6 * cout * cin) };
    let mut u_packed: Vec<PackedA> =
        if packed { (0..6).map(|_| PackedA::zeroed(cout, cin)).collect() } else { Vec::new() };
    {
        let u_at: Vec<SendPtr<f32>> = if packed {
            u_packed.iter_mut().map(|p| SendPtr(p.data_mut().as_mut_ptr())).collect()
        } else {
            (0..6).map(|xi| SendPtr(u[xi * cout * cin..].as_mut_ptr())).collect()
        };
        let u_packed = &u_packed;
        (0..cout).into_par_iter().for_each_init(Vec::new, |scratch: &mut Vec<f32>, co| {
            // this output channel's 3·cin taps as float32, then its six transformed rows (in
            // place where U is row-major, else in `scratch` and scattered to the panels)
            let taps = 3 * cin;
            scratch.resize(if packed { taps + 9 * cin } else { taps + 3 * cin }, 0.0);
            let (row, rest) = scratch.split_at_mut(taps);
            match w {
                Src::F32(s) => row.copy_from_slice(&s[co * taps..(co + 1) * taps]),
                Src::F16(s) => {
                    use half::slice::HalfFloatSliceExt;
                    s[co * taps..(co + 1) * taps].convert_to_f32_slice(row);
                }
                Src::Bf16(s) => {
                    use half::slice::HalfFloatSliceExt;
                    s[co * taps..(co + 1) * taps].convert_to_f32_slice(row);
                }
            }
            let (taps_by_k, planes) = rest.split_at_mut(3 * cin);
            if packed {
                g3to6_rows(row, taps_by_k, planes.chunks_mut(cin.max(1)));
                for (xi, plane) in planes.chunks(cin.max(1)).enumerate() {
                    for (ci, &tv) in plane.iter().enumerate() {
                        // SAFETY: each (co, ci) is written once, inside its ξ's buffer.
                        unsafe { *u_at[xi].get().add(u_packed[0].index(co, ci)) = tv };
                    }
                }
            } else {
                // SAFETY: row co of each ξ plane (cin floats) is this task's alone.
                let rows = u_at.iter().map(|p| unsafe { std::slice::from_raw_parts_mut(p.get().add(co * cin), cin) });
                g3to6_rows(row, taps_by_k, rows);
            }
        });
    }
    if let Some(half) = half {
        u_packed = u_packed.iter().map(|u| u.to_half(half)).collect();
    }
    // Columns: (batch, frame tile, pixel). A chunk is `ns` segments of `pl` pixels of one
    // (batch, frame tile) each, sized so that its transformed input and GEMM output (6·C·cols
    // floats each) stay around a few MB (cache-resident between the passes).
    const BUDGET: usize = 1 << 20;
    let cmax = cin.max(cout);
    let pl = if 6 * cmax * hw <= BUDGET { hw } else { (BUDGET / (6 * cmax)).max(256).min(hw) };
    let pieces = hw.div_ceil(pl);
    let segs: Vec<(usize, usize, usize, usize)> =
        (0..b * nt).flat_map(|g| (0..pieces).map(move |q| (g / nt, g % nt, q * pl, pl.min(hw - q * pl)))).collect();
    let ns_max = (BUDGET / (6 * cmax * pl)).max(1);
    let mut v = vec![0f32; 6 * cin * ns_max * pl];
    let mut m = vec![0f32; 6 * cout * ns_max * pl];
    let optr = SendPtr(out.as_mut_ptr());
    for chunk in segs.chunks(ns_max) {
        // segments of a chunk share one length except possibly a last, shorter piece of a row:
        // give every segment the stride `pl` (the columns past a short piece are left unused)
        let ncols = chunk.len() * pl;
        let vptr = SendPtr(v.as_mut_ptr());
        // input transform, parallel over input channels
        (0..cin).into_par_iter().for_each(|ci| {
            for (sl, &(bb, tau, p0, len)) in chunk.iter().enumerate() {
                let plane = &x[(bb * cin + ci) * fhw..][..fhw];
                let rows: [Option<&[f32]>; 6] = std::array::from_fn(|k| {
                    let fr = (4 * tau + k) as isize - 1;
                    (fr >= 0 && (fr as usize) < f).then(|| &plane[fr as usize * hw + p0..][..len])
                });
                for (xi, bt) in BT.iter().enumerate() {
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(vptr.get().add((xi * cin + ci) * ncols + sl * pl), pl)
                    };
                    dst.fill(0.0);
                    for (k, row) in rows.iter().enumerate() {
                        if let (Some(row), c) = (row, bt[k]) {
                            if c != 0.0 {
                                for (d, &s) in dst.iter_mut().zip(row.iter()) {
                                    *d += c * s;
                                }
                            }
                        }
                    }
                }
            }
        });
        // six GEMMs
        for xi in 0..6 {
            let vx = &v[xi * cin * ncols..][..cin * ncols];
            let mx = m[xi * cout * ncols..].as_mut_ptr();
            if packed {
                let vb = if let Some(half) = half {
                    PackedB::from_rows_half(vx, half, cin, ncols, ncols, nthreads > 1)
                } else {
                    PackedB::from_rows(vx, cin, ncols, ncols, nthreads > 1)
                };
                // SAFETY: the packed path's instructions are present; m holds cout rows of ncols.
                unsafe {
                    packed_matmul::matmul_packed(&u_packed[xi], &vb, mx, ncols, Init::Overwrite, nthreads > 1, true)
                };
            } else {
                // SAFETY: u holds cout×cin, v cin×ncols and m cout×ncols floats for this ξ.
                unsafe {
                    sgemm(
                        cout,
                        ncols,
                        cin,
                        mx,
                        ncols,
                        false,
                        u[xi * cout * cin..].as_ptr(),
                        cin,
                        1,
                        vx.as_ptr(),
                        ncols,
                        par,
                        KernelKind::TemporalConv,
                    )
                };
            }
        }
        // output transform, parallel over output channels
        let mref = &m;
        (0..cout).into_par_iter().for_each(|co| {
            let bv = bias.map_or(0.0, |bs| bs[co]);
            for (sl, &(bb, tau, p0, len)) in chunk.iter().enumerate() {
                let ms: [&[f32]; 6] = std::array::from_fn(|xi| &mref[(xi * cout + co) * ncols + sl * pl..][..len]);
                for (i, at) in AT.iter().enumerate() {
                    let fr = 4 * tau + i;
                    if fr >= f {
                        break;
                    }
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(optr.get().add(((bb * cout + co) * f + fr) * hw + p0), len)
                    };
                    dst.fill(bv);
                    for (xi, mrow) in ms.iter().enumerate() {
                        let c = at[xi];
                        if c != 0.0 {
                            for (d, &s) in dst.iter_mut().zip(mrow.iter()) {
                                *d += c * s;
                            }
                        }
                    }
                }
            }
        });
    }
}
