//! `y = x·Wᵀ + b` as one GEMM whose output starts as the bias (candle's matmul would need a
//! second pass over the output for the bias), reading float16 weights widened once per call.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct LinearOp;

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Option<&'a [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("linear needs contiguous inputs") };
    Ok(match s {
        CpuStorage::F32(v) => Some(&v[a..b]),
        _ => None,
    })
}

fn weight_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("linear needs a contiguous weight") };
    Ok(match s {
        CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[a..b]),
        CpuStorage::F16(v) => {
            // Widened on both cores: a step widens every weight of the UNet once.
            let src = &v[a..b];
            let mut wide = vec![0f32; src.len()];
            wide.par_chunks_mut(1 << 14).zip(src.par_chunks(1 << 14)).for_each(|(d, s)| {
                for (d, h) in d.iter_mut().zip(s) {
                    *d = h.to_f32();
                }
            });
            std::borrow::Cow::Owned(wide)
        }
        _ => candle_core::bail!("linear: unsupported weight dtype"),
    })
}

fn run(x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout, bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
    let x = slice(x, lx)?.ok_or_else(|| candle_core::Error::Msg("linear: input must be f32".into()))?;
    let w = weight_f32(w, lw)?;
    let (m, k) = lx.shape().dims2()?;
    let (n, k2) = lw.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("linear: input width {k} ≠ weight width {k2}");
    }
    let mut out = vec![0f32; m * n];
    if let Some(b) = bias {
        for row in out.chunks_mut(n) {
            row.copy_from_slice(b);
        }
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the pointers cover m×n, m×k and n×k floats laid out with the strides given.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
    Ok((CpuStorage::F32(out), Shape::from((m, n))))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        run(x, lx, w, lw, None)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = slice(b, lb)?.ok_or_else(|| candle_core::Error::Msg("linear: bias must be f32".into()))?;
        run(x, lx, w, lw, Some(b))
    }
}

/// `x` (rows, in) · `weight` (out, in)ᵀ + `bias` (out) → (rows, out). On the CPU with float32
/// activations (and float32 or float16 weights) one fused GEMM; elsewhere candle's matmul.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let cpu_f32 = x.device().is_cpu()
        && x.dtype() == DType::F32
        && matches!(weight.dtype(), DType::F32 | DType::F16)
        && bias.is_none_or(|b| b.dtype() == DType::F32);
    if cpu_f32 {
        let (x, w) = (crate::kernels::copy::contiguous(x)?, weight.contiguous()?);
        return match bias {
            Some(b) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &LinearOp),
            None => x.apply_op2_no_bwd(&w, &LinearOp),
        };
    }
    let w = if weight.dtype() == x.dtype() { weight.clone() } else { weight.to_dtype(x.dtype())? };
    let y = x.matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}
