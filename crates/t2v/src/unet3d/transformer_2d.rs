//! diffusers' `Transformer2DModel` for continuous inputs: each frame's pixels attend to each other
//! and to the prompt.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{add, contiguous, group_norm, linear, GroupNorm, Linear};

use super::attention::{BasicTransformerBlock, SecondAttention};

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
    pub fn forward(&self, xs: &Tensor, context: &Tensor, repeat: usize) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let mut tokens =
            self.proj_in.forward(&contiguous(&normed.permute((0, 2, 3, 1))?)?.reshape((n, h * w, c))?)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, Some((context, repeat)))?;
        }
        let out = contiguous(&self.proj_out.forward(&tokens)?.reshape((n, h, w, c))?.permute((0, 3, 1, 2))?)?;
        add(&out, xs)
    }
}
