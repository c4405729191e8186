//! The VAE encoder (diffusers' `AutoencoderKL.encode`): frames → the diagonal Gaussian posterior
//! over latents, which video-to-video samples its starting latents from.
//!
//! Built from the same layers as the decoder, so the CPU kernels apply. Each frame is encoded on
//! its own (GroupNorm statistics are per image, so this is the same result as one batch), which
//! bounds the activations to one frame's.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::{Config, SpatialSelfAttention};
use crate::error::{Error, Result};
use crate::nn::{conv2d, group_norm, Conv2d, GroupNorm, ResnetBlock2D, ResnetConfig};
use crate::noise::TorchGenerator;

/// `DownEncoderBlock2D`: ResNet blocks, then (except in the last block) a stride-2 3×3
/// convolution after padding one zero column on the right and one zero row at the bottom, as
/// diffusers' `Downsample2D` with `padding=0` does.
#[derive(Debug)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Conv2d>,
}

impl DownEncoderBlock {
    /// Takes its input by value, so that it is freed once the first ResNet block has read it.
    fn forward(&self, mut x: Tensor) -> candle_core::Result<Tensor> {
        for r in &self.resnets {
            x = r.forward(&x, None)?;
        }
        if let Some(conv) = &self.downsample {
            x = conv.forward_downsampled(&x)?;
        }
        Ok(x)
    }
}

/// The parameters of `vae.encode(x).latent_dist`, diffusers' `DiagonalGaussianDistribution`:
/// (n, latent_channels, h, w) each.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// The log-variance after the reference's clamp to [-30, 20].
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// The standard deviation, exp(0.5 · logvar).
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// `latent_dist.sample(generator)`: mean + std · ε, with ε drawn from `generator` in the mean's
    /// shape (frames as the batch), the draw that the reference makes first.
    pub fn sample(&self, generator: &mut TorchGenerator) -> Result<Tensor> {
        let eps = generator.randn_tensor(self.mean.dims(), self.mean.device())?.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (self.std()? * eps)?)?)
    }

    /// `latent_dist.mode()`: the mean.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// The encoder half of `AutoencoderKL`, with its `quant_conv`.
pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: SpatialSelfAttention,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    /// The compute dtype the weights were loaded in; inputs are converted to it.
    dtype: DType,
    config: Config,
}

impl VaeEncoder {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        validate_encoder(cfg)?;
        Ok(Self::build(vb, cfg)?)
    }

    fn build(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let groups = cfg.norm_num_groups;
        let resnet_cfg = ResnetConfig { groups, eps: 1e-6, temb_channels: None, output_scale_factor: 1.0 };
        let channels = &cfg.block_out_channels;
        let top = *channels.last().unwrap();
        let enc = vb.pp("encoder");
        let mid = enc.pp("mid_block");
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut out_ch = channels[0];
        for (i, &ch) in channels.iter().enumerate() {
            let prev = out_ch;
            out_ch = ch;
            let block = enc.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        block.pp("resnets").pp(j),
                        if j == 0 { prev } else { out_ch },
                        out_ch,
                        resnet_cfg,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsample = if i + 1 < channels.len() {
                Some(conv2d(out_ch, out_ch, 3, 2, 0, block.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock { resnets, downsample });
        }
        let moments = 2 * cfg.latent_channels;
        let quant_conv =
            if cfg.use_quant_conv { Some(conv2d(moments, moments, 1, 1, 0, vb.pp("quant_conv"))?) } else { None };
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, channels[0], 3, 1, 1, enc.pp("conv_in"))?,
            down_blocks,
            mid_resnets: [
                ResnetBlock2D::new(mid.pp("resnets.0"), top, top, resnet_cfg)?,
                ResnetBlock2D::new(mid.pp("resnets.1"), top, top, resnet_cfg)?,
            ],
            mid_attention: SpatialSelfAttention::new(mid.pp("attentions.0"), top, groups)?,
            conv_norm_out: group_norm(groups, top, 1e-6, enc.pp("conv_norm_out"))?,
            conv_out: conv2d(top, moments, 3, 1, 1, enc.pp("conv_out"))?,
            quant_conv,
            dtype: vb.dtype(),
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `vae.encode(x).latent_dist`: images (n, in_channels, H, W) in [-1, 1] → the posterior,
    /// (n, latent_channels, ⌈H/s⌉, ⌈W/s⌉) each.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let (n, c, h, w) = images.dims4()?;
        if c != self.config.in_channels || n == 0 || h == 0 || w == 0 {
            return Err(Error::InvalidArgument(format!(
                "the VAE encoder takes (frames, {}, height, width) images, got shape {:?}",
                self.config.in_channels,
                images.dims()
            )));
        }
        let mut moments = Vec::with_capacity(n);
        for i in 0..n {
            moments.push(self.moments(&images.narrow(0, i, 1)?)?);
        }
        let moments = Tensor::cat(&moments, 0)?;
        let latent = self.config.latent_channels;
        let mean = moments.narrow(1, 0, latent)?.contiguous()?;
        // The clamp bounds of the reference's DiagonalGaussianDistribution.
        let logvar = moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?.contiguous()?;
        Ok(DiagonalGaussian { mean, logvar })
    }

    /// The encoder and `quant_conv` on one image: (1, 2·latent_channels, h, w).
    fn moments(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(&x.to_dtype(self.dtype)?)?;
        for block in &self.down_blocks {
            x = block.forward(x)?;
        }
        let x = self.mid_resnets[0].forward(&x, None)?;
        let x = self.mid_attention.forward(&x)?;
        let x = self.mid_resnets[1].forward(&x, None)?;
        let x = self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)?;
        match &self.quant_conv {
            Some(conv) => conv.forward(&x),
            None => Ok(x),
        }
    }
}

/// The encoder's own configuration checks (the decoder's are in [`Config::validate`]).
fn validate_encoder(cfg: &Config) -> Result<()> {
    let bad = |msg: String| Err(Error::InvalidArgument(format!("vae/config.json: {msg}")));
    if cfg.down_block_types.len() != cfg.block_out_channels.len() {
        return bad("down_block_types and block_out_channels must be of the same length".into());
    }
    if let Some(t) = cfg.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
        return bad(format!("down block type `{t}` is not supported (DownEncoderBlock2D)"));
    }
    if cfg.layers_per_block == 0 {
        return bad("layers_per_block must be at least 1".into());
    }
    Ok(())
}
