//! `t2v generate`: settings are the library's defaults, then those of `--from`, then the flags;
//! every output is decided and checked before the model loads; the model loads once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use serde::Serialize;
use t2v::checkpoint::{self, HubOptions, WeightsVariant, DEFAULT_MODEL};
use t2v::pipeline::{self, Control, GenerationParams, LoadOptions, TextToVideo};
use t2v::schedulers::SchedulerKind;
use t2v::video::{EncodeOptions, Frames, Quality, VideoFormat};

use crate::output::{self, Planner, Target};
use crate::progress::{spinner, steps_bar};
use crate::settings::{parse_dtype, RunSettings};

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

    /// Sampler: `dpm` (DPM-Solver++ multistep, the model card's recipe) or `ddim` (the
    /// checkpoint's own). [default: dpm]
    #[arg(long)]
    scheduler: Option<SchedulerKind>,

    /// DDIM's eta: 0 is deterministic, 1 adds as much fresh noise as DDPM. [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    eta: Option<f64>,

    /// Number of frames. [default: 16]
    #[arg(long, short = 'f', allow_negative_numbers = true)]
    num_frames: Option<usize>,

    /// Frame height in pixels, a multiple of the VAE's scale (8). [default: the model's native
    /// size, 256 for the 1.7B model]
    #[arg(long, allow_negative_numbers = true)]
    height: Option<usize>,

    /// Frame width in pixels, a multiple of the VAE's scale (8). [default: the model's native size]
    #[arg(long, allow_negative_numbers = true)]
    width: Option<usize>,

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

    /// Compute precision: f32 (the reference's numbers; fastest on the CPU), f16 (half the
    /// memory; frames within ~1e-2 of f32) or bf16 (GPUs only). [default: f32, or what --from recorded]
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
    }
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

pub fn run(args: GenerateArgs) -> Result<()> {
    let quiet = args.quiet;
    let say = |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    let from = match &args.from {
        Some(path) => Some(RunSettings::read(path).with_context(|| format!("reading the settings in {}", path.display()))?),
        None => None,
    };

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
    let fps = args.fps.or(from.as_ref().map(|s| s.fps)).unwrap_or(t2v::video::DEFAULT_FPS);
    if fps == 0 {
        bail!("--fps must be at least 1");
    }
    let dtype = match (args.dtype, &from) {
        (Some(d), _) => d,
        (None, Some(s)) => s.dtype().context("the settings of --from")?,
        (None, None) => DType::F32,
    };
    let model_spec = args.model.clone().or_else(|| from.as_ref().map(|s| s.model.clone())).unwrap_or_else(|| DEFAULT_MODEL.to_string());

    // The prompts: given, from a file, or from the settings being repeated.
    let prompts: Vec<String> = if let Some(p) = &args.prompt {
        vec![p.clone()]
    } else if let Some(file) = &args.prompts {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading the prompts in {}", file.display()))?;
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
    let device = pipeline::select_device(&args.device)?;
    if dtype == DType::BF16 && device.is_cpu() {
        bail!("--dtype bf16 needs a GPU (candle's CPU matrix products have no bfloat16): use --dtype f32 (fastest on the CPU) or f16");
    }

    // Every output is decided and checked before any model work.
    let total = prompts.len() * args.num_videos;
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

    let model_folder = checkpoint::resolve_model(&model_spec, &hub_options(args.offline, quiet, args.variant))
        .with_context(|| format!("finding the model {model_spec}"))?;
    // A local folder is recorded as an absolute path, so that --from finds it from anywhere.
    let model_spec = match std::path::Path::new(&model_spec).is_dir() {
        true => std::fs::canonicalize(&model_spec).map(|p| p.display().to_string()).unwrap_or(model_spec),
        false => model_spec,
    };
    let (height, width) = pipeline::check_params(&model_folder, &template)
        .with_context(|| format!("checking the settings against {model_spec}"))?;
    for job in &mut jobs {
        job.params.height = Some(height);
        job.params.width = Some(width);
    }
    let interrupted = on_interrupt();

    let options = LoadOptions { device, dtype, variant: args.variant, ..LoadOptions::default() };
    let started = Instant::now();
    let loading = (!quiet).then(|| spinner(&format!("loading {model_spec}")));
    let pipe = TextToVideo::load(&model_folder, &options).with_context(|| format!("loading the model {model_spec}"))?;
    if let Some(s) = loading {
        s.finish_and_clear();
    }
    let load_s = started.elapsed().as_secs_f64();
    say(&format!("loaded {model_spec} in {load_s:.1}s"));

    let mut summaries = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        let params = &job.params;
        for w in pipe.prompt_warnings(&params.prompt)? {
            say(&format!("warning: {}", printable(&w)));
        }
        let counter = if jobs.len() > 1 { format!("[{}/{}] ", i + 1, jobs.len()) } else { String::new() };
        say(&format!(
            "{counter}\"{}\": {} frames of {width}×{height}, {} {} steps, guidance {}, seed {}",
            printable(&params.prompt),
            params.num_frames, params.num_inference_steps, params.scheduler, params.guidance_scale, params.seed
        ));
        let bar = (!quiet).then(|| steps_bar(params.num_inference_steps as u64));
        let mut decoding = None;
        let video = pipe.generate(params, &mut |p| {
            if let Some(bar) = &bar {
                bar.set_position(p.step as u64);
                let per_step = p.elapsed.as_secs_f64() / p.step as f64;
                bar.set_message(format!("t={:<4} {per_step:.2}s/step", p.timestep));
                if p.step == p.total_steps {
                    bar.finish_and_clear();
                    decoding = Some(spinner("decoding frames"));
                }
            }
            if interrupted.load(Ordering::SeqCst) {
                Control::Cancel
            } else {
                Control::Continue
            }
        })?;
        if let Some(s) = &decoding {
            s.set_message("writing");
        }
        let write_started = Instant::now();
        let run_settings = RunSettings::new(&model_spec, params, height, width, fps, dtype);
        let settings_json = run_settings.to_json();
        let data = video.frames.flatten_all()?.to_vec1::<f32>()?;
        let clip = Frames::new(&data, params.num_frames, height, width)?;
        let encode = EncodeOptions { fps, quality: Quality::Qp(args.quality), metadata: Some(settings_json.clone()) };
        output::publish(&job.targets, &clip, &encode, &settings_json, args.overwrite)?;
        if let Some(s) = decoding {
            s.finish_and_clear();
        }
        let names: Vec<String> = job.targets.iter().map(|t| t.path.display().to_string()).collect();
        say(&format!(
            "{counter}wrote {} (settings: {}) — denoised in {:.1}s, decoded in {:.1}s",
            names.join(", "),
            job.targets.iter().map(|t| t.settings.display().to_string()).collect::<Vec<_>>().join(", "),
            video.timings.denoising.as_secs_f64(),
            video.timings.decoding.as_secs_f64()
        ));
        summaries.push(VideoSummary {
            outputs: job
                .targets
                .iter()
                .map(|t| Written { output: t.path.clone(), settings_file: t.settings.clone(), format: t.format.name() })
                .collect(),
            settings: run_settings,
            text_encoding_s: video.timings.text_encoding.as_secs_f64(),
            denoising_s: video.timings.denoising.as_secs_f64(),
            decoding_s: video.timings.decoding.as_secs_f64(),
            writing_s: write_started.elapsed().as_secs_f64(),
        });
        if interrupted.load(Ordering::SeqCst) {
            if i + 1 < jobs.len() {
                say(&format!("stopped: {} is complete and kept; {} videos not made", names.join(", "), jobs.len() - i - 1));
                return Err(t2v::Error::Cancelled.into());
            }
            say(&format!("{} is complete and kept", names.join(", ")));
        }
    }
    if args.json {
        let summary = Summary { model: model_spec, model_folder, load_s, videos: summaries };
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
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
