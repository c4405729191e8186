//! The `t2v` command line: a thin layer over the library.

mod bench;
mod generate;
mod output;
mod progress;
mod settings;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use t2v::checkpoint::{self, WeightsVariant, DEFAULT_MODEL};
use t2v::tokenizer::ClipTokenizer;

/// Text to video with the ModelScope text-to-video model (and zeroscope checkpoints), natively in
/// Rust: one binary, no Python, the same frames as the reference for the same seed.
#[derive(Parser)]
#[command(name = "t2v", version, about, propagate_version = true)]
#[command(
    after_help = "Examples:\n  t2v generate \"a corgi surfing a wave\"            # downloads the 1.7B model once\n  t2v generate \"a corgi\" -o corgi.mp4 --format mp4,gif --seed 7\n  t2v generate --from corgi.mp4                   # repeat a run\n  t2v generate \"a corgi\" --video in.mp4 --strength 0.6   # video-to-video\n  t2v generate \"a corgi\" -m cerspense/zeroscope_v2_576w \\\n      --upscale cerspense/zeroscope_v2_XL --upscale-size 1024x576   # two passes\n  t2v bench                                       # full-size speed and memory\n\nEnvironment:\n  T2V_ISA=auto|amx|avx512fp16|avx512bf16|avx512|avx2|neon|generic   the CPU kernels' instruction set (default: the best this CPU has;\n                                     generic: candle's standard ops)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate videos from prompts.
    Generate(Box<generate::GenerateArgs>),
    /// Print the token ids a prompt becomes (padded to the text encoder's length) as JSON.
    Tokenize(TokenizeArgs),
    /// Time the full-size 1.7B model (random weights, nothing downloaded): text encoding, one
    /// guided UNet step, VAE decoding, the 25-step run, peak memory and GFLOP/s.
    Bench(bench::BenchArgs),
    /// Serve the model over HTTP: a web page, and an API in the shape of OpenAI's videos API,
    /// with a job queue that survives restarts.
    Serve(Box<t2v_serve::ServeArgs>),
    /// Run jobs from a queue shared with `t2v serve --workers 0` (PostgreSQL): the workers of a
    /// deployment on several machines.
    Worker(Box<t2v_serve::WorkerArgs>),
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

fn main() {
    let cli = Cli::parse();
    t2v::kernels::tune_allocator();
    // An unusable T2V_ISA is refused here, before any work (the library would take the best path).
    if let Err(e) = t2v::kernels::Isa::from_env() {
        eprintln!("error: {}: {e}", t2v::kernels::isa::ISA_ENV);
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Tokenize(args) => tokenize(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => t2v_serve::run(*args),
        Command::Worker(args) => t2v_serve::run_worker(*args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        let cancelled = err.downcast_ref::<t2v::Error>().is_some_and(|e| matches!(e, t2v::Error::Cancelled));
        std::process::exit(if cancelled { 130 } else { 1 });
    }
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let model =
        checkpoint::resolve_model(&args.model, &generate::hub_options(args.offline, false, WeightsVariant::Auto))?;
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
    if let Some(w) = t2v::pipeline::non_english_warning(&args.prompt) {
        eprintln!("warning: {w}");
    }
    println!("{}", serde_json::to_string(&encoded.ids)?);
    Ok(())
}
