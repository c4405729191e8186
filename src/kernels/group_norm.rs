//! GroupNorm, optionally followed by SiLU, in one pass per group on the CPU.
//!
//! candle's `GroupNorm` takes about eight passes over the activations (mean, subtract, square,
//! sum, divide, scale, shift, each allocating), and the SiLU that follows almost every GroupNorm
//! in this model is a ninth. Here each (image, group) block is read three times (mean, variance, then the
//! normalised output, while it is still in cache) by one thread of a parallel loop. Statistics are accumulated in f64, which
//! is at least as accurate as PyTorch's float32 kernel. Other devices and dtypes use candle's ops.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-silu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        gamma: &CpuStorage,
        lg: &Layout,
        beta: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((x0, x1)), Some((g0, g1)), Some((b0, b1))) =
            (lx.contiguous_offsets(), lg.contiguous_offsets(), lb.contiguous_offsets())
        else {
            candle_core::bail!("group-norm-silu needs contiguous inputs");
        };
        let x = &x.as_slice::<f32>()?[x0..x1];
        let gamma = &gamma.as_slice::<f32>()?[g0..g1];
        let beta = &beta.as_slice::<f32>()?[b0..b1];
        let dims = lx.shape().dims();
        let (n, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let channels_per_group = c / self.groups;
        let block = channels_per_group * spatial;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(block).zip(x.par_chunks(block)).enumerate().for_each(|(i, (out, x))| {
            let group = i % self.groups;
            // Two passes (mean, then squared deviations): no cancellation when |mean| ≫ std.
            let count = block as f64;
            let mean = x.chunks(256).map(|c| c.iter().sum::<f32>() as f64).sum::<f64>() / count;
            let m = mean as f32;
            let var = x.chunks(256).map(|c| c.iter().map(|&v| (v - m) * (v - m)).sum::<f32>() as f64).sum::<f64>() / count;
            let inv_std = 1.0 / (var + self.eps).sqrt();
            for ch in 0..channels_per_group {
                let channel = group * channels_per_group + ch;
                // y = (x - mean) * inv_std * gamma + beta = x * scale + shift
                let scale = (inv_std * gamma[channel] as f64) as f32;
                let shift = (beta[channel] as f64 - mean * inv_std * gamma[channel] as f64) as f32;
                let range = ch * spatial..(ch + 1) * spatial;
                let (o, xs) = (&mut out[range.clone()], &x[range]);
                if self.silu {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        let y = v * scale + shift;
                        *o = y / (1.0 + (-y).exp());
                    }
                } else {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        *o = v * scale + shift;
                    }
                }
            }
        });
        debug_assert_eq!(out.len(), n * c * spatial);
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// GroupNorm over `x` (batch, channels, ...), then SiLU when `silu`.
pub fn group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    if c % groups != 0 {
        candle_core::bail!("{c} channels do not split into {groups} groups");
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && gamma.dtype() == DType::F32 && beta.dtype() == DType::F32 {
        let x = crate::kernels::copy::contiguous(x)?;
        return x.apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &GroupNormOp { groups, eps, silu });
    }
    // Any other device or dtype: candle's own ops.
    let dims = x.dims().to_vec();
    let xs = x.reshape((dims[0], groups, ()))?;
    let internal = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let xs = xs.to_dtype(internal)?;
    let mean = xs.mean_keepdim(2)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(x.dtype())?.reshape(dims.clone())?;
    let mut shape = vec![1; dims.len()];
    shape[1] = c;
    let y = normed.broadcast_mul(&gamma.reshape(shape.clone())?)?.broadcast_add(&beta.reshape(shape)?)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}
