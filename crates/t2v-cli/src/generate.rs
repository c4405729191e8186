//! `t2v generate`: settings are the library's defaults, then those of `--from`, then the flags;
//! every output is decided and checked before the model loads; the model loads once.
//!
//! One file: the flags, their merge with `--from` and the run that follows are one command; the work
//! itself is the library's (`t2v::pipeline`, `pipeline::upscale`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use serde::Serialize;
use t2v::checkpoint::{self, HubOptions, WeightsVariant, DEFAULT_MODEL};
use t2v::long_video::{ContextWeighting, ContextWindows};
use t2v::pipeline::upscale::{self, scheduler_config_for};
use t2v::pipeline::{self, Control, GenerationParams, LoadOptions, StepProgress, TextToVideo, Timings, Video};
use t2v::schedulers::{strength_begin_index, SchedulerKind};

/// The width of T2V-Turbo-MS's guidance embedding (`time_cond_proj_dim` of its UNet).
const T2V_TURBO_COND_DIM: usize = 256;
use t2v::video::input::{read_video, Fit, ReadOptions};
use t2v::video::{EncodeOptions, Frames, Quality, VideoFormat};

use crate::output::{self, Planner, Target};
use crate::progress::{frames_bar, spinner, steps_bar};
use crate::settings::{input_sha256, parse_dtype, InputSettings, LoraSettings, RunSettings, UpscaleSettings};

#[derive(Args)]
pub struct GenerateArgs {
    /// What the video shows (the model understands English only).
    prompt: Option<String>,

    /// Generate one video per line of this file (empty lines and lines starting with # skipped).
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    prompts: Option<PathBuf>,

    /// Repeat a run: take every setting from a settings .json that t2v wrote, or from an MP4 it
    /// made. Options given as well override those settings.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,

    /// A local folder in the diffusers layout, or a Hugging Face repo id (owner/name[@revision]),
    /// downloaded once into the Hugging Face cache (HF_HOME, HF_HUB_CACHE; HF_HUB_OFFLINE=1 to
    /// stay offline). [default: damo-vilab/text-to-video-ms-1.7b]
    #[arg(long, short = 'm')]
    model: Option<String>,

    /// What the video should not show. [default: none (the empty prompt)]
    #[arg(long, short = 'n')]
    negative_prompt: Option<String>,

    /// Random seed: the same seed and settings give the same video; with --num-videos, the
    /// videos use seed, seed+1, ... [default: picked at random and printed]
    #[arg(long, short = 's', allow_negative_numbers = true)]
    seed: Option<u64>,

    /// Denoising steps. [default: 25]
    #[arg(long, allow_negative_numbers = true)]
    steps: Option<usize>,

    /// Classifier-free guidance scale: how strongly to follow the prompt (≤ 1 turns guidance
    /// off). [default: 9]
    #[arg(long, short = 'g', allow_negative_numbers = true)]
    guidance_scale: Option<f64>,

    /// Sampler: `dpm` (DPM-Solver++ multistep, the model card's recipe), `ddim` (the
    /// checkpoint's own), `lcm` (latent consistency: distilled LoRAs, 4 steps, guidance 1),
    /// `unipc`, `euler`, `euler_a` (Euler ancestral) or `t2v-turbo` (T2V-Turbo-MS's consistency
    /// sampler: with `--lora unet_lora.pt`, 4 steps; the UNet gets T2V-Turbo's 256-wide guidance
    /// embedding of `--guidance-scale`, no unconditional pass). Each is built from the
    /// checkpoint's scheduler config as diffusers' `from_config` does. [default: dpm]
    #[arg(long)]
    scheduler: Option<SchedulerKind>,

    /// A scheduler setting over the checkpoint's, KEY=VALUE (repeatable), as diffusers'
    /// `from_config(config, KEY=VALUE)`: `--scheduler lcm --scheduler-config timestep_scaling=4`.
    #[arg(long, value_name = "KEY=VALUE")]
    scheduler_config: Vec<String>,

    /// Merge a LoRA into the model at load, PATH[:WEIGHT] (weight 1 by default; repeatable, the
    /// updates add): a diffusers/PEFT .safetensors (lora_A/lora_B or lora.down/lora.up keys), a
    /// kohya one (lora_unet_…, with .alpha), a PEFT adapter folder (adapter_config.json), a
    /// Text-To-Video-Finetuning / T2V-Turbo list (.pt), or a Stable LoRA (the webui's). Instead of
    /// a path, a Hub repo: owner/name[/subfolder][@revision] (yhzhai/mcm/modelscopet2v-webvid).
    #[arg(long, value_name = "PATH|REPO[/SUBFOLDER][:WEIGHT]")]
    lora: Vec<String>,

    /// DDIM's eta: 0 is deterministic, 1 adds as much fresh noise as DDPM. [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    eta: Option<f64>,

    /// Number of frames; with --video, how many frames to read (a clip with fewer is refused).
    /// [default: 16; with --video, all the frames chosen, up to 64]
    #[arg(long, short = 'f', allow_negative_numbers = true)]
    num_frames: Option<usize>,

    /// Long videos (FreeNoise): the temporal attention sees windows of this many frames, fused
    /// with weights, and the noise repeats shuffled from the first window; 0 keeps it off.
    /// [default: off; 16 when --num-frames is above 24]
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    context_length: Option<usize>,

    /// Frames between FreeNoise windows, 1 to the context length. [default: 4]
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    context_stride: Option<usize>,

    /// How overlapping windows are weighted per frame: pyramid, flat or
    /// delayed_reverse_sawtooth. [default: pyramid]
    #[arg(long, value_name = "SCHEME")]
    context_weighting: Option<ContextWeighting>,

    /// Prompt travel: the prompt from keyframe FRAME (0-based) on, as `--prompt-at 32:"a red
    /// car"`; frames between keyframes blend their neighbours' prompts. Repeatable; the
    /// positional prompt is frame 0's.
    #[arg(long, value_name = "FRAME:TEXT", value_parser = parse_keyframe)]
    prompt_at: Vec<(usize, String)>,

    /// A negative prompt from keyframe FRAME on, as --prompt-at; --negative-prompt is frame 0's.
    #[arg(long, value_name = "FRAME:TEXT", value_parser = parse_keyframe)]
    negative_prompt_at: Vec<(usize, String)>,

    /// Frame height in pixels, a multiple of the VAE's scale (8). [default: the model's native
    /// size, 256 for the 1.7B model]
    #[arg(long, allow_negative_numbers = true)]
    height: Option<usize>,

    /// Frame width in pixels, a multiple of the VAE's scale (8). [default: the model's native size]
    #[arg(long, allow_negative_numbers = true)]
    width: Option<usize>,

    /// Re-render this video following the prompt (video-to-video): an MP4 (H.264), a GIF, a
    /// folder of PNG or JPEG frames, or a .npy array. Its frames are resized to --height/--width
    /// (default: the model's native size) with a note.
    #[arg(long, value_name = "IN")]
    video: Option<PathBuf>,

    /// With --video: how much of the input is replaced, 0 to 1; the last int(steps × strength)
    /// steps run. [default: 0.6, as diffusers' VideoToVideoSDPipeline]
    #[arg(long, allow_negative_numbers = true)]
    strength: Option<f64>,

    /// With --video: the first frame read, 0-based. [default: 0]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    video_start: Option<usize>,

    /// With --video: read every N-th frame (3 turns a 24 fps clip into the model's 8 fps). [default: 1]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    video_every: Option<usize>,

    /// With --video: how a clip of another size becomes the frame size: resize (stretch to it),
    /// crop (cover it, cut the overflow) or pad (fit inside, black bars). [default: resize]
    #[arg(long, value_name = "HOW")]
    video_fit: Option<Fit>,

    /// Two passes in one command: generate with --model, then re-render those frames with this
    /// model at --upscale-size (video-to-video; one model in memory at a time), as zeroscope's
    /// 576w → XL recipe. With --video, re-render that video with this model (the same as --video
    /// with --model).
    #[arg(long, value_name = "MODEL")]
    upscale: Option<String>,

    /// Frame size of the second pass, WIDTHxHEIGHT. [default: the upscale model's native size]
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    upscale_size: Option<(usize, usize)>,

    /// How much of the first pass the second replaces, 0 to 1. [default: 0.7; zeroscope_v2_XL's
    /// card: 0.66 to 0.85]
    #[arg(long, allow_negative_numbers = true)]
    upscale_strength: Option<f64>,

    /// Denoising steps of the second pass (of which int(steps × strength) run). [default: --steps]
    #[arg(long, allow_negative_numbers = true)]
    upscale_steps: Option<usize>,

    /// Videos per prompt, with consecutive seeds.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    num_videos: usize,

    /// Output file (or folder, for PNG frames); the format follows the extension. Give it more
    /// than once to write several formats of each video. With several videos, -1, -2, ... is
    /// added to the name. [default: outputs/<prompt>-<seed>.mp4]
    #[arg(long, short = 'o')]
    output: Vec<PathBuf>,

    /// Output formats, comma-separated (mp4, gif, png: a folder of frames, npy), when the
    /// extension does not say: `--format mp4,gif` writes both. [default: from the extension, else mp4]
    #[arg(long, value_delimiter = ',')]
    format: Vec<VideoFormat>,

    /// Frames per second of the MP4 or GIF. [default: 8, as the original model's videos]
    #[arg(long, allow_negative_numbers = true)]
    fps: Option<u32>,

    /// H.264 quantiser, 12 (best) to 51 (smallest); 16 is visually lossless.
    #[arg(long, default_value_t = Quality::DEFAULT_QP, value_parser = clap::value_parser!(u8).range(12..=51))]
    quality: u8,

    /// Replace output files that exist.
    #[arg(long)]
    overwrite: bool,

    /// Compute precision: f32 (the reference's numbers), f16 (on a GPU: float16 throughout; on
    /// the CPU: float16 weights, float32 activations, matrix products in float16 with
    /// AVX512_FP16 (Intel since Sapphire Rapids; widened elsewhere), the fastest without AMX;
    /// frames within 2e-2 of f32) or bf16 (on the CPU: bfloat16 weights, float32 activations,
    /// matrix products in bfloat16 on AMX, or with AVX512_BF16 where that beats float32 (AMD;
    /// Intel without AMX widens them), the fastest with AMX; frames within 2e-2 of f32).
    /// [default: f32, or what --from recorded]
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,

    /// Where to run: cpu, cuda, cuda:N, metal, metal:N, or auto (a GPU when this build supports
    /// one and it is present, else the CPU). GPUs need a build with `--features cuda` or `metal`.
    #[arg(long, default_value = "auto")]
    device: String,

    /// Which weights to use (and download) when the model has several: auto (the full-precision
    /// ones, or fp16 when they are the only ones), fp16 (`*.fp16.safetensors`: half the
    /// download) or full.
    #[arg(long, default_value_t = WeightsVariant::Auto)]
    variant: WeightsVariant,

    /// Never use the network: the model must be in the Hugging Face cache (as HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,

    /// No progress or messages on stderr (errors still print).
    #[arg(long, short = 'q')]
    quiet: bool,

    /// Print a JSON summary (outputs, seeds, timings) on stdout.
    #[arg(long)]
    json: bool,
}

impl GenerateArgs {
    /// The flags given override `params`.
    fn apply_to(&self, params: &mut GenerationParams) {
        if let Some(v) = &self.negative_prompt {
            params.negative_prompt = Some(v.clone());
        }
        if let Some(v) = self.seed {
            params.seed = v;
        }
        if let Some(v) = self.steps {
            params.num_inference_steps = v;
        }
        if let Some(v) = self.guidance_scale {
            params.guidance_scale = v;
        }
        if let Some(v) = self.scheduler {
            params.scheduler = v;
        }
        if let Some(v) = self.eta {
            params.eta = v;
        }
        if let Some(v) = self.num_frames {
            params.num_frames = v;
        }
        if self.height.is_some() {
            params.height = self.height;
        }
        if self.width.is_some() {
            params.width = self.width;
        }
        // FreeNoise: --context-length turns it on (0: off); stride and weighting adjust it.
        if let Some(length) = self.context_length {
            params.long.context = (length > 0).then(|| {
                let recorded = params.long.context;
                ContextWindows::new(
                    length,
                    recorded.map_or(ContextWindows::DEFAULT_STRIDE, |c| c.stride),
                    recorded.map_or(ContextWeighting::default(), |c| c.weighting),
                )
            });
        }
        if let Some(c) = &mut params.long.context {
            if let Some(stride) = self.context_stride {
                c.stride = stride;
            }
            if let Some(weighting) = self.context_weighting {
                c.weighting = weighting;
            }
        }
        for (frame, text) in &self.prompt_at {
            params.long.prompts.insert(*frame, text.clone());
        }
        for (frame, text) in &self.negative_prompt_at {
            params.long.negative_prompts.insert(*frame, text.clone());
        }
    }

    /// When a long video asks for nothing about FreeNoise: on, with diffusers' 16 / 4, above
    /// the training length of these models (16 frames for the 1.7B, 24 for zeroscope).
    fn auto_context(&self, params: &mut GenerationParams, repeating: bool) -> Option<String> {
        let asked_frames = self.num_frames.is_some() || !repeating;
        if self.context_length.is_some()
            || params.long.context.is_some()
            || !asked_frames
            || params.num_frames <= AUTO_CONTEXT_ABOVE
        {
            return None;
        }
        let mut windows = ContextWindows::new(
            ContextWindows::DEFAULT_LENGTH,
            ContextWindows::DEFAULT_STRIDE,
            ContextWeighting::default(),
        );
        if let Some(stride) = self.context_stride {
            windows.stride = stride;
        }
        if let Some(weighting) = self.context_weighting {
            windows.weighting = weighting;
        }
        params.long.context = Some(windows);
        Some(format!(
            "{} frames is past what the model was trained on: FreeNoise is on, windows of {} frames every {} ({}); \
             --context-length 0 turns it off",
            params.num_frames, windows.length, windows.stride, windows.weighting
        ))
    }
}

/// Above this many frames FreeNoise turns on by itself (zeroscope's training length).
pub const AUTO_CONTEXT_ABOVE: usize = 24;

/// `FRAME:TEXT`, as `32:a red car`.
fn parse_keyframe(s: &str) -> Result<(usize, String), String> {
    let bad = || format!("invalid keyframe `{s}`: give FRAME:TEXT, as 32:\"a red car\" (frames are 0-based)");
    let (frame, text) = s.split_once(':').ok_or_else(bad)?;
    let frame = frame.trim().parse::<usize>().map_err(|_| bad())?;
    Ok((frame, text.to_string()))
}

pub fn hub_options(offline: bool, quiet: bool, variant: WeightsVariant) -> HubOptions {
    let mut opts = HubOptions::from_env();
    opts.offline |= offline;
    opts.progress &= !quiet;
    opts.variant = variant;
    opts
}

/// One video to make.
struct Job {
    params: GenerationParams,
    targets: Vec<Target>,
}

#[derive(Serialize)]
struct VideoSummary {
    outputs: Vec<Written>,
    settings: RunSettings,
    text_encoding_s: f64,
    video_encoding_s: f64,
    denoising_s: f64,
    decoding_s: f64,
    writing_s: f64,
}

#[derive(Serialize)]
struct Written {
    output: PathBuf,
    settings_file: PathBuf,
    format: &'static str,
}

#[derive(Serialize)]
struct Summary {
    model: String,
    model_folder: PathBuf,
    load_s: f64,
    videos: Vec<VideoSummary>,
}

pub use t2v::params::{DEFAULT_STRENGTH, DEFAULT_UPSCALE_STRENGTH};

/// `WIDTHxHEIGHT`, as `1024x576`.
fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("invalid size `{s}`: give WIDTHxHEIGHT, as 1024x576");
    let (w, h) = s.trim().split_once(['x', 'X', '×']).ok_or_else(bad)?;
    Ok((w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?))
}

/// The second pass of a two-pass run, resolved.
struct UpscalePass {
    spec: String,
    folder: PathBuf,
    height: usize,
    width: usize,
    strength: f64,
    steps: usize,
}

impl UpscalePass {
    fn params(&self) -> upscale::UpscaleParams {
        upscale::UpscaleParams {
            height: self.height,
            width: self.width,
            strength: self.strength,
            num_inference_steps: self.steps,
        }
    }
}

/// The input video of a video-to-video run, read and checked.
struct InputClip {
    settings: InputSettings,
    /// (frames, 3, H, W) in [-1, 1].
    tensor: Tensor,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let quiet = args.quiet;
    let say = |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    let from = match &args.from {
        Some(path) => {
            Some(RunSettings::read(path).with_context(|| format!("reading the settings in {}", path.display()))?)
        }
        None => None,
    };
    let from_input = from.as_ref().and_then(|s| s.input.clone());
    let from_upscale = from.as_ref().and_then(|s| s.upscale.clone());

    // The library's defaults (the model card's recipe), then the settings repeated, then the flags.
    let mut template = GenerationParams::new(String::new(), 0);
    if let Some(s) = &from {
        s.apply_to(&mut template).context("the settings of --from")?;
    }
    args.apply_to(&mut template);
    if args.seed.is_none() && from.is_none() {
        template.seed = random_seed();
        say(&format!("seed: {} (pass --seed {} to repeat)", template.seed, template.seed));
    }
    // LoRAs: as given, else those of --from (refused when a file changed since).
    let loras: Vec<t2v::lora::LoraSpec> = if !args.lora.is_empty() {
        // A path, or a Hub repo `owner/name[/subfolder][@revision]` fetched into the cache.
        let lora_hub = hub_options(args.offline, quiet, args.variant);
        args.lora
            .iter()
            .map(|l| {
                let mut spec = t2v::lora::LoraSpec::parse(l)?;
                spec.path = t2v::checkpoint::hub::resolve_lora(&spec.path.to_string_lossy(), &lora_hub)?;
                Ok(spec)
            })
            .collect::<t2v::Result<_>>()?
    } else {
        match &from {
            Some(s) => s.loras.iter().map(|l| l.check()).collect::<Result<_>>()?,
            None => Vec::new(),
        }
    };
    let lora_settings = loras.iter().map(LoraSettings::of).collect::<Result<Vec<_>>>().context("reading the LoRAs")?;
    // Scheduler settings: those of --from, then the flags.
    let mut scheduler_overrides = from.as_ref().map(|s| s.scheduler_config.clone()).unwrap_or_default();
    for text in &args.scheduler_config {
        let (key, value) = t2v::schedulers::parse_override(text)?;
        scheduler_overrides.insert(key, value);
    }
    let fps = args.fps.or(from.as_ref().map(|s| s.fps)).unwrap_or(t2v::video::DEFAULT_FPS);
    if fps == 0 {
        bail!("--fps must be at least 1");
    }
    let dtype = match (args.dtype, &from) {
        (Some(d), _) => d,
        (None, Some(s)) => s.dtype().context("the settings of --from")?,
        (None, None) => DType::F32,
    };

    // Video-to-video and the second pass.
    let video_path = args.video.clone().or_else(|| from_input.as_ref().map(|i| i.path.clone()));
    // Long videos: FreeNoise on by itself past the models' training length (text-to-video).
    if video_path.is_none() {
        if let Some(note) = args.auto_context(&mut template, from.is_some()) {
            say(&format!("note: {note}"));
        }
    }
    if template.long.context.is_none() {
        for (given, name) in [
            (args.context_stride.is_some(), "--context-stride"),
            (args.context_weighting.is_some(), "--context-weighting"),
        ] {
            if given {
                bail!("{name} applies to FreeNoise's windows: give it with --context-length W (W ≥ 1 frames)");
            }
        }
    }
    if video_path.is_none() {
        for (given, name) in [
            (args.strength.is_some(), "--strength"),
            (args.video_start.is_some(), "--video-start"),
            (args.video_every.is_some(), "--video-every"),
            (args.video_fit.is_some(), "--video-fit"),
        ] {
            if given {
                bail!("{name} applies to an input video: give it with --video IN");
            }
        }
    }
    let upscale_model = args.upscale.clone().or_else(|| from_upscale.as_ref().map(|u| u.model.clone()));
    if upscale_model.is_none() {
        for (given, name) in [
            (args.upscale_size.is_some(), "--upscale-size"),
            (args.upscale_strength.is_some(), "--upscale-strength"),
            (args.upscale_steps.is_some(), "--upscale-steps"),
        ] {
            if given {
                bail!("{name} applies to a second pass: give it with --upscale MODEL");
            }
        }
    }
    let mut model_arg = args.model.clone();
    let mut strength = args.strength.or(from_input.as_ref().map(|i| i.strength)).unwrap_or(DEFAULT_STRENGTH);
    let mut upscale = None;
    if let Some(up_model) = upscale_model {
        let up_strength =
            args.upscale_strength.or(from_upscale.as_ref().map(|u| u.strength)).unwrap_or(DEFAULT_UPSCALE_STRENGTH);
        let up_steps =
            args.upscale_steps.or(from_upscale.as_ref().map(|u| u.steps)).unwrap_or(template.num_inference_steps);
        let up_size = args.upscale_size.or(from_upscale.as_ref().map(|u| (u.width, u.height)));
        if video_path.is_some() {
            // An existing video re-rendered by the upscaler: one video-to-video pass.
            for (given, name) in [
                (args.model.is_some(), "--model"),
                (args.strength.is_some(), "--strength"),
                (args.height.is_some(), "--height"),
                (args.width.is_some(), "--width"),
            ] {
                if given {
                    bail!(
                        "with --video, `--upscale M --upscale-size WxH --upscale-strength S` is the same as `--model M \
                         --width W --height H --strength S`: give one form, not {name} as well"
                    );
                }
            }
            model_arg = Some(up_model);
            strength = up_strength;
            template.num_inference_steps = up_steps;
            template.height = up_size.map(|(_, h)| h);
            template.width = up_size.map(|(w, _)| w);
        } else {
            upscale = Some((up_model, up_size, up_strength, up_steps));
        }
    }
    // A strength that runs no step is refused before anything is read.
    if video_path.is_some() {
        strength_begin_index(template.num_inference_steps, strength)?;
    }
    if let Some((_, _, s, n)) = &upscale {
        strength_begin_index(*n, *s).context("the second pass")?;
    }
    let model_spec =
        model_arg.or_else(|| from.as_ref().map(|s| s.model.clone())).unwrap_or_else(|| DEFAULT_MODEL.to_string());

    if let Some(path) = &args.video {
        if !path.exists() {
            bail!(
                "the input video {} does not exist: give the path of an .mp4, .gif, .npy or a folder of frames",
                path.display()
            );
        }
    }
    // Repeating a video-to-video run needs the very same input.
    if let (None, Some(i)) = (&args.video, &from_input) {
        if !i.path.exists() {
            bail!(
                "the input video of these settings, {}, is missing: put it back to repeat the run, or give --video \
                 with another clip (the result will differ)",
                i.path.display()
            );
        }
        let now = input_sha256(&i.path)?;
        if now != i.sha256 {
            bail!(
                "the input video {} has changed since the run (SHA-256 {} recorded, {now} now): restore the original \
                 to repeat the run, or pass --video {} to re-render it as it is now",
                i.path.display(),
                i.sha256,
                i.path.display()
            );
        }
    }

    // The prompts: given, from a file, or from the settings being repeated.
    let prompts: Vec<String> = if let Some(p) = &args.prompt {
        vec![p.clone()]
    } else if let Some(file) = &args.prompts {
        let text = t2v::files::read_text(file, t2v::files::FileKind::Prompts).context("reading the prompts")?;
        let prompts: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
        if prompts.is_empty() {
            bail!("{} holds no prompts (one a line; lines starting with # are skipped)", file.display());
        }
        prompts
    } else if from.is_some() {
        vec![template.prompt.clone()]
    } else {
        bail!("say what the video should show: t2v generate \"a corgi surfing a wave\" (or --prompts FILE, or --from SETTINGS)");
    };
    if args.num_videos == 0 {
        bail!("--num-videos must be at least 1");
    }
    let total = prompts.len().checked_mul(args.num_videos).filter(|&n| n <= MAX_VIDEOS).with_context(|| {
        format!(
            "{} prompts × --num-videos {} is more than the {MAX_VIDEOS} videos one run makes: split the run",
            prompts.len(),
            args.num_videos
        )
    })?;
    let device = pipeline::select_device(&args.device)?;

    // Every output is decided and checked before any model work.
    let mut planner = Planner::new(&args.output, &args.format, args.overwrite)?;
    let mut jobs = Vec::with_capacity(total);
    for (p, prompt) in prompts.iter().enumerate() {
        for k in 0..args.num_videos {
            let seed = template.seed.checked_add(k as u64).with_context(|| {
                format!("seed {} + {k} is past the largest seed ({}): choose a smaller --seed", template.seed, u64::MAX)
            })?;
            let params = GenerationParams { prompt: prompt.clone(), seed, ..template.clone() };
            let targets = planner.plan(prompt, params.seed, p * args.num_videos + k, total)?;
            jobs.push(Job { params, targets });
        }
    }

    let hub = hub_options(args.offline, quiet, args.variant);
    let (model_spec, model_folder) = resolve(&model_spec, &hub)?;
    // The LoRAs go into the model of the first pass only (the second is another model).
    let upscale_options =
        LoadOptions { device: device.clone(), dtype, variant: args.variant, ..LoadOptions::default() };
    // T2V-Turbo-MS's UNet has a 256-wide guidance embedding (its `cond_proj` starts from zeros:
    // no published file holds its base weight).
    let time_cond_proj_dim = (template.scheduler == SchedulerKind::T2vTurbo).then_some(T2V_TURBO_COND_DIM);
    let options = LoadOptions { loras: loras.clone(), time_cond_proj_dim, ..upscale_options.clone() };
    // With an input video the frame count is the clip's, checked once it is read.
    let checked = match &video_path {
        Some(_) => GenerationParams { long: Default::default(), ..template.clone() },
        None => template.clone(),
    };
    let (height, width) = pipeline::check_params(&model_folder, &checked)
        .with_context(|| format!("checking the settings against {model_spec}"))?;
    t2v::pipeline::check_loras_with(&model_folder, &loras, args.variant, time_cond_proj_dim)
        .with_context(|| format!("checking the LoRAs against {model_spec}"))?;
    let overrides: Vec<(String, String)> = scheduler_overrides.clone().into_iter().collect();
    let scheduler_config = scheduler_config_for(&model_folder, &template, &overrides)
        .with_context(|| format!("checking --scheduler-config against {model_spec}"))?;
    let upscale = match upscale {
        Some((spec, size, strength, steps)) => {
            let (spec, folder) = resolve(&spec, &hub)?;
            let asked = GenerationParams {
                num_inference_steps: steps,
                height: size.map(|(_, h)| h),
                width: size.map(|(w, _)| w),
                ..template.clone()
            };
            let (h, w) = pipeline::check_params(&folder, &asked)
                .with_context(|| format!("checking the second pass's settings against {spec}"))?;
            scheduler_config_for(&folder, &asked, &overrides)
                .with_context(|| format!("checking --scheduler-config against {spec}"))?;
            Some(UpscalePass { spec, folder, height: h, width: w, strength, steps })
        }
        None => None,
    };

    // The input video, read at the frame size (a note says when it was resized).
    let input = match &video_path {
        Some(path) => {
            let from_input = from_input.as_ref();
            let fit = match (args.video_fit, from_input) {
                (Some(f), _) => f,
                (None, Some(i)) => Fit::parse(&i.fit).context("the settings of --from")?,
                (None, None) => Fit::default(),
            };
            let options = ReadOptions {
                size: Some((width, height)),
                fit,
                start_frame: args.video_start.or(from_input.map(|i| i.start_frame)).unwrap_or(0),
                every: args.video_every.or(from_input.map(|i| i.every)).unwrap_or(1),
                num_frames: args.num_frames.or(from.as_ref().filter(|_| from_input.is_some()).map(|s| s.num_frames)),
                ..ReadOptions::default()
            };
            let clip =
                read_video(path, &options).with_context(|| format!("reading the input video {}", path.display()))?;
            for w in &clip.warnings {
                say(&format!("note: {}", printable(w)));
            }
            let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            let settings = InputSettings {
                sha256: input_sha256(&absolute)?,
                path: absolute,
                strength,
                start_frame: options.start_frame,
                every: options.every,
                fit: fit.name().to_string(),
            };
            for job in &mut jobs {
                job.params.num_frames = clip.frames;
                // A window as long as the clip is plain video-to-video.
                if job.params.long.context.is_some_and(|c| c.length >= clip.frames) {
                    job.params.long.context = None;
                }
            }
            Some(InputClip { settings, tensor: clip.to_model_input(&candle_core::Device::Cpu, DType::F32)? })
        }
        None => None,
    };
    for job in &mut jobs {
        job.params.height = Some(height);
        job.params.width = Some(width);
    }
    // What the encoders cannot take is known now, before the first step (and before the memory
    // plan: a hard limit of the format, whatever the machine).
    let (out_height, out_width) = upscale.as_ref().map_or((height, width), |u| (u.height, u.width));
    for job in &jobs {
        for t in &job.targets {
            t2v::video::check_encodable(t.format, job.params.num_frames, out_height, out_width, fps)
                .with_context(|| format!("{} cannot be written", t.path.display()))?;
        }
    }
    // The memory each pass needs, with the frame count of the input video when there is one.
    if let Some(job) = jobs.first() {
        pipeline::plan_run(&model_folder, &job.params, &options)
            .with_context(|| format!("checking the settings against {model_spec}"))?;
        if let Some(up) = &upscale {
            let asked = GenerationParams { height: Some(up.height), width: Some(up.width), ..job.params.clone() };
            pipeline::plan_run(&up.folder, &asked, &options)
                .with_context(|| format!("checking the second pass's settings against {}", up.spec))?;
        }
    }
    let interrupted = on_interrupt();
    let passes = if upscale.is_some() { 2 } else { 1 };
    let ctx = RunContext { quiet, interrupted: &interrupted, jobs: jobs.len(), passes };

    let (mut pipe, load_s) = load(&model_spec, &model_folder, &options, &ctx, 1)?;
    pipe.set_scheduler_config(scheduler_config);
    // Every prompt of the run is known: encode them all now and free the text encoder, so that
    // the UNet's activations and the VAE decode have its memory (0.7 GB for the 1.7B model).
    pipe.encode_ahead_and_release(jobs.iter().map(|job| &job.params)).context("encoding the prompts")?;
    let mut summaries = Vec::with_capacity(jobs.len());
    let mut first_pass = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let params = &job.params;
        for w in pipe.prompt_warnings(&params.prompt)? {
            say(&format!("warning: {}", printable(&w)));
        }
        let video_input = input.as_ref().map(|c| (&c.tensor, c.settings.strength));
        let mut run_settings = RunSettings::new(&model_spec, params, height, width, fps, dtype);
        run_settings.input = input.as_ref().map(|c| c.settings.clone());
        run_settings.loras = lora_settings.clone();
        run_settings.scheduler_config = scheduler_overrides.clone();
        // A text-to-video run written only as MP4 is decoded and encoded frame by frame as the
        // frames come: a long video's frames are never all held (issue 22). The bytes are the
        // same as encoding the decoded clip (`Mp4Encoder`).
        if upscale.is_none() && video_input.is_none() && job.targets.iter().all(|t| t.format == VideoFormat::Mp4) {
            let (latents, timings) = ctx.denoise_latents(&pipe, params, i, (height, width))?;
            let stream = Stream { latents: &latents, timings, fps, quality: args.quality };
            summaries.push(ctx.publish_streamed(&pipe, job, stream, run_settings, args.overwrite, i)?);
            continue;
        }
        let video = ctx.denoise(&pipe, params, video_input, i, 1, (height, width))?;
        match &upscale {
            Some(up) => {
                // The first pass's frames as the reference's workflow hands them on: 8-bit images,
                // resized to the second pass's size.
                let clip = upscale::first_pass_frames(&video.frames, up.height, up.width)?;
                run_settings.upscale = Some(UpscaleSettings {
                    model: up.spec.clone(),
                    height: up.height,
                    width: up.width,
                    strength: up.strength,
                    steps: up.steps,
                });
                first_pass.push((clip, run_settings, video.timings));
            }
            _ => summaries.push(ctx.publish(job, &video, run_settings, fps, args.quality, args.overwrite, i)?),
        }
    }
    drop(pipe);

    let mut load_s = load_s;
    if let Some(up) = &upscale {
        // Only one model in memory at a time: the first is dropped before the second loads.
        let (mut pipe, s) = load(&up.spec, &up.folder, &upscale_options, &ctx, 2)?;
        let asked = GenerationParams { num_inference_steps: up.steps, ..template.clone() };
        pipe.set_scheduler_config(scheduler_config_for(&up.folder, &asked, &overrides)?);
        load_s += s;
        let second: Vec<GenerationParams> = jobs.iter().map(|job| up.params().second_pass(&job.params)).collect();
        pipe.encode_ahead_and_release(&second).context("encoding the prompts for the second pass")?;
        for (i, ((job, params), (clip, run_settings, first_timings))) in
            jobs.iter().zip(&second).zip(first_pass).enumerate()
        {
            let tensor = clip.to_model_input(&candle_core::Device::Cpu, DType::F32)?;
            let mut video = ctx.denoise(&pipe, params, Some((&tensor, up.strength)), i, 2, (up.height, up.width))?;
            video.timings.text_encoding += first_timings.text_encoding;
            video.timings.denoising += first_timings.denoising;
            video.timings.decoding += first_timings.decoding;
            summaries.push(ctx.publish(job, &video, run_settings, fps, args.quality, args.overwrite, i)?);
        }
    }
    if args.json {
        let summary = Summary { model: model_spec, model_folder, load_s, videos: summaries };
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// The most videos one run makes (each is planned, its outputs checked, before any work).
const MAX_VIDEOS: usize = 10_000;

/// The folder of `spec`, and `spec` as recorded: a local folder by its absolute path, so that
/// --from finds it from anywhere.
fn resolve(spec: &str, hub: &HubOptions) -> Result<(String, PathBuf)> {
    let folder = checkpoint::resolve_model(spec, hub).with_context(|| format!("finding the model {spec}"))?;
    let spec = match Path::new(spec).is_dir() {
        true => std::fs::canonicalize(spec).map(|p| p.display().to_string()).unwrap_or_else(|_| spec.to_string()),
        false => spec.to_string(),
    };
    Ok((spec, folder))
}

/// The final latents of a one-pass run and how to encode them, for [`RunContext::publish_streamed`].
struct Stream<'a> {
    latents: &'a Tensor,
    timings: Timings,
    fps: u32,
    quality: u8,
}

/// What every pass of a run shares: how it reports and stops.
struct RunContext<'a> {
    quiet: bool,
    interrupted: &'a AtomicBool,
    jobs: usize,
    passes: usize,
}

impl RunContext<'_> {
    fn say(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// "pass 1/2 " when there are two passes.
    fn pass_label(&self, pass: usize) -> String {
        if self.passes > 1 {
            format!("pass {pass}/{} ", self.passes)
        } else {
            String::new()
        }
    }

    /// "[2/4] " when there are several videos.
    fn counter(&self, i: usize) -> String {
        if self.jobs > 1 {
            format!("[{}/{}] ", i + 1, self.jobs)
        } else {
            String::new()
        }
    }

    /// Runs one pass of video `i`: text-to-video, or video-to-video from `input` (the frames and
    /// the strength), with a bar counting the steps that run.
    fn denoise(
        &self,
        pipe: &TextToVideo,
        params: &GenerationParams,
        input: Option<(&Tensor, f64)>,
        i: usize,
        pass: usize,
        size: (usize, usize),
    ) -> Result<Video> {
        self.run_pass(params, input, i, pass, size, true, |on_step| match input {
            Some((video, strength)) => pipe.video_to_video(params, video, strength, on_step),
            None => pipe.generate(params, on_step),
        })
    }

    /// [`RunContext::denoise`] of a one-pass text-to-video run, stopping before the VAE: the
    /// final latents, to decode with [`RunContext::publish_streamed`].
    fn denoise_latents(
        &self,
        pipe: &TextToVideo,
        params: &GenerationParams,
        i: usize,
        size: (usize, usize),
    ) -> Result<(Tensor, Timings)> {
        self.run_pass(params, None, i, 1, size, false, |on_step| pipe.denoise(params, on_step))
    }

    /// What every pass shares around the library call `run`: the line saying what runs, the
    /// steps bar (then a spinner while the frames are decoded, when `decode`), and stopping on
    /// an interrupt.
    #[allow(clippy::too_many_arguments)]
    fn run_pass<T>(
        &self,
        params: &GenerationParams,
        input: Option<(&Tensor, f64)>,
        i: usize,
        pass: usize,
        (height, width): (usize, usize),
        decode: bool,
        run: impl FnOnce(&mut dyn FnMut(&StepProgress) -> Control) -> t2v::Result<T>,
    ) -> Result<T> {
        let (label, counter) = (self.pass_label(pass), self.counter(i));
        let n = params.num_inference_steps;
        let (frames, steps, from) = match input {
            Some((video, strength)) => {
                let run = n - strength_begin_index(n, strength)?;
                (video.dim(0)?, run, format!(", strength {strength} ({run} of {n} steps run)"))
            }
            None => (params.num_frames, n, String::new()),
        };
        self.say(&format!(
            "{label}{counter}\"{}\": {frames} frames of {width}×{height}, {} {n} steps, guidance {}, seed {}{from}{}",
            printable(&params.prompt),
            params.scheduler,
            params.guidance_scale,
            params.seed,
            long_summary(params, frames)
        ));
        let bar = (!self.quiet).then(|| steps_bar(&label, steps as u64));
        let mut decoding = None;
        let mut on_step = |p: &StepProgress| {
            if let Some(bar) = &bar {
                bar.set_position(p.step as u64);
                let per_step = p.elapsed.as_secs_f64() / p.step as f64;
                bar.set_message(format!("t={:<4} {per_step:.2}s/step", p.timestep));
                if p.step == p.total_steps {
                    bar.finish_and_clear();
                    if decode {
                        decoding = Some(spinner(&format!("{label}decoding frames")));
                    }
                }
            }
            if self.interrupted.load(Ordering::SeqCst) {
                Control::Cancel
            } else {
                Control::Continue
            }
        };
        let out = run(&mut on_step)?;
        if let Some(s) = decoding {
            s.finish_and_clear();
        }
        if self.interrupted.load(Ordering::SeqCst) && pass < self.passes {
            self.say("stopped after the first pass: nothing was written");
            return Err(t2v::Error::Cancelled.into());
        }
        Ok(out)
    }

    /// Decodes `stream.latents` frame by frame into one MP4 encoder per target (every target is
    /// an MP4), then publishes them with their settings as [`RunContext::publish`] does.
    fn publish_streamed(
        &self,
        pipe: &TextToVideo,
        job: &Job,
        stream: Stream,
        run_settings: RunSettings,
        overwrite: bool,
        i: usize,
    ) -> Result<VideoSummary> {
        let Stream { latents, mut timings, fps, quality } = stream;
        let write_started = Instant::now();
        let settings_json = run_settings.to_json();
        let (_, _, frames, _, _) = latents.dims5()?;
        let (height, width) = (run_settings.height, run_settings.width);
        let encode = EncodeOptions { fps, quality: Quality::Qp(quality), metadata: Some(settings_json.clone()) };
        let mut encoders = Vec::with_capacity(job.targets.len());
        for t in &job.targets {
            encoders.push(
                t2v::video::Mp4Encoder::new(width, height, &encode, &t.path)
                    .with_context(|| format!("writing {}", t.path.display()))?,
            );
        }
        let bar = (!self.quiet).then(|| frames_bar("decoding and encoding", frames as u64));
        let started = Instant::now();
        pipe.decode_latents_each(latents, &mut |k, frame| {
            let rgb = frame.flatten_all()?.to_vec1::<f32>()?;
            for encoder in &mut encoders {
                encoder.push(&rgb)?;
            }
            if let Some(bar) = &bar {
                bar.set_position(k as u64 + 1);
            }
            Ok(())
        })?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        timings.decoding = started.elapsed();
        let mut staged = Vec::with_capacity(encoders.len());
        for (t, encoder) in job.targets.iter().zip(encoders) {
            staged.push(
                t2v::video::stage_mp4(encoder, &t.path).with_context(|| format!("writing {}", t.path.display()))?,
            );
        }
        output::publish_staged(&job.targets, staged, &settings_json, overwrite)?;
        self.written(job, &timings, run_settings, write_started, i)
    }

    /// Writes video `i` to its targets with its settings.
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        job: &Job,
        video: &Video,
        run_settings: RunSettings,
        fps: u32,
        quality: u8,
        overwrite: bool,
        i: usize,
    ) -> Result<VideoSummary> {
        let write_started = Instant::now();
        let settings_json = run_settings.to_json();
        let (frames, height, width, _) = video.frames.dims4()?;
        let data = video.frames.flatten_all()?.to_vec1::<f32>()?;
        let clip = Frames::new(&data, frames, height, width)?;
        let encode = EncodeOptions { fps, quality: Quality::Qp(quality), metadata: Some(settings_json.clone()) };
        output::publish(&job.targets, &clip, &encode, &settings_json, overwrite)?;
        self.written(job, &video.timings, run_settings, write_started, i)
    }

    /// After video `i` is published: says so, stops when interrupted, and sums it up.
    fn written(
        &self,
        job: &Job,
        timings: &Timings,
        run_settings: RunSettings,
        write_started: Instant,
        i: usize,
    ) -> Result<VideoSummary> {
        let counter = self.counter(i);
        let names: Vec<String> = job.targets.iter().map(|t| t.path.display().to_string()).collect();
        self.say(&format!(
            "{counter}wrote {} (settings: {}) — denoised in {:.1}s, decoded in {:.1}s",
            names.join(", "),
            job.targets.iter().map(|t| t.settings.display().to_string()).collect::<Vec<_>>().join(", "),
            timings.denoising.as_secs_f64(),
            timings.decoding.as_secs_f64()
        ));
        if self.interrupted.load(Ordering::SeqCst) {
            if i + 1 < self.jobs {
                self.say(&format!(
                    "stopped: {} is complete and kept; {} videos not made",
                    names.join(", "),
                    self.jobs - i - 1
                ));
                return Err(t2v::Error::Cancelled.into());
            }
            self.say(&format!("{} is complete and kept", names.join(", ")));
        }
        Ok(VideoSummary {
            outputs: job
                .targets
                .iter()
                .map(|t| Written { output: t.path.clone(), settings_file: t.settings.clone(), format: t.format.name() })
                .collect(),
            settings: run_settings,
            text_encoding_s: timings.text_encoding.as_secs_f64(),
            video_encoding_s: timings.video_encoding.as_secs_f64(),
            denoising_s: timings.denoising.as_secs_f64(),
            decoding_s: timings.decoding.as_secs_f64(),
            writing_s: write_started.elapsed().as_secs_f64(),
        })
    }
}

/// ", FreeNoise: 5 windows of 16 frames every 4 (pyramid), 3 keyframe prompts" for a long video.
fn long_summary(params: &GenerationParams, frames: usize) -> String {
    let mut parts = Vec::new();
    if let Some(c) = params.long.context {
        match c.plan(frames) {
            Ok(plan) => parts.push(format!(
                "FreeNoise: {} windows of {} frames every {} ({})",
                plan.windows.len(),
                c.length,
                c.stride,
                c.weighting
            )),
            Err(_) => parts.push(format!("FreeNoise: windows of {} frames every {}", c.length, c.stride)),
        }
    }
    let keys = params.long.prompts.len() + 1;
    if !params.long.prompts.is_empty() {
        parts.push(format!("{keys} keyframe prompts"));
    }
    if !params.long.negative_prompts.is_empty() {
        parts.push(format!("{} keyframe negative prompts", params.long.negative_prompts.len() + 1));
    }
    parts.iter().map(|p| format!(", {p}")).collect()
}

/// Loads the model of pass `pass`, with a spinner.
fn load(spec: &str, folder: &Path, options: &LoadOptions, ctx: &RunContext, pass: usize) -> Result<(TextToVideo, f64)> {
    let label = ctx.pass_label(pass);
    let started = Instant::now();
    let loading = (!ctx.quiet).then(|| spinner(&format!("{label}loading {spec}")));
    let pipe = TextToVideo::load(folder, options).with_context(|| format!("loading the model {spec}"))?;
    if let Some(s) = loading {
        s.finish_and_clear();
    }
    let load_s = started.elapsed().as_secs_f64();
    ctx.say(&format!("{label}loaded {spec} in {load_s:.1}s"));
    Ok((pipe, load_s))
}

/// Ctrl-C stops after the current step, and nothing half-written stays behind; a second Ctrl-C
/// quits at once.
fn on_interrupt() -> Arc<AtomicBool> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let presses = AtomicUsize::new(0);
    let _ = ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::SeqCst) > 0 {
            std::process::exit(130);
        }
        flag.store(true, Ordering::SeqCst);
        eprintln!("\nstopping after this step (Ctrl-C again to quit at once)");
    });
    interrupted
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; 32 bits keep seeds short enough to retype.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() % (1 << 32)
}

/// Text from files (a prompt file, settings, an MP4's metadata) as it may be printed: control
/// characters escaped, so that a shared video cannot send escape sequences to the terminal.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    //! The numeric options through clap and every check that runs before the model loads
    //! (issue 11): any value is refused with an error or accepted, never a panic or an abort.

    use clap::Parser;
    use proptest::prelude::*;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn tiny() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-t2v")
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u64..40).prop_map(|v| v.to_string()),
            prop::sample::select(vec![
                "18446744073709551615",
                "18446744073709551608",
                "1099511627776",
                "99999999999",
                "4294967295",
                "100000",
                "-1",
                "1e300",
                "NaN",
                "inf",
                "-0",
                "0.5",
                "8",
                "16",
                "32",
                "x",
                "",
            ])
            .prop_map(String::from),
        ]
    }

    const OPTIONS: &[&str] = &[
        "--num-frames",
        "--height",
        "--width",
        "--steps",
        "--seed",
        "--guidance-scale",
        "--eta",
        "--fps",
        "--num-videos",
        "--quality",
        "--strength",
        "--video-start",
        "--video-every",
        "--upscale-steps",
        "--upscale-strength",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn numeric_options(options in prop::collection::btree_map(prop::sample::select(OPTIONS), value(), 0..6)) {
            let mut argv = vec!["t2v".to_string(), "a cat".to_string()];
            for (k, v) in &options {
                argv.push(format!("{k}={v}"));
            }
            let Ok(cli) = Cli::try_parse_from(&argv) else { return Ok(()) };
            let args = cli.args;
            let mut params = GenerationParams::new("a cat", 0);
            args.apply_to(&mut params);
            let _ = strength_begin_index(params.num_inference_steps, args.strength.unwrap_or(DEFAULT_STRENGTH));
            let options = LoadOptions::default();
            if let Ok(plan) = pipeline::plan_run(tiny(), &params, &options) {
                let fps = args.fps.unwrap_or(t2v::video::DEFAULT_FPS);
                let (h, w) = (plan.shape.height, plan.shape.width);
                for format in [VideoFormat::Mp4, VideoFormat::Gif, VideoFormat::Npy, VideoFormat::PngFrames] {
                    let _ = t2v::video::check_encodable(format, params.num_frames, h, w, fps);
                }
            }
        }
    }
}
