//! The layers that mix information across frames: diffusers' `TemporalConvLayer` (four
//! GroupNorm–SiLU–Conv3d(3,1,1) stages, residual) and `TransformerTemporalModel` (each pixel's
//! sequence of frames attends to itself).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::long_video::WindowPlan;
use crate::nn::{
    add, add_from_sequences, chunk_rows, contiguous, even_chunks, group_norm, linear, temporal_conv, uninitialized,
    GroupNorm, Linear, TemporalConv,
};

use super::attention::{BasicTransformerBlock, SecondAttention};

/// (batch·frames, C, H, W) → (batch, C, frames, H, W).
pub fn frames_to_video(xs: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    xs.reshape((n / frames, frames, c, h, w))?.permute((0, 2, 1, 3, 4))
}

/// (batch, C, frames, H, W) → (batch·frames, C, H, W), contiguous.
pub fn video_to_frames(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, f, h, w) = xs.dims5()?;
    contiguous(&xs.permute((0, 2, 1, 3, 4))?)?.reshape((b * f, c, h, w))
}

#[derive(Debug)]
struct NormActConv {
    norm: GroupNorm,
    conv: TemporalConv,
}

/// `TemporalConvLayer(in_dim, out_dim, norm_num_groups)`.
#[derive(Debug)]
pub struct TemporalConvLayer {
    stages: Vec<NormActConv>,
}

impl TemporalConvLayer {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, norm_num_groups: usize) -> candle_core::Result<Self> {
        // conv1 maps in→out, conv2..4 map out→in (equal in every UNet3D use); GroupNorm keeps
        // torch's default eps 1e-5. Each stage is Sequential(GroupNorm, SiLU, [Dropout], Conv3d),
        // so the conv sits at index 2 in conv1 and index 3 after the dropout.
        let mut stages = vec![NormActConv {
            norm: group_norm(norm_num_groups, in_dim, 1e-5, vb.pp("conv1.0"))?,
            conv: temporal_conv(in_dim, out_dim, vb.pp("conv1.2"))?,
        }];
        for name in ["conv2", "conv3", "conv4"] {
            stages.push(NormActConv {
                norm: group_norm(norm_num_groups, out_dim, 1e-5, vb.pp(name).pp("0"))?,
                conv: temporal_conv(out_dim, in_dim, vb.pp(name).pp("3"))?,
            });
        }
        Ok(Self { stages })
    }

    /// `xs`: (batch·frames, C, H, W).
    pub fn forward(&self, xs: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
        let mut h = frames_to_video(xs, frames)?;
        for stage in &self.stages {
            // GroupNorm statistics span all frames of a video, as on the 5-D tensor in diffusers.
            let normed = stage.norm.forward_silu(&h)?;
            // The previous stage's output is freed before the convolution allocates its own:
            // one activation fewer alive, where a long video's memory peaks (128 frames: 0.31 GiB).
            drop(h);
            h = stage.conv.forward(&normed)?;
        }
        // The residual, added in the per-frame layout where both are contiguous.
        let h_frames = video_to_frames(&h)?;
        drop(h);
        add(&h_frames, &contiguous(xs)?)
    }
}

/// `TransformerTemporalModel(heads, dim_head, in_channels, num_layers=1, norm_num_groups)` with
/// its default `double_self_attention`: both attentions of its block are across frames.
#[derive(Debug)]
pub struct TransformerTemporalModel {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl TransformerTemporalModel {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        heads: usize,
        dim_head: usize,
        norm_num_groups: usize,
    ) -> candle_core::Result<Self> {
        let inner = heads * dim_head;
        let block = BasicTransformerBlock::new(
            vb.pp("transformer_blocks.0"),
            inner,
            heads,
            dim_head,
            SecondAttention::SelfAgain,
        )?;
        Ok(Self {
            norm: group_norm(norm_num_groups, in_channels, 1e-6, vb.pp("norm"))?,
            proj_in: linear(in_channels, inner, vb.pp("proj_in"))?,
            blocks: vec![block],
            proj_out: linear(inner, in_channels, vb.pp("proj_out"))?,
        })
    }

    /// `xs`: (batch·frames, C, H, W). With `windows` (FreeNoise) each block attends per window.
    /// After the GroupNorm (whose statistics span every frame and pixel) each pixel's sequence of
    /// frames is computed alone, so the pixels run in chunks of rows of about `chunk_bytes` of
    /// activations: the same result, with one chunk's intermediates held at a time.
    pub fn forward(
        &self,
        xs: &Tensor,
        frames: usize,
        windows: Option<&WindowPlan>,
        chunk_bytes: usize,
    ) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let b = n / frames;
        let normed = self.norm.forward(&frames_to_video(xs, frames)?)?;
        // One row of pixels of every frame: its widest intermediate is the feed-forward's chunk,
        // the others are (b·W·F, inner) like the projections.
        let inner = self.proj_in.out_dim().max(c);
        // FreeNoise's windows also hold attn1's q, k and v of every frame and the two per-frame
        // sums beside the input.
        let held = if windows.is_some() { 6 } else { 1 };
        let row_bytes = held * b * w * frames * inner * xs.dtype().size_in_bytes();
        let chunks = even_chunks(h, chunk_rows(chunk_bytes, row_bytes));
        // Run on many chunks (or windows), the layers' weights are packed once for all of them
        // (at 1280 channels, 8 chunks of a 128-frame video would otherwise pack 36M weights each).
        let pack = windows.is_some() || chunks.len() > 1;
        let (proj_in, proj_out) = (self.proj_in.prepare(pack)?, self.proj_out.prepare(pack)?);
        let blocks = self.blocks.iter().map(|b| b.prepare(pack)).collect::<candle_core::Result<Vec<_>>>()?;
        // Each chunk's output is written into place in the video layout with the residual added
        // (one pass, see `add_from_sequences`).
        let out = uninitialized(&[b, frames, c, h, w], xs.dtype(), xs.device())?;
        let (out_pixels, xs_pixels) =
            (out.reshape((b, frames, c, h * w))?, contiguous(xs)?.reshape((b, frames, c, h * w))?);
        for &(row, rows) in &chunks {
            // (b, C, F, rows, W) → (b·rows·W, F, C): one sequence of frames per pixel.
            let part = normed.narrow(3, row, rows)?;
            let seq = contiguous(&part.permute((0, 3, 4, 2, 1))?)?.reshape((b * rows * w, frames, c))?;
            let mut seq = proj_in.forward(&seq)?;
            for block in &blocks {
                seq = match windows {
                    Some(plan) => block.forward_windowed(&seq, plan)?,
                    None => block.forward(&seq, None)?,
                };
            }
            let seq = proj_out.forward(&seq)?;
            add_from_sequences(&out_pixels, &seq.reshape((b, rows * w, frames, c))?, &xs_pixels, row * w)?;
        }
        out.reshape((n, c, h, w))
    }
}
