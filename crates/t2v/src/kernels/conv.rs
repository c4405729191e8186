//! Fast, exact float32 CPU convolutions for the shapes of the ModelScope text-to-video UNet and
//! the VAE decoder, behind candle's custom-op interface.
//!
//! * 3×3, stride 1, padding 1 (the bulk of the work): Winograd F(4×4, 3×3) with interpolation
//!   points {0, 1, −1, ½, −2, ∞} (more accurate in f32 than the usual {0, ±1, ±2}), a hand-written
//!   AVX2+FMA 6×16 GEMM micro-kernel over the 36 transformed planes, and channel sums split into
//!   blocks of 128 input channels (each block summed from zero, then added) so that the error
//!   stays a few 1e-6 of the output's magnitude (measured against a float64 direct convolution
//!   in `tests/conv.rs`; candle's direct f32 convolution: ~5e-7). Weights are transformed per
//!   call, per block of output channels, inside the parallel tasks (no 4×-sized copy of all the
//!   weights). Needs AVX2+FMA+F16C at run time (checked once); otherwise candle's convolution.
//! * 1×1, stride 1, padding 0: one GEMM per image (the `gemm` crate, as candle's matmul).
//! * The temporal `Conv3d(k=(3,1,1), pad=(1,0,0))` of the UNet's temporal layers
//!   ([`temporal_conv3`]): 1-D Winograd F(4, 3) along frames (six GEMMs with half the
//!   multiplications; error ~1e-6) when B·F·H·W ≥ 2048, else three accumulated GEMMs over
//!   frame-shifted views of the input (no padded or im2col copy).
//!
//! Memory: the 3×3 kernel keeps a transformed-input buffer (≤ 32 MB) between calls, and each
//! rayon thread a weight/product scratch (≤ 36·48·Cin floats, 8.8 MB at Cin = 1280).
//!
//! Every entry point falls back to candle's own ops for devices other than the CPU, dtypes other
//! than f32 activations with f32/f16 weights, and shapes the kernels don't cover; weights may be
//! f16 (widened exactly to f32 inside the kernel, so the result equals the f32-weight result).


use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use super::{f32_of, src_of, threads, SendPtr, Src};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// `conv2d` on NCHW `x` (groups 1, dilation 1) with `weight` (Cout, Cin, K, K) and an optional
/// `bias` (Cout). On the CPU, with f32 `x`, f32/f16 weights and a supported kernel (3×3 stride 1
/// padding 1, or 1×1 stride 1 padding 0) it runs the fast kernels of this module; otherwise it
/// falls back to candle's `Tensor::conv2d` (+ a broadcast bias add).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    if let Some(kind) = fast_kind(x, weight, bias, stride, padding)? {
        let x = crate::kernels::copy::contiguous(x)?;
        let weight = weight.contiguous()?;
        let op = ConvOp { kind, has_bias: bias.is_some() };
        return match bias {
            Some(b) => x.apply_op3_no_bwd(&weight, &b.contiguous()?, &op),
            None => x.apply_op2_no_bwd(&weight, &op),
        };
    }
    conv2d_fallback(x, weight, bias, stride, padding)
}

/// candle's own convolution (what [`conv2d`] falls back to).
pub fn conv2d_fallback(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let weight = if weight.dtype() != x.dtype() { weight.to_dtype(x.dtype())? } else { weight.clone() };
    let y = x.conv2d(&weight, padding, stride, 1, 1)?;
    match bias {
        Some(b) => {
            let b = if b.dtype() != y.dtype() { b.to_dtype(y.dtype())? } else { b.clone() };
            y.broadcast_add(&b.reshape((1, (), 1, 1))?)
        }
        None => Ok(y),
    }
}

/// `nn.Conv3d(Cin, Cout, kernel_size=(3, 1, 1), padding=(1, 0, 0))` on `x` (B, Cin, F, H, W):
/// `y[b, :, f] = bias + Σ_k W_k · x[b, :, f + k − 1]` (frames outside [0, F) are zero).
/// `weight` is (Cout, Cin, 3, 1, 1), (Cout, Cin, 3, 1) or (Cout, Cin, 3), f32 or f16.
pub fn temporal_conv3(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    temporal_conv3_with(x, weight, bias, TemporalAlgo::Auto)
}

/// Which algorithm [`temporal_conv3_with`] uses on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemporalAlgo {
    /// Winograd when there are enough columns (B·F·H·W ≥ 2048) and F ≥ 3, else direct.
    Auto,
    /// Three accumulated GEMMs over frame-shifted views.
    Direct,
    /// 1-D Winograd F(4, 3) along frames: six GEMMs with half the multiplications of Direct.
    Winograd,
}

/// [`temporal_conv3`] with a chosen CPU algorithm (for tests and benchmarks).
pub fn temporal_conv3_with(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, algo: TemporalAlgo) -> Result<Tensor> {
    let (b, cin, f, h, w) = x.dims5()?;
    let cout = weight.dim(0)?;
    let wdims = weight.dims();
    if wdims.len() < 3 || wdims[1] != cin || wdims[2] != 3 || wdims[3..].iter().any(|&d| d != 1) {
        bail!("temporal_conv3: weight {:?} doesn't fit input {:?}", wdims, x.dims());
    }
    let weight = weight.reshape((cout, cin, 3))?;
    if super::on_cpu(x.device())
        && x.dtype() == DType::F32
        && matches!(weight.dtype(), DType::F32 | DType::F16)
        && bias.is_none_or(|b| matches!(b.dtype(), DType::F32 | DType::F16) && b.dims() == [cout])
    {
        let x = crate::kernels::copy::contiguous(x)?;
        let weight = weight.contiguous()?;
        let op = TemporalOp { has_bias: bias.is_some(), algo };
        return match bias {
            Some(bb) => x.apply_op3_no_bwd(&weight, &bb.contiguous()?, &op),
            None => x.apply_op2_no_bwd(&weight, &op),
        };
    }
    temporal_conv3_fallback(&x.reshape((b, cin, f, h, w))?, &weight, bias)
}

/// What the main crate did before: candle's conv2d with a (3, 1) kernel over zero-padded frames.
pub fn temporal_conv3_fallback(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, f, h, w) = x.dims5()?;
    let cout = weight.dim(0)?;
    let weight = weight.reshape((cout, c, 3, 1))?;
    let weight = if weight.dtype() != x.dtype() { weight.to_dtype(x.dtype())? } else { weight };
    let padded = x.reshape((b, c, f, h * w))?.pad_with_zeros(2, 1, 1)?;
    let out = padded.conv2d(&weight, 0, 1, 1, 1)?;
    let out = match bias {
        Some(bb) => {
            let bb = if bb.dtype() != out.dtype() { bb.to_dtype(out.dtype())? } else { bb.clone() };
            out.broadcast_add(&bb.reshape((1, cout, 1, 1))?)?
        }
        None => out,
    };
    out.reshape((b, cout, f, h, w))
}

// ---------------------------------------------------------------------------------------------
// Dispatch and custom ops
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Wino3x3,
    Pointwise,
}

fn fast_kind(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Option<Kind>> {
    if !super::on_cpu(x.device()) || x.dtype() != DType::F32 || x.rank() != 4 || weight.rank() != 4 {
        return Ok(None);
    }
    if !matches!(weight.dtype(), DType::F32 | DType::F16) {
        return Ok(None);
    }
    let (_, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if wcin != cin || cout == 0 || cin == 0 || h == 0 || w == 0 {
        return Ok(None);
    }
    if let Some(b) = bias {
        if !matches!(b.dtype(), DType::F32 | DType::F16) || b.dims() != [cout] {
            return Ok(None);
        }
    }
    if kh == 3 && kw == 3 && stride == 1 && padding == 1 && super::has_avx2_fma() {
        return Ok(Some(Kind::Wino3x3));
    }
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        return Ok(Some(Kind::Pointwise));
    }
    Ok(None)
}

struct ConvOp {
    kind: Kind,
    has_bias: bool,
}

impl ConvOp {
    fn run(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bias: Option<Vec<f32>>) -> Result<(CpuStorage, Shape)> {
        let x = f32_of(xs, xl, "conv input")?;
        let w = src_of(ws, wl, "conv weight")?;
        let (n, cin, h, wd) = xl.shape().dims4()?;
        let (cout, wcin, kh, kw) = wl.shape().dims4()?;
        if wcin != cin {
            bail!("t2v conv: weight {:?} doesn't fit input {:?}", wl.shape(), xl.shape());
        }
        // both kernels write every output pixel (Winograd tiles cover the plane; the 1×1 GEMM
        // starts from the bias or overwrites)
        let mut out = super::output_buffer(n * cout * h * wd);
        match self.kind {
            Kind::Wino3x3 => {
                if kh != 3 || kw != 3 || !super::has_avx2_fma() {
                    bail!("t2v conv: winograd kernel needs a 3x3 kernel and AVX2+FMA");
                }
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    wino::conv3x3(x, w, bias.as_deref(), &mut out, n, cin, cout, h, wd);
                }
            }
            Kind::Pointwise => {
                if kh != 1 || kw != 1 {
                    bail!("t2v conv: pointwise kernel needs a 1x1 kernel");
                }
                pointwise(x, w, bias.as_deref(), &mut out, n, cin, cout, h * wd);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, cout, h, wd))))
    }
}

fn bias_vec(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    Ok(src_of(s, l, "conv bias")?.to_f32_vec())
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "t2v-conv2d"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.has_bias {
            bail!("t2v conv: bias expected");
        }
        self.run(s1, l1, s2, l2, None)
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "t2v-conv2d"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s1, l1, s2, l2, Some(bias_vec(s3, l3)?))
    }
}

struct TemporalOp {
    has_bias: bool,
    algo: TemporalAlgo,
}

impl TemporalOp {
    fn run(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bias: Option<Vec<f32>>) -> Result<(CpuStorage, Shape)> {
        let x = f32_of(xs, xl, "conv input")?;
        let w = src_of(ws, wl, "conv weight")?;
        let (b, cin, f, h, wd) = xl.shape().dims5()?;
        let (cout, wcin, k) = wl.shape().dims3()?;
        if wcin != cin || k != 3 {
            bail!("t2v temporal conv: weight {:?} doesn't fit input {:?}", wl.shape(), xl.shape());
        }
        // every frame of every channel starts from the bias or is overwritten by a first GEMM
        let mut out = super::output_buffer(b * cout * f * h * wd);
        let wino = match self.algo {
            TemporalAlgo::Auto => f >= 3 && b * f * h * wd >= 2048,
            TemporalAlgo::Direct => false,
            TemporalAlgo::Winograd => true,
        };
        if wino {
            temporal_wino(x, w, bias.as_deref(), &mut out, b, cin, cout, f, h * wd);
        } else {
            temporal(x, w, bias.as_deref(), &mut out, b, cin, cout, f, h * wd);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, f, h, wd))))
    }
}

impl CustomOp2 for TemporalOp {
    fn name(&self) -> &'static str {
        "t2v-temporal-conv3"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.has_bias {
            bail!("t2v temporal conv: bias expected");
        }
        self.run(s1, l1, s2, l2, None)
    }
}

impl CustomOp3 for TemporalOp {
    fn name(&self) -> &'static str {
        "t2v-temporal-conv3"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s1, l1, s2, l2, Some(bias_vec(s3, l3)?))
    }
}

// ---------------------------------------------------------------------------------------------
// GEMM-based kernels (1×1 convolution, temporal convolution)
// ---------------------------------------------------------------------------------------------

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
) {
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

fn fill_bias(out: &mut [f32], bias: Option<&[f32]>, plane: usize) {
    if let Some(b) = bias {
        for (chunk, &bv) in out.chunks_mut(plane.max(1)).zip(b.iter().cycle()) {
            chunk.fill(bv);
        }
    }
}

/// 1×1 convolution: `out[n] = W · x[n] (+ bias)`.
#[allow(clippy::too_many_arguments)]
fn pointwise(x: &[f32], w: Src, bias: Option<&[f32]>, out: &mut [f32], n: usize, cin: usize, cout: usize, hw: usize) {
    let wf: Vec<f32>;
    let wp: &[f32] = match w {
        Src::F32(s) => s,
        Src::F16(_) => {
            wf = w.to_f32_vec();
            &wf
        }
    };
    fill_bias(out, bias, hw);
    let acc = bias.is_some();
    let nt = threads();
    let optr = SendPtr(out.as_mut_ptr());
    let per_image_flops = 2 * cout * cin * hw;
    if n >= nt && nt > 1 && per_image_flops < (64 << 20) {
        (0..n).into_par_iter().for_each(|i| unsafe {
            sgemm(cout, hw, cin, optr.get().add(i * cout * hw), hw, acc, wp.as_ptr(), cin, 1, x.as_ptr().add(i * cin * hw), hw, gemm::Parallelism::None);
        });
    } else {
        let par = if nt > 1 { gemm::Parallelism::Rayon(nt) } else { gemm::Parallelism::None };
        for i in 0..n {
            unsafe {
                sgemm(cout, hw, cin, optr.get().add(i * cout * hw), hw, acc, wp.as_ptr(), cin, 1, x.as_ptr().add(i * cin * hw), hw, par);
            }
        }
    }
}

/// Temporal convolution over (B, C, F, HW): three accumulated GEMMs per video, each over a
/// frame-shifted view of the input.
#[allow(clippy::too_many_arguments)]
fn temporal(x: &[f32], w: Src, bias: Option<&[f32]>, out: &mut [f32], b: usize, cin: usize, cout: usize, f: usize, hw: usize) {
    let wf: Vec<f32>;
    let wp: &[f32] = match w {
        Src::F32(s) => s,
        Src::F16(_) => {
            wf = w.to_f32_vec();
            &wf
        }
    };
    let fhw = f * hw;
    fill_bias(out, bias, fhw);
    let nt = threads();
    let optr = SendPtr(out.as_mut_ptr());
    let run = |bi: usize, par: gemm::Parallelism| unsafe {
        let o = optr.get().add(bi * cout * fhw);
        let xi = x.as_ptr().add(bi * cin * fhw);
        let wk = |k: usize| wp.as_ptr().add(k);
        // centre tap: all frames
        sgemm(cout, fhw, cin, o, fhw, bias.is_some(), wk(1), 3 * cin, 3, xi, fhw, par);
        if f > 1 {
            let n = (f - 1) * hw;
            // k = 0: y[f] += W0 · x[f − 1] for f ≥ 1
            sgemm(cout, n, cin, o.add(hw), fhw, true, wk(0), 3 * cin, 3, xi, fhw, par);
            // k = 2: y[f] += W2 · x[f + 1] for f ≤ F − 2
            sgemm(cout, n, cin, o, fhw, true, wk(2), 3 * cin, 3, xi.add(hw), fhw, par);
        }
    };
    let par = if nt > 1 { gemm::Parallelism::Rayon(nt) } else { gemm::Parallelism::None };
    for bi in 0..b {
        run(bi, par);
    }
}

/// 1-D Winograd F(4, 3) along frames (points {0, 1, −1, ½, −2, ∞}): frames in tiles of 4
/// (input windows of 6, zero outside [0, F)); `V_ξ = Σ_k Bᵀ[ξ][k] x[4τ − 1 + k]`,
/// `U_ξ = Σ_k G[ξ][k] W_k`, `M_ξ = U_ξ · V_ξ` (six GEMMs, half the multiplications of the direct
/// form), `y[4τ + i] = bias + Σ_ξ Aᵀ[i][ξ] M_ξ`.
#[allow(clippy::too_many_arguments)]
fn temporal_wino(x: &[f32], w: Src, bias: Option<&[f32]>, out: &mut [f32], b: usize, cin: usize, cout: usize, f: usize, hw: usize) {
    const BT: [[f32; 6]; 6] = [
        [1.0, -1.5, -2.0, 1.5, 1.0, 0.0],
        [0.0, -1.0, 0.5, 2.5, 1.0, 0.0],
        [0.0, 1.0, -2.5, 0.5, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 0.5, -1.0, -0.5, 1.0, 0.0],
        [0.0, 1.0, -1.5, -2.0, 1.5, 1.0],
    ];
    const AT: [[f32; 6]; 4] = [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 0.5, -2.0, 0.0], [0.0, 1.0, 1.0, 0.25, 4.0, 0.0], [0.0, 1.0, -1.0, 0.125, -8.0, 1.0]];
    let nt = f.div_ceil(4);
    let fhw = f * hw;
    let nthreads = threads();
    let par = if nthreads > 1 { gemm::Parallelism::Rayon(nthreads) } else { gemm::Parallelism::None };
    // U[ξ][co][ci]
    let mut u = vec![0f32; 6 * cout * cin];
    {
        let uptr = SendPtr(u.as_mut_ptr());
        (0..cout).into_par_iter().for_each_init(Vec::new, |row, co| {
            // this output channel's 3·cin taps as float32 (one vectorised widening)
            let taps = 3 * cin;
            let row: &[f32] = match w {
                Src::F32(s) => &s[co * taps..(co + 1) * taps],
                Src::F16(s) => {
                    use half::slice::HalfFloatSliceExt;
                    row.resize(taps, 0.0);
                    s[co * taps..(co + 1) * taps].convert_to_f32_slice(row);
                    row
                }
            };
            for ci in 0..cin {
                let g = &row[3 * ci..3 * ci + 3];
                let t = g3to6(g[0], g[1], g[2]);
                for (xi, &tv) in t.iter().enumerate() {
                    unsafe { *uptr.get().add((xi * cout + co) * cin + ci) = tv };
                }
            }
        });
    }
    // Columns: (batch, frame tile, pixel). A chunk is `ns` segments of `pl` pixels of one
    // (batch, frame tile) each, sized so that its transformed input and GEMM output (6·C·cols
    // floats each) stay around a few MB (cache-resident between the passes).
    const BUDGET: usize = 1 << 20;
    let cmax = cin.max(cout);
    let pl = if 6 * cmax * hw <= BUDGET { hw } else { (BUDGET / (6 * cmax)).max(256).min(hw) };
    let pieces = hw.div_ceil(pl);
    let segs: Vec<(usize, usize, usize, usize)> = (0..b * nt)
        .flat_map(|g| (0..pieces).map(move |q| (g / nt, g % nt, q * pl, pl.min(hw - q * pl))))
        .collect();
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
                    let dst = unsafe { std::slice::from_raw_parts_mut(vptr.get().add((xi * cin + ci) * ncols + sl * pl), pl) };
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
            unsafe {
                sgemm(cout, ncols, cin, m.as_mut_ptr().add(xi * cout * ncols), ncols, false, u.as_ptr().add(xi * cout * cin), cin, 1, v.as_ptr().add(xi * cin * ncols), ncols, par);
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
                    let dst = unsafe { std::slice::from_raw_parts_mut(optr.get().add(((bb * cout + co) * f + fr) * hw + p0), len) };
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

/// G for the points {0, 1, −1, ½, −2, ∞}: 3 taps → 6.
fn g3to6(a: f32, b: f32, c: f32) -> [f32; 6] {
    let ac = a + c;
    // (plain mul/add: `f32::mul_add` is a libm call without an FMA target feature)
    [a, (ac + b) * (1.0 / 3.0), (b - ac) * (1.0 / 3.0), (16.0 * a + (8.0 * b + 4.0 * c)) * (-1.0 / 15.0), (4.0 * c + (-2.0 * b + a)) * (1.0 / 15.0), c]
}

// ---------------------------------------------------------------------------------------------
// Winograd F(4×4, 3×3)
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod wino {
    use super::*;
    use std::cell::RefCell;
    use std::arch::x86_64::*;

    /// Output channels per micro-kernel panel (broadcast operand).
    pub(super) use super::super::packed_matmul::MR;
    /// Tiles per micro-kernel panel (2 AVX vectors).
    pub(super) use super::super::packed_matmul::NR;
    /// Input channels per accumulation block: partial sums over KC channels start from zero and
    /// are then added, which keeps the f32 error of long channel sums small.
    pub(super) const KC: usize = 128;
    /// Transformed-input chunk budget (floats): tiles are processed in chunks of at most this much
    /// transformed data.
    const V_BUDGET: usize = 8 << 20;
    /// Largest output-channel block of one task (in panels).
    const MAX_TASK_PANELS: usize = 8;
    /// Groups of NR tiles sharing one pass over the weights in the GEMM loop (1 measured best:
    /// the NR×KC block of transformed input then stays in L1 across all panels).
    const SG: usize = 1;

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
    pub(super) unsafe fn conv3x3(x: &[f32], w: Src, bias: Option<&[f32]>, out: &mut [f32], n: usize, cin: usize, cout: usize, h: usize, wd: usize) {
        assert_eq!(x.len(), n * cin * h * wd);
        assert_eq!(w.len(), cout * cin * 9);
        assert_eq!(out.len(), n * cout * h * wd);
        let ty_n = h.div_ceil(4);
        let tx_n = wd.div_ceil(4);
        let g = Geom { cin, cout, h, w: wd, ty_n, tx_n, t_total: n * ty_n * tx_n };
        let nt = threads();
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
        let tasks: Vec<(usize, usize)> = (0..n_tasks)
            .map(|i| (i * n_panels / n_tasks, (i + 1) * n_panels / n_tasks))
            .filter(|(a, b)| b > a)
            .collect();

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
            // (channel-major order, tried, is ~15 % slower overall on 128-channel layers).
            let groups: Vec<(usize, usize, usize)> = (0..tcc / 8).map(|gi| g.tile(t0 + gi * 8)).collect();
            let ci_blk = cin.div_ceil(4 * nt).max(1);
            (0..cin.div_ceil(ci_blk)).into_par_iter().for_each(|cb| {
                let (c_a, c_b) = (cb * ci_blk, ((cb + 1) * ci_blk).min(cin));
                for (gi, &pos) in groups.iter().enumerate() {
                    input_group(x, &g, t0 + gi * 8, pos, c_a, c_b, vptr.get(), gi);
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
                    let need_m = SG * NR * np * MR * 36;
                    if mbuf.len() < need_m {
                        mbuf.resize(need_m, 0.0);
                    }
                    transform_weights(w, &g, pa * MR, np, ubuf.as_mut_ptr(), uxs);
                    task_gemm(&g, ubuf.as_ptr(), uxs, np, vptr.get(), n_tsub, mbuf.as_mut_ptr(), pa * MR, t0, bias, optr.get());
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
        let t3 = _mm256_fmadd_ps(_mm256_set1_ps(16.0), a, _mm256_fmadd_ps(_mm256_set1_ps(8.0), b, _mm256_mul_ps(_mm256_set1_ps(4.0), c)));
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
                        }
                    }
                    // after the transposes rows[q][m] holds flat index 8q + m = cl·9 + k, lane = r
                    for rq in rows.iter_mut() {
                        super::super::packed_matmul::transpose8(rq);
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
                                *gv = match w {
                                    Src::F32(s) => s[base + k],
                                    Src::F16(s) => s[base + k].to_f32(),
                                };
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

    /// Bᵀ for the points {0, 1, −1, ½, −2, ∞}.
    #[inline(always)]
    unsafe fn bt6(v: [__m256; 6]) -> [__m256; 6] {
        let [v0, v1, v2, v3, v4, v5] = v;
        let h = _mm256_set1_ps(0.5);
        let h3 = _mm256_set1_ps(1.5);
        let two = _mm256_set1_ps(2.0);
        let h5 = _mm256_set1_ps(2.5);
        // r0 = v0 − 1.5 v1 − 2 v2 + 1.5 v3 + v4 = v0 + v4 + 1.5 (v3 − v1) − 2 v2
        let r0 = _mm256_fnmadd_ps(two, v2, _mm256_fmadd_ps(h3, _mm256_sub_ps(v3, v1), _mm256_add_ps(v0, v4)));
        // r5 = v1 − 1.5 v2 − 2 v3 + 1.5 v4 + v5 = v1 + v5 + 1.5 (v4 − v2) − 2 v3
        let r5 = _mm256_fnmadd_ps(two, v3, _mm256_fmadd_ps(h3, _mm256_sub_ps(v4, v2), _mm256_add_ps(v1, v5)));
        // r1 = −v1 + 0.5 v2 + 2.5 v3 + v4
        let r1 = _mm256_fmadd_ps(h5, v3, _mm256_fmadd_ps(h, v2, _mm256_sub_ps(v4, v1)));
        // r2 = v1 − 2.5 v2 + 0.5 v3 + v4
        let r2 = _mm256_fnmadd_ps(h5, v2, _mm256_fmadd_ps(h, v3, _mm256_add_ps(v4, v1)));
        // r3 = −2 v1 − v2 + 2 v3 + v4 = 2 (v3 − v1) + v4 − v2
        let r3 = _mm256_fmadd_ps(two, _mm256_sub_ps(v3, v1), _mm256_sub_ps(v4, v2));
        // r4 = 0.5 v1 − v2 − 0.5 v3 + v4 = 0.5 (v1 − v3) + v4 − v2
        let r4 = _mm256_fmadd_ps(h, _mm256_sub_ps(v1, v3), _mm256_sub_ps(v4, v2));
        [r0, r1, r2, r3, r4, r5]
    }

    /// Transform the 8 tiles [tg, tg + 8) (lane = tile; `pos` = `g.tile(tg)`) of channels
    /// [c_a, c_b) into `v` (group `gi` of the chunk).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn input_group(x: &[f32], g: &Geom, tg: usize, pos: (usize, usize, usize), c_a: usize, c_b: usize, v: *mut f32, gi: usize) {
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
                            buf[r][c][l] = if yok && xx >= 0 && (xx as usize) < w { *pbase.add(y as usize * w + xx as usize) } else { 0.0 };
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
    unsafe fn transform_store(d: &[[__m256; 6]; 6], dst: *mut f32, stride_xi: usize) {
        let s6 = 6 * stride_xi;
        let mut pj = dst;
        for j in 0..6 {
            let col = bt6([d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]]);
            let mut p = pj;
            for v in col {
                _mm256_storeu_ps(p, v);
                p = p.add(s6);
            }
            pj = pj.add(stride_xi);
        }
    }

    // ----- GEMM over the 36 planes + output transform -----------------------------------------

    /// One task: output channels [co0, co0 + np·MR) × all tiles of the chunk.
    /// `m` scratch layout: `[s in SG][co_local][ξ][NR]`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn task_gemm(g: &Geom, u: *const f32, uxs: usize, np: usize, v: *const f32, n_tsub: usize, m: *mut f32, co0: usize, t0: usize, bias: Option<&[f32]>, out: *mut f32) {
        let cin = g.cin;
        let mc = np * MR;
        let mut s0 = 0;
        while s0 < n_tsub {
            let sg = SG.min(n_tsub - s0);
            for xi in 0..36 {
                let mut kb = 0;
                while kb < cin {
                    let kl = KC.min(cin - kb);
                    for p in 0..np {
                        let up = u.add(xi * uxs + kb * np * MR + p * kl * MR);
                        for s in 0..sg {
                            let vp = v.add((((s0 + s) * 36 + xi) * cin + kb) * NR);
                            let cp = m.add(((s * mc + p * MR) * 36 + xi) * NR);
                            super::super::packed_matmul::kernel_6x16(kl, up, vp, cp, 36 * NR, kb > 0, std::ptr::null());
                        }
                    }
                    kb += kl;
                }
            }
            for s in 0..sg {
                for col in 0..mc {
                    let co = co0 + col;
                    if co >= g.cout {
                        break;
                    }
                    let bv = bias.map_or(0.0, |b| b[co]);
                    let mp = m.add((s * mc + col) * 36 * NR);
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

    /// Aᵀ for the points {0, 1, −1, ½, −2, ∞}: 6 → 4.
    #[inline(always)]
    unsafe fn at6(m: [__m256; 6]) -> [__m256; 4] {
        let [m0, m1, m2, m3, m4, m5] = m;
        let s12 = _mm256_add_ps(m1, m2);
        let d12 = _mm256_sub_ps(m1, m2);
        let o0 = _mm256_add_ps(_mm256_add_ps(m0, s12), _mm256_add_ps(m3, m4));
        let o1 = _mm256_fmadd_ps(_mm256_set1_ps(0.5), m3, _mm256_fnmadd_ps(_mm256_set1_ps(2.0), m4, d12));
        let o2 = _mm256_fmadd_ps(_mm256_set1_ps(0.25), m3, _mm256_fmadd_ps(_mm256_set1_ps(4.0), m4, s12));
        let o3 = _mm256_fmadd_ps(_mm256_set1_ps(0.125), m3, _mm256_fnmadd_ps(_mm256_set1_ps(8.0), m4, _mm256_add_ps(d12, m5)));
        [o0, o1, o2, o3]
    }

    /// Output transform of 8 tiles [tg, tg + 8) (lane = tile) of channel `co`: `mp[ξ·NR + lane]`.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn output_group(g: &Geom, mp: *const f32, tg: usize, co: usize, bv: f32, out: *mut f32) {
        let mut mm = [[_mm256_setzero_ps(); 6]; 6];
        for i in 0..6 {
            for j in 0..6 {
                mm[i][j] = _mm256_loadu_ps(mp.add((i * 6 + j) * NR));
            }
        }
        let mut t = [[_mm256_setzero_ps(); 6]; 4];
        for j in 0..6 {
            let c = at6([mm[0][j], mm[1][j], mm[2][j], mm[3][j], mm[4][j], mm[5][j]]);
            for i in 0..4 {
                t[i][j] = c[i];
            }
        }
        let bvec = _mm256_set1_ps(bv);
        let mut o = [[_mm256_setzero_ps(); 4]; 4];
        for i in 0..4 {
            let r = at6(t[i]);
            for j in 0..4 {
                o[i][j] = _mm256_add_ps(r[j], bvec);
            }
        }
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
}

