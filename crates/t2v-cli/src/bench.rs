//! `t2v bench`: the full-size model's speed and memory.

use std::time::Instant;

use anyhow::Result;
use candle_core::DType;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
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
    #[arg(long, conflicts_with = "dtype")]
    float32_weights: bool,
    /// f32: float32 compute, weight matrices stored as float16 (or --float32-weights); bf16:
    /// weight matrices stored as bfloat16 and multiplied in bfloat16 on AMX-BF16 tiles, or with
    /// AVX512_BF16 where that beats float32 (float32 sums and activations; `products` in --json
    /// says which), as `generate --dtype bf16`; f16: weight matrices stored as float16 and
    /// multiplied in float16 with AVX512_FP16 (float16 sums of 32 products, added in float32),
    /// else widened, as `generate --dtype f16`.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Print the time spent per kind of layer in each timed stage (each UNet step, the VAE).
    #[arg(long)]
    profile: bool,
    /// Time only the text encoding and the guided steps (no unguided step, no VAE): what a long
    /// video's run repeats, in half the benchmark's time.
    #[arg(long)]
    guided_only: bool,
    /// Keep the text encoder resident through the steps and the VAE, as the service keeps it
    /// between requests (and PyTorch's torch_fullsize.py keeps its whole pipeline). By default
    /// it is freed once the prompt is encoded, as `t2v generate` frees it: the peak memory
    /// reported is then a `generate` run's.
    #[arg(long)]
    keep_text_encoder: bool,
    /// Print one JSON object (text_encode_s, unet_step_s, vae_decode_s, vae_encode_s, peak_rss_gib, ...) on stdout.
    #[arg(long)]
    json: bool,
    /// Where to run: cpu, cuda, cuda:N, metal, metal:N or auto (as `generate --device`).
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let asked = t2v::params::parse_dtype(&args.dtype)?;
    let matrix_dtype = match asked {
        DType::BF16 | DType::F16 => asked,
        DType::F32 if args.float32_weights => DType::F32,
        DType::F32 => DType::F16,
        other => anyhow::bail!("the benchmark runs --dtype f32, f16 or bf16, not {}", t2v::params::dtype_name(other)),
    };
    let opts = t2v::bench::BenchOptions {
        frames: args.frames,
        height: args.height,
        width: args.width,
        steps: args.steps,
        matrix_dtype,
        f16_products: asked == DType::F16,
        device: t2v::pipeline::select_device(&args.device)?,
        guided_only: args.guided_only,
        keep_text_encoder: args.keep_text_encoder,
    };
    t2v::profile::set_enabled(args.profile);
    let started = Instant::now();
    let report = t2v::bench::run(&opts, &mut |stage| {
        eprintln!("[{:>7.1}s] {stage}", started.elapsed().as_secs_f64());
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let r = &report;
        println!(
            "{} frames of {}x{} on the {} ({} kernels), {} threads, {:.0}M parameters",
            r.frames, r.width, r.height, r.device, r.isa, r.threads, r.params_m
        );
        println!("kernels tuned for {}", r.tuning);
        println!("weights {}, matrix products in {}", r.weights, r.products);
        println!("text_encode_s      {:.3}", r.text_encode_s);
        println!(
            "unet_step_s        {:.3}   (guided step, batch 2; {:.0} GFLOP at {:.1} GFLOP/s; steps {})",
            r.unet_step_s,
            r.unet_step_gflop,
            r.unet_gflops_per_s,
            r.unet_steps_s.iter().map(|s| format!("{s:.1} s")).collect::<Vec<_>>().join(", ")
        );
        match (r.vae_decode_s, r.vae_encode_s, r.unet_unguided_step_s, r.run_25_steps_s, r.run_4_steps_unguided_s) {
            (Some(decode), Some(encode), Some(unguided), Some(run_25), Some(run_4)) => {
                println!("vae_decode_s       {decode:.3}");
                println!(
                    "vae_encode_s       {encode:.3}   (the same frames back to latents, as video-to-video starts)"
                );
                println!(
                    "unet_unguided_s    {unguided:.3}   (a step without guidance, batch 1; mean of {})",
                    r.unet_steps_s.len()
                );
                println!("run_25_steps_s     {run_25:.1}");
                println!(
                    "run_4_unguided_s   {run_4:.1}   (4 steps without guidance: LCM/MCM, T2V-Turbo; {:.3} of the 25-step run)",
                    run_4 / run_25
                );
            }
            _ => println!("(--guided-only: no unguided step, VAE or whole-run figures)"),
        }
        println!(
            "peak_rss_gib       {:.2}   ({})",
            r.peak_rss_gib,
            match r.text_encoder_kept {
                true => "the text encoder kept resident, as the service keeps it",
                false => "the text encoder freed once the prompt is encoded, as `t2v generate` frees it",
            }
        );
        if let Some(p) = r.peak_rss_decode_gib {
            println!("peak_rss_decode    {p:.2}   (through the VAE decode, as torch_fullsize.py runs)");
        }
    }
    for stage in &report.profile {
        eprintln!("time per kind of layer, {}:", stage.stage);
        for p in &stage.layers {
            let rate = if p.flops > 0 && p.seconds > 0.0 {
                format!("{:>8.1} GFLOP/s", p.flops as f64 / p.seconds / 1e9)
            } else {
                String::new()
            };
            eprintln!(
                "  {:<20} {:>9.2}s {:>7} calls {:>9.1} GFLOP{rate}",
                p.kind,
                p.seconds,
                p.calls,
                p.flops as f64 / 1e9
            );
        }
    }
    Ok(())
}
