//! The layers every network here is built from. Weight matrices and kernels may be kept in the
//! narrower dtype they are stored in (float16 checkpoints) and are widened to the compute dtype
//! one layer at a time, as they are used: the same numbers as widening them all at load time,
//! in half the memory.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};

/// Floating-point operations of the matrix products and convolutions run so far (2 per
/// multiply-add, as torch's FLOP counter counts them): the benchmark's effective GFLOP/s.
static FLOPS: AtomicU64 = AtomicU64::new(0);

pub fn flops() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

/// Counts `n` floating-point operations of a layer of kind `kind`.
pub(crate) fn count_flops(kind: &'static str, n: usize) {
    FLOPS.fetch_add(n as u64, Ordering::Relaxed);
    if PROFILING.load(Ordering::Relaxed) {
        if let Ok(mut p) = PROFILE.lock() {
            entry(&mut p, kind).flops += n as u64;
        }
    }
}

/// Time spent per kind of layer, when profiling is on (the benchmark's `--profile`).
static PROFILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static PROFILE: std::sync::Mutex<Vec<LayerProfile>> = std::sync::Mutex::new(Vec::new());

/// Where the time of one kind of layer went.
#[derive(Debug, Clone)]
pub struct LayerProfile {
    pub kind: &'static str,
    pub seconds: f64,
    pub calls: u64,
    /// Floating-point operations of its matrix products (0 for elementwise kinds).
    pub flops: u64,
}

fn entry<'a>(p: &'a mut Vec<LayerProfile>, kind: &'static str) -> &'a mut LayerProfile {
    match p.iter().position(|e| e.kind == kind) {
        Some(i) => &mut p[i],
        None => {
            p.push(LayerProfile { kind, seconds: 0.0, calls: 0, flops: 0 });
            p.last_mut().unwrap()
        }
    }
}

pub fn set_profiling(on: bool) {
    PROFILING.store(on, Ordering::Relaxed);
}

/// Each kind of layer since profiling was turned on, slowest first.
pub fn profile() -> Vec<LayerProfile> {
    let mut p = PROFILE.lock().map(|p| p.clone()).unwrap_or_default();
    p.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    p
}

/// Runs `f`, adding its time to `kind` when profiling.
pub(crate) fn timed<T>(kind: &'static str, f: impl FnOnce() -> T) -> T {
    if !PROFILING.load(Ordering::Relaxed) {
        return f();
    }
    let started = std::time::Instant::now();
    let out = f();
    let secs = started.elapsed().as_secs_f64();
    if let Ok(mut p) = PROFILE.lock() {
        let e = entry(&mut p, kind);
        e.seconds += secs;
        e.calls += 1;
    }
    out
}

/// Widens a narrow weight to `dtype` (a no-op when it already is).
pub(crate) fn widen(w: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if w.dtype() == dtype {
        Ok(w.clone())
    } else {
        timed("widen weights", || w.to_dtype(dtype))
    }
}

/// `nn.Linear`: y = x·Wᵀ + b over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.))?;
    let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.))?;
    Ok(Linear { weight, bias: Some(bias) })
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.))?;
    Ok(Linear { weight, bias: None })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has a last dimension");
        // One matrix product over all leading dimensions, the bias added as it is written.
        let rows = x.elem_count() / in_dim;
        let y = timed("linear", || crate::kernels::linear::linear(&x.reshape((rows, in_dim))?, &self.weight, self.bias.as_ref()))?;
        count_flops("linear", 2 * rows * in_dim * y.dim(1)?);
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out_dims)
    }
}

/// `nn.Conv2d` with groups 1 and dilation 1 (all this model uses).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let weight = vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", Init::Const(0.))?;
    let bias = vb.get_with_hints(out_channels, "bias", Init::Const(0.))?;
    Ok(Conv2d { weight, bias, stride, padding })
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c_in, kh, kw) = self.weight.dims4()?;
        let kind = match (kh, self.stride) {
            (1, _) => "conv 1x1",
            (_, 1) => "conv 3x3",
            _ => "conv 3x3 stride 2",
        };
        // The kernels widen float16 weights themselves, and add the bias as they write.
        let y = timed(kind, || crate::kernels::conv::conv2d(x, &self.weight, Some(&self.bias), self.stride, self.padding))?;
        count_flops(kind, 2 * c_in * kh * kw * y.elem_count());
        Ok(y)
    }
}

/// `nn.Embedding`: rows of a table by id.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
}

pub fn embedding(count: usize, dim: usize, vb: VarBuilder) -> candle_core::Result<Embedding> {
    Ok(Embedding { table: vb.get_with_hints((count, dim), "weight", Init::Const(0.))? })
}

impl Embedding {
    /// `ids`: u32 of any shape → (..., dim) in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.table.dim(1)?);
        let rows = self.table.index_select(&ids.flatten_all()?, 0)?;
        widen(&rows, dtype)?.reshape(dims)
    }
}

pub use candle_nn::{layer_norm, LayerNorm};

/// `nn.GroupNorm(groups, channels, eps)` with its affine scale and shift.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", Init::Const(1.))?,
        bias: vb.get_with_hints(channels, "bias", Init::Const(0.))?,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// GroupNorm followed by SiLU, fused: the pair that opens every ResNet and temporal
    /// convolution stage.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        timed("group norm", || crate::kernels::group_norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true))
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        timed("group norm", || crate::kernels::group_norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false))
    }
}

/// Score-matrix elements computed at once (64 MiB of float32): attention runs over blocks of
/// (batch·heads) rows and query tokens within this budget, so no full score matrix of a long
/// sequence is held (a 32×32 latent has 1024 tokens a frame). The result is the same.
const SCORE_BUDGET: usize = 16 << 20;

/// softmax(q·kᵀ·scale)·v for (batch, tokens, head_dim) inputs (one head).
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    multi_head_attention(q, k, v, 1, scale, 1)
}

/// Attention with `heads` heads for q (batch, tokens, heads·d) and k, v (batch / repeat, keys,
/// heads·d), row b / repeat of k and v serving query row b; (batch, tokens, heads·d) out.
/// On the CPU one kernel reads the heads in place ([`crate::kernels::attention`]); elsewhere
/// the heads are split into (batch·heads, tokens, d) and [`attention_in_blocks`] runs.
pub fn multi_head_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, repeat: usize) -> candle_core::Result<Tensor> {
    let (batch, tokens, width) = q.dims3()?;
    let keys = k.dim(1)?;
    // (profile labels: cross-attention attends to another sequence than its queries')
    let kind = if keys != tokens {
        "attention (cross)"
    } else if tokens <= crate::kernels::attention::SHORT {
        "attention (short)"
    } else {
        "attention (long)"
    };
    count_flops(kind, 4 * batch * tokens * keys * width);
    timed(kind, || {
        if let Some(out) = crate::kernels::attention::multi_head_attention(q, k, v, heads, scale, repeat)? {
            return Ok(out);
        }
        let (k, v) = (repeat_interleave(k, repeat)?, repeat_interleave(v, repeat)?);
        let d = width / heads;
        let split = |x: &Tensor| -> candle_core::Result<Tensor> {
            let n = x.dim(1)?;
            x.reshape((batch, n, heads, d))?.transpose(1, 2)?.contiguous()?.reshape((batch * heads, n, d))
        };
        let out = attention_in_blocks(&split(q)?, &split(&k)?, &split(&v)?, scale, SCORE_BUDGET)?;
        out.reshape((batch, heads, tokens, d))?.transpose(1, 2)?.contiguous()?.reshape((batch, tokens, width))
    })
}

/// torch's `repeat_interleave(repeat, dim=0)` for a (batch, ...) tensor.
pub fn repeat_interleave(xs: &Tensor, repeat: usize) -> candle_core::Result<Tensor> {
    if repeat == 1 {
        return Ok(xs.clone());
    }
    let dims = xs.dims();
    let mut expanded = vec![dims[0], repeat];
    expanded.extend_from_slice(&dims[1..]);
    let mut flat = vec![dims[0] * repeat];
    flat.extend_from_slice(&dims[1..]);
    crate::kernels::copy::contiguous(&xs.unsqueeze(1)?.broadcast_as(expanded)?)?.reshape(flat)
}

/// [`scaled_dot_product_attention`] with at most `budget` scores computed at once.
pub fn attention_in_blocks(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, budget: usize) -> candle_core::Result<Tensor> {
    let (rows, tokens, _) = q.dims3()?;
    let keys = k.dim(1)?;
    {
        // The scale is applied to q (tokens × head_dim) rather than to the scores
        // (tokens × keys): the same product up to rounding, with far fewer multiplications.
        let q = (q * scale)?;
        let k_t = k.t()?.contiguous()?;
        let v = v.contiguous()?;
        let q_block = tokens.min((budget / keys).max(1));
        let row_block = rows.min((budget / (q_block * keys)).max(1));
        let mut row_outs = Vec::with_capacity(rows.div_ceil(row_block));
        for r in (0..rows).step_by(row_block) {
            let nr = row_block.min(rows - r);
            let (q_r, k_r, v_r) = (q.narrow(0, r, nr)?, k_t.narrow(0, r, nr)?, v.narrow(0, r, nr)?);
            let mut outs = Vec::with_capacity(tokens.div_ceil(q_block));
            for t in (0..tokens).step_by(q_block) {
                let nt = q_block.min(tokens - t);
                let scores = q_r.narrow(1, t, nt)?.matmul(&k_r)?;
                outs.push(candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v_r)?);
            }
            row_outs.push(if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(&outs, 1)? });
        }
        if row_outs.len() == 1 {
            Ok(row_outs.pop().unwrap())
        } else {
            Tensor::cat(&row_outs, 0)
        }
    }
}

/// SiLU, x·σ(x).
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    timed("silu", || candle_nn::ops::silu(x))
}

/// diffusers' `ResnetBlock2D` (pre-norm, SiLU, `time_embedding_norm="default"`), on each image:
/// GroupNorm–SiLU–conv, plus the projected time embedding, GroupNorm–SiLU–conv, plus the
/// (1×1-projected when the width changes) input, divided by `output_scale_factor`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    /// Width of the time embedding; `None` for the VAE, which has none.
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, in_ch: usize, out_ch: usize, cfg: ResnetConfig) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: group_norm(cfg.groups, in_ch, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(in_ch, out_ch, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: match cfg.temb_channels {
                Some(t) => Some(linear(t, out_ch, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: group_norm(cfg.groups, out_ch, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(out_ch, out_ch, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if in_ch != out_ch {
                Some(conv2d(in_ch, out_ch, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `x`: (n, C, H, W); `temb`: (n, temb_channels) when the block has a time projection.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = crate::kernels::add::add(&shortcut, &h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
