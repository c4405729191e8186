//! Attention layers shared by the spatial and the temporal transformers: diffusers' `Attention`
//! (with the default scaled-dot-product processor), `FeedForward` with GEGLU, and
//! `BasicTransformerBlock` in its `layer_norm` form.
//!
//! candle-transformers' Stable Diffusion `BasicTransformerBlock` is private and its GEGLU uses the
//! tanh approximation of GELU, where diffusers' uses the exact one; these mirror diffusers.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::long_video::WindowPlan;
use crate::nn::{
    accumulate_window, add, contiguous, geglu, layer_norm, linear, linear_no_bias, multi_head_attention,
    multi_head_attention_window, LayerNorm, Linear,
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
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
        })
    }

    /// `xs`: (batch, tokens, query_dim). `context`: (batch / repeat, context_tokens, context_dim),
    /// used for every `repeat` consecutive batch rows (the frames of one video share its prompt:
    /// projecting it once per video gives the same k and v as diffusers' per-frame copies).
    pub fn forward(&self, xs: &Tensor, context: Option<(&Tensor, usize)>) -> candle_core::Result<Tensor> {
        let q = self.to_q.forward(xs)?;
        let (source, repeat) = context.unwrap_or((xs, 1));
        let (k, v) = (self.to_k.forward(source)?, self.to_v.forward(source)?);
        self.attend_projected(&q, &k, &v, repeat)
    }

    /// The q, k and v of self-attention over `xs`, each (batch, tokens, inner): what
    /// [`Self::forward`] computes first, for callers that attend over parts of the tokens.
    pub fn project_self(&self, xs: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        Ok((self.to_q.forward(xs)?, self.to_k.forward(xs)?, self.to_v.forward(xs)?))
    }

    /// The rest of [`Self::forward`] from its projections: the heads' attention, then `to_out`.
    pub fn attend_projected(&self, q: &Tensor, k: &Tensor, v: &Tensor, repeat: usize) -> candle_core::Result<Tensor> {
        let out = multi_head_attention(q, k, v, self.heads, self.scale, repeat)?;
        self.to_out.forward(&out)
    }

    /// [`Self::attend_projected`] of self-attention within tokens [start, start + length) of
    /// every row of the projections (one FreeNoise window, read in place).
    pub fn attend_window(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: usize,
        length: usize,
    ) -> candle_core::Result<Tensor> {
        let out = multi_head_attention_window(q, k, v, self.heads, self.scale, start, length)?;
        self.to_out.forward(&out)
    }
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
        Ok(Self { proj: linear(dim, inner * 2, vb.pp("net.0.proj"))?, out: linear(inner, dim, vb.pp("net.2"))? })
    }
}

/// Token rows of the feed-forward computed at once: its hidden layer is 8× the width
/// (4× after GEGLU), so level 0 of a 16-frame guided step would otherwise hold over 1 GB there.
const FF_ROWS: usize = 8192;

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let width = *dims.last().unwrap();
        let rows = xs.elem_count() / width;
        let flat = xs.reshape((rows, width))?;
        let mut outs = Vec::with_capacity(rows.div_ceil(FF_ROWS));
        for start in (0..rows).step_by(FF_ROWS) {
            let h = self.proj.forward(&flat.narrow(0, start, FF_ROWS.min(rows - start))?)?;
            // GEGLU: value * gelu(gate), with the exact (erf) GELU as F.gelu.
            let gated = geglu(&h)?;
            outs.push(self.out.forward(&gated)?);
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

    /// `context`: the text embeddings and how many consecutive rows of `xs` share each.
    pub fn forward(&self, xs: &Tensor, context: Option<(&Tensor, usize)>) -> candle_core::Result<Tensor> {
        let xs = self.attend(xs, context)?;
        add(&self.ff.forward(&self.norm3.forward(&xs)?)?, &xs)
    }

    /// The two attentions with their residuals: everything before the feed-forward.
    fn attend(&self, xs: &Tensor, context: Option<(&Tensor, usize)>) -> candle_core::Result<Tensor> {
        let xs = add(&self.attn1.forward(&self.norm1.forward(xs)?, None)?, xs)?;
        add(&self.attn2.forward(&self.norm2.forward(&xs)?, context)?, &xs)
    }

    /// diffusers' `FreeNoiseTransformerBlock.forward` for a self-attention-only block: `xs`
    /// (sequences, frames, C); the attentions run per window of `plan`, each window's output is
    /// weighted per frame and accumulated (in window order, as the reference adds), the sums are
    /// divided by the per-frame weight sums, then norm3 and the feed-forward run on every frame.
    /// Only one window's intermediates, attn1's projections and the per-frame sums are held
    /// besides the input; attn1 reads each window of its projections in place, and each window's
    /// output is added into the sums in place.
    pub fn forward_windowed(&self, xs: &Tensor, plan: &WindowPlan) -> candle_core::Result<Tensor> {
        let (n, frames, c) = xs.dims3()?;
        if frames != plan.frames {
            candle_core::bail!("the window plan is for {} frames, the sequences have {frames}", plan.frames)
        }
        // attn1's LayerNorm and its q, k and v act on each frame's token alone, so they are the
        // same in every window that holds the frame: computed once for all frames and narrowed
        // per window (the reference recomputes them per window: the same numbers, 3/8 of the
        // windowed projections saved). What follows attn1 depends on its window.
        let (q, k, v) = self.attn1.project_self(&self.norm1.forward(xs)?)?;
        // The per-frame weighted sums, from zero as the reference's `accumulated_values`.
        let sums = Tensor::zeros((n, frames, c), xs.dtype(), xs.device())?;
        for window in &plan.windows {
            let attended = self.attn1.attend_window(&q, &k, &v, window.start, plan.length)?;
            let hidden = add(&attended, &contiguous(&xs.narrow(1, window.start, plan.length)?)?)?;
            drop(attended);
            let out = add(&self.attn2.forward(&self.norm2.forward(&hidden)?, None)?, &hidden)?;
            drop(hidden);
            accumulate_window(&sums, &out, window.start, window.skip, &plan.weights)?;
        }
        drop((q, k, v));
        // A true division, as the reference's `accumulated / num_times_accumulated`.
        let divisor = Tensor::from_slice(&plan.weight_sums, (1, frames, 1), xs.device())?.to_dtype(xs.dtype())?;
        let xs = sums.broadcast_div(&divisor)?;
        drop(sums);
        debug_assert_eq!(xs.dims(), &[n, frames, c]);
        add(&self.ff.forward(&self.norm3.forward(&xs)?)?, &xs)
    }
}
