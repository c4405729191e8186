//! diffusers' `UNet3DConditionModel`: the noise prediction network of the text-to-video model,
//! built from `unet/config.json`.
//!
//! Latents (batch, C, frames, h, w) are folded to (batch·frames, C, h, w) so that convolutions,
//! ResNet blocks and spatial attention run on every frame; the temporal convolutions and
//! temporal transformers unfold them again to mix across frames.

mod attention;
mod blocks;
mod module_order;
mod temporal;
mod transformer_2d;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

pub use crate::nn::repeat_interleave;
use blocks::{DownBlock, LevelConfig, MidBlock, UpBlock};
pub use module_order::{lora_module_order, modelscope_name};
use temporal::{frames_to_video, video_to_frames, TransformerTemporalModel};

use crate::error::{Error, Result};
use crate::long_video::WindowPlan;
use crate::nn::{conv2d, group_norm, linear, silu, Conv2d, GroupNorm, Linear};

/// diffusers' `TimestepEmbedding`: linear, SiLU, linear; with `cond_proj_dim`, a bias-free
/// `cond_proj` (cond_proj_dim → in_dim) of a condition added to the sinusoidal features first
/// (T2V-Turbo's guidance embedding).
#[derive(Debug)]
struct TimestepEmbedding {
    linear_1: Linear,
    cond_proj: Option<candle_nn::Linear>,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, cond_proj_dim: Option<usize>) -> candle_core::Result<Self> {
        let cond_proj = match cond_proj_dim {
            Some(d) => Some(candle_nn::Linear::new(vb.pp("cond_proj").get((in_dim, d), "weight")?, None)),
            None => None,
        };
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            cond_proj,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    /// As diffusers: without a condition (or without `cond_proj`), the condition is not used.
    fn forward(&self, x: &Tensor, condition: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => (x + proj.forward(&c.to_dtype(x.dtype())?)?.broadcast_as(x.shape())?)?,
            _ => x.clone(),
        };
        self.linear_2.forward(&silu(&self.linear_1.forward(&x)?)?)
    }
}

/// The UNet's `time_proj`: diffusers' `Timesteps(ch0, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`, i.e. `get_timestep_embedding`: `[cos(t·f_i), sin(t·f_i)]` with
/// `f_i = exp(−i · ln(10000) / half)`, zero-padded to an odd channel count. Ours rather than
/// candle-transformers' equal one: it was the only thing this crate took from that crate of
/// hundreds of models, which cost minutes of every cold build and CUDA check.
#[derive(Debug)]
struct Timesteps {
    num_channels: usize,
}

impl Timesteps {
    fn forward(&self, timesteps: &Tensor) -> candle_core::Result<Tensor> {
        let half = self.num_channels / 2;
        let exponent = (Tensor::arange(0u32, half as u32, timesteps.device())?.to_dtype(candle_core::DType::F32)?
            * -10000f64.ln())?;
        let freqs = (exponent / half as f64)?.exp()?.to_dtype(timesteps.dtype())?;
        // timesteps[:, None].float() * freqs[None, :]
        let args = timesteps.unsqueeze(candle_core::D::Minus1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
        let features = Tensor::cat(&[&args.cos()?, &args.sin()?], candle_core::D::Minus1)?;
        if self.num_channels % 2 == 1 {
            features.pad_with_zeros(candle_core::D::Minus1, 0, 1)
        } else {
            Ok(features)
        }
    }
}

/// T2V-Turbo's guidance embedding (its pipeline's `get_w_embedding`, after VDM): `w · 1000` in
/// `dim` sinusoidal features, `[sin(w·1000·f_i), cos(w·1000·f_i)]` with
/// `f_i = exp(−i · ln(10000) / (dim/2 − 1))`, zero-padded to an odd `dim`; float32 as the
/// reference computes it. Returns (1, dim).
pub fn guidance_scale_embedding(w: f64, dim: usize, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let w = (w as f32) * 1000.0f32;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -step).exp() * w).collect();
    let mut values: Vec<f32> = freqs.iter().map(|x| x.sin()).collect();
    values.extend(freqs.iter().map(|x| x.cos()));
    values.resize(dim, 0.0);
    Tensor::from_vec(values, (1, dim), device)
}

/// An integer, or one integer per level.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerLevel {
    One(usize),
    Each(Vec<usize>),
}

impl PerLevel {
    fn expand(&self, levels: usize) -> Vec<usize> {
        match self {
            PerLevel::One(v) => vec![*v; levels],
            PerLevel::Each(v) => v.clone(),
        }
    }
}

/// The most resolution levels a UNet or VAE config may have (published models have 4).
pub const MAX_LEVELS: usize = 8;
/// The largest channel count, layer count or sample size a config may name.
pub const MAX_DIM: usize = 1 << 16;

/// Checks that each `(key, value)` of the config file `path` is a dimension from 1 to [`MAX_DIM`].
pub(crate) fn check_dims(path: &str, dims: &[(&str, usize)]) -> Result<()> {
    for &(key, v) in dims {
        if !(1..=MAX_DIM).contains(&v) {
            let reason = format!("is {v}: it must be 1 to {MAX_DIM}");
            return Err(Error::InvalidConfig { path: path.into(), key: key.into(), reason });
        }
    }
    Ok(())
}

/// `unet/config.json`. Missing keys take `UNet3DConditionModel.__init__`'s defaults (those of
/// the published 1.7B model); keys not listed are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub attention_head_dim: PerLevel,
    pub num_attention_heads: Option<PerLevel>,
    pub time_cond_proj_dim: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            down_block_types: ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"]
                .map(String::from)
                .to_vec(),
            up_block_types: ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"]
                .map(String::from)
                .to_vec(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: 1024,
            attention_head_dim: PerLevel::One(64),
            num_attention_heads: None,
            time_cond_proj_dim: None,
        }
    }
}

impl Config {
    /// Rejects what the reference rejects, what t2v does not implement, and values no model can
    /// be built or run with, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| {
            Err(Error::InvalidConfig { path: "unet/config.json".into(), key: key.into(), reason })
        };
        let levels = self.block_out_channels.len();
        if !(1..=MAX_LEVELS).contains(&levels) {
            return bad("block_out_channels", format!("has {levels} levels: it must have 1 to {MAX_LEVELS}"));
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return bad(
                "down_block_types",
                format!(
                    "block_out_channels ({levels}), down_block_types ({}) and up_block_types ({}) must have the same length",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            );
        }
        if self.num_attention_heads.is_some() {
            return bad(
                "num_attention_heads",
                "must be null: UNet3DConditionModel takes the head size from attention_head_dim".into(),
            );
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return bad("act_fn", format!("`{}` is not supported (only silu)", self.act_fn));
        }
        crate::unet3d::check_dims(
            "unet/config.json",
            &[
                ("in_channels", self.in_channels),
                ("out_channels", self.out_channels),
                ("layers_per_block", self.layers_per_block),
                ("cross_attention_dim", self.cross_attention_dim),
            ],
        )?;
        if let Some(d) = self.time_cond_proj_dim {
            if !(1..=MAX_DIM).contains(&d) {
                return bad("time_cond_proj_dim", format!("is {d}: it must be 1 to {MAX_DIM}"));
            }
        }
        if let Some(s) = self.sample_size {
            if !(1..=MAX_DIM).contains(&s) {
                return bad("sample_size", format!("is {s}: it must be 1 to {MAX_DIM} latent pixels"));
            }
        }
        // Downsample2D pads asymmetrically for 0 and grows the maps for more than 1: every
        // published model uses 1, the only value t2v implements.
        if self.downsample_padding != 1 {
            return bad("downsample_padding", format!("is {}: only 1 is supported", self.downsample_padding));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad("norm_eps", format!("is {}: it must be a positive number", self.norm_eps));
        }
        if !self.mid_block_scale_factor.is_finite() {
            return bad("mid_block_scale_factor", "must be a finite number".into());
        }
        let Some(groups) = self.norm_num_groups else {
            return bad("norm_num_groups", "null is not supported".into());
        };
        if groups == 0 {
            return bad("norm_num_groups", "is 0: GroupNorm needs at least 1 group".into());
        }
        let head_dims = self.attention_head_dim.expand(levels);
        if head_dims.len() != levels {
            return bad("attention_head_dim", format!("has {} entries for {levels} levels", head_dims.len()));
        }
        for (i, (&ch, &hd)) in self.block_out_channels.iter().zip(&head_dims).enumerate() {
            if !(1..=MAX_DIM).contains(&ch) {
                return bad("block_out_channels", format!("level {i} has {ch} channels: it must be 1 to {MAX_DIM}"));
            }
            if hd == 0 || ch % hd != 0 || ch % groups != 0 {
                return bad(
                    "block_out_channels",
                    format!(
                        "level {i}: {ch} channels are not a multiple of attention_head_dim {hd} and norm_num_groups {groups}"
                    ),
                );
            }
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock3D" && t != "DownBlock3D" {
                return bad("down_block_types", format!("`{t}` is not supported (CrossAttnDownBlock3D, DownBlock3D)"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock3D" && t != "UpBlock3D" {
                return bad("up_block_types", format!("`{t}` is not supported (CrossAttnUpBlock3D, UpBlock3D)"));
            }
        }
        Ok(())
    }

    /// The factor between the latent size and the smallest level's size.
    pub fn overall_downsampling(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// What the attention layers read besides the hidden states.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conditioning<'a> {
    /// The text embeddings, each shared by `text_repeat` consecutive rows of the (batch·frames)
    /// layout: the frames of a video, or 1 with an embedding per frame (prompt travel).
    pub text: &'a Tensor,
    pub text_repeat: usize,
    /// FreeNoise: the temporal transformers attend per window.
    pub windows: Option<&'a WindowPlan>,
    /// The activation bytes per chunk of the frame-chunked layers.
    pub chunk_bytes: usize,
}

/// How a long video runs through the UNet (see [`crate::long_video`]); the default is a plain run.
#[derive(Debug, Clone, Copy, Default)]
pub struct LongVideoForward<'a> {
    /// The text embeddings are one per frame, (batch·frames, tokens, D), frame f of video b at
    /// row b·frames + f, instead of one per video.
    pub text_per_frame: bool,
    /// Every temporal transformer block (`transformer_in`'s and each `temp_attentions`') runs
    /// per window and fuses the windows as diffusers' `FreeNoiseTransformerBlock`.
    pub windows: Option<&'a WindowPlan>,
}

/// The 3D UNet: `forward(latents, timestep, text embeddings)` → predicted noise.
#[derive(Debug)]
pub struct UNet3DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    transformer_in: TransformerTemporalModel,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: Config,
    chunk_bytes: usize,
}

impl UNet3DConditionModel {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        Ok(Self::build(vb, cfg)?)
    }

    fn build(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let levels = cfg.block_out_channels.len();
        let groups = cfg.norm_num_groups.unwrap_or(32);
        let head_dims = cfg.attention_head_dim.expand(levels);
        let ch0 = cfg.block_out_channels[0];
        let time_embed_dim = ch0 * 4;
        let level_cfg = |i: usize| LevelConfig {
            temb_channels: time_embed_dim,
            groups,
            eps: cfg.norm_eps,
            cross_attention_dim: cfg.cross_attention_dim,
            head_dim: head_dims[i],
        };
        let conv_in = conv2d(cfg.in_channels, ch0, 3, 1, 1, vb.pp("conv_in"))?;
        // Timesteps(ch0, flip_sin_to_cos=True, downscale_freq_shift=0).
        let time_proj = Timesteps { num_channels: ch0 };
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), ch0, time_embed_dim, cfg.time_cond_proj_dim)?;
        // transformer_in: 8 heads of attention_head_dim channels, as the reference hard-wires.
        let transformer_in = TransformerTemporalModel::new(vb.pp("transformer_in"), ch0, 8, head_dims[0], groups)?;

        let mut down_blocks = Vec::with_capacity(levels);
        let mut out_ch = ch0;
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = cfg.block_out_channels[i];
            down_blocks.push(DownBlock::new(
                vb.pp("down_blocks").pp(i),
                in_ch,
                out_ch,
                cfg.layers_per_block,
                kind == "CrossAttnDownBlock3D",
                i + 1 < levels,
                cfg.downsample_padding,
                &level_cfg(i),
            )?);
        }
        let last = *cfg.block_out_channels.last().unwrap();
        let mid_block = MidBlock::new(vb.pp("mid_block"), last, cfg.mid_block_scale_factor, &level_cfg(levels - 1))?;

        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(levels);
        let mut out_ch = reversed[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev_out = out_ch;
            out_ch = reversed[i];
            let in_ch = reversed[(i + 1).min(levels - 1)];
            up_blocks.push(UpBlock::new(
                vb.pp("up_blocks").pp(i),
                in_ch,
                prev_out,
                out_ch,
                cfg.layers_per_block + 1,
                kind == "CrossAttnUpBlock3D",
                i + 1 < levels,
                &level_cfg(levels - 1 - i),
            )?);
        }
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            transformer_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, ch0, cfg.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(ch0, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            config: cfg.clone(),
            chunk_bytes: crate::nn::CHUNK_BYTES,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How many bytes of activations the layers that work on each frame alone (ResNets,
    /// spatial attention, up- and down-sampling) and on each pixel's frames alone (the temporal
    /// transformers after their GroupNorm) compute at a time (default [`crate::nn::CHUNK_BYTES`]).
    /// What a step holds then grows with the frames only by the activations passed between
    /// layers and the skip connections; the results are the same for every size.
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_bytes = bytes.max(1);
    }

    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// `latents`: (batch, C, frames, h, w); `timestep`: the scheduler's integer timestep;
    /// `encoder_hidden_states`: (batch, tokens, cross_attention_dim). Returns the predicted noise,
    /// shaped like `latents`.
    pub fn forward(&self, latents: &Tensor, timestep: f64, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        if latents.dim(0)? != encoder_hidden_states.dim(0)? {
            return Err(Error::InvalidArgument(format!(
                "the UNet got {} latents for {} text embeddings",
                latents.dim(0)?,
                encoder_hidden_states.dim(0)?
            )));
        }
        Ok(self.forward_inner(latents, timestep, encoder_hidden_states, &LongVideoForward::default(), None)?)
    }

    /// The prediction for the same latents under each of several text embeddings (classifier-free
    /// guidance: [negative, prompt]): `latents` (1, C, frames, h, w), `encoder_hidden_states`
    /// (n, tokens, D) → (n, C, frames, h, w). Equal to [`UNet3DConditionModel::forward`] on the
    /// latents repeated n times, but what comes before the first cross-attention (the input
    /// convolution, the input temporal transformer, the first ResNet and temporal convolution)
    /// depends only on the latents and the timestep, so it is computed once.
    pub fn forward_shared_latents(
        &self,
        latents: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_long(latents, timestep, encoder_hidden_states, &LongVideoForward::default())
    }

    /// [`UNet3DConditionModel::forward_shared_latents`] for a long video: per-frame text
    /// embeddings and/or windowed temporal attention.
    pub fn forward_long(
        &self,
        latents: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        long: &LongVideoForward,
    ) -> Result<Tensor> {
        self.forward_guidance_embedded(latents, timestep, encoder_hidden_states, long, None)
    }

    /// [`UNet3DConditionModel::forward_long`] with diffusers' `timestep_cond`: a (1, D) condition
    /// that `time_embedding.cond_proj` adds to the timestep features (T2V-Turbo's guidance
    /// embedding, [`guidance_scale_embedding`]); `None`, or a UNet without `cond_proj`, ignores it
    /// as diffusers does.
    pub fn forward_guidance_embedded(
        &self,
        latents: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        long: &LongVideoForward,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        if latents.dim(0)? != 1 {
            return Err(Error::InvalidArgument("forward_shared_latents takes the latents of one video".into()));
        }
        let frames = latents.dim(2)?;
        if long.text_per_frame && encoder_hidden_states.dim(0)? % frames != 0 {
            return Err(Error::InvalidArgument(format!(
                "per-frame text embeddings: {} rows for {frames} frames",
                encoder_hidden_states.dim(0)?
            )));
        }
        if let Some(plan) = long.windows {
            if plan.frames != frames {
                return Err(Error::InvalidArgument(format!(
                    "the context windows are planned for {} frames, the latents have {frames}",
                    plan.frames
                )));
            }
        }
        Ok(self.forward_inner(latents, timestep, encoder_hidden_states, long, timestep_cond)?)
    }

    /// `latents` has the batch of `context`, or a batch of 1 shared by every text embedding.
    fn forward_inner(
        &self,
        latents: &Tensor,
        timestep: f64,
        context: &Tensor,
        long: &LongVideoForward,
        timestep_cond: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (_, _, frames, h, w) = latents.dims5()?;
        let (batch, text_repeat) =
            if long.text_per_frame { (context.dim(0)? / frames, 1) } else { (context.dim(0)?, frames) };
        let chunk_bytes = self.chunk_bytes;
        let cond = Conditioning { text: context, text_repeat, windows: long.windows, chunk_bytes };
        let context = &cond;
        let repeat = |x: &Tensor| -> candle_core::Result<Tensor> {
            if x.dim(0)? == batch * frames {
                Ok(x.clone())
            } else {
                Tensor::cat(&vec![x; batch], 0)
            }
        };
        let dtype = latents.dtype();
        let device = latents.device();
        let factor = self.config.overall_downsampling();
        // Sizes the down-sampling does not divide are handled as in the reference: each
        // up-sampling interpolates to the size of the skip connection it meets.
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let timesteps = Tensor::full(timestep as f32, latents.dim(0)?, device)?;
        let t_emb = self.time_proj.forward(&timesteps)?.to_dtype(dtype)?;
        let emb = self.time_embedding.forward(&t_emb, timestep_cond)?;
        let emb = repeat_interleave(&emb, frames)?;

        // (in a block: what only the batch of 1 needed is let go before the rest runs)
        let (first_skip, prefix) = {
            let xs = self.conv_in.forward(&video_to_frames(latents)?)?;
            let xs = self.transformer_in.forward(&xs, frames, long.windows, chunk_bytes)?;
            let prefix = self.down_blocks[0].forward_prefix(&xs, &emb, frames, chunk_bytes)?;
            (repeat(&xs)?, repeat(&prefix)?)
        };
        let emb = repeat(&emb)?;

        let mut skips = vec![first_skip];
        let (mut xs, res) = self.down_blocks[0].forward_after_prefix(&prefix, &emb, context, frames)?;
        drop(prefix);
        skips.extend(res);
        for block in &self.down_blocks[1..] {
            let (out, res) = block.forward(&xs, &emb, context, frames)?;
            xs = out;
            skips.extend(res);
        }
        xs = self.mid_block.forward(&xs, &emb, context, frames)?;

        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let level_skips = skips.split_off(skips.len() - block.num_layers());
            let upsample_size = if i + 1 < n_up && forward_upsample_size {
                let next = skips.last().expect("one skip per up-block layer");
                let (_, _, sh, sw) = next.dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            xs = block.forward(xs, level_skips, &emb, context, frames, upsample_size)?;
        }
        // GroupNorm (per image here), SiLU and the output convolution, a chunk of frames at a time.
        let n = xs.dim(0)?;
        let row_bytes = xs.elem_count() / n.max(1) * xs.dtype().size_in_bytes();
        let chunks = crate::nn::even_chunks(n, crate::nn::chunk_rows(chunk_bytes, row_bytes));
        let xs = crate::nn::map_chunks(0, &chunks, |start, len| {
            self.conv_out.forward(&self.conv_norm_out.forward_silu(&xs.narrow(0, start, len)?)?)
        })?;
        frames_to_video(&xs, frames)?.contiguous()
    }
}
