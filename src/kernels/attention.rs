//! Attention over short sequences (the temporal transformers attend across 16 frames, for every
//! pixel and head: hundreds of thousands of 16×16 problems a layer). candle runs each as a tiny
//! batched matrix product, dominated by per-product overhead; here each (batch·head) row is one
//! small loop nest, rows in parallel. Long sequences keep candle's matrix products.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Sequences at most this long (queries and keys) take the loop kernel.
pub const SHORT: usize = 64;

struct ShortAttention {
    scale: f32,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: vectorisable without reassociating one long chain.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

impl CustomOp3 for ShortAttention {
    fn name(&self) -> &'static str {
        "short-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let get = |s: &'_ CpuStorage, l: &Layout| -> Result<Vec<f32>> {
            let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("short-attention needs contiguous inputs") };
            Ok(s.as_slice::<f32>()?[a..b].to_vec())
        };
        let (q, k, v) = (get(q, lq)?, get(k, lk)?, get(v, lv)?);
        let (rows, t, d) = lq.shape().dims3()?;
        let s = lk.shape().dims3()?.1;
        let mut out = vec![0f32; rows * t * d];
        out.par_chunks_mut(t * d).enumerate().for_each(|(r, out)| {
            let (q, k, v) = (&q[r * t * d..(r + 1) * t * d], &k[r * s * d..(r + 1) * s * d], &v[r * s * d..(r + 1) * s * d]);
            let mut p = [0f32; SHORT];
            for ti in 0..t {
                let qi = &q[ti * d..(ti + 1) * d];
                let mut max = f32::NEG_INFINITY;
                for si in 0..s {
                    p[si] = dot(qi, &k[si * d..(si + 1) * d]) * self.scale;
                    max = max.max(p[si]);
                }
                let mut sum = 0f32;
                for pi in p[..s].iter_mut() {
                    *pi = (*pi - max).exp();
                    sum += *pi;
                }
                let o = &mut out[ti * d..(ti + 1) * d];
                for si in 0..s {
                    let w = p[si] / sum;
                    for (o, &vv) in o.iter_mut().zip(&v[si * d..(si + 1) * d]) {
                        *o += w * vv;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, t, d))))
    }
}

/// softmax(q·kᵀ·scale)·v for short sequences, or `None` when this kernel does not apply
/// (another device or dtype, or sequences longer than [`SHORT`]).
pub fn short_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let (t, s) = (q.dim(1)?, k.dim(1)?);
    if !(q.device().is_cpu() && q.dtype() == DType::F32 && t <= SHORT && s <= SHORT) {
        return Ok(None);
    }
    let op = ShortAttention { scale: scale as f32 };
    let c = crate::kernels::copy::contiguous;
    Ok(Some(c(q)?.apply_op3_no_bwd(&c(k)?, &c(v)?, &op)?))
}
