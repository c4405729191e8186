//! LayerNorm over the last dimension on the CPU: into float32 rows, or straight into the
//! bfloat16 AMX tiles of the products that read it.
//!
//! Why our own: candle's CPU LayerNorm runs a task per row and sums each row in one scalar
//! chain, its variance as E[x²] − mean² (which cancels where |mean| ≫ std). Here each task takes
//! a block of rows, each row is summed in 16 lanes, and the variance comes from the deviations
//! (a second pass over the row while it is in L1), as PyTorch's two-moment kernel does.
//!
//! The tiles: in a transformer block the LayerNorms' outputs are read only by linear layers
//! (q, k and v; q of the cross-attention; the feed-forward's projection), and on AMX those
//! products round their input to bfloat16 as they pack it into tiles, once per product. Written
//! rounded, in the tiles' layout ([`super::packed_matmul::PackedA`]), the normalised rows are
//! half the bytes, written once and read by every product as they are: the float32 output, its
//! reading and the packing (three times over for q, k and v) are saved. The values are those
//! of the float32 kernel rounded as the products round them (`vcvtne2ps2bf16`), so the products
//! give the same bits either way.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::packed_matmul::PackedA;

/// Sums run in this many lanes: lane i sums values i, i + 16, …
const LANES: usize = 16;

/// Σ f(v) over `row` in [`LANES`] lanes, reduced in a fixed order: the same sums whatever the
/// vector width the compiler gives the loop.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// The row's mean and 1/√(variance + eps) (biased variance, from the deviations).
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len().max(1) as f32;
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `out = (x − mean)·rstd·γ + β` for each row of `x` (rows of `gamma.len()` values).
#[inline(always)]
fn rows_body(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let n = gamma.len();
    for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let (mean, rstd) = moments(x, eps);
        for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
            *o = (v - mean) * rstd * g + b;
        }
    }
}

/// [`rows_body`] compiled for AVX2 (the same operations in the same order: the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    rows_body(x, gamma, beta, eps, out)
}

/// [`rows_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    rows_body(x, gamma, beta, eps, out)
}

fn rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::avx512() {
            // SAFETY: AVX-512F checked.
            return unsafe { rows_avx512(x, gamma, beta, eps, out) };
        }
        if super::avx2() {
            // SAFETY: AVX2 and FMA checked.
            return unsafe { rows_avx2(x, gamma, beta, eps, out) };
        }
    }
    rows_body(x, gamma, beta, eps, out)
}

/// Rows a task normalises: enough to amortise the task (a row of 320 values is a few hundred
/// cycles), few enough to spread a 16²-latent call's rows over the threads.
const TASK_ROWS: usize = 64;

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = operands(x, lx, g, lg, b, lb)?;
        let n = gamma.len();
        // every row is written
        let mut out = super::output_buffer(x.len());
        if n > 0 {
            out.par_chunks_mut(TASK_ROWS * n)
                .zip(x.par_chunks(TASK_ROWS * n))
                .for_each(|(out, x)| rows(x, gamma, beta, self.eps, out));
        }
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// The float32 input, γ and β of a LayerNorm op, checked to fit.
fn operands<'a>(
    x: &'a CpuStorage,
    lx: &Layout,
    g: &'a CpuStorage,
    lg: &Layout,
    b: &'a CpuStorage,
    lb: &Layout,
) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
    let (x, gamma, beta) = (
        super::f32_of(x, lx, "layer norm input")?,
        super::f32_of(g, lg, "layer norm weight")?,
        super::f32_of(b, lb, "layer norm bias")?,
    );
    let n = *lx.shape().dims().last().unwrap_or(&0);
    if gamma.len() != n || beta.len() != n {
        candle_core::bail!("layer norm: input {:?}, weight {}, bias {}", lx.shape().dims(), gamma.len(), beta.len());
    }
    Ok((x, gamma, beta))
}

/// Whether the CPU kernel takes `x` (float32 on the CPU, on a path with kernels).
fn applies(x: &Tensor) -> bool {
    super::on_cpu(x.device()) && x.dtype() == DType::F32 && x.rank() > 0
}

/// γ or β as float32 (they may be kept narrower).
fn as_f32(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        Ok(t.clone())
    } else {
        t.to_dtype(DType::F32)
    }
}

/// `nn.LayerNorm` over the last dimension of `x`, with its scale `weight` and shift `bias`:
/// the CPU kernel for float32 inputs on the CPU, candle's op elsewhere.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !applies(x) {
        let x = x.contiguous()?;
        return candle_nn::ops::layer_norm(&x, weight, bias, eps as f32);
    }
    let x = super::copy::contiguous(x)?;
    x.apply_op3_no_bwd(&as_f32(weight)?.contiguous()?, &as_f32(bias)?.contiguous()?, &LayerNormOp { eps: eps as f32 })
}

/// [`layer_norm`] of `x` (…, k) rounded to bfloat16 as the products on AMX tiles round their
/// input, laid out as their A tiles (rows: all of `x`'s leading dimensions): for the linear
/// layers that read it ([`super::linear::PackedLinear::forward_tiles`]). `None` where the
/// products are not on tiles, or `x` is not float32 on the CPU.
pub fn layer_norm_tiles(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<PackedA>> {
    #[cfg(target_arch = "x86_64")]
    if applies(x) && super::amx() {
        let k = x.dim(candle_core::D::Minus1)?;
        let (gamma, beta) = (as_f32(weight)?.to_vec1::<f32>()?, as_f32(bias)?.to_vec1::<f32>()?);
        if gamma.len() != k || beta.len() != k {
            candle_core::bail!("layer norm: input {:?}, weight {}, bias {}", x.dims(), gamma.len(), beta.len());
        }
        let x = super::copy::contiguous(x)?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { return Ok(None) };
        let x = super::f32_of(cpu, layout, "layer norm input")?;
        return Ok(Some(tiles::normalize(x, k, &gamma, &beta, eps as f32)));
    }
    let _ = (x, weight, bias, eps);
    Ok(None)
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::super::aligned::Aligned;
    use super::super::bf16::Half;
    use super::super::packed_matmul::PackedA;

    /// Rows (and pairs) of a tile; u32 in a tile.
    const T: usize = 16;
    const TILE: usize = T * T;

    /// Row groups of 16 a task normalises.
    const TASK_GROUPS: usize = 4;

    /// The rows of `x` (k values each) normalised and rounded into A tiles
    /// `[16-row group][depth tile][row][16 pairs]`, pairs past k/2 and rows past the last zero.
    pub(super) fn normalize(x: &[f32], k: usize, gamma: &[f32], beta: &[f32], eps: f32) -> PackedA {
        let m = x.len().checked_div(k).unwrap_or(0);
        let tiles = k.div_ceil(2).div_ceil(T);
        let group = tiles * TILE;
        // SAFETY: every element is written below: each row's tiles in full (zeros past k), and
        // the rows past m of the last group zeroed.
        let mut pairs = unsafe { Aligned::<u32>::uninit(m.div_ceil(T) * group) };
        pairs.par_chunks_mut((TASK_GROUPS * group).max(1)).enumerate().for_each(|(task, out)| {
            for (g, out) in out.chunks_mut(group).enumerate() {
                let first = (task * TASK_GROUPS + g) * T;
                for r in 0..T {
                    let row = first + r;
                    if row < m {
                        // SAFETY: AMX implies AVX-512F/BW and AVX512_BF16 (the path's check);
                        // `out` holds the group's tiles.
                        unsafe { row_tiles(&x[row * k..][..k], gamma, beta, eps, out.as_mut_ptr().add(r * T), tiles) };
                    } else {
                        for t in 0..tiles {
                            out[t * TILE + r * T..][..T].fill(0);
                        }
                    }
                }
            }
        });
        PackedA { data: Vec::new(), pairs, half: Some(Half::Bf16), tiles: true, m, k }
    }

    /// One row into its tile rows (`dst` at the row's first, tiles 256 u32 apart): 32 values of
    /// the float32 kernel's formula a tile row, rounded by `vcvtne2ps2bf16` as `pack_rows`
    /// rounds them.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn row_tiles(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, dst: *mut u32, tiles: usize) {
        let k = x.len();
        let (mean, rstd) = super::moments(x, eps);
        let (mv, rv) = (_mm512_set1_ps(mean), _mm512_set1_ps(rstd));
        let mask = |n: usize| if n >= T { 0xffff } else { ((1u32 << n) - 1) as __mmask16 };
        for t in 0..tiles {
            let mut half = [_mm512_setzero_ps(); 2];
            for (h, v) in half.iter_mut().enumerate() {
                let at = 32 * t + 16 * h;
                let m = mask(k.saturating_sub(at));
                if m == 0 {
                    continue;
                }
                // masked lanes are not read: the row may end here
                let load = |p: &[f32]| _mm512_maskz_loadu_ps(m, p.as_ptr().wrapping_add(at));
                let d = _mm512_mul_ps(_mm512_sub_ps(load(x), mv), rv);
                *v = _mm512_maskz_mov_ps(m, _mm512_add_ps(_mm512_mul_ps(d, load(gamma)), load(beta)));
            }
            let pairs = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(half[1], half[0]));
            _mm512_storeu_si512(dst.add(t * TILE) as *mut __m512i, pairs);
        }
    }
}
