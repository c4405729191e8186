//! Attention layers shared by the spatial and the temporal transformers: diffusers' `Attention`
//! (with the default scaled-dot-product processor), `FeedForward` with GEGLU, and
//! `BasicTransformerBlock` in its `layer_norm` form.
//!
//! candle-transformers' Stable Diffusion `BasicTransformerBlock` is private and its GEGLU uses the
//! tanh approximation of GELU, where diffusers' uses the exact one; these mirror diffusers.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::long_video::WindowPlan;
use crate::nn::{
    accumulate_window, add_windows, contiguous, geglu_projection, layer_norm, linear, linear_no_bias,
    multi_head_attention, multi_head_attention_windows, Activations, LayerNorm, Linear, PreparedLinear, ValueProduct,
};

/// `Attention(query_dim, cross_attention_dim, heads, dim_head)`: q from the hidden states, k and
/// v from the context (cross-attention) or from the hidden states (self-attention).
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// Bfloat16 or float16 where the weights are (`--dtype bf16`, `--dtype f16`): see
    /// [`ValueProduct`].
    values: ValueProduct,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> candle_core::Result<Self> {
        let inner = heads * dim_head;
        let context_dim = context_dim.unwrap_or(query_dim);
        let to_v = linear_no_bias(context_dim, inner, vb.pp("to_v"))?;
        // (a float16 weight packed at load is a `--dtype f16` run's: a float32 run of float16
        // weights keeps them as tensors, widened per call)
        let values = match to_v.weight_dtype() {
            DType::BF16 => ValueProduct::Bfloat16,
            DType::F16 if to_v.is_packed() => ValueProduct::Float16,
            _ => ValueProduct::Float32,
        };
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
            values,
        })
    }

    /// This attention with its weights packed once for many calls when `pack` (see
    /// [`Linear::prepare`]), else packed per call.
    pub fn prepare(&self, pack: bool) -> candle_core::Result<PreparedAttention<'_>> {
        Ok(PreparedAttention {
            to_q: self.to_q.prepare(pack)?,
            to_k: self.to_k.prepare(pack)?,
            to_v: self.to_v.prepare(pack)?,
            to_out: self.to_out.prepare(pack)?,
            heads: self.heads,
            scale: self.scale,
            values: self.values,
        })
    }
}

/// An [`Attention`] ready to run ([`Attention::prepare`]).
pub struct PreparedAttention<'a> {
    to_q: PreparedLinear<'a>,
    to_k: PreparedLinear<'a>,
    to_v: PreparedLinear<'a>,
    to_out: PreparedLinear<'a>,
    heads: usize,
    scale: f64,
    values: ValueProduct,
}

impl PreparedAttention<'_> {
    /// `xs`: (batch, tokens, query_dim). `context`: (batch / repeat, context_tokens, context_dim),
    /// used for every `repeat` consecutive batch rows (the frames of one video share its prompt:
    /// projecting it once per video gives the same k and v as diffusers' per-frame copies).
    /// `residual` (shaped as the output) is added as `to_out` writes its product
    /// ([`crate::nn::Linear::forward_residual`]).
    pub fn forward_residual(
        &self,
        xs: &Activations,
        context: Option<(&Tensor, usize)>,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.to_out.forward_residual(&self.attend(xs, context)?, residual)
    }

    /// Whether every projection of `xs` (q, and k and v without a `context`) reads a LayerNorm's
    /// output in AMX tiles ([`LayerNorm::forward_rows`]).
    fn takes_tiles(&self, cross: bool) -> bool {
        self.to_q.takes_tiles() && (cross || (self.to_k.takes_tiles() && self.to_v.takes_tiles()))
    }

    /// The heads (batch, tokens, inner) before `to_out`: q from `xs`, k and v from `context`
    /// (cross-attention) or from `xs`.
    fn attend(&self, xs: &Activations, context: Option<(&Tensor, usize)>) -> candle_core::Result<Tensor> {
        let q = self.to_q.forward_activations(xs)?;
        let (k, v, repeat) = match context {
            Some((source, repeat)) => (self.to_k.forward(source)?, self.to_v.forward(source)?, repeat),
            None => (self.to_k.forward_activations(xs)?, self.to_v.forward_activations(xs)?, 1),
        };
        multi_head_attention(&q, &k, &v, self.heads, self.scale, repeat, self.values)
    }

    /// Self-attention's heads (batch, tokens, inner) before `to_out`.
    fn heads(&self, xs: &Activations) -> candle_core::Result<Tensor> {
        self.attend(xs, None)
    }
}

/// Rows of a group of FreeNoise windows that make the products efficient (B streams from
/// memory once per block of rows: a few thousand rows amortise it).
const GROUP_ROWS: usize = 4096;
/// Bytes of one activation of a group of windows at most, so that a group's intermediates stay
/// small beside a long video's activations.
const GROUP_BYTES: usize = 16 << 20;

/// How many windows of `window_rows` rows (sequences × frames) of `width` channels run together.
fn windows_per_group(window_rows: usize, width: usize) -> usize {
    let by_rows = GROUP_ROWS.div_ceil(window_rows.max(1));
    let by_bytes = GROUP_BYTES / (window_rows * width * std::mem::size_of::<f32>()).max(1);
    by_rows.min(by_bytes).max(1)
}

/// `FeedForward(dim, activation_fn="geglu", mult=4)`.
#[derive(Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> candle_core::Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: geglu_projection(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

/// Token rows of the feed-forward computed at once: its hidden layer is 8× the width
/// (4× after GEGLU), so level 0 of a 16-frame guided step would otherwise hold over 1 GB there.
const FF_ROWS: usize = 8192;

impl FeedForward {
    fn prepare(&self, pack: bool) -> candle_core::Result<PreparedFeedForward<'_>> {
        Ok(PreparedFeedForward { proj: self.proj.prepare_geglu(pack)?, out: self.out.prepare(pack)? })
    }
}

struct PreparedFeedForward<'a> {
    proj: PreparedLinear<'a>,
    out: PreparedLinear<'a>,
}

impl PreparedFeedForward<'_> {
    /// The feed-forward of `norm(xs)` plus `xs`, added as the second projection writes its
    /// product ([`crate::nn::Linear::forward_residual`]), over chunks of [`FF_ROWS`] rows (the
    /// norm too: it acts on each row alone), each with its rows of the residual.
    fn forward_residual(&self, norm: &LayerNorm, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let width = *dims.last().unwrap();
        let rows = xs.elem_count() / width;
        let flat = xs.reshape((rows, width))?;
        let tiles = self.proj.takes_geglu_tiles();
        let mut outs = Vec::with_capacity(rows.div_ceil(FF_ROWS));
        for start in (0..rows).step_by(FF_ROWS) {
            let len = FF_ROWS.min(rows - start);
            let chunk = flat.narrow(0, start, len)?;
            // GEGLU: value * gelu(gate), with the exact (erf) GELU as F.gelu.
            let normed = norm.forward_rows(&chunk, tiles)?;
            let gated = self.proj.forward_geglu_activations(&normed, self.out.takes_tiles())?;
            drop(normed);
            outs.push(self.out.forward_residual_activations(&gated, &chunk)?);
        }
        let out = if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(&outs, 0)? };
        out.reshape(dims)
    }
}

/// What the second attention of a `BasicTransformerBlock` attends to.
#[derive(Debug, Clone, Copy)]
pub enum SecondAttention {
    /// Cross-attention to the text embeddings of this width.
    Cross(usize),
    /// Self-attention again (`double_self_attention`, as the temporal transformers use).
    SelfAgain,
}

/// `BasicTransformerBlock` with `norm_type="layer_norm"`: self-attention, then cross- or
/// self-attention, then GEGLU feed-forward, each pre-normed and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        second: SecondAttention,
    ) -> candle_core::Result<Self> {
        let context_dim = match second {
            SecondAttention::Cross(d) => Some(d),
            SecondAttention::SelfAgain => None,
        };
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, dim_head)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, dim_head)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    /// This block with the weights of its linear layers packed once for many calls when `pack`
    /// (a caller that runs it on many chunks, or FreeNoise's windows), else packed per call.
    pub fn prepare(&self, pack: bool) -> candle_core::Result<PreparedBlock<'_>> {
        Ok(PreparedBlock {
            block: self,
            attn1: self.attn1.prepare(pack)?,
            attn2: self.attn2.prepare(pack)?,
            ff: self.ff.prepare(pack)?,
        })
    }
}

/// A [`BasicTransformerBlock`] ready to run ([`BasicTransformerBlock::prepare`]).
pub struct PreparedBlock<'a> {
    block: &'a BasicTransformerBlock,
    attn1: PreparedAttention<'a>,
    attn2: PreparedAttention<'a>,
    ff: PreparedFeedForward<'a>,
}

impl PreparedBlock<'_> {
    /// `context`: the text embeddings and how many consecutive rows of `xs` share each.
    pub fn forward(&self, xs: &Tensor, context: Option<(&Tensor, usize)>) -> candle_core::Result<Tensor> {
        let b = self.block;
        let (tiles1, tiles2) = (self.attn1.takes_tiles(false), self.attn2.takes_tiles(context.is_some()));
        // each residual added as the layer's last product writes its output
        let xs = self.attn1.forward_residual(&b.norm1.forward_rows(xs, tiles1)?, None, xs)?;
        let xs = self.attn2.forward_residual(&b.norm2.forward_rows(&xs, tiles2)?, context, &xs)?;
        self.ff.forward_residual(&b.norm3, &xs)
    }

    /// diffusers' `FreeNoiseTransformerBlock.forward` for a self-attention-only block: `xs`
    /// (sequences, frames, C); the attentions run per window of `plan`, each window's output is
    /// weighted per frame and accumulated (in window order, as the reference adds), the sums are
    /// divided by the per-frame weight sums, then norm3 and the feed-forward run on every frame.
    /// Only one group of windows' intermediates, attn1's projections and the per-frame sums (of
    /// the hidden states and of attn2's heads) are held besides the input; attn1 reads each
    /// window of its projections in place, and each window's outputs are added into the sums in
    /// place.
    pub fn forward_windowed(&self, xs: &Tensor, plan: &WindowPlan) -> candle_core::Result<Tensor> {
        let (n, frames, c) = xs.dims3()?;
        if frames != plan.frames {
            candle_core::bail!("the window plan is for {} frames, the sequences have {frames}", plan.frames)
        }
        // attn1's LayerNorm and its q, k and v act on each frame's token alone, so they are the
        // same in every window that holds the frame: computed once for all frames and narrowed
        // per window (the reference recomputes them per window: the same numbers, 3/8 of the
        // windowed projections saved). What follows attn1 depends on its window.
        let (b, a1, a2) = (self.block, &self.attn1, &self.attn2);
        let normed = b.norm1.forward_rows(xs, a1.takes_tiles(false))?;
        let (q, k, v) = (
            a1.to_q.forward_activations(&normed)?,
            a1.to_k.forward_activations(&normed)?,
            a1.to_v.forward_activations(&normed)?,
        );
        drop(normed);
        // The reference adds each window's `attn2.to_out(heads) + hidden`, weighted. `to_out` is
        // affine, so Σ wᵢ·(W·headsᵢ + b) = W·(Σ wᵢ·headsᵢ) + (Σ wᵢ)·b: the heads' outputs are
        // summed apart and projected once (1/5 of the windowed products saved; the same sum in
        // another rounding order). The sums start from (Σ wᵢ)·b per frame, the weights actually
        // applied (they differ from the divisor on the tail window's frames).
        let to_out = a2.to_out.layer();
        let sums = match to_out.bias() {
            Some(bias) => {
                let applied = Tensor::from_slice(&plan.applied_sums, (frames, 1), xs.device())?.to_dtype(xs.dtype())?;
                let per_frame = applied.broadcast_mul(&bias.to_dtype(xs.dtype())?.reshape((1, c))?)?;
                contiguous(&per_frame.reshape((1, frames, c))?.broadcast_as((n, frames, c))?)?
            }
            None => Tensor::zeros((n, frames, c), xs.dtype(), xs.device())?,
        };
        let inner = to_out.in_dim();
        let head_sums = Tensor::zeros((n, frames, inner), xs.dtype(), xs.device())?;
        // Windows run in groups stacked along the sequences: every layer between the two
        // attentions acts on each sequence (or token) alone, so a group's products are those of
        // its windows one by one (the same numbers), with enough rows to run at full speed where
        // a chunk holds few sequences (the deep levels: 128 rows a window at 4×4 latents).
        let group = windows_per_group(n * plan.length, c.max(inner));
        let xs = contiguous(xs)?;
        for windows in plan.windows.chunks(group) {
            // the group's windows attended straight into one stacked tensor, the residual added
            // in place from the windows of `xs`: no copies of either
            let starts: Vec<usize> = windows.iter().map(|w| w.start).collect();
            let heads = multi_head_attention_windows(&q, &k, &v, a1.heads, a1.scale, &starts, plan.length, a1.values)?;
            let hidden = a1.to_out.forward(&heads)?;
            drop(heads);
            add_windows(&hidden, &xs, &starts)?;
            let heads = a2.heads(&b.norm2.forward_rows(&hidden, a2.takes_tiles(false))?)?;
            // added window by window, in the reference's order
            for (i, window) in windows.iter().enumerate() {
                let part = |t: &Tensor| t.narrow(0, i * n, n);
                accumulate_window(&sums, &part(&hidden)?, window.start, window.skip, &plan.weights)?;
                accumulate_window(&head_sums, &part(&heads)?, window.start, window.skip, &plan.weights)?;
            }
        }
        drop((q, k, v));
        let sums = to_out.accumulate_without_bias(sums, &head_sums)?;
        drop(head_sums);
        // A true division, as the reference's `accumulated / num_times_accumulated`.
        let divisor = Tensor::from_slice(&plan.weight_sums, (1, frames, 1), xs.device())?.to_dtype(xs.dtype())?;
        let xs = sums.broadcast_div(&divisor)?;
        drop(sums);
        debug_assert_eq!(xs.dims(), &[n, frames, c]);
        self.ff.forward_residual(&b.norm3, &xs)
    }
}
