//! GEGLU, `value · gelu(gate)` over the two halves of the feed-forward's first projection, in one
//! parallel pass on the CPU (candle would copy both halves, run GELU on one thread and multiply in
//! a third pass). GELU is the exact one (erf), as `F.gelu`: vectorised (`vmath::gelu`)
//! where AVX2 is available, candle's own erf otherwise.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

struct GegluOp;

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `o = value · gelu(gate)` over whole vectors of sixteen (AVX-512) or eight (AVX2) where the CPU
/// has them; returns how many elements were done (the rest take the scalar loop).
fn geglu_vectors(o: &mut [f32], value: &[f32], gate: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m256, __m512};
        if super::avx512() {
            // SAFETY: AVX-512F checked; the slices hold the same number of floats.
            return unsafe { geglu_512(o, value, gate) };
        }
        if super::avx2() {
            // SAFETY: AVX2 and FMA checked; the slices hold the same number of floats.
            return unsafe { geglu_256(o, value, gate) };
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn geglu_512(o: &mut [f32], value: &[f32], gate: &[f32]) -> usize {
            // then one vector of eight where eight or more are left, as the AVX2 path does them
            let done = geglu_lanes::<__m512>(o, value, gate);
            done + geglu_lanes::<__m256>(&mut o[done..], &value[done..], &gate[done..])
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn geglu_256(o: &mut [f32], value: &[f32], gate: &[f32]) -> usize {
            geglu_lanes::<__m256>(o, value, gate)
        }
    }
    let _ = (o, value, gate);
    0
}

/// [`geglu_vectors`] on vectors of `V`, inlined into a function compiled for its width.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn geglu_lanes<V: super::vmath::F32s>(o: &mut [f32], value: &[f32], gate: &[f32]) -> usize {
    let n = o.len() / V::LANES * V::LANES;
    for i in (0..n).step_by(V::LANES) {
        let g = super::vmath::gelu(V::load(gate.as_ptr().add(i)));
        V::load(value.as_ptr().add(i)).mul(g).store(o.as_mut_ptr().add(i));
    }
    n
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("geglu needs a contiguous input");
        };
        let h = &storage.as_slice::<f32>()?[start..end];
        let mut dims = layout.shape().dims().to_vec();
        let width = *dims.last().unwrap();
        let half = width / 2;
        // every element is written (vectors, then the scalar remainder)
        let mut out = super::output_buffer(h.len() / 2);
        out.par_chunks_mut(half).zip(h.par_chunks(width)).for_each(|(o, row)| {
            let (value, gate) = row.split_at(half);
            let done = geglu_vectors(o, value, gate);
            for ((o, &v), &g) in o.iter_mut().zip(value).zip(gate).skip(done) {
                *o = v * gelu(g);
            }
        });
        *dims.last_mut().unwrap() = half;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `h[..., :n] * gelu(h[..., n:])` for `h` of last dimension 2n.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu needs an even last dimension, got {width}");
    }
    if super::on_cpu(h.device()) && h.dtype() == DType::F32 {
        return h.contiguous()?.apply_op1_no_bwd(&GegluOp);
    }
    let half = width / 2;
    h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?
}
