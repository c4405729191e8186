//! Video-to-video: diffusers' `VideoToVideoSDPipeline.__call__` on the same loaded checkpoint.
//!
//! The input frames are encoded by the VAE, the posterior sampled and noised to the timestep
//! where the strength starts the schedule, and the last `int(n · strength)` steps of the
//! text-to-video loop run from there. One seeded generator draws, in the reference's order and
//! shape (frames as the batch, (F, C, h, w)): the posterior sample ε₁, the added noise ε₂, then
//! DDIM's per-step noise when η > 0.

use std::time::Instant;

use candle_core::Tensor;

use super::{Control, GenerationParams, StepProgress, TextToVideo, Timings, Video};
use crate::error::{Error, Result};
use crate::noise::TorchGenerator;
use crate::schedulers::{strength_begin_index, Scheduler};
use crate::vae::{self, VaeEncoder};

/// Where video-to-video starts denoising, as the reference's `prepare_latents` computes it; each
/// (frames, latent channels, h, w).
#[derive(Debug, Clone)]
pub struct VideoLatents {
    /// `scaling_factor · (mean + std · ε₁)`: the posterior sample of the input frames.
    pub image_latents: Tensor,
    /// ε₂, the noise added at the start timestep.
    pub noise: Tensor,
    /// `scheduler.add_noise(image_latents, ε₂, start timestep)`.
    pub noisy_latents: Tensor,
}

impl TextToVideo {
    /// The VAE encoder of this checkpoint, read from its weights on first use.
    pub fn vae_encoder(&self) -> Result<&VaeEncoder> {
        if let Some(encoder) = self.vae_encoder.get() {
            return Ok(encoder);
        }
        let cfg: vae::Config = self.folder.config("vae", "config.json")?;
        let weights = self.options.open_weights(&self.folder, "vae")?;
        let encoder = weights.build(|vb| VaeEncoder::new(vb, &cfg))?;
        Ok(self.vae_encoder.get_or_init(|| encoder))
    }

    /// Checks a video-to-video request before any work: `video` must be (frames, 3, H, W) with
    /// sides that are multiples of the VAE's scale, matching `params.height`/`width` where those
    /// are set, and `strength` must run at least one step. Returns the index of the first
    /// timestep that runs.
    pub fn validate_video_to_video(
        &self,
        params: &GenerationParams,
        video_shape: &[usize],
        strength: f64,
    ) -> Result<usize> {
        let &[frames, channels, height, width] = video_shape else {
            return Err(Error::InvalidArgument(format!(
                "the input video must be a (frames, 3, height, width) tensor, got shape {video_shape:?}"
            )));
        };
        if channels != self.vae.config().in_channels {
            return Err(Error::InvalidArgument(format!(
                "the input video must have {} channels (RGB), got shape {video_shape:?}",
                self.vae.config().in_channels
            )));
        }
        for (name, asked, got) in [("height", params.height, height), ("width", params.width, width)] {
            if let Some(asked) = asked.filter(|&a| a != got) {
                return Err(Error::InvalidArgument(format!(
                    "the input video's {name} is {got} but a {name} of {asked} is asked: resize the video to the asked size when reading it"
                )));
            }
        }
        let mut resolved =
            GenerationParams { num_frames: frames, height: Some(height), width: Some(width), ..params.clone() };
        resolved.long.context = resolved.long.context.filter(|c| c.length < frames);
        let shape = crate::sizing::run_shape(self.unet.config(), self.vae.config(), &resolved)?;
        self.check_activations(&shape)?;
        strength_begin_index(params.num_inference_steps, strength)
    }

    /// The reference's `prepare_latents`: encodes `video` (frames, 3, H, W) in [-1, 1], samples
    /// the posterior with `generator` (ε₁), scales it by the VAE's `scaling_factor`, draws ε₂ and
    /// noises the sample to `timestep` with `scheduler`, whose begin index must already be set.
    pub fn video_latents(
        &self,
        video: &Tensor,
        scheduler: &dyn Scheduler,
        timestep: usize,
        generator: &mut TorchGenerator,
    ) -> Result<VideoLatents> {
        let posterior = self.vae_encoder()?.encode(&video.to_device(&self.device)?.to_dtype(self.dtype)?)?;
        let image_latents = (posterior.sample(generator)? * self.vae.config().scaling_factor)?;
        let noise = generator.randn_tensor(image_latents.dims(), &self.device)?.to_dtype(self.dtype)?;
        let noisy_latents = scheduler.add_noise(&image_latents, &noise, timestep)?;
        Ok(VideoLatents { image_latents, noise, noisy_latents })
    }

    /// Re-renders `video` ((frames, 3, H, W) in [-1, 1], as
    /// [`crate::video::input::InputVideo::to_model_input`] makes it) following the prompt:
    /// `strength` (0 to 1) is how much of it is replaced. The frame count and size come from
    /// `video`; `params.num_frames` is not used. `on_step` runs after every step that runs.
    pub fn video_to_video(
        &self,
        params: &GenerationParams,
        video: &Tensor,
        strength: f64,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Video> {
        self.video_to_video_with_scheduler(params, &self.scheduler_config, video, strength, on_step)
    }

    /// [`TextToVideo::video_to_video`] with the scheduler built from `scheduler_config` (see
    /// [`TextToVideo::generate_with_scheduler`]).
    pub fn video_to_video_with_scheduler(
        &self,
        params: &GenerationParams,
        scheduler_config: &serde_json::Value,
        video: &Tensor,
        strength: f64,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Video> {
        let (latents, mut timings) =
            self.denoise_video_with_scheduler(params, scheduler_config, video, strength, on_step)?;
        let started = Instant::now();
        let frames = self.decode_latents(&latents)?;
        timings.decoding = started.elapsed();
        Ok(Video { frames, seed: params.seed, timings })
    }

    /// [`TextToVideo::video_to_video`] up to the final latents (1, C, frames, h, w), before the VAE.
    pub fn denoise_video(
        &self,
        params: &GenerationParams,
        video: &Tensor,
        strength: f64,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<(Tensor, Timings)> {
        self.denoise_video_with_scheduler(params, &self.scheduler_config, video, strength, on_step)
    }

    /// [`TextToVideo::denoise_video`] with the scheduler built from `scheduler_config` (see
    /// [`TextToVideo::generate_with_scheduler`]).
    pub fn denoise_video_with_scheduler(
        &self,
        params: &GenerationParams,
        scheduler_config: &serde_json::Value,
        video: &Tensor,
        strength: f64,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<(Tensor, Timings)> {
        let begin = self.validate_video_to_video(params, video.dims(), strength)?;
        // The clip sets the frame count; a window as long as the clip is plain video-to-video.
        let frames = video.dim(0)?;
        let mut resolved = GenerationParams { num_frames: frames, ..params.clone() };
        resolved.long.context = resolved.long.context.filter(|c| c.length < frames);
        let params = &resolved;
        let (context, text_encoding) = self.guidance_context(params)?;

        let started = Instant::now();
        let mut scheduler = self.scheduler(params, scheduler_config)?;
        let timesteps = scheduler.timesteps()[begin..].to_vec();
        scheduler.set_begin_index(begin);
        let mut generator = TorchGenerator::new(params.seed);
        let start = self.video_latents(video, scheduler.as_ref(), timesteps[0], &mut generator)?;
        let video_encoding = started.elapsed();

        // (frames, C, h, w) → (1, C, frames, h, w), the UNet's layout.
        let latents = start.noisy_latents.unsqueeze(0)?.permute((0, 2, 1, 3, 4))?.contiguous()?;
        let started = Instant::now();
        let latents = self.denoising_loop(
            params,
            &context,
            scheduler.as_mut(),
            &mut generator,
            latents,
            &timesteps,
            started,
            on_step,
        )?;
        let denoising = started.elapsed();
        Ok((latents, Timings { text_encoding, video_encoding, denoising, ..Timings::default() }))
    }
}
