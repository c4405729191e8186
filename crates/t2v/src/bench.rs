//! The full-size benchmark: the published 1.7B configuration with random weights (nothing is
//! downloaded), timed stage by stage as the reference PyTorch benchmark (`torch_fullsize.py`) times PyTorch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::text_encoder::{self, TextEncoder};
use crate::unet3d::{self, UNet3DConditionModel};
use crate::vae::{self, Vae};

/// The published checkpoint's configuration (`damo-vilab/text-to-video-ms-1.7b`), as diffusers
/// writes it; the same files as `configs/full-1.7b/`.
pub const UNET_CONFIG: &str = include_str!("../configs/full-1.7b/unet/config.json");
pub const TEXT_ENCODER_CONFIG: &str = include_str!("../configs/full-1.7b/text_encoder/config.json");
pub const VAE_CONFIG: &str = include_str!("../configs/full-1.7b/vae/config.json");

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    /// Guided UNet steps to time (their mean is reported).
    pub steps: usize,
    /// The dtype weight matrices and kernels are stored in (activations are float32): float16
    /// (as the published fp16 weights, widened per layer), bfloat16 (`--dtype bf16`: multiplied
    /// in bfloat16 on the `avx512bf16` and `amx` paths, see [`crate::kernels::bf16`]) or float32.
    pub matrix_dtype: DType,
    /// Float16 matrices multiplied in float16 where the CPU has AVX512_FP16 (`--dtype f16`, see
    /// [`crate::kernels::fp16`]), rather than widened as a float32 run of the published weights.
    pub f16_products: bool,
    pub device: Device,
    /// Time only the text encoding and the guided steps: a long video's unguided steps, VAE
    /// decode and encode take as long again as its guided steps, and the guided step is what a
    /// run repeats.
    pub guided_only: bool,
    /// Keep the text encoder through the steps and the VAE, as a service keeps it between
    /// requests (and PyTorch's `torch_fullsize.py` keeps its pipeline whole). By default it is
    /// freed once the prompts are encoded, as `t2v generate` frees it
    /// ([`crate::pipeline::TextToVideo::encode_ahead_and_release`]).
    pub keep_text_encoder: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            frames: 16,
            height: 256,
            width: 256,
            steps: 2,
            matrix_dtype: DType::F16,
            f16_products: false,
            device: Device::Cpu,
            guided_only: false,
            keep_text_encoder: false,
        }
    }
}

/// Seconds per stage, memory and throughput; the JSON field names are the benchmark's contract.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `cpu`, or the GPU's kind (`cuda`, `metal`).
    pub device: String,
    /// The CPU kernels' instruction-set path (`amx`, `avx512bf16`, `avx512`, `avx2`, `generic`; `generic`
    /// off the CPU).
    pub isa: String,
    /// The vector width each kind of kernel runs at, chosen for the CPU found
    /// ([`crate::kernels::tuning`]), e.g. "zen5: 512-bit linear, …; 256-bit temporal conv".
    pub tuning: String,
    /// The weight matrices' dtype (`f16`, `bf16`, `f32`).
    pub weights: String,
    /// What the matrix products multiply: `bf16` (bfloat16 operands, float32 sums: bfloat16
    /// weights where the path multiplies in them), `f16` (float16 operands and sums of 32
    /// products: `--dtype f16` on `avx512fp16`) or `f32`.
    pub products: String,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub threads: usize,
    pub params_m: f64,
    pub build_s: f64,
    pub text_encode_s: f64,
    /// FreeNoise's context length in the timed steps (past 24 frames), else none.
    pub context_length: Option<usize>,
    /// Mean of the timed guided steps (batch 2: negative and positive prompt).
    pub unet_step_s: f64,
    pub unet_steps_s: Vec<f64>,
    pub unet_step_gflop: f64,
    pub unet_gflops_per_s: f64,
    /// None (JSON null) in this and the four fields after it when only the guided steps were
    /// timed ([`BenchOptions::guided_only`]).
    pub vae_decode_s: Option<f64>,
    /// The VAE encoder's posterior of as many frames (video-to-video's first stage).
    pub vae_encode_s: Option<f64>,
    /// Text encoding + 25 guided steps + decoding: the model card's recipe.
    pub run_25_steps_s: Option<f64>,
    /// A UNet step without guidance (batch 1; the mean of as many as the guided steps): the
    /// few-step samplers' step.
    pub unet_unguided_step_s: Option<f64>,
    /// Text encoding + 4 unguided steps + decoding: LCM/MCM or T2V-Turbo's 4-step recipe.
    pub run_4_steps_unguided_s: Option<f64>,
    /// Peak resident memory of the whole benchmark (the VAE encode last).
    pub peak_rss_gib: f64,
    /// Peak resident memory through the VAE decode, read before the encode: the stages
    /// `torch_fullsize.py` runs (text encoding, the guided steps, the decode; the unguided steps
    /// too, which hold less).
    pub peak_rss_decode_gib: Option<f64>,
    /// Whether the text encoder stayed resident after encoding ([`BenchOptions::keep_text_encoder`]).
    pub text_encoder_kept: bool,
    /// With profiling on ([`crate::profile::set_enabled`]): the time per kind of layer of each
    /// timed stage (each UNet step its own: a process's first step also pays for first touching
    /// the memory it grows into), in the order they ran.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<StageProfile>,
}

/// The time per kind of layer of one timed stage of the benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageProfile {
    pub stage: String,
    pub layers: Vec<crate::profile::LayerProfile>,
}

/// Random weights of the requested shapes: matrices uniform in ±1/√fan_in (PyTorch's default
/// scale, so activations stay finite), norm scales 1, biases 0.
struct RandomWeights {
    matrix_dtype: DType,
    /// Parameters handed out so far.
    count: Arc<AtomicU64>,
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        self.count.fetch_add(s.elem_count() as u64, Ordering::Relaxed);
        if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            let t = Tensor::rand(-bound as f32, bound as f32, s, dev)?;
            let narrow = self.matrix_dtype.size_in_bytes() < dtype.size_in_bytes();
            t.to_dtype(if narrow { self.matrix_dtype } else { dtype })
        } else if name.ends_with("weight") {
            Tensor::ones(s, dtype, dev)
        } else {
            Tensor::zeros(s, dtype, dev)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Config { path: what.into(), reason: e.to_string() })
}

/// Past this many frames the benchmark's steps run FreeNoise's windowed temporal attention, as
/// `t2v generate` does by default.
pub const AUTO_FREE_NOISE_FRAMES: usize = 24;

/// The most guided steps the benchmark times.
pub const MAX_STEPS: usize = 1000;

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Builds the full-size model and times each stage; `progress` hears what is being done.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let device = opts.device.clone();
    // A GPU runs its kernels asynchronously: each timed stage ends when the device is idle.
    let finish = || -> Result<()> { Ok(device.synchronize()?) };
    let dtype = DType::F32;
    let matrix_dtype = opts.matrix_dtype;
    if !matrix_dtype.is_float() || matrix_dtype == DType::F64 {
        return Err(Error::InvalidArgument(format!(
            "the benchmark stores weight matrices as f16, bf16 or f32, not {matrix_dtype:?}"
        )));
    }
    let mut profile = Vec::new();
    let end_stage = |profile: &mut Vec<StageProfile>, stage: &str| {
        if crate::profile::enabled() {
            profile.push(StageProfile { stage: stage.to_string(), layers: crate::profile::take() });
        }
    };
    let count = Arc::new(AtomicU64::new(0));
    let vb = || {
        VarBuilder::from_backend(Box::new(RandomWeights { matrix_dtype, count: count.clone() }), dtype, device.clone())
    };
    let te_cfg: text_encoder::Config = parse(TEXT_ENCODER_CONFIG, "text_encoder/config.json")?;
    let unet_cfg: unet3d::Config = parse(UNET_CONFIG, "unet/config.json")?;
    let vae_cfg: vae::Config = parse(VAE_CONFIG, "vae/config.json")?;
    let scale = vae_cfg.scale_factor();
    if !opts.height.is_multiple_of(scale) || !opts.width.is_multiple_of(scale) || opts.frames == 0 || opts.steps == 0 {
        return Err(Error::InvalidArgument(format!(
            "the benchmark needs at least one frame and step, and a size that is a multiple of {scale}"
        )));
    }
    if opts.steps > MAX_STEPS {
        return Err(Error::InvalidArgument(format!(
            "the benchmark times at most {MAX_STEPS} steps, not {}",
            opts.steps
        )));
    }
    // The sizes of a guided run of this shape, checked before the model is built.
    let mut asked = crate::pipeline::GenerationParams::new("", 0);
    (asked.num_frames, asked.height, asked.width) = (opts.frames, Some(opts.height), Some(opts.width));
    let shape = crate::sizing::run_shape(&unet_cfg, &vae_cfg, &asked)?;
    let check_memory = |weights: u64, loaded: bool| -> Result<()> {
        if !device.is_cpu() {
            return Ok(());
        }
        let estimate = crate::sizing::estimate(&unet_cfg, &vae_cfg, &shape, dtype, weights)?;
        crate::sizing::check_fits(&estimate, &shape, crate::sizing::available_memory(), loaded)
    };
    // About 1.8 billion parameters: float16 and bfloat16 matrices take 2 bytes each.
    check_memory(1_800_000_000 * matrix_dtype.size_in_bytes() as u64, false)?;

    progress("building the 1.7B model with random weights");
    let started = Instant::now();
    // (layers built as a `--dtype f16` load builds them, where asked)
    let (text_encoder, unet, vae) = crate::kernels::with_f16_products(opts.f16_products, || -> Result<_> {
        Ok((TextEncoder::new(vb(), &te_cfg)?, UNet3DConditionModel::new(vb(), &unet_cfg)?, Vae::new(vb(), &vae_cfg)?))
    })?;
    let build_s = started.elapsed().as_secs_f64();
    let params = count.load(Ordering::Relaxed);
    crate::profile::take();

    progress("text encoding");
    let ids: Vec<u32> = (0..2 * 77).map(|i| (i * 7919 % 49407) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 77), &device)?;
    let started = Instant::now();
    let context = text_encoder.forward(&ids)?;
    finish()?;
    let text_encode_s = started.elapsed().as_secs_f64();
    end_stage(&mut profile, "text encoding");
    // (kept to the end, or freed now and its memory handed back for the steps to grow into)
    let _text_encoder = match opts.keep_text_encoder {
        true => Some(text_encoder),
        false => {
            drop(text_encoder);
            crate::kernels::release_freed_memory();
            None
        }
    };

    let (h, w) = (opts.height / scale, opts.width / scale);
    // A guided step: one video's latents under [negative, prompt], as the pipeline runs it.
    let latents = Tensor::randn(0f32, 1f32, (1, unet_cfg.in_channels, opts.frames, h, w), &device)?;
    // Past 24 frames `t2v generate` turns FreeNoise on (windows of 16 frames, stride 4): the
    // temporal attention runs per window, as a long video's steps do.
    let windows = crate::long_video::ContextWindows::new(
        crate::long_video::ContextWindows::DEFAULT_LENGTH,
        crate::long_video::ContextWindows::DEFAULT_STRIDE,
        crate::long_video::ContextWeighting::Pyramid,
    );
    let plan = if opts.frames > AUTO_FREE_NOISE_FRAMES { Some(windows.plan(opts.frames)?) } else { None };
    let long = unet3d::LongVideoForward { text_per_frame: false, windows: plan.as_ref() };
    // `opts.steps` steps under `context`: each step's seconds and the last one's operations.
    let mut time_steps = |what: &str, context: &Tensor, profile: &mut Vec<StageProfile>| -> Result<(Vec<f64>, u64)> {
        let (mut seconds, mut flops) = (Vec::with_capacity(opts.steps), 0);
        for i in 0..opts.steps {
            let step = format!("{what} UNet step {}/{}", i + 1, opts.steps);
            progress(&step);
            let before = crate::profile::flops();
            let started = Instant::now();
            let out = unet.forward_long(&latents, (981 - 20 * i) as f64, context, &long)?;
            finish()?;
            drop(out);
            seconds.push(started.elapsed().as_secs_f64());
            flops = crate::profile::flops() - before;
            end_stage(profile, &step);
        }
        Ok((seconds, flops))
    };
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (unet_steps_s, step_flops) = time_steps("guided", &context, &mut profile)?;
    let unet_step_s = mean(&unet_steps_s);
    let rest = if opts.guided_only {
        None
    } else {
        // A step without guidance (batch 1, the prompt only): what the few-step samplers (LCM
        // with guidance 1, T2V-Turbo) run. Timed as many times as the guided step (the mean), so
        // that the two compare alike on a machine whose speed drifts.
        let (unguided_s, _) = time_steps("unguided", &context.narrow(0, 1, 1)?, &mut profile)?;
        let unet_unguided_step_s = mean(&unguided_s);

        progress("VAE decode");
        let z = Tensor::randn(0f32, 1f32, (opts.frames, vae_cfg.latent_channels, h, w), &device)?;
        // as the pipeline's decode starts (the trim is not timed)
        crate::kernels::release_freed_memory();
        let started = Instant::now();
        let frames = vae.decode(&z)?;
        finish()?;
        let vae_decode_s = started.elapsed().as_secs_f64();
        end_stage(&mut profile, "VAE decode");
        drop(vae);
        let peak_rss_decode_gib = gib(peak_rss_bytes().unwrap_or(0));

        // Video-to-video encodes its input frames first: the decoded frames, held to the
        // [-1, 1] the pipeline passes.
        progress("VAE encode");
        let encoder = crate::kernels::with_f16_products(opts.f16_products, || vae::VaeEncoder::new(vb(), &vae_cfg))?;
        let started = Instant::now();
        let posterior = encoder.encode(&frames.clamp(-1f32, 1f32)?)?;
        finish()?;
        let vae_encode_s = started.elapsed().as_secs_f64();
        end_stage(&mut profile, "VAE encode");
        drop((posterior, frames, encoder));
        Some((unet_unguided_step_s, vae_decode_s, vae_encode_s, peak_rss_decode_gib))
    };

    Ok(BenchReport {
        device: match &device {
            Device::Cpu => "cpu".into(),
            Device::Cuda(_) => "cuda".into(),
            Device::Metal(_) => "metal".into(),
        },
        isa: if device.is_cpu() { crate::kernels::isa() } else { crate::kernels::Isa::Generic }.to_string(),
        tuning: if device.is_cpu() { crate::kernels::tuning::describe() } else { "generic: candle's ops".to_string() },
        weights: crate::params::dtype_name(matrix_dtype).to_string(),
        products: match matrix_dtype {
            DType::BF16 if device.is_cpu() && crate::kernels::avx512bf16() => "bf16",
            DType::F16 if device.is_cpu() && opts.f16_products && crate::kernels::avx512fp16() => "f16",
            _ => "f32",
        }
        .to_string(),
        frames: opts.frames,
        height: opts.height,
        width: opts.width,
        threads: candle_core::utils::get_num_threads(),
        params_m: params as f64 / 1e6,
        build_s,
        text_encode_s,
        context_length: plan.as_ref().map(|p| p.length),
        unet_step_s,
        unet_steps_s,
        unet_step_gflop: step_flops as f64 / 1e9,
        unet_gflops_per_s: step_flops as f64 / 1e9 / unet_step_s,
        vae_decode_s: rest.map(|r| r.1),
        vae_encode_s: rest.map(|r| r.2),
        run_25_steps_s: rest.map(|r| text_encode_s + 25.0 * unet_step_s + r.1),
        unet_unguided_step_s: rest.map(|r| r.0),
        run_4_steps_unguided_s: rest.map(|r| text_encode_s + 4.0 * r.0 + r.1),
        peak_rss_gib: gib(peak_rss_bytes().unwrap_or(0)),
        peak_rss_decode_gib: rest.map(|r| r.3),
        text_encoder_kept: opts.keep_text_encoder,
        profile,
    })
}
