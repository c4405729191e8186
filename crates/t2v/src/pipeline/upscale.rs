//! zeroscope's two-pass recipe as one call: generate with a first model, hand its frames on as
//! 8-bit images resized to the second model's size, and re-render them by video-to-video with the
//! second model (`cerspense/zeroscope_v2_576w` at 576×320, then `zeroscope_v2_XL` at 1024×576 and
//! strength 0.6, as its model card does with diffusers:
//! `[Image.fromarray(f).resize((1024, 576)) for f in frames]` → `pipe(prompt, video=…, strength=0.6)`).
//!
//! Only one model is in memory at a time: the first is dropped before the second loads, which is
//! what lets the XL pass run on machines that cannot hold both. The command line (`--upscale`),
//! the service and the Python package run the workflow through this module, so every door gives
//! the same frames.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{Control, GenerationParams, LoadOptions, StepProgress, TextToVideo, Video};
use crate::error::{Error, Result};
use crate::schedulers;
use crate::video::input::{frames_to_input, Fit, InputVideo, ResizeFilter};
use crate::video::Frames;

/// The second pass's settings (its prompt, seed, guidance and sampler are the first pass's).
#[derive(Debug, Clone, PartialEq)]
pub struct UpscaleParams {
    /// Frame size of the second pass, pixels.
    pub height: usize,
    pub width: usize,
    /// How much of the first pass's video the second replaces (0 to 1).
    pub strength: f64,
    /// The second pass's scheduler steps, of which `strength` of them run.
    pub num_inference_steps: usize,
}

impl UpscaleParams {
    /// The second pass's run parameters: those of `first` at this pass's size and steps.
    pub fn second_pass(&self, first: &GenerationParams) -> GenerationParams {
        GenerationParams {
            num_inference_steps: self.num_inference_steps,
            height: Some(self.height),
            width: Some(self.width),
            ..first.clone()
        }
    }
}

/// Which pass a step belongs to (1 or 2), for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Text-to-video (or video-to-video on an input clip) with the first model.
    First,
    /// Video-to-video with the second model on the first pass's frames.
    Second,
}

impl Pass {
    /// 1 or 2.
    pub fn number(self) -> usize {
        match self {
            Pass::First => 1,
            Pass::Second => 2,
        }
    }
}

/// What [`generate_upscaled`] reports as it goes.
#[derive(Debug, Clone)]
pub enum UpscaleEvent<'a> {
    /// A model of `pass` is loading (the first is dropped before the second loads).
    Loading(Pass),
    /// A denoising step of `pass` has finished.
    Step(Pass, &'a StepProgress),
}

/// The first pass's frames ((frames, height, width, 3) in [0, 1], a [`Video`]'s) as the
/// second pass takes them: 8-bit RGB as the reference's workflow hands PIL images on (each value
/// clamped and rounded), resized to `width`×`height` with the Lanczos filter (PIL's
/// `Image.resize` default for this recipe), as [`InputVideo`] — exactly what writing them as PNG
/// frames and reading those back with [`crate::video::input::read_video`] at that size gives.
pub fn first_pass_frames(frames: &Tensor, height: usize, width: usize) -> Result<InputVideo> {
    let (count, h, w, channels) = frames.dims4()?;
    if channels != 3 {
        return Err(Error::InvalidArgument(format!("frames must have 3 channels (RGB), not {channels}")));
    }
    let data = frames.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let clip = Frames::new(&data, count, h, w)?;
    frames_to_input(&clip, (width, height), Fit::Resize, ResizeFilter::Lanczos3)
}

/// The scheduler configuration of the checkpoint at `folder` with `overrides` applied (diffusers'
/// `Scheduler.from_config(config, **overrides)`), checked by building the scheduler `params`
/// ask for.
pub fn scheduler_config_for(
    folder: &Path,
    params: &GenerationParams,
    overrides: &[(String, String)],
) -> Result<serde_json::Value> {
    let path = folder.join("scheduler").join("scheduler_config.json");
    let base = schedulers::load_scheduler_config(&path)?;
    let config = schedulers::apply_overrides(params.scheduler, &base, overrides, &path)?;
    schedulers::build_scheduler(params.scheduler, &config, &path, params.num_inference_steps, params.eta)?;
    Ok(config)
}

/// One model of the workflow: its folder, how to load it and the scheduler overrides for it.
#[derive(Debug, Clone)]
pub struct PassModel<'a> {
    pub folder: &'a Path,
    pub options: LoadOptions,
    /// `from_config` overrides of the checkpoint's scheduler config (none: the config as it is).
    pub scheduler_overrides: &'a [(String, String)],
}

/// zeroscope's recipe in one call: `params` with the `first` model (video-to-video on `input`
/// — (frames, 3, H, W) in [-1, 1] and a strength — when given, else text-to-video), then the
/// `second` model re-renders the frames as `upscale` says. One model is loaded at a time.
/// The timings add up both passes. `on_event` may cancel at any step.
pub fn generate_upscaled(
    first: &PassModel,
    second: &PassModel,
    params: &GenerationParams,
    input: Option<(&Tensor, f64)>,
    upscale: &UpscaleParams,
    on_event: &mut dyn FnMut(UpscaleEvent) -> Control,
) -> Result<Video> {
    // Both passes' settings are checked before any model loads or any step runs.
    let second_params = upscale.second_pass(params);
    super::check_params(second.folder, &second_params)?;
    let first_config = scheduler_config_for(first.folder, params, first.scheduler_overrides)?;
    let second_config = scheduler_config_for(second.folder, &second_params, second.scheduler_overrides)?;

    let video = {
        if on_event(UpscaleEvent::Loading(Pass::First)) == Control::Cancel {
            return Err(Error::Cancelled);
        }
        let pipe = TextToVideo::load(first.folder, &first.options)?;
        let mut on_step = |p: &StepProgress| on_event(UpscaleEvent::Step(Pass::First, p));
        match input {
            Some((video, strength)) => {
                pipe.video_to_video_with_scheduler(params, &first_config, video, strength, &mut on_step)?
            }
            None => pipe.generate_with_scheduler(params, &first_config, &mut on_step)?,
        }
        // The first model is dropped here, before the second loads.
    };
    let frames = first_pass_frames(&video.frames, upscale.height, upscale.width)?;
    let tensor = frames.to_model_input(&Device::Cpu, DType::F32)?;
    if on_event(UpscaleEvent::Loading(Pass::Second)) == Control::Cancel {
        return Err(Error::Cancelled);
    }
    let pipe = TextToVideo::load(second.folder, &second.options)?;
    let mut on_step = |p: &StepProgress| on_event(UpscaleEvent::Step(Pass::Second, p));
    let mut upscaled =
        pipe.video_to_video_with_scheduler(&second_params, &second_config, &tensor, upscale.strength, &mut on_step)?;
    upscaled.timings.text_encoding += video.timings.text_encoding;
    upscaled.timings.video_encoding += video.timings.video_encoding;
    upscaled.timings.denoising += video.timings.denoising;
    upscaled.timings.decoding += video.timings.decoding;
    Ok(upscaled)
}
