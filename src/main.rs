//! The `t2v` command line: a thin layer over the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use t2v::loading::WeightsVariant;
use t2v::pipeline::{self, Control, GenerationParams, LoadOptions, TextToVideo};
use t2v::schedulers::SchedulerKind;
use t2v::tokenizer::ClipTokenizer;
use t2v::video::{self, EncodeOptions, Frames, VideoFormat};

/// Text to video with the ModelScope text-to-video model (and zeroscope checkpoints), natively in Rust.
#[derive(Parser)]
#[command(name = "t2v", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a video from a prompt.
    Generate(GenerateArgs),
    /// Print the token ids a prompt becomes (padded to the text encoder's length) as JSON.
    Tokenize(TokenizeArgs),
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
    /// float32: the reference's numbers.
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum VariantArg {
    /// The full-precision weights, or the fp16 ones when they are the only ones.
    Auto,
    /// The `fp16` variant (`*.fp16.safetensors`).
    Fp16,
    /// The full-precision weights only.
    Full,
}

#[derive(Args)]
struct GenerateArgs {
    /// What the video shows (English).
    prompt: String,

    /// Checkpoint folder in the diffusers layout (model_index.json, unet/, vae/, ...).
    #[arg(long, short = 'm')]
    model: PathBuf,

    /// What the video should not show.
    #[arg(long, short = 'n')]
    negative_prompt: Option<String>,

    /// Random seed; the same seed and settings give the same video. Picked at random and
    /// printed when absent.
    #[arg(long, short = 's')]
    seed: Option<u64>,

    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    steps: usize,

    /// Classifier-free guidance scale: how strongly to follow the prompt (≤ 1 turns guidance off).
    #[arg(long, short = 'g', default_value_t = 9.0, allow_negative_numbers = true)]
    guidance_scale: f64,

    /// Sampler.
    #[arg(long, value_enum, default_value = "dpm")]
    scheduler: SchedulerArg,

    /// DDIM's eta: 0 is deterministic, 1 adds as much fresh noise as DDPM.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    eta: f64,

    /// Number of frames.
    #[arg(long, short = 'f', default_value_t = 16)]
    num_frames: usize,

    /// Frame height in pixels, a multiple of the VAE's scale (8) [default: the model's native
    /// size, 256 for the 1.7B model].
    #[arg(long)]
    height: Option<usize>,

    /// Frame width in pixels, a multiple of the VAE's scale (8) [default: the model's native size].
    #[arg(long)]
    width: Option<usize>,

    /// Compute precision.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,

    /// Which weights file to read when the folder has several.
    #[arg(long, value_enum, default_value = "auto")]
    variant: VariantArg,

    /// Output file; the format follows the extension (.npy: float32 frames (F, H, W, 3) in [0, 1]).
    /// Default: a new file in outputs/ named after the prompt and seed.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,

    /// Replace the output file if it exists.
    #[arg(long)]
    overwrite: bool,

    /// No progress or messages on stderr (errors still print).
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    /// The prompt to tokenize.
    prompt: String,

    /// Checkpoint folder (only its tokenizer/ is read).
    #[arg(long, short = 'm')]
    model: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Tokenize(args) => tokenize(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let tokenizer = ClipTokenizer::from_folder(&args.model.join("tokenizer"))
        .with_context(|| format!("loading the tokenizer of {}", args.model.display()))?;
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

fn generate(args: GenerateArgs) -> Result<()> {
    let say = |msg: &str| {
        if !args.quiet {
            eprintln!("{msg}");
        }
    };
    let seed = match args.seed {
        Some(seed) => seed,
        None => {
            let seed = random_seed();
            say(&format!("seed: {seed} (pass --seed {seed} to repeat this video)"));
            seed
        }
    };
    let params = GenerationParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        seed,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler: match args.scheduler {
            SchedulerArg::Ddim => SchedulerKind::Ddim,
            SchedulerArg::Dpm => SchedulerKind::DpmSolverMultistep,
        },
        eta: args.eta,
        num_frames: args.num_frames,
        height: args.height,
        width: args.width,
    };

    // Everything that can be checked without the weights is checked first.
    let output = match &args.output {
        Some(path) => path.clone(),
        None => default_output_path(&params.prompt, seed, "npy")?,
    };
    let format = VideoFormat::from_path(&output)?;
    check_output_path(&output, args.overwrite)?;
    let (height, width) = pipeline::check_params(&args.model, &params)
        .with_context(|| format!("checking the settings against {}", args.model.display()))?;

    let options = LoadOptions {
        dtype: match args.dtype {
            DtypeArg::F32 => DType::F32,
        },
        variant: match args.variant {
            VariantArg::Auto => WeightsVariant::Auto,
            VariantArg::Fp16 => WeightsVariant::Fp16,
            VariantArg::Full => WeightsVariant::Full,
        },
        ..LoadOptions::default()
    };
    let started = Instant::now();
    let spinner = (!args.quiet).then(|| spinner(&format!("loading {}", args.model.display())));
    let pipe = TextToVideo::load(&args.model, &options)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    say(&format!("loaded {} in {:.1}s", args.model.display(), started.elapsed().as_secs_f64()));
    for w in pipe.prompt_warnings(&params.prompt)? {
        say(&format!("warning: {w}"));
    }

    let bar = (!args.quiet).then(|| steps_bar(params.num_inference_steps as u64));
    say(&format!(
        "generating {} frames of {width}×{height}, {} steps of {}, guidance {}, seed {seed}",
        params.num_frames,
        params.num_inference_steps,
        args.scheduler.to_possible_value().unwrap().get_name(),
        params.guidance_scale
    ));
    let video = pipe.generate(&params, &mut |p| {
        if let Some(bar) = &bar {
            bar.set_position(p.step as u64);
            bar.set_message(format!("t={}", p.timestep));
        }
        Control::Continue
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    say(&format!(
        "denoised in {:.1}s, decoded in {:.1}s",
        video.timings.denoising.as_secs_f64(),
        video.timings.decoding.as_secs_f64()
    ));

    let data = video.frames.flatten_all()?.to_vec1::<f32>()?;
    let frames = Frames { data: &data, frames: params.num_frames, height, width };
    video::write_video(&frames, format, &output, &EncodeOptions { fps: 8, metadata: None })
        .with_context(|| format!("writing {}", output.display()))?;
    say(&format!("wrote {}", output.display()));
    Ok(())
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; one u32 keeps seeds short enough to retype.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() % (1 << 32)
}

/// `outputs/<prompt words>-<seed>.<ext>`, numbered when taken.
fn default_output_path(prompt: &str, seed: u64, ext: &str) -> Result<PathBuf> {
    let dir = PathBuf::from("outputs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let slug: String = prompt
        .chars()
        .map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .take(8)
        .collect::<Vec<_>>()
        .join("-");
    let slug = if slug.is_empty() { "video".to_string() } else { slug.chars().take(60).collect() };
    for n in 0.. {
        let name = if n == 0 { format!("{slug}-{seed}.{ext}") } else { format!("{slug}-{seed}-{n}.{ext}") };
        let path = dir.join(name);
        if !path.exists() {
            return Ok(path);
        }
    }
    unreachable!()
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
            "denoising {bar:30.cyan/blue} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}, {per_sec}]",
        )
        .expect("valid template")
        .progress_chars("█▉▊▋▌▍▎▏ "),
    );
    bar
}
