//! diffusers' `Transformer2DModel` for continuous inputs: each frame's pixels attend to each other
//! and to the prompt.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{add, chunk_rows, contiguous, group_norm, linear, map_chunks, GroupNorm, Linear, PreparedLinear};

use super::attention::{BasicTransformerBlock, PreparedBlock, SecondAttention};

/// `Transformer2DModel(heads, dim_head, in_channels, num_layers=1, cross_attention_dim,
/// norm_num_groups, use_linear_projection=True)`: every 3D UNet block builds it with linear
/// projections (the `get_down_block`/`get_up_block` and mid-block defaults).
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl Transformer2DModel {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: usize,
        norm_num_groups: usize,
    ) -> candle_core::Result<Self> {
        let inner = heads * dim_head;
        let block = BasicTransformerBlock::new(
            vb.pp("transformer_blocks.0"),
            inner,
            heads,
            dim_head,
            SecondAttention::Cross(cross_attention_dim),
        )?;
        Ok(Self {
            norm: group_norm(norm_num_groups, in_channels, 1e-6, vb.pp("norm"))?,
            proj_in: linear(in_channels, inner, vb.pp("proj_in"))?,
            blocks: vec![block],
            proj_out: linear(inner, in_channels, vb.pp("proj_out"))?,
        })
    }

    /// `xs`: (batch·frames, C, H, W); `context`: text embeddings, each shared by `repeat`
    /// consecutive rows of `xs` (the frames of a video, or 1 with an embedding per frame).
    /// Every frame attends within itself, so the frames run in chunks of about `chunk_bytes` of
    /// activations: the same result, with one chunk's intermediates held at a time.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        repeat: usize,
        chunk_bytes: usize,
    ) -> candle_core::Result<Tensor> {
        let n = xs.dim(0)?;
        let row_bytes = xs.elem_count() / n.max(1) * xs.dtype().size_in_bytes();
        let chunks = text_aligned_chunks(n, chunk_rows(chunk_bytes, row_bytes), repeat);
        // Over many chunks the layers' weights are packed once for all of them.
        let pack = chunks.len() > 1;
        let layers = Prepared {
            proj_in: self.proj_in.prepare(pack)?,
            blocks: self.blocks.iter().map(|b| b.prepare(pack)).collect::<candle_core::Result<Vec<_>>>()?,
            proj_out: self.proj_out.prepare(pack)?,
        };
        map_chunks(0, &chunks, |start, len| {
            // The rows of the chunk read embeddings start / repeat onwards (a chunk is whole
            // groups of `repeat` rows, or lies within one).
            let first = start / repeat;
            let last = (start + len - 1) / repeat;
            let text = context.narrow(0, first, last + 1 - first)?;
            // (a piece of one group: its rows all read the one embedding)
            let repeat = if first == last { len } else { repeat };
            self.forward_rows(&layers, &xs.narrow(0, start, len)?, &text, repeat)
        })
    }

    fn forward_rows(
        &self,
        layers: &Prepared,
        xs: &Tensor,
        context: &Tensor,
        repeat: usize,
    ) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let mut tokens =
            layers.proj_in.forward(&contiguous(&normed.permute((0, 2, 3, 1))?)?.reshape((n, h * w, c))?)?;
        drop(normed);
        for block in &layers.blocks {
            tokens = block.forward(&tokens, Some((context, repeat)))?;
        }
        let out = contiguous(&layers.proj_out.forward(&tokens)?.reshape((n, h, w, c))?.permute((0, 3, 1, 2))?)?;
        add(&out, &contiguous(xs)?)
    }
}

/// The model's linear layers ready for its chunks.
struct Prepared<'a> {
    proj_in: PreparedLinear<'a>,
    blocks: Vec<PreparedBlock<'a>>,
    proj_out: PreparedLinear<'a>,
}

/// Chunks of at most `chunk` of `n` rows that never split a group of `repeat` rows sharing an
/// embedding unless they lie within it: whole groups when a chunk holds at least one, else pieces
/// of one group.
fn text_aligned_chunks(n: usize, chunk: usize, repeat: usize) -> Vec<(usize, usize)> {
    let repeat = repeat.max(1);
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let len = if chunk >= repeat {
            (chunk / repeat * repeat).min(n - start)
        } else {
            let group_end = (start / repeat + 1) * repeat;
            chunk.min(group_end.min(n) - start)
        };
        chunks.push((start, len));
        start += len;
    }
    chunks
}
