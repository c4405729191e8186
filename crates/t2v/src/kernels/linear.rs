//! `y = x·Wᵀ + b` as one packed GEMM ([`super::packed_matmul`]) whose output tiles start as the bias
//! (candle's matmul would need a second pass over the output for the bias), float16 weights
//! widened as they are packed, once per call; bfloat16 weights multiply in bfloat16 where the CPU
//! has AVX512_BF16 ([`super::bf16`]: the input rounded as it is packed), else are widened too.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::packed_matmul::{self, Init, PackedB};

struct LinearOp;

fn run(x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout, bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
    let x = super::f32_of(x, lx, "linear input")?;
    let w = super::src_of(w, lw, "linear weight")?;
    let (m, k) = lx.shape().dims2()?;
    let (n, k2) = lw.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("linear: input width {k} ≠ weight width {k2}");
    }
    // The weight is packed (float16 widened; bfloat16 kept where the CPU multiplies in it) once
    // per call, on every thread.
    let packed = if w.multiplies_in_bf16() {
        PackedB::from_transposed_bf16(w, n, k, true)
    } else {
        PackedB::from_transposed(w, n, k, true)
    };
    // the GEMM overwrites (or starts from the bias in) every tile
    let mut out = super::output_buffer(m * n);
    let init = bias.map_or(Init::Overwrite, Init::Bias);
    // SAFETY: `x` holds m×k and `out` m×n floats, rows contiguous; `avx2()` was checked
    // by `linear` before this op was applied.
    let wide = super::wide(super::KernelKind::Linear);
    unsafe { packed_matmul::matmul(m, x.as_ptr(), k, &packed, out.as_mut_ptr(), n, init, wide) };
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
        let b = super::f32_of(b, lb, "linear bias")?;
        run(x, lx, w, lw, Some(b))
    }
}

/// `x` (rows, in) · `weight` (out, in)ᵀ + `bias` (out) → (rows, out). On the CPU with float32
/// activations (and float32, float16 or bfloat16 weights) one fused GEMM; elsewhere candle's
/// matmul.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let cpu_f32 = super::on_cpu(x.device())
        && super::avx2()
        && x.dtype() == DType::F32
        && matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && bias.is_none_or(|b| b.dtype() == DType::F32);
    if cpu_f32 {
        let (x, w) = (super::copy::contiguous(x)?, weight.contiguous()?);
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
