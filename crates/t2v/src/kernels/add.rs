//! Residual additions of same-shaped float32 tensors, in parallel (candle adds on one thread;
//! every block of the UNet ends in one or more of these over its whole activation).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "residual-add"
    }

    fn cpu_fwd(&self, a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some((a0, a1)), Some((b0, b1))) = (la.contiguous_offsets(), lb.contiguous_offsets()) else {
            candle_core::bail!("residual-add needs contiguous inputs");
        };
        let (a, b) = (&a.as_slice::<f32>()?[a0..a1], &b.as_slice::<f32>()?[b0..b1]);
        // every element is written below
        let mut out = super::output_buffer(a.len());
        out.par_chunks_mut(1 << 14).zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14))).for_each(|(o, (a, b))| {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = x + y;
            }
        });
        Ok((CpuStorage::F32(out), la.shape().clone()))
    }
}

/// `a + b` for tensors of one shape; on every thread for contiguous float32 CPU tensors.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if super::on_cpu(a.device())
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.dims() == b.dims()
        && a.is_contiguous()
        && b.is_contiguous()
    {
        return a.apply_op2_no_bwd(b, &Add);
    }
    a + b
}
