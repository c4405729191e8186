//! The `t2v` command line: a thin layer over the library.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use t2v::hub::{self, HubOptions, DEFAULT_MODEL};
use t2v::loading::WeightsVariant;
use t2v::pipeline::{self, Control, GenerationParams, LoadOptions, TextToVideo};
use t2v::schedulers::SchedulerKind;
use t2v::settings::{self, RunSettings};
use t2v::tokenizer::ClipTokenizer;
use t2v::video::{self, EncodeOptions, Frames, Quality, VideoFormat};

/// Text to video with the ModelScope text-to-video model (and zeroscope checkpoints), natively in
/// Rust: one binary, no Python, the same frames as the reference for the same seed.
#[derive(Parser)]
#[command(name = "t2v", version, about, propagate_version = true)]
#[command(after_help = "Examples:\n  t2v generate \"a corgi surfing a wave\"            # downloads the 1.7B model once\n  t2v generate \"a corgi\" -o corgi.gif --seed 7\n  t2v generate --from outputs/a-corgi-7.json      # repeat a run\n  t2v bench                                       # full-size speed and memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate videos from prompts.
    Generate(Box<GenerateArgs>),
    /// Print the token ids a prompt becomes (padded to the text encoder's length) as JSON.
    Tokenize(TokenizeArgs),
    /// Time the full-size 1.7B model (random weights, nothing downloaded): text encoding, one
    /// guided UNet step, VAE decoding, the 25-step run, peak memory and GFLOP/s.
    Bench(BenchArgs),
    /// Serve the model over HTTP: a web page, and an API in the shape of OpenAI's videos API,
    /// with a job queue that survives restarts.
    Serve(Box<t2v_serve::ServeArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
enum SchedulerArg {
    /// DDIM, the checkpoint's own scheduler.
    Ddim,
    /// DPM-Solver++ (2nd-order multistep), the model card's recipe.
    Dpm,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    /// float32: the reference's numbers (and on the CPU the fastest: its kernels are float32).
    F32,
    /// float16: half the memory on GPUs; frames within ~1e-2 of float32.
    F16,
    /// bfloat16: GPUs only (candle's CPU matrix products have no bfloat16).
    Bf16,
}

impl DtypeArg {
    fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::F16 => "f16",
            DtypeArg::Bf16 => "bf16",
        }
    }

    fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum VariantArg {
    /// The full-precision weights, or the fp16 ones when they are the only ones.
    Auto,
    /// The `fp16` variant (`*.fp16.safetensors`): half the download.
    Fp16,
    /// The full-precision weights only.
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    /// H.264 MP4 (yuv420p, fast start): plays in browsers, VLC and QuickTime.
    Mp4,
    /// Animated GIF that loops.
    Gif,
    /// A folder of numbered PNG frames.
    Png,
    /// float32 frames (F, H, W, 3) in [0, 1], for numpy.
    Npy,
}

#[derive(Args)]
struct GenerateArgs {
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
    #[arg(long, short = 's')]
    seed: Option<u64>,

    /// Denoising steps. [default: 25]
    #[arg(long)]
    steps: Option<usize>,

    /// Classifier-free guidance scale: how strongly to follow the prompt (≤ 1 turns guidance
    /// off). [default: 9]
    #[arg(long, short = 'g', allow_negative_numbers = true)]
    guidance_scale: Option<f64>,

    /// Sampler. [default: dpm]
    #[arg(long, value_enum)]
    scheduler: Option<SchedulerArg>,

    /// DDIM's eta: 0 is deterministic, 1 adds as much fresh noise as DDPM. [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    eta: Option<f64>,

    /// Number of frames. [default: 16]
    #[arg(long, short = 'f')]
    num_frames: Option<usize>,

    /// Frame height in pixels, a multiple of the VAE's scale (8). [default: the model's native
    /// size, 256 for the 1.7B model]
    #[arg(long)]
    height: Option<usize>,

    /// Frame width in pixels, a multiple of the VAE's scale (8). [default: the model's native size]
    #[arg(long)]
    width: Option<usize>,

    /// Videos per prompt, with consecutive seeds.
    #[arg(long, default_value_t = 1)]
    num_videos: usize,

    /// Output file (or folder, for PNG frames); the format follows the extension. With several
    /// videos, -1, -2, ... is added to the name. [default: outputs/<prompt>-<seed>.mp4]
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,

    /// Output format, when the extension does not say. [default: from the extension, else mp4]
    #[arg(long, value_enum)]
    format: Option<FormatArg>,

    /// Frames per second of the MP4 or GIF. [default: 8, as the original model's videos]
    #[arg(long)]
    fps: Option<u32>,

    /// H.264 quantiser, 12 (best) to 51 (smallest); 16 is visually lossless.
    #[arg(long, default_value_t = Quality::DEFAULT_QP, value_parser = clap::value_parser!(u8).range(12..=51))]
    quality: u8,

    /// Replace output files that exist.
    #[arg(long)]
    overwrite: bool,

    /// Compute precision [default: f32, or what --from recorded].
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,

    /// Where to run: cpu, cuda, cuda:N, metal, metal:N, or auto (a GPU when this build supports
    /// one and it is present, else the CPU). GPUs need a build with `--features cuda` or `metal`.
    #[arg(long, default_value = "auto")]
    device: String,

    /// Which weights to use (and download) when the model has several.
    #[arg(long, value_enum, default_value = "auto")]
    variant: VariantArg,

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

#[derive(Args)]
struct TokenizeArgs {
    /// The prompt to tokenize.
    prompt: String,

    /// A local folder or a Hugging Face repo id (only its tokenizer/ is read).
    #[arg(long, short = 'm', default_value = DEFAULT_MODEL)]
    model: String,

    /// Never use the network.
    #[arg(long)]
    offline: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Number of frames.
    #[arg(long, short = 'f', default_value_t = 16)]
    frames: usize,
    /// Frame height in pixels.
    #[arg(long, default_value_t = 256)]
    height: usize,
    /// Frame width in pixels.
    #[arg(long, default_value_t = 256)]
    width: usize,
    /// Guided UNet steps to time (the mean is reported).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Keep weight matrices in float32 instead of float16 (as the published fp16 weights).
    #[arg(long)]
    float32_weights: bool,
    /// Print the time spent per kind of layer after the run.
    #[arg(long)]
    profile: bool,
    /// Print one JSON object (text_encode_s, unet_step_s, vae_decode_s, peak_rss_gib, ...) on stdout.
    #[arg(long)]
    json: bool,
    /// Where to run: cpu, cuda, cuda:N, metal, metal:N or auto (as `generate --device`).
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() {
    let cli = Cli::parse();
    t2v::kernels::tune_allocator();
    let result = match cli.command {
        Command::Generate(args) => generate(*args),
        Command::Tokenize(args) => tokenize(args),
        Command::Bench(args) => bench(args),
        Command::Serve(args) => t2v_serve::run(*args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        let code = if err.downcast_ref::<t2v::Error>().is_some_and(|e| matches!(e, t2v::Error::Cancelled)) { 130 } else { 1 };
        std::process::exit(code);
    }
}

fn hub_options(offline: bool, quiet: bool, fp16: bool) -> HubOptions {
    let mut opts = HubOptions::from_env();
    opts.offline |= offline;
    opts.progress &= !quiet;
    opts.variant_fp16 = fp16;
    opts
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let model = hub::resolve_model(&args.model, &hub_options(args.offline, false, false))?;
    let tokenizer = ClipTokenizer::from_folder(&model.join("tokenizer"))
        .with_context(|| format!("loading the tokenizer of {}", args.model))?;
    let encoded = tokenizer.encode_padded(&args.prompt)?;
    if encoded.truncated {
        eprintln!(
            "warning: the prompt is {} tokens long; the text encoder reads only the first {}",
            encoded.untruncated_len,
            tokenizer.max_length()
        );
    }
    if let Some(w) = pipeline::non_english_warning(&args.prompt) {
        eprintln!("warning: {w}");
    }
    println!("{}", serde_json::to_string(&encoded.ids)?);
    Ok(())
}

/// One video to make.
struct Job {
    params: GenerationParams,
    output: PathBuf,
    format: VideoFormat,
}

#[derive(Serialize)]
struct VideoSummary {
    output: PathBuf,
    settings_file: PathBuf,
    format: &'static str,
    settings: RunSettings,
    text_encoding_s: f64,
    denoising_s: f64,
    decoding_s: f64,
    writing_s: f64,
}

#[derive(Serialize)]
struct Summary {
    model: String,
    model_folder: PathBuf,
    load_s: f64,
    videos: Vec<VideoSummary>,
}

fn generate(args: GenerateArgs) -> Result<()> {
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
    } else if let Some(s) = &from {
        vec![s.prompt.clone()]
    } else {
        bail!("say what the video should show: t2v generate \"a corgi surfing a wave\" (or --prompts FILE, or --from SETTINGS)");
    };
    if args.num_videos == 0 {
        bail!("--num-videos must be at least 1");
    }

    let model_spec = args.model.clone().or_else(|| from.as_ref().map(|s| s.model.clone())).unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let base = from.as_ref().map(|s| s.to_params()).transpose()?;
    let pick = |given: Option<f64>, from: Option<f64>, default: f64| given.or(from).unwrap_or(default);
    let seed = match args.seed.or(base.as_ref().map(|b| b.seed)) {
        Some(seed) => seed,
        None => {
            let seed = random_seed();
            say(&format!("seed: {seed} (pass --seed {seed} to repeat)"));
            seed
        }
    };
    let template = GenerationParams {
        prompt: String::new(),
        negative_prompt: args.negative_prompt.clone().or(base.as_ref().and_then(|b| b.negative_prompt.clone())),
        seed,
        num_inference_steps: args.steps.or(base.as_ref().map(|b| b.num_inference_steps)).unwrap_or(25),
        guidance_scale: pick(args.guidance_scale, base.as_ref().map(|b| b.guidance_scale), 9.0),
        scheduler: match args.scheduler {
            Some(SchedulerArg::Ddim) => SchedulerKind::Ddim,
            Some(SchedulerArg::Dpm) => SchedulerKind::DpmSolverMultistep,
            None => base.as_ref().map(|b| b.scheduler).unwrap_or(SchedulerKind::DpmSolverMultistep),
        },
        eta: pick(args.eta, base.as_ref().map(|b| b.eta), 0.0),
        num_frames: args.num_frames.or(base.as_ref().map(|b| b.num_frames)).unwrap_or(16),
        height: args.height.or(base.as_ref().and_then(|b| b.height)),
        width: args.width.or(base.as_ref().and_then(|b| b.width)),
    };
    let fps = args.fps.or(from.as_ref().map(|s| s.fps)).unwrap_or(video::DEFAULT_FPS);
    if fps == 0 {
        bail!("--fps must be at least 1");
    }
    let dtype = match (args.dtype, &from) {
        (Some(d), _) => d,
        (None, Some(s)) => DtypeArg::from_str(&s.dtype, true).map_err(|_| anyhow::anyhow!("the settings of --from name an unknown dtype `{}` (f32, f16 or bf16)", s.dtype))?,
        (None, None) => DtypeArg::F32,
    };
    let device = pipeline::select_device(&args.device)?;
    if matches!(dtype, DtypeArg::Bf16) && device.is_cpu() {
        bail!("--dtype bf16 needs a GPU (candle's CPU matrix products have no bfloat16): use --dtype f32 (fastest on the CPU) or f16");
    }

    // Every output is decided and checked before any model work.
    let total = prompts.len() * args.num_videos;
    let format_arg = args.format.map(|f| match f {
        FormatArg::Mp4 => VideoFormat::Mp4,
        FormatArg::Gif => VideoFormat::Gif,
        FormatArg::Png => VideoFormat::PngFrames,
        FormatArg::Npy => VideoFormat::Npy,
    });
    if args.output.is_none() {
        std::fs::create_dir_all("outputs").context("creating outputs/")?;
    }
    let mut jobs = Vec::with_capacity(total);
    let mut taken = HashSet::new();
    for (p, prompt) in prompts.iter().enumerate() {
        for k in 0..args.num_videos {
            let params = GenerationParams { prompt: prompt.clone(), seed: seed + k as u64, ..template.clone() };
            let index = p * args.num_videos + k;
            let (output, format) = output_for(&args.output, format_arg, &params, index, total, &taken)?;
            check_output_path(&output, args.overwrite)?;
            check_output_path(&settings::settings_path(&output), args.overwrite)?;
            if !taken.insert(output.clone()) || !taken.insert(settings::settings_path(&output)) {
                bail!("two videos would be written to {}: give each a different --output", output.display());
            }
            jobs.push(Job { params, output, format });
        }
    }

    let model_folder = hub::resolve_model(&model_spec, &hub_options(args.offline, quiet, matches!(args.variant, VariantArg::Fp16)))
        .with_context(|| format!("finding the model {model_spec}"))?;
    let (height, width) = pipeline::check_params(&model_folder, &template)
        .with_context(|| format!("checking the settings against {model_spec}"))?;
    for job in &mut jobs {
        job.params.height = Some(height);
        job.params.width = Some(width);
    }
    // Ctrl-C stops after the current step; nothing half-written stays behind.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        let presses = AtomicUsize::new(0);
        let _ = ctrlc::set_handler(move || {
            if presses.fetch_add(1, Ordering::SeqCst) > 0 {
                std::process::exit(130);
            }
            interrupted.store(true, Ordering::SeqCst);
            eprintln!("\nstopping after this step (Ctrl-C again to quit at once)");
        });
    }

    let options = LoadOptions {
        device,
        dtype: dtype.dtype(),
        variant: match args.variant {
            VariantArg::Auto => WeightsVariant::Auto,
            VariantArg::Fp16 => WeightsVariant::Fp16,
            VariantArg::Full => WeightsVariant::Full,
        },
        ..LoadOptions::default()
    };
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
            say(&format!("warning: {w}"));
        }
        let counter = if jobs.len() > 1 { format!("[{}/{}] ", i + 1, jobs.len()) } else { String::new() };
        say(&format!(
            "{counter}\"{}\": {} frames of {width}×{height}, {} {} steps, guidance {}, seed {}",
            params.prompt,
            params.num_frames,
            params.num_inference_steps,
            settings::scheduler_name(params.scheduler),
            params.guidance_scale,
            params.seed
        ));
        let bar = (!quiet).then(|| steps_bar(params.num_inference_steps as u64));
        let (latents, mut timings) = pipe.denoise(params, &mut |p| {
            if let Some(bar) = &bar {
                bar.set_position(p.step as u64);
                let per_step = p.elapsed.as_secs_f64() / p.step as f64;
                bar.set_message(format!("t={:<4} {per_step:.2}s/step", p.timestep));
            }
            if interrupted.load(Ordering::SeqCst) { Control::Cancel } else { Control::Continue }
        })?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let status = (!quiet).then(|| spinner("decoding frames"));
        let decode_started = Instant::now();
        let frames = pipe.decode_latents(&latents)?;
        timings.decoding = decode_started.elapsed();
        if let Some(s) = &status {
            s.set_message(format!("writing {}", job.output.display()));
        }
        let write_started = Instant::now();
        let mut run_settings = RunSettings::new(&model_spec, params, height, width, fps);
        run_settings.dtype = dtype.name().to_string();
        let data = frames.flatten_all()?.to_vec1::<f32>()?;
        let clip = Frames::new(&data, params.num_frames, height, width)?;
        let encode = EncodeOptions { fps, quality: Quality::Qp(args.quality), metadata: Some(run_settings.to_json()) };
        video::write_video(&clip, job.format, &job.output, &encode).with_context(|| format!("writing {}", job.output.display()))?;
        let settings_file = settings::settings_path(&job.output);
        video::write_text(&settings_file, &run_settings.to_json())?;
        if let Some(s) = status {
            s.finish_and_clear();
        }
        let writing_s = write_started.elapsed().as_secs_f64();
        say(&format!(
            "{counter}wrote {} (settings: {}) — denoised in {:.1}s, decoded in {:.1}s",
            job.output.display(),
            settings_file.display(),
            timings.denoising.as_secs_f64(),
            timings.decoding.as_secs_f64()
        ));
        summaries.push(VideoSummary {
            output: job.output.clone(),
            settings_file,
            format: job.format.name(),
            settings: run_settings,
            text_encoding_s: timings.text_encoding.as_secs_f64(),
            denoising_s: timings.denoising.as_secs_f64(),
            decoding_s: timings.decoding.as_secs_f64(),
            writing_s,
        });
        if interrupted.load(Ordering::SeqCst) {
            return Err(t2v::Error::Cancelled.into());
        }
    }
    if args.json {
        let summary = Summary { model: model_spec, model_folder, load_s, videos: summaries };
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// The output of job `index` of `total`: as given (numbered when there are several), or a new
/// name in outputs/ made from the prompt and seed.
fn output_for(
    given: &Option<PathBuf>,
    format: Option<VideoFormat>,
    params: &GenerationParams,
    index: usize,
    total: usize,
    taken: &HashSet<PathBuf>,
) -> Result<(PathBuf, VideoFormat)> {
    match given {
        Some(path) => {
            let format = match format {
                Some(f) => f,
                None => VideoFormat::from_path(path)?,
            };
            let path = if total == 1 {
                path.clone()
            } else {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("video");
                let name = match path.extension().and_then(|e| e.to_str()) {
                    Some(ext) => format!("{stem}-{}.{ext}", index + 1),
                    None => format!("{stem}-{}", index + 1),
                };
                path.with_file_name(name)
            };
            Ok((path, format))
        }
        None => {
            let format = format.unwrap_or(VideoFormat::Mp4);
            let slug: String = params
                .prompt
                .chars()
                .map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
                .collect::<String>()
                .split('-')
                .filter(|s| !s.is_empty())
                .take(8)
                .collect::<Vec<_>>()
                .join("-");
            let slug = if slug.is_empty() { "video".to_string() } else { slug.chars().take(60).collect() };
            let ext = format.extension();
            for n in 0.. {
                let stem = if n == 0 { format!("{slug}-{}", params.seed) } else { format!("{slug}-{}-{n}", params.seed) };
                let name = if ext.is_empty() { stem } else { format!("{stem}.{ext}") };
                let path = Path::new("outputs").join(name);
                if !path.exists() && !settings::settings_path(&path).exists() && !taken.contains(&path) {
                    return Ok((path, format));
                }
            }
            Err(anyhow!("no free name in outputs/"))
        }
    }
}

fn check_output_path(path: &Path, overwrite: bool) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!("the output folder {} does not exist: create it, or choose another --output", parent.display());
    }
    if path.exists() && !overwrite {
        bail!("{} exists: pass --overwrite to replace it, or choose another --output", path.display());
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let opts = t2v::bench::BenchOptions {
        frames: args.frames,
        height: args.height,
        width: args.width,
        steps: args.steps,
        float16_weights: !args.float32_weights,
        device: t2v::pipeline::select_device(&args.device)?,
    };
    t2v::nn::set_profiling(args.profile);
    let started = Instant::now();
    let report = t2v::bench::run(&opts, &mut |stage| {
        eprintln!("[{:>7.1}s] {stage}", started.elapsed().as_secs_f64());
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let r = &report;
        println!("{} frames of {}x{} on the {}, {} threads, {:.0}M parameters", r.frames, r.width, r.height, r.device, r.threads, r.params_m);
        println!("text_encode_s      {:.3}", r.text_encode_s);
        println!(
            "unet_step_s        {:.3}   (guided step, batch 2; {:.0} GFLOP at {:.1} GFLOP/s)",
            r.unet_step_s, r.unet_step_gflop, r.unet_gflops_per_s
        );
        println!("vae_decode_s       {:.3}", r.vae_decode_s);
        println!("run_25_steps_s     {:.1}", r.run_25_steps_s);
        println!("peak_rss_gib       {:.2}", r.peak_rss_gib);
    }
    if args.profile {
        eprintln!("time per kind of layer (whole run):");
        for p in t2v::nn::profile() {
            let rate = if p.flops > 0 && p.seconds > 0.0 { format!("{:>8.1} GFLOP/s", p.flops as f64 / p.seconds / 1e9) } else { String::new() };
            eprintln!("  {:<20} {:>9.2}s {:>7} calls {:>9.1} GFLOP{rate}", p.kind, p.seconds, p.calls, p.flops as f64 / 1e9);
        }
    }
    Ok(())
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; 32 bits keep seeds short enough to retype.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() % (1 << 32)
}

fn spinner(msg: &str) -> ProgressBar {
    let s = ProgressBar::new_spinner();
    s.set_message(msg.to_string());
    if std::io::stderr().is_terminal() {
        s.enable_steady_tick(Duration::from_millis(120));
    }
    s
}

fn steps_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "denoising {bar:30.cyan/blue} {pos}/{len} steps {msg} [{elapsed_precise} < {eta_precise} left]",
        )
        .expect("valid template")
        .progress_chars("█▉▊▋▌▍▎▏ "),
    );
    bar
}
