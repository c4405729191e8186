//! GroupNorm, optionally followed by SiLU, in one pass per group on the CPU.
//!
//! candle's `GroupNorm` takes about eight passes over the activations (mean, subtract, square,
//! sum, divide, scale, shift, each allocating), and the SiLU that follows almost every GroupNorm
//! in this model is a ninth. Here each (image, group) block is read twice (mean and variance
//! together, chunk by chunk, then the normalised output) by one thread of a parallel loop, where
//! it lies (a permuted view is read in place, row by row).
//! Statistics are accumulated in f64, which is at least as accurate as PyTorch's float32 kernel. Other devices and dtypes use candle's ops.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Σ x (or Σ (x − m)² when `squares`) over a short chunk, in eight lanes where AVX2 is present.
fn sum(xs: &[f32], m: f32, squares: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: AVX2 and FMA checked.
        return unsafe { simd::sum(xs, m, squares) };
    }
    if squares {
        xs.iter().map(|&v| (v - m) * (v - m)).sum()
    } else {
        xs.iter().sum()
    }
}

/// Values per chunk of [`mean_and_variance`]: read twice while in L1.
const STAT_CHUNK: usize = 512;

/// Mean and (biased) variance of the values of `rows` in one pass over memory: per chunk of at
/// most [`STAT_CHUNK`] values of a row its mean and squared deviations from that mean (two
/// passes over a chunk in L1, so no cancellation when |mean| ≫ std), merged in f64 (Chan et
/// al.'s pairwise update). Reading the group once for both, instead of once for the mean and
/// again for the deviations, matters where a group outgrows the cache (a temporal layer's group
/// at 128 frames is 5 MB).
fn mean_and_variance<'a>(rows: impl Iterator<Item = &'a [f32]>) -> (f64, f64) {
    let (mut n, mut mean, mut m2) = (0f64, 0f64, 0f64);
    for c in rows.flat_map(|row| row.chunks(STAT_CHUNK)) {
        let nc = c.len() as f64;
        let mc = sum(c, 0.0, false) as f64 / nc;
        // deviations from the f32 chunk mean m′, moved to the f64 one: Σ(x − mc)² = Σ(x − m′)² − n(mc − m′)²
        let m32 = mc as f32;
        let m2c = (sum(c, m32, true) as f64 - nc * (mc - m32 as f64).powi(2)).max(0.0);
        let total = n + nc;
        let delta = mc - mean;
        mean += delta * nc / total;
        m2 += m2c + delta * delta * n * nc / total;
        n = total;
    }
    (mean, if n > 0.0 { m2 / n } else { 0.0 })
}

/// Where one image's channel lies in a strided input: its spatial dimensions merged
/// ([`super::copy::merged`]) into rows of `row` contiguous floats, `rows` of them, at the
/// offsets the outer spatial dimensions give.
struct ChannelRows {
    row: usize,
    rows: usize,
    outer_dims: Vec<usize>,
    outer_strides: Vec<usize>,
}

impl ChannelRows {
    /// The rows of a (batch, channels, ...) layout, or None where the last spatial dimension is
    /// itself strided.
    fn of(dims: &[usize], strides: &[usize]) -> Option<Self> {
        let (d, s) = super::copy::merged(&dims[2..], &strides[2..]);
        let last = d.len() - 1;
        (s[last] == 1).then(|| ChannelRows {
            row: d[last],
            rows: d[..last].iter().product(),
            outer_dims: d[..last].to_vec(),
            outer_strides: s[..last].to_vec(),
        })
    }

    /// The channel's rows in order, from its first float at `base`.
    fn iter<'a>(&'a self, x: &'a [f32], base: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        (0..self.rows).map(move |r| {
            let at = super::copy::offset_of(r, &self.outer_dims, &self.outer_strides, base);
            &x[at..at + self.row]
        })
    }
}

/// `o = x·scale + shift`, then SiLU when `silu`.
fn normalize(o: &mut [f32], xs: &[f32], scale: f32, shift: f32, silu: bool) {
    #[cfg(target_arch = "x86_64")]
    let done = if super::avx2() {
        // SAFETY: AVX2 and FMA checked; equal lengths.
        unsafe { simd::normalize(o, xs, scale, shift, silu) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (o, &v) in o.iter_mut().zip(xs).skip(done) {
        let y = v * scale + shift;
        *o = if silu { y / (1.0 + (-y).exp()) } else { y };
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sum(xs: &[f32], m: f32, squares: bool) -> f32 {
        let n = xs.len() / 16 * 16;
        let p = xs.as_ptr();
        let mv = _mm256_set1_ps(m);
        let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..n).step_by(16) {
            let (x0, x1) = (_mm256_loadu_ps(p.add(i)), _mm256_loadu_ps(p.add(i + 8)));
            if squares {
                let (d0, d1) = (_mm256_sub_ps(x0, mv), _mm256_sub_ps(x1, mv));
                a = _mm256_fmadd_ps(d0, d0, a);
                b = _mm256_fmadd_ps(d1, d1, b);
            } else {
                a = _mm256_add_ps(a, x0);
                b = _mm256_add_ps(b, x1);
            }
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a, b));
        let mut s: f32 = lanes.iter().sum();
        for &v in &xs[n..] {
            s += if squares { (v - m) * (v - m) } else { v };
        }
        s
    }

    /// Every value, the tail too (through a padded copy), with the same vector arithmetic: a
    /// value's result does not depend on where its row starts (GroupNorm applied in bands of
    /// rows equals the whole one bit for bit).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn normalize(o: &mut [f32], xs: &[f32], scale: f32, shift: f32, silu: bool) -> usize {
        let len = xs.len().min(o.len());
        let n = len / 8 * 8;
        let (sv, hv) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift));
        let one = |x: __m256| {
            let y = _mm256_fmadd_ps(x, sv, hv);
            if silu {
                super::super::vmath::silu(y)
            } else {
                y
            }
        };
        for i in (0..n).step_by(8) {
            _mm256_storeu_ps(o.as_mut_ptr().add(i), one(_mm256_loadu_ps(xs.as_ptr().add(i))));
        }
        if n < len {
            let mut tail = [0f32; 8];
            tail[..len - n].copy_from_slice(&xs[n..len]);
            _mm256_storeu_ps(tail.as_mut_ptr(), one(_mm256_loadu_ps(tail.as_ptr())));
            o[n..len].copy_from_slice(&tail[..len - n]);
        }
        len
    }
}

/// One channel's `y = (x − mean)·inv_std·gamma + beta` as `y = x·scale + shift`: the same f32
/// pair wherever the statistics were taken, so a norm applied in bands ([`AffineOp`]) equals
/// the whole one.
fn channel_affine(mean: f64, var: f64, eps: f64, gamma: f32, beta: f32) -> (f32, f32) {
    let inv_std = 1.0 / (var + eps).sqrt();
    ((inv_std * gamma as f64) as f32, (beta as f64 - mean * inv_std * gamma as f64) as f32)
}

/// A GroupNorm op's operands, checked: the input's rows per (image, channel) where they lie, and
/// the weights.
struct Operands<'a> {
    x: &'a [f32],
    rows: ChannelRows,
    gamma: &'a [f32],
    beta: &'a [f32],
    /// The first float of image 0, channel 0, and the steps between images and channels.
    start: usize,
    image: usize,
    channel: usize,
}

impl<'a> Operands<'a> {
    fn of(
        op: &str,
        (x, lx): (&'a CpuStorage, &Layout),
        (gamma, lg): (&'a CpuStorage, &Layout),
        (beta, lb): (&'a CpuStorage, &Layout),
    ) -> Result<Self> {
        let (Some((g0, g1)), Some((b0, b1))) = (lg.contiguous_offsets(), lb.contiguous_offsets()) else {
            candle_core::bail!("{op} needs contiguous weights");
        };
        let (dims, strides) = (lx.dims(), lx.stride());
        // The input is read where it lies: a permuted activation (the per-video view of the
        // per-frame layout before a temporal layer) needs no contiguous copy first.
        let Some(rows) = ChannelRows::of(dims, strides) else {
            candle_core::bail!("{op} needs rows of contiguous values");
        };
        Ok(Self {
            x: x.as_slice::<f32>()?,
            rows,
            gamma: &gamma.as_slice::<f32>()?[g0..g1],
            beta: &beta.as_slice::<f32>()?[b0..b1],
            start: lx.start_offset(),
            image: strides[0],
            channel: strides[1],
        })
    }

    /// The rows of one image's channel.
    fn channel_rows(&self, image: usize, channel: usize) -> impl Iterator<Item = &[f32]> + '_ {
        self.rows.iter(self.x, self.start + image * self.image + channel * self.channel)
    }

    /// Each channel of one image's group with its scale and shift ([`channel_affine`]).
    fn group_affine(
        &self,
        image: usize,
        channels: std::ops::Range<usize>,
        eps: f64,
    ) -> impl Iterator<Item = (usize, f32, f32)> + '_ {
        let (mean, var) = mean_and_variance(channels.clone().flat_map(|ch| self.channel_rows(image, ch)));
        channels.map(move |ch| {
            let (scale, shift) = channel_affine(mean, var, eps, self.gamma[ch], self.beta[ch]);
            (ch, scale, shift)
        })
    }
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
        let ops = Operands::of("group-norm-silu", (x, lx), (gamma, lg), (beta, lb))?;
        let dims = lx.dims();
        let (n, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let per_group = c / self.groups;
        // every channel of every group is normalised into it
        let mut out = super::output_buffer(n * c * spatial);
        out.par_chunks_mut((per_group * spatial).max(1)).enumerate().for_each(|(i, out)| {
            let (image, group) = (i / self.groups, i % self.groups);
            let channels = ops.group_affine(image, group * per_group..(group + 1) * per_group, self.eps);
            for ((ch, scale, shift), out) in channels.zip(out.chunks_mut(spatial.max(1))) {
                for (o, xs) in out.chunks_mut(ops.rows.row).zip(ops.channel_rows(image, ch)) {
                    normalize(o, xs, scale, shift, self.silu);
                }
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// The statistics half of GroupNorm: per (image, channel) the scale and shift that normalise
/// `x`, as a (batch, channels, 2) tensor.
struct StatisticsOp {
    groups: usize,
    eps: f64,
}

impl CustomOp3 for StatisticsOp {
    fn name(&self) -> &'static str {
        "group-norm-statistics"
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
        let ops = Operands::of("group-norm-statistics", (x, lx), (gamma, lg), (beta, lb))?;
        let (n, c) = (lx.dims()[0], lx.dims()[1]);
        let per_group = c / self.groups;
        let mut out = vec![0f32; n * c * 2];
        out.par_chunks_mut(2 * per_group).enumerate().for_each(|(i, out)| {
            let (image, group) = (i / self.groups, i % self.groups);
            let channels = ops.group_affine(image, group * per_group..(group + 1) * per_group, self.eps);
            for ((_, scale, shift), pair) in channels.zip(out.chunks_mut(2)) {
                (pair[0], pair[1]) = (scale, shift);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, 2))))
    }
}

/// `y = x·scale + shift` per (image, channel), then SiLU when `silu`: GroupNorm's second half,
/// on any rows of the tensor whose statistics were taken ([`group_norm_statistics`]).
struct AffineOp {
    silu: bool,
}

impl candle_core::CustomOp2 for AffineOp {
    fn name(&self) -> &'static str {
        "group-norm-affine"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, affine: &CpuStorage, la: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a0, a1)) = la.contiguous_offsets() else {
            candle_core::bail!("group-norm-affine needs a contiguous scale and shift");
        };
        let (dims, strides) = (lx.dims(), lx.stride());
        let Some(rows) = ChannelRows::of(dims, strides) else {
            candle_core::bail!("group-norm-affine needs rows of contiguous values");
        };
        let x = x.as_slice::<f32>()?;
        let affine = &affine.as_slice::<f32>()?[a0..a1];
        let (n, c) = (dims[0], dims[1]);
        if affine.len() != n * c * 2 {
            candle_core::bail!("group-norm-affine: {} values of scale and shift for {n}×{c} channels", affine.len());
        }
        let spatial: usize = dims[2..].iter().product();
        // every channel of every image is written
        let mut out = super::output_buffer(n * c * spatial);
        out.par_chunks_mut(spatial.max(1)).enumerate().for_each(|(i, out)| {
            let (image, ch) = (i / c, i % c);
            let base = lx.start_offset() + image * strides[0] + ch * strides[1];
            for (o, xs) in out.chunks_mut(rows.row).zip(rows.iter(x, base)) {
                normalize(o, xs, affine[2 * i], affine[2 * i + 1], self.silu);
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// GroupNorm's statistics over all of `x` (batch, channels, ...): per (image, channel) the
/// scale and shift ((batch, channels, 2), float32) that [`group_norm_apply`] applies to any
/// rows of `x`. The two together equal [`group_norm`] on every value.
pub fn group_norm_statistics(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    if c % groups != 0 {
        candle_core::bail!("{c} channels do not split into {groups} groups");
    }
    if super::on_cpu(x.device()) && x.dtype() == DType::F32 && gamma.dtype() == DType::F32 && beta.dtype() == DType::F32
    {
        let x = match ChannelRows::of(x.dims(), x.stride()) {
            Some(_) => x.clone(),
            None => super::copy::contiguous(x)?,
        };
        return x.apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &StatisticsOp { groups, eps });
    }
    // Any other device or dtype: candle's ops, in float32 (float64 for float64).
    let internal = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let xs = x.reshape((n, groups, ()))?.to_dtype(internal)?;
    let mean = xs.mean_keepdim(2)?;
    let var = xs.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    // (n, groups, 1) → (n, c): each group's value for each of its channels
    let per_channel = |t: &Tensor| t.broadcast_as((n, groups, c / groups))?.reshape((n, c));
    let (mean, inv_std) = (per_channel(&mean)?, per_channel(&inv_std)?);
    let scale = inv_std.broadcast_mul(&gamma.to_dtype(internal)?.reshape((1, c))?)?;
    let shift = beta.to_dtype(internal)?.reshape((1, c))?.broadcast_sub(&mean.mul(&scale)?)?;
    Tensor::stack(&[scale, shift], 2)?.to_dtype(DType::F32)
}

/// `x`'s values normalised with `affine` from [`group_norm_statistics`] (of a tensor of which
/// `x` may be any rows), then SiLU when `silu`.
pub fn group_norm_apply(x: &Tensor, affine: &Tensor, silu: bool) -> Result<Tensor> {
    if super::on_cpu(x.device()) && x.dtype() == DType::F32 {
        let x = match ChannelRows::of(x.dims(), x.stride()) {
            Some(_) => x.clone(),
            None => super::copy::contiguous(x)?,
        };
        return x.apply_op2_no_bwd(&affine.contiguous()?, &AffineOp { silu });
    }
    let mut shape = vec![x.dim(0)?, x.dim(1)?];
    shape.resize(x.rank(), 1);
    let scale = affine.narrow(2, 0, 1)?.reshape(shape.clone())?.to_dtype(x.dtype())?;
    let shift = affine.narrow(2, 1, 1)?.reshape(shape)?.to_dtype(x.dtype())?;
    let y = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}

/// GroupNorm over `x` (batch, channels, ...), then SiLU when `silu`.
pub fn group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    if c % groups != 0 {
        candle_core::bail!("{c} channels do not split into {groups} groups");
    }
    if super::on_cpu(x.device()) && x.dtype() == DType::F32 && gamma.dtype() == DType::F32 && beta.dtype() == DType::F32
    {
        // read in place when its spatial values lie in rows, else copied first
        let x = match ChannelRows::of(x.dims(), x.stride()) {
            Some(_) => x.clone(),
            None => super::copy::contiguous(x)?,
        };
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
