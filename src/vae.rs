//! The VAE decoder (diffusers' `AutoencoderKL.decode`), which turns latents into frames.
//!
//! The network itself is candle-transformers' `AutoEncoderKL`, which the fixtures show to match
//! the reference; this module configures it from `vae/config.json` and decodes a video a few
//! frames at a time (each frame is decoded independently, so the result is the same as one
//! batch and the activations stay small).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;

use crate::error::{Error, Result};

/// `vae/config.json`; missing keys take `AutoencoderKL.__init__`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub in_channels: usize,
    pub out_channels: usize,
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
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(format!("vae/config.json: {msg}")));
        if self.block_out_channels.is_empty() || self.up_block_types.len() != self.block_out_channels.len() {
            return bad("block_out_channels and up_block_types must be non-empty and of the same length".into());
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return bad(format!("up block type `{t}` is not supported (UpDecoderBlock2D)"));
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return bad(format!("act_fn `{}` is not supported (only silu)", self.act_fn));
        }
        if !self.mid_block_add_attention {
            return bad("mid_block_add_attention false is not supported".into());
        }
        Ok(())
    }

    /// How many pixels one latent covers along each side: 2^(levels − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Frames decoded in one batch: the top level of the 1.7B decoder holds 128×256×256 floats a frame.
const FRAMES_PER_BATCH: usize = 1;

pub struct Vae {
    model: AutoEncoderKL,
    config: Config,
}

impl Vae {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let kl_cfg = AutoEncoderKLConfig {
            block_out_channels: cfg.block_out_channels.clone(),
            layers_per_block: cfg.layers_per_block,
            latent_channels: cfg.latent_channels,
            norm_num_groups: cfg.norm_num_groups,
            use_quant_conv: cfg.use_quant_conv,
            use_post_quant_conv: cfg.use_post_quant_conv,
        };
        let model = AutoEncoderKL::new(vb, cfg.in_channels, cfg.out_channels, kl_cfg)?;
        Ok(Self { model, config: cfg.clone() })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Raw `vae.decode(z)`: (n, latent_channels, h, w) → (n, out_channels, s·h, s·w), no scaling.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let n = latents.dim(0)?;
        let mut parts = Vec::with_capacity(n.div_ceil(FRAMES_PER_BATCH));
        let mut start = 0;
        while start < n {
            let len = FRAMES_PER_BATCH.min(n - start);
            parts.push(self.model.decode(&latents.narrow(0, start, len)?)?);
            start += len;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}
