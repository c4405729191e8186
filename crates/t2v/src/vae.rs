//! The VAE decoder (diffusers' `AutoencoderKL.decode`), which turns latents into frames, and in
//! [`encoder`] its encoder (`AutoencoderKL.encode`), which video-to-video needs.
//!
//! [`Vae`] is the decoder alone: text-to-video never encodes, so the encoder's weights are only
//! read when a [`VaeEncoder`] is built. Each frame is decoded on its own (GroupNorm statistics are per image, so this is the
//! same result as one batch), which keeps the activations of a 256×256 frame small.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{Error, Result};
pub mod encoder;
pub use encoder::{DiagonalGaussian, VaeEncoder};

use crate::nn::{
    conv2d, group_norm, linear, scaled_dot_product_attention, Conv2d, GroupNorm, Linear, ResnetBlock2D, ResnetConfig,
};
/// `vae/config.json`; missing keys take `AutoencoderKL.__init__`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl Config {
    /// Rejects what t2v does not implement and values no model can be built or run with,
    /// naming the key.
    pub fn validate(&self) -> Result<()> {
        use crate::unet3d::{MAX_DIM, MAX_LEVELS};
        let bad = |key: &str, reason: String| {
            Err(Error::InvalidConfig { path: "vae/config.json".into(), key: key.into(), reason })
        };
        let levels = self.block_out_channels.len();
        if !(1..=MAX_LEVELS).contains(&levels) {
            return bad("block_out_channels", format!("has {levels} levels: it must have 1 to {MAX_LEVELS}"));
        }
        if self.up_block_types.len() != levels {
            return bad(
                "up_block_types",
                format!("has {} entries for the {levels} levels of block_out_channels", self.up_block_types.len()),
            );
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return bad("up_block_types", format!("`{t}` is not supported (UpDecoderBlock2D)"));
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return bad("act_fn", format!("`{}` is not supported (only silu)", self.act_fn));
        }
        if !self.mid_block_add_attention {
            return bad("mid_block_add_attention", "false is not supported".into());
        }
        crate::unet3d::check_dims(
            "vae/config.json",
            &[
                ("in_channels", self.in_channels),
                ("out_channels", self.out_channels),
                ("latent_channels", self.latent_channels),
                ("layers_per_block", self.layers_per_block),
                ("norm_num_groups", self.norm_num_groups),
            ],
        )?;
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            if !(1..=MAX_DIM).contains(&ch) || ch % self.norm_num_groups != 0 {
                return bad(
                    "block_out_channels",
                    format!(
                        "level {i} has {ch} channels: it must be 1 to {MAX_DIM} and a multiple of norm_num_groups {}",
                        self.norm_num_groups
                    ),
                );
            }
        }
        // Latents are divided by it: 0 gives infinities, a negative one inverted frames.
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return bad("scaling_factor", format!("is {}: it must be a positive number", self.scaling_factor));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return bad("shift_factor", "must be a finite number".into());
        }
        Ok(())
    }

    /// How many pixels one latent covers along each side: 2^(levels − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The mid-block attention: one head over all pixels of a frame, with a residual. Checkpoints
/// saved before diffusers 0.15 name its layers `query`/`key`/`value`/`proj_attn`, later ones
/// `to_q`/`to_k`/`to_v`/`to_out.0`; both are read.
#[derive(Debug)]
pub(crate) struct SpatialSelfAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialSelfAttention {
    pub(crate) fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let names = if vb.contains_tensor("query.weight") {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp(names[0]))?,
            to_k: linear(channels, channels, vb.pp(names[1]))?,
            to_v: linear(channels, channels, vb.pp(names[2]))?,
            to_out: linear(channels, channels, vb.pp(names[3]))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x)?.reshape((n, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = scaled_dot_product_attention(&q, &k, &v, 1.0 / (c as f64).sqrt())?;
        let out = self.to_out.forward(&out)?.transpose(1, 2)?.reshape((n, c, h, w))?;
        out + x
    }
}

/// `UpDecoderBlock2D`: ResNet blocks, then nearest 2× up-sampling and a 3×3 convolution.
#[derive(Debug)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Conv2d>,
}

impl UpDecoderBlock {
    /// Takes its input by value: at 1024×576 the input of the last block is 604 MB, which
    /// must not outlive the first ResNet block that reads it.
    fn forward(&self, mut x: Tensor) -> candle_core::Result<Tensor> {
        for r in &self.resnets {
            x = r.forward(&x, None)?;
        }
        if let Some(conv) = &self.upsample {
            x = conv.forward_upsampled(&x)?;
        }
        Ok(x)
    }
}

/// The decoder half of `AutoencoderKL`, with its `post_quant_conv`.
pub struct Vae {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: SpatialSelfAttention,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: Config,
}

impl Vae {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        Ok(Self::build(vb, cfg)?)
    }

    fn build(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let groups = cfg.norm_num_groups;
        let resnet_cfg = ResnetConfig { groups, eps: 1e-6, temb_channels: None, output_scale_factor: 1.0 };
        let top = *cfg.block_out_channels.last().unwrap();
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(cfg.latent_channels, cfg.latent_channels, 1, 1, 0, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let dec = vb.pp("decoder");
        let mid = dec.pp("mid_block");
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut out_ch = reversed[0];
        for (i, &ch) in reversed.iter().enumerate() {
            let prev = out_ch;
            out_ch = ch;
            let block = dec.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        block.pp("resnets").pp(j),
                        if j == 0 { prev } else { out_ch },
                        out_ch,
                        resnet_cfg,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample = if i + 1 < reversed.len() {
                Some(conv2d(out_ch, out_ch, 3, 1, 1, block.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock { resnets, upsample });
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv2d(cfg.latent_channels, top, 3, 1, 1, dec.pp("conv_in"))?,
            mid_resnets: [
                ResnetBlock2D::new(mid.pp("resnets.0"), top, top, resnet_cfg)?,
                ResnetBlock2D::new(mid.pp("resnets.1"), top, top, resnet_cfg)?,
            ],
            mid_attention: SpatialSelfAttention::new(mid.pp("attentions.0"), top, groups)?,
            up_blocks,
            conv_norm_out: group_norm(groups, cfg.block_out_channels[0], 1e-6, dec.pp("conv_norm_out"))?,
            conv_out: conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, 1, 1, dec.pp("conv_out"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Raw `vae.decode(z)`: (n, latent_channels, h, w) → (n, out_channels, s·h, s·w), no scaling.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let n = latents.dim(0)?;
        let mut frames = Vec::with_capacity(n);
        for i in 0..n {
            frames.push(self.decode_one(&latents.narrow(0, i, 1)?)?);
        }
        Ok(Tensor::cat(&frames, 0)?)
    }

    fn decode_one(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        // One binding, reassigned: each activation is freed once the next is made.
        let mut x = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        x = self.conv_in.forward(&x)?;
        x = self.mid_resnets[0].forward(&x, None)?;
        x = self.mid_attention.forward(&x)?;
        x = self.mid_resnets[1].forward(&x, None)?;
        for block in &self.up_blocks {
            x = block.forward(x)?;
        }
        self.conv_out.forward_norm_silu(&self.conv_norm_out, &x, None)
    }
}
