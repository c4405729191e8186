//! The UNet's levels: diffusers' `CrossAttnDownBlock3D`, `DownBlock3D`,
//! `UNetMidBlock3DCrossAttn`, `UpBlock3D` and `CrossAttnUpBlock3D`. Every layer is a spatial
//! ResNet block on each frame followed by a temporal convolution; the cross-attention kinds add
//! a spatial transformer and a temporal transformer after it.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{chunk_rows, conv2d, even_chunks, map_chunks, Conv2d, ResnetBlock2D, ResnetConfig};

use super::temporal::{TemporalConvLayer, TransformerTemporalModel};
use super::transformer_2d::Transformer2DModel;
use super::Conditioning;

/// What every level shares: the time-embedding width, the norms and the attention geometry.
#[derive(Debug, Clone, Copy)]
pub struct LevelConfig {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub cross_attention_dim: usize,
    /// The config's `attention_head_dim` for this level, which the reference uses as the width
    /// of one head (heads = channels / it) — see the note in `UNet3DConditionModel.__init__`.
    pub head_dim: usize,
}

/// One layer of a level: ResNet, temporal conv, and for cross-attention levels the spatial and
/// temporal transformers.
#[derive(Debug)]
struct Layer {
    resnet: ResnetBlock2D,
    temp_conv: TemporalConvLayer,
    attention: Option<(Transformer2DModel, TransformerTemporalModel)>,
}

fn resnet(
    vb: VarBuilder,
    in_ch: usize,
    out_ch: usize,
    cfg: &LevelConfig,
    output_scale_factor: f64,
) -> candle_core::Result<ResnetBlock2D> {
    let rcfg =
        ResnetConfig { groups: cfg.groups, eps: cfg.eps, temb_channels: Some(cfg.temb_channels), output_scale_factor };
    ResnetBlock2D::new(vb, in_ch, out_ch, rcfg)
}

fn attentions(
    vb: &VarBuilder,
    index: usize,
    channels: usize,
    cfg: &LevelConfig,
) -> candle_core::Result<(Transformer2DModel, TransformerTemporalModel)> {
    let heads = channels / cfg.head_dim;
    Ok((
        Transformer2DModel::new(
            vb.pp("attentions").pp(index),
            channels,
            heads,
            cfg.head_dim,
            cfg.cross_attention_dim,
            cfg.groups,
        )?,
        TransformerTemporalModel::new(vb.pp("temp_attentions").pp(index), channels, heads, cfg.head_dim, cfg.groups)?,
    ))
}

/// `f`, an operation on each image alone, on chunks of images of at most `chunk_bytes` of input.
fn per_frame(
    xs: &Tensor,
    chunk_bytes: usize,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let n = xs.dim(0)?;
    let row_bytes = xs.elem_count() / n.max(1) * xs.dtype().size_in_bytes();
    map_chunks(0, &even_chunks(n, chunk_rows(chunk_bytes, row_bytes)), |start, len| f(&xs.narrow(0, start, len)?))
}

impl Layer {
    fn forward(&self, xs: &Tensor, temb: &Tensor, cond: &Conditioning, frames: usize) -> candle_core::Result<Tensor> {
        self.attend(&self.convolve(&[xs], temb, frames, cond.chunk_bytes)?, cond, frames)
    }

    /// The part before the prompt is seen: ResNet and temporal convolution.
    fn convolve(
        &self,
        parts: &[&Tensor],
        temb: &Tensor,
        frames: usize,
        chunk_bytes: usize,
    ) -> candle_core::Result<Tensor> {
        self.temp_conv.forward(&self.resnet.forward_chunked(parts, Some(temb), chunk_bytes)?, frames)
    }

    fn attend(&self, xs: &Tensor, cond: &Conditioning, frames: usize) -> candle_core::Result<Tensor> {
        match &self.attention {
            Some((spatial, temporal)) => temporal.forward(
                &spatial.forward(xs, cond.text, cond.text_repeat, cond.chunk_bytes)?,
                frames,
                cond.windows,
                cond.chunk_bytes,
            ),
            None => Ok(xs.clone()),
        }
    }
}

/// `CrossAttnDownBlock3D` (with attention) or `DownBlock3D` (without).
#[derive(Debug)]
pub struct DownBlock {
    layers: Vec<Layer>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        with_attention: bool,
        add_downsample: bool,
        downsample_padding: usize,
        cfg: &LevelConfig,
    ) -> candle_core::Result<Self> {
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let in_ch = if i == 0 { in_channels } else { out_channels };
            layers.push(Layer {
                resnet: resnet(vb.pp("resnets").pp(i), in_ch, out_channels, cfg, 1.0)?,
                temp_conv: TemporalConvLayer::new(vb.pp("temp_convs").pp(i), out_channels, out_channels, cfg.groups)?,
                attention: if with_attention { Some(attentions(&vb, i, out_channels, cfg)?) } else { None },
            });
        }
        // Downsample2D(use_conv=True): a stride-2 3×3 convolution.
        let downsample = if add_downsample {
            Some(conv2d(out_channels, out_channels, 3, 2, downsample_padding, vb.pp("downsamplers.0.conv"))?)
        } else {
            None
        };
        Ok(Self { layers, downsample })
    }

    /// Returns the output and the skip connections it adds for the up path.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        cond: &Conditioning,
        frames: usize,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let first = self.forward_prefix(xs, temb, frames, cond.chunk_bytes)?;
        self.forward_after_prefix(&first, temb, cond, frames)
    }

    /// The first layer's ResNet and temporal convolution: all that comes before the block first
    /// sees the prompt.
    pub fn forward_prefix(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        frames: usize,
        chunk_bytes: usize,
    ) -> candle_core::Result<Tensor> {
        self.layers[0].convolve(&[xs], temb, frames, chunk_bytes)
    }

    /// The rest of [`DownBlock::forward`], from the output of [`DownBlock::forward_prefix`].
    pub fn forward_after_prefix(
        &self,
        prefix: &Tensor,
        temb: &Tensor,
        cond: &Conditioning,
        frames: usize,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut skips = Vec::with_capacity(self.layers.len() + 1);
        let mut xs = self.layers[0].attend(prefix, cond, frames)?;
        skips.push(xs.clone());
        for layer in &self.layers[1..] {
            xs = layer.forward(&xs, temb, cond, frames)?;
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsample {
            xs = per_frame(&xs, cond.chunk_bytes, |x| down.forward(x))?;
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }
}

/// `UNetMidBlock3DCrossAttn`: ResNet + temporal conv, then one layer of spatial transformer,
/// temporal transformer, ResNet and temporal conv.
#[derive(Debug)]
pub struct MidBlock {
    first_resnet: ResnetBlock2D,
    first_temp_conv: TemporalConvLayer,
    layers: Vec<(Transformer2DModel, TransformerTemporalModel, ResnetBlock2D, TemporalConvLayer)>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        output_scale_factor: f64,
        cfg: &LevelConfig,
    ) -> candle_core::Result<Self> {
        let (spatial, temporal) = attentions(&vb, 0, channels, cfg)?;
        Ok(Self {
            first_resnet: resnet(vb.pp("resnets.0"), channels, channels, cfg, output_scale_factor)?,
            first_temp_conv: TemporalConvLayer::new(vb.pp("temp_convs.0"), channels, channels, cfg.groups)?,
            layers: vec![(
                spatial,
                temporal,
                resnet(vb.pp("resnets.1"), channels, channels, cfg, output_scale_factor)?,
                TemporalConvLayer::new(vb.pp("temp_convs.1"), channels, channels, cfg.groups)?,
            )],
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        cond: &Conditioning,
        frames: usize,
    ) -> candle_core::Result<Tensor> {
        let chunk = cond.chunk_bytes;
        let mut xs =
            self.first_temp_conv.forward(&self.first_resnet.forward_chunked(&[xs], Some(temb), chunk)?, frames)?;
        for (spatial, temporal, resnet, temp_conv) in &self.layers {
            let attended = spatial.forward(&xs, cond.text, cond.text_repeat, chunk)?;
            xs = temporal.forward(&attended, frames, cond.windows, chunk)?;
            xs = temp_conv.forward(&resnet.forward_chunked(&[&xs], Some(temb), chunk)?, frames)?;
        }
        Ok(xs)
    }
}

/// `CrossAttnUpBlock3D` (with attention) or `UpBlock3D` (without).
#[derive(Debug)]
pub struct UpBlock {
    layers: Vec<Layer>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        prev_output_channels: usize,
        out_channels: usize,
        num_layers: usize,
        with_attention: bool,
        add_upsample: bool,
        cfg: &LevelConfig,
    ) -> candle_core::Result<Self> {
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            // The last layer takes the skip from the level's input, the others from its output.
            let skip_ch = if i == num_layers - 1 { in_channels } else { out_channels };
            let resnet_in = if i == 0 { prev_output_channels } else { out_channels };
            layers.push(Layer {
                resnet: resnet(vb.pp("resnets").pp(i), resnet_in + skip_ch, out_channels, cfg, 1.0)?,
                temp_conv: TemporalConvLayer::new(vb.pp("temp_convs").pp(i), out_channels, out_channels, cfg.groups)?,
                attention: if with_attention { Some(attentions(&vb, i, out_channels, cfg)?) } else { None },
            });
        }
        let upsample = if add_upsample {
            Some(conv2d(out_channels, out_channels, 3, 1, 1, vb.pp("upsamplers.0.conv"))?)
        } else {
            None
        };
        Ok(Self { layers, upsample })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `skips`: this level's skip connections, consumed from the last. `upsample_size`: the
    /// size to interpolate to when the latent size is not a multiple of the total down-sampling
    /// (otherwise twice the input). Both are taken by value: the input and each skip are let go
    /// as soon as the ResNet that reads them is done (at 256 frames under guidance, level 0's
    /// up-sampled input alone is 1.25 GiB, and each skip 0.62).
    pub fn forward(
        &self,
        xs: Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        cond: &Conditioning,
        frames: usize,
        upsample_size: Option<(usize, usize)>,
    ) -> candle_core::Result<Tensor> {
        if skips.len() != self.layers.len() {
            candle_core::bail!("{} skip connections for {} up-block layers", skips.len(), self.layers.len());
        }
        let mut xs = xs;
        for layer in &self.layers {
            let skip = skips.pop().expect("one skip per layer, checked above");
            // torch.cat([hidden_states, res_hidden_states], dim=1), made chunk by chunk
            xs = layer.resnet.forward_chunked(&[&xs, &skip], Some(temb), cond.chunk_bytes)?;
            drop(skip);
            xs = layer.temp_conv.forward(&xs, frames)?;
            xs = layer.attend(&xs, cond, frames)?;
        }
        if let Some(conv) = &self.upsample {
            let (_, _, h, w) = xs.dims4()?;
            let (th, tw) = upsample_size.unwrap_or((2 * h, 2 * w));
            // Upsample2D: nearest-neighbour interpolation, then a 3×3 convolution, per frame.
            xs = per_frame(&xs, cond.chunk_bytes / 4, |x| conv.forward(&crate::nn::upsample_nearest2d(x, th, tw)?))?;
        }
        Ok(xs)
    }
}
