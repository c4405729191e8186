//! What a run asks for ([`GenerationParams`]), the defaults of the model card's recipe, and the
//! checks that need no model. Below both the pipeline and the sizing of a run, which read it: data
//! flows one way (params → sizing → pipeline), and every door (command line, service, Python)
//! takes its defaults from here.

use crate::error::{Error, Result};
use crate::long_video::LongVideo;
use crate::schedulers::SchedulerKind;

/// Denoising steps of the model card's recipe.
pub const DEFAULT_STEPS: usize = 25;
/// Classifier-free guidance scale of the model card's recipe.
pub const DEFAULT_GUIDANCE_SCALE: f64 = 9.0;
/// Frames of the model card's recipe (the 1.7B model's training length).
pub const DEFAULT_NUM_FRAMES: usize = 16;
/// Video-to-video's strength: the share of the steps that run (diffusers' `VideoToVideoSDPipeline`
/// default).
pub const DEFAULT_STRENGTH: f64 = 0.6;
/// The second pass of the zeroscope workflow: the middle of its model card's 0.66–0.85.
pub const DEFAULT_UPSCALE_STRENGTH: f64 = 0.7;

/// What to generate. [`GenerationParams::new`] gives the model card's recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub prompt: String,
    /// What to steer away from; the empty prompt when absent, as the reference.
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale; at most 1 runs the UNet once a step, without guidance.
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    /// DDIM's η (0: deterministic); ignored by DPM-Solver++.
    pub eta: f64,
    pub num_frames: usize,
    /// Pixels; `None` takes the UNet's `sample_size` times the VAE scale.
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Long videos: FreeNoise's windows and keyframe prompts (off by default).
    pub long: LongVideo,
}

impl GenerationParams {
    /// The model card's recipe: DPM-Solver++, 25 steps, guidance 9, 16 frames.
    pub fn new(prompt: impl Into<String>, seed: u64) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            seed,
            num_inference_steps: DEFAULT_STEPS,
            guidance_scale: DEFAULT_GUIDANCE_SCALE,
            scheduler: SchedulerKind::DpmSolverMultistep,
            eta: 0.0,
            num_frames: DEFAULT_NUM_FRAMES,
            height: None,
            width: None,
            long: LongVideo::default(),
        }
    }
}

/// The largest classifier-free guidance scale accepted: published recipes use 7.5 to 15; far
/// above, the guided prediction leaves the range the model was trained on and turns to noise
/// or overflows.
pub const MAX_GUIDANCE_SCALE: f64 = 100.0;

/// The checks that need no model: sizes, counts and scales.
pub fn validate_params(params: &GenerationParams, height: usize, width: usize, vae_scale: usize) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if params.num_frames == 0 {
        return bad("the number of frames must be at least 1".into());
    }
    if params.num_inference_steps == 0 {
        return bad("the number of denoising steps must be at least 1".into());
    }
    params.long.validate(params.num_frames)?;
    if !params.guidance_scale.is_finite() || !(0.0..=MAX_GUIDANCE_SCALE).contains(&params.guidance_scale) {
        return bad(format!(
            "the guidance scale must be between 0 and {MAX_GUIDANCE_SCALE} (the model card uses 9), got {:?}",
            params.guidance_scale
        ));
    }
    // DDIM's η scales the fresh noise of each step; above 1 its variance exceeds what the step
    // leaves room for and the samples become NaN.
    if !params.eta.is_finite() || !(0.0..=1.0).contains(&params.eta) {
        return bad(format!("eta must be between 0 (deterministic) and 1, got {:?}", params.eta));
    }
    for (name, v) in [("height", height), ("width", width)] {
        if v == 0 || v % vae_scale != 0 {
            return bad(format!(
                "the {name} must be a positive multiple of {vae_scale} (the VAE's scale), got {v}; try {}",
                (v / vae_scale).max(1) * vae_scale
            ));
        }
    }
    Ok(())
}

/// The compute dtype for a name, the one parser every door uses: `f32`/`float32`/`fp32`/`float`,
/// `f16`/`float16`/`fp16`/`half`, `bf16`/`bfloat16`, any case, with or without torch's `torch.`
/// prefix (`torch_dtype=torch.float16` spelled as a string).
pub fn parse_dtype(name: &str) -> Result<candle_core::DType> {
    use candle_core::DType;
    let lower = name.trim().to_ascii_lowercase();
    match lower.strip_prefix("torch.").unwrap_or(&lower) {
        "f32" | "float32" | "fp32" | "float" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::InvalidArgument(format!("unknown dtype `{other}`: use f32, f16 or bf16"))),
    }
}

/// The short name of a compute dtype, as `--dtype` takes it and the settings record it.
pub fn dtype_name(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::F16 => "f16",
        candle_core::DType::BF16 => "bf16",
        _ => "f32",
    }
}
