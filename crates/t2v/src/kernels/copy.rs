//! Making a strided (permuted, narrowed) float32 tensor contiguous, in parallel. candle copies
//! strided tensors on one thread; the UNet moves its activations between the per-frame layout
//! (batch·frames, C, H, W) and the per-video one (batch, C, frames, H, W) dozens of times a
//! step, so those copies are worth spreading over every thread.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Contiguous;

impl CustomOp1 for Contiguous {
    fn name(&self) -> &'static str {
        "contiguous"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = storage.as_slice::<f32>()?;
        let dims = layout.dims();
        let strides = layout.stride();
        let start = layout.start_offset();
        let rank = dims.len();
        let inner = dims[rank - 1];
        let inner_stride = strides[rank - 1];
        // every element is copied in
        let mut out = super::output_buffer(layout.shape().elem_count());
        if inner == 0 {
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        out.par_chunks_mut(inner).enumerate().for_each(|(row, dst)| {
            // The source offset of this row: its index over the outer dimensions, by their strides.
            let mut rest = row;
            let mut offset = start;
            for d in (0..rank - 1).rev() {
                offset += (rest % dims[d]) * strides[d];
                rest /= dims[d];
            }
            if inner_stride == 1 {
                dst.copy_from_slice(&src[offset..offset + inner]);
            } else {
                for (i, v) in dst.iter_mut().enumerate() {
                    *v = src[offset + i * inner_stride];
                }
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `x.contiguous()`, copying float32 CPU tensors on every thread.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    if super::on_cpu(x.device()) && x.dtype() == DType::F32 && x.rank() > 0 {
        return x.apply_op1_no_bwd(&Contiguous);
    }
    x.contiguous()
}

/// torch's `repeat_interleave(repeat, dim=0)` for a (batch, ...) tensor: each row `repeat`
/// times in a row.
pub fn repeat_interleave(xs: &Tensor, repeat: usize) -> Result<Tensor> {
    if repeat == 1 {
        return Ok(xs.clone());
    }
    let dims = xs.dims();
    let mut expanded = vec![dims[0], repeat];
    expanded.extend_from_slice(&dims[1..]);
    let mut flat = vec![dims[0] * repeat];
    flat.extend_from_slice(&dims[1..]);
    contiguous(&xs.unsqueeze(1)?.broadcast_as(expanded)?)?.reshape(flat)
}
