//! The text-to-video pipeline: diffusers' `TextToVideoSDPipeline.__call__`, step for step.
//!
//! Load a checkpoint once with [`TextToVideo::load`], then call [`TextToVideo::generate`] as often
//! as needed; a per-step callback reports progress and can cancel.
//!
//! One file (with `video_to_video.rs` and `upscale.rs` beside it): loading, the checks and the
//! denoising loop share `TextToVideo`'s private parts.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{inspect_safetensors, ComponentWeights, ModelFolder, WeightsFormat, WeightsVariant};
use crate::error::{Error, Result};
use crate::long_video;
use crate::lora::{self, LoraFile, LoraSpec, LoraTarget};
use crate::noise::TorchGenerator;
pub use crate::params::{validate_params, GenerationParams, MAX_GUIDANCE_SCALE};
use crate::schedulers;
use crate::sizing;
use crate::text_encoder::{self, TextEncoder};
use crate::tokenizer::ClipTokenizer;
use crate::unet3d::{self, LongVideoForward, UNet3DConditionModel};
use crate::vae::{self, Vae, VaeEncoder};

pub mod upscale;
mod video_to_video;
pub use video_to_video::VideoLatents;

/// The device named by `spec`: `cpu`, `cuda` / `cuda:N`, `metal` / `metal:N`, or `auto` (a CUDA
/// GPU, else a Metal one, when this build supports it and one is present; else the CPU).
pub fn select_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((kind, n)) => {
            let n = n.parse::<usize>().map_err(|_| {
                Error::Device(format!("`{spec}`: the device number must be a whole number, as in cuda:1"))
            })?;
            (kind.to_string(), n)
        }
        None => (spec.clone(), 0),
    };
    let rebuild = |feature: &str| {
        format!("this t2v was built without {feature} support: rebuild it with `cargo build --release --features {feature}`")
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            // A build with GPU support on a machine without that GPU still runs, on the CPU.
            let gpu = if candle_core::utils::cuda_is_available() {
                Device::new_cuda(ordinal).ok()
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(ordinal).ok()
            } else {
                None
            };
            Ok(gpu.unwrap_or(Device::Cpu))
        }
        "cuda" if !candle_core::utils::cuda_is_available() => Err(Error::Device(rebuild("cuda"))),
        "cuda" => {
            Device::new_cuda(ordinal).map_err(|e| Error::Device(format!("cannot open CUDA device {ordinal}: {e}")))
        }
        "metal" if !candle_core::utils::metal_is_available() => Err(Error::Device(rebuild("metal"))),
        "metal" => {
            Device::new_metal(ordinal).map_err(|e| Error::Device(format!("cannot open Metal device {ordinal}: {e}")))
        }
        _ => Err(Error::Device(format!("unknown device `{spec}`: use cpu, cuda, cuda:N, metal, metal:N or auto"))),
    }
}

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The compute dtype; stored weights of any float dtype are converted to it.
    pub dtype: DType,
    pub variant: WeightsVariant,
    /// Keep float16-stored weight matrices in float16 and widen each layer's as it runs: the
    /// same results in about half the memory.
    pub keep_narrow_weights: bool,
    /// LoRAs merged into the UNet and text encoder weights at load (see [`crate::lora`]), in
    /// this order.
    pub loras: Vec<LoraSpec>,
    /// Overrides the UNet config's `time_cond_proj_dim`: the width of the guidance embedding
    /// a distilled UNet takes (T2V-Turbo-MS: 256). Its `time_embedding.cond_proj` weight, which
    /// no published file holds, starts from zeros; its LoRA pair (in T2V-Turbo's list) is added.
    pub time_cond_proj_dim: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: WeightsVariant::Auto,
            keep_narrow_weights: true,
            loras: Vec::new(),
            time_cond_proj_dim: None,
        }
    }
}

impl LoadOptions {
    /// The dtype the activations are computed in, and the one weight matrices and kernels are
    /// stored in where that differs: `bf16` on the CPU computes in float32 with bfloat16
    /// matrices, whose products run in bfloat16 where the CPU has AVX512_BF16 or AMX (see
    /// [`crate::kernels::bf16`]); `f16` on the CPU likewise with float16 matrices, multiplied in
    /// float16 where it has AVX512_FP16 ([`crate::kernels::fp16`]), else widened; every other
    /// choice computes in `dtype`.
    pub fn compute_dtypes(&self) -> (DType, Option<DType>) {
        if self.device.is_cpu() && matches!(self.dtype, DType::BF16 | DType::F16) {
            (DType::F32, Some(self.dtype))
        } else {
            (self.dtype, None)
        }
    }

    /// A component's weights opened as these options load them.
    pub(crate) fn open_weights(&self, folder: &ModelFolder, component: &str) -> Result<ComponentWeights> {
        let (dtype, matrices) = self.compute_dtypes();
        let weights = folder.weights_with(component, self.variant, dtype, &self.device, self.keep_narrow_weights)?;
        if let Some(m) = matrices {
            weights.store_matrices_as(m)?;
        }
        Ok(weights)
    }
}

/// Whether a run makes an unconditional pass (classifier-free guidance): a guidance scale above
/// 1, as diffusers, except under T2V-Turbo's sampler, whose UNet takes the scale as an
/// embedding.
pub(crate) fn classifier_free(params: &GenerationParams) -> bool {
    params.guidance_scale > 1.0 && params.scheduler.guides_with_negative()
}

/// The negative prompt a guided run encodes: the one given, else the empty text (diffusers'
/// `negative_prompt=None` under guidance).
fn negative_prompt(params: &GenerationParams) -> &str {
    params.negative_prompt.as_deref().unwrap_or("")
}

/// The UNet config with the load's `time_cond_proj_dim` override, validated.
fn unet_config(folder: &ModelFolder, time_cond_proj_dim: Option<usize>) -> Result<unet3d::Config> {
    let mut cfg: unet3d::Config = folder.config("unet", "config.json")?;
    if time_cond_proj_dim.is_some() {
        cfg.time_cond_proj_dim = time_cond_proj_dim;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The UNet's `cond_proj` weight is in no published file (T2V-Turbo saves only its LoRA): zeros.
fn zero_cond_proj(weights: &crate::checkpoint::ComponentWeights, cfg: &unet3d::Config) {
    if let Some(d) = cfg.time_cond_proj_dim {
        weights.zero_if_absent("time_embedding.cond_proj.weight", &[cfg.block_out_channels[0], d]);
    }
}

/// The UNet's modules in the order key-less LoRA lists follow, and their ModelScope names.
pub fn lora_module_names(cfg: &unet3d::Config) -> lora::ModuleNames {
    let order = unet3d::lora_module_order(cfg);
    let aliases = order.iter().map(|m| (unet3d::modelscope_name(cfg, m), m.clone())).collect();
    lora::ModuleNames {
        order: std::collections::HashMap::from([(LoraTarget::Unet, order)]),
        aliases: std::collections::HashMap::from([(LoraTarget::Unet, aliases)]),
    }
}

/// Reported after each denoising step.
#[derive(Debug, Clone)]
pub struct StepProgress {
    /// 1-based index of the step just finished.
    pub step: usize,
    pub total_steps: usize,
    pub timestep: usize,
    /// Since the first step started.
    pub elapsed: Duration,
    /// The latents this step started from, (1, C, frames, h, w).
    pub sample: Tensor,
    /// The (guided) model output for `sample` at `timestep`; with the scheduler's
    /// `alphas_cumprod` the two give the predicted clean latents, as diffusers'
    /// `pred_original_sample` (what live previews show).
    pub model_output: Tensor,
    /// The latents after this step, (1, C, frames, h, w): what diffusers' step callbacks receive.
    pub latents: Tensor,
}

/// What the step callback tells the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

/// A generated video.
#[derive(Debug, Clone)]
pub struct Video {
    /// (frames, height, width, 3), float32 in [0, 1]: the reference's `output_type="np"` frames.
    pub frames: Tensor,
    pub seed: u64,
    pub timings: Timings,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub text_encoding: Duration,
    /// The VAE encoding of the input video (video-to-video only).
    pub video_encoding: Duration,
    pub denoising: Duration,
    pub decoding: Duration,
}

/// A loaded checkpoint: tokenizer, text encoder, UNet, VAE and the scheduler configuration.
pub struct TextToVideo {
    folder: ModelFolder,
    tokenizer: ClipTokenizer,
    /// `None` once released ([`TextToVideo::encode_ahead_and_release`]): the texts it encoded
    /// are then in `encoded`.
    text_encoder: Option<TextEncoder>,
    /// The texts encoded before the text encoder was released, with the time each took.
    encoded: std::collections::HashMap<String, (Tensor, Duration)>,
    unet: UNet3DConditionModel,
    vae: Vae,
    /// Built on first use by video-to-video: text-to-video never reads the encoder's weights.
    vae_encoder: std::sync::OnceLock<VaeEncoder>,
    options: LoadOptions,
    scheduler_config: serde_json::Value,
    device: Device,
    dtype: DType,
}

impl TextToVideo {
    /// Loads every component of the checkpoint folder at `root`.
    pub fn load(root: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let folder = ModelFolder::open(root)?;
        let (device, dtype) = (&options.device, options.compute_dtypes().0);
        let tokenizer = ClipTokenizer::from_folder(&folder.component_dir("tokenizer"))?;

        folder.check_config_class("text_encoder", "config.json", &["CLIPTextModel"])?;
        let te_cfg: text_encoder::Config = folder.config("text_encoder", "config.json")?;
        let te_weights = options.open_weights(&folder, "text_encoder")?;

        folder.check_config_class("unet", "config.json", &["UNet3DConditionModel"])?;
        let unet_cfg = unet_config(&folder, options.time_cond_proj_dim)?;
        let unet_weights = options.open_weights(&folder, "unet")?;
        zero_cond_proj(&unet_weights, &unet_cfg);

        // LoRAs: every key checked against the weights' headers before any layer is built.
        if !options.loras.is_empty() {
            let files = options
                .loras
                .iter()
                .map(|spec| Ok((LoraFile::open(&spec.path)?, spec.weight)))
                .collect::<Result<Vec<_>>>()?;
            let shapes = std::collections::HashMap::from([
                (LoraTarget::Unet, unet_weights.tensor_shapes()),
                (LoraTarget::TextEncoder, te_weights.tensor_shapes()),
            ]);
            let mut deltas = lora::resolve_with_names(&files, &shapes, &lora_module_names(&unet_cfg))?;
            if let Some(d) = deltas.remove(&LoraTarget::Unet) {
                unet_weights.set_lora(d)?;
            }
            if let Some(d) = deltas.remove(&LoraTarget::TextEncoder) {
                te_weights.set_lora(d)?;
            }
        }

        let text_encoder = te_weights.build(|vb| TextEncoder::new(vb, &te_cfg))?;
        let unet = unet_weights.build(|vb| UNet3DConditionModel::new(vb, &unet_cfg))?;

        folder.check_config_class("vae", "config.json", &["AutoencoderKL"])?;
        let vae_cfg: vae::Config = folder.config("vae", "config.json")?;
        let weights = options.open_weights(&folder, "vae")?;
        let vae = weights.build(|vb| Vae::new(vb, &vae_cfg))?;

        // diffusers writes non-finite floats (`-Infinity`) that strict JSON rejects.
        let scheduler_config =
            schedulers::load_scheduler_config(&folder.component_dir("scheduler").join("scheduler_config.json"))?;
        Ok(Self {
            folder,
            tokenizer,
            text_encoder: Some(text_encoder),
            encoded: std::collections::HashMap::new(),
            unet,
            vae,
            vae_encoder: std::sync::OnceLock::new(),
            options: options.clone(),
            scheduler_config,
            device: device.clone(),
            dtype,
        })
    }

    pub fn folder(&self) -> &ModelFolder {
        &self.folder
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The text encoder, until [`TextToVideo::encode_ahead_and_release`] frees it.
    pub fn text_encoder(&self) -> Option<&TextEncoder> {
        self.text_encoder.as_ref()
    }

    /// Encodes every text that `runs` read (prompts, negative prompts, keyframe prompts), keeps
    /// those embeddings, and frees the text encoder's weights (0.7 GB in float16 for the 1.7B
    /// model): for a run that knows all its prompts up front, such as one `t2v generate`, whose
    /// UNet and VAE then have that memory. The embeddings are the ones each run would have
    /// computed (the same encoder, the same text), so the frames do not change. A text not
    /// encoded here is an error afterwards; call it again (it encodes nothing once released)
    /// only with texts already given.
    pub fn encode_ahead_and_release<'a>(&mut self, runs: impl IntoIterator<Item = &'a GenerationParams>) -> Result<()> {
        let mut texts = Vec::new();
        for params in runs {
            texts.push(params.prompt.as_str());
            texts.extend(params.long.prompts.values().map(String::as_str));
            if classifier_free(params) {
                texts.push(negative_prompt(params));
                texts.extend(params.long.negative_prompts.values().map(String::as_str));
            }
        }
        for text in texts {
            if !self.encoded.contains_key(text) {
                let encoded = self.encoded_prompt(text)?;
                self.encoded.insert(text.to_string(), encoded);
            }
        }
        if self.text_encoder.take().is_some() {
            crate::kernels::release_freed_memory();
        }
        Ok(())
    }

    /// [`TextToVideo::encode_prompt`] and the time encoding it took (then, where
    /// [`TextToVideo::encode_ahead_and_release`] kept it).
    fn encoded_prompt(&self, prompt: &str) -> Result<(Tensor, Duration)> {
        if let Some((embeds, took)) = self.encoded.get(prompt) {
            return Ok((embeds.clone(), *took));
        }
        let Some(text_encoder) = &self.text_encoder else {
            return Err(Error::InvalidArgument(format!(
                "the text encoder was freed once this run's prompts were encoded, and \"{prompt}\" was not among \
                 them: give every prompt before the run starts, or load the model again"
            )));
        };
        let started = Instant::now();
        let encoded = self.tokenizer.encode_padded(prompt)?;
        let ids = Tensor::new(encoded.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok((text_encoder.forward(&ids)?, started.elapsed()))
    }

    pub fn unet(&self) -> &UNet3DConditionModel {
        &self.unet
    }

    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    pub fn scheduler_config(&self) -> &serde_json::Value {
        &self.scheduler_config
    }

    /// Replaces the scheduler config that [`TextToVideo::generate`] and video-to-video build
    /// their scheduler from (e.g. the checkpoint's with `from_config` overrides applied: see
    /// [`schedulers::apply_overrides`]).
    pub fn set_scheduler_config(&mut self, config: serde_json::Value) {
        self.scheduler_config = config;
    }

    /// Checks `params` against this model before any work: sizes, scales, and (on the CPU) that
    /// the run's activations fit in the memory available now. Returns (height, width) with the
    /// defaults resolved.
    pub fn validate(&self, params: &GenerationParams) -> Result<(usize, usize)> {
        let shape = sizing::run_shape(self.unet.config(), self.vae.config(), params)?;
        self.check_activations(&shape)?;
        Ok((shape.height, shape.width))
    }

    /// Refuses, on the CPU, a run of `shape` whose activations do not fit in the memory left.
    pub(crate) fn check_activations(&self, shape: &sizing::RunShape) -> Result<()> {
        if !self.device.is_cpu() {
            return Ok(());
        }
        let estimate = sizing::estimate(self.unet.config(), self.vae.config(), shape, self.dtype, 0)?;
        sizing::check_fits(&estimate, shape, sizing::available_memory(), true)
    }

    /// Warnings about a prompt that the model will not read as written: cut at the tokenizer's
    /// length, or not in English (the only language the model card says it understands).
    pub fn prompt_warnings(&self, prompt: &str) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        let encoded = self.tokenizer.encode_padded(prompt)?;
        if encoded.truncated {
            let ids = self.tokenizer.encode_untruncated(prompt)?;
            let keep = self.tokenizer.max_length() - 1;
            let removed = self.tokenizer.decode(&ids[keep..ids.len() - 1], true)?;
            warnings.push(format!(
                "the prompt is longer than the {} tokens the text encoder reads; this part is ignored: \"{removed}\"",
                self.tokenizer.max_length()
            ));
        }
        if let Some(w) = non_english_warning(prompt) {
            warnings.push(w);
        }
        Ok(warnings)
    }

    /// The text encoder's last hidden state for `prompt`, padded to the tokenizer's length:
    /// (1, tokens, hidden).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        Ok(self.encoded_prompt(prompt)?.0)
    }

    /// The initial latents the seed gives: (1, C, frames, h, w), torch-identical noise.
    pub fn initial_latents(
        &self,
        generator: &mut TorchGenerator,
        frames: usize,
        height: usize,
        width: usize,
    ) -> Result<Tensor> {
        let scale = self.vae.config().scale_factor();
        let shape = [1, self.unet.config().in_channels, frames, height / scale, width / scale];
        Ok(generator.randn_tensor(&shape, &self.device)?.to_dtype(self.dtype)?)
    }

    /// The initial latents of `params`: [`TextToVideo::initial_latents`], then with FreeNoise
    /// (`params.long.context`) the shuffled noise of [`long_video::shuffle_context`], drawn
    /// from the same generator.
    pub fn initial_latents_for(
        &self,
        generator: &mut TorchGenerator,
        params: &GenerationParams,
        height: usize,
        width: usize,
    ) -> Result<Tensor> {
        let latents = self.initial_latents(generator, params.num_frames, height, width)?;
        match &params.long.context {
            Some(windows) => long_video::shuffle_context(&latents, generator, windows),
            None => Ok(latents),
        }
    }

    /// Generates one video. `on_step` runs after every denoising step and may cancel.
    pub fn generate(
        &self,
        params: &GenerationParams,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Video> {
        self.generate_with_scheduler(params, &self.scheduler_config, on_step)
    }

    /// [`TextToVideo::generate`] with the scheduler of `params.scheduler` built from
    /// `scheduler_config` instead of the checkpoint's (diffusers' `pipe.scheduler =
    /// Scheduler.from_config(config, **overrides)`).
    pub fn generate_with_scheduler(
        &self,
        params: &GenerationParams,
        scheduler_config: &serde_json::Value,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Video> {
        let (latents, mut timings) = self.denoise_with_scheduler(params, scheduler_config, on_step)?;
        let started = Instant::now();
        let frames = self.decode_latents(&latents)?;
        timings.decoding = started.elapsed();
        Ok(Video { frames, seed: params.seed, timings })
    }

    /// Text encoding and the denoising loop: the final latents (1, C, frames, h, w), before the
    /// VAE. [`TextToVideo::generate`] is this followed by [`TextToVideo::decode_latents`].
    pub fn denoise(
        &self,
        params: &GenerationParams,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<(Tensor, Timings)> {
        self.denoise_with_scheduler(params, &self.scheduler_config, on_step)
    }

    /// [`TextToVideo::denoise`] with the scheduler built from `scheduler_config` (see
    /// [`TextToVideo::generate_with_scheduler`]).
    pub fn denoise_with_scheduler(
        &self,
        params: &GenerationParams,
        scheduler_config: &serde_json::Value,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<(Tensor, Timings)> {
        let (height, width) = self.validate(params)?;
        let (context, text_encoding) = self.guidance_context(params)?;

        let started = Instant::now();
        let mut scheduler = self.scheduler(params, scheduler_config)?;
        let mut generator = TorchGenerator::new(params.seed);
        let latents = self.initial_latents_for(&mut generator, params, height, width)?;
        let latents = (latents * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
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
        Ok((latents, Timings { text_encoding, denoising, ..Timings::default() }))
    }

    /// The text encoder's output for the UNet: under classifier-free guidance one batch of
    /// [negative, prompt], else the prompt alone.
    /// With keyframe prompts ([`LongVideo::travels`]) one embedding per frame: see
    /// [`TextToVideo::travelling_context`].
    /// Also the time the text encoder took for these texts (when they were encoded ahead, the
    /// time it took then).
    pub(crate) fn guidance_context(&self, params: &GenerationParams) -> Result<(Tensor, Duration)> {
        if params.long.travels() {
            return self.travelling_context_timed(params);
        }
        let (prompt_embeds, mut took) = self.encoded_prompt(&params.prompt)?;
        if classifier_free(params) {
            let (negative, also) = self.encoded_prompt(negative_prompt(params))?;
            took += also;
            Ok((Tensor::cat(&[&negative, &prompt_embeds], 0)?, took))
        } else {
            Ok((prompt_embeds, took))
        }
    }

    /// Prompt travel (diffusers' `_encode_prompt_free_noise`): the prompt (frame 0) and the
    /// keyframe prompts encoded and interpolated per frame; under classifier-free guidance the
    /// negative prompts the same way, first: (2·frames or frames, tokens, D), frame f of each half
    /// at row f, which frame f's cross-attention reads.
    pub fn travelling_context(&self, params: &GenerationParams) -> Result<Tensor> {
        Ok(self.travelling_context_timed(params)?.0)
    }

    /// [`TextToVideo::travelling_context`] and the time the text encoder took for its texts.
    fn travelling_context_timed(&self, params: &GenerationParams) -> Result<(Tensor, Duration)> {
        let frames = params.num_frames;
        let took = std::cell::Cell::new(Duration::ZERO);
        let encode = |text: &str| -> Result<Tensor> {
            let (embeds, t) = self.encoded_prompt(text)?;
            took.set(took.get() + t);
            Ok(embeds)
        };
        let interpolate = |first: &str, keys: &std::collections::BTreeMap<usize, String>| -> Result<Tensor> {
            let mut embeds = std::collections::BTreeMap::new();
            embeds.insert(0, encode(first)?);
            for (&frame, text) in keys {
                embeds.insert(frame, encode(text)?);
            }
            long_video::interpolate_keyframes(&embeds, frames)
        };
        let prompt_embeds = interpolate(&params.prompt, &params.long.prompts)?;
        let context = if classifier_free(params) {
            let negative = interpolate(negative_prompt(params), &params.long.negative_prompts)?;
            Tensor::cat(&[&negative, &prompt_embeds], 0)?
        } else {
            prompt_embeds
        };
        Ok((context, took.get()))
    }

    /// The scheduler `params` ask for, its timesteps set for their step count.
    fn scheduler(
        &self,
        params: &GenerationParams,
        config: &serde_json::Value,
    ) -> Result<Box<dyn schedulers::Scheduler>> {
        schedulers::build_scheduler(
            params.scheduler,
            config,
            &self.folder.component_dir("scheduler").join("scheduler_config.json"),
            params.num_inference_steps,
            params.eta,
        )
    }

    /// The denoising loop over `timesteps` from `latents` (1, C, frames, h, w), shared by text-
    /// and video-to-video; `started` is when the steps' elapsed time counts from.
    #[allow(clippy::too_many_arguments)]
    fn denoising_loop(
        &self,
        params: &GenerationParams,
        context: &Tensor,
        scheduler: &mut dyn schedulers::Scheduler,
        generator: &mut TorchGenerator,
        mut latents: Tensor,
        timesteps: &[usize],
        started: Instant,
        on_step: &mut dyn FnMut(&StepProgress) -> Control,
    ) -> Result<Tensor> {
        let guided = classifier_free(params);
        // T2V-Turbo: no unconditional pass; the guidance scale goes in as an embedding, and its
        // scheduler's noise is drawn as its pipeline draws it, in the (1, C, frames, h, w) layout.
        let turbo = params.scheduler == schedulers::SchedulerKind::T2vTurbo;
        let guidance_embedding = if turbo {
            let Some(dim) = self.unet.config().time_cond_proj_dim else {
                return Err(Error::InvalidArgument(
                    "T2V-Turbo sampling needs a UNet with a guidance embedding: load the model with \
                     time_cond_proj_dim 256 (T2V-Turbo-MS; the command line does so for --scheduler t2v-turbo)"
                        .into(),
                ));
            };
            Some(unet3d::guidance_scale_embedding(params.guidance_scale, dim, &self.device)?.to_dtype(self.dtype)?)
        } else {
            None
        };
        let device = self.device.clone();
        let dtype = self.dtype;
        let plan = match &params.long.context {
            Some(windows) => Some(windows.plan(latents.dim(2)?)?),
            None => None,
        };
        let long = LongVideoForward { text_per_frame: params.long.travels(), windows: plan.as_ref() };
        for (i, &t) in timesteps.iter().enumerate() {
            // Under guidance both halves of the batch see the same latents: the UNet computes
            // what precedes the prompt once for both.
            let model_input = scheduler.scale_model_input(latents.clone(), t)?;
            let model_t = scheduler.model_timestep(t);
            let noise_pred = self.unet.forward_guidance_embedded(
                &model_input,
                model_t,
                context,
                &long,
                guidance_embedding.as_ref(),
            )?;
            let noise_pred = if guided {
                let uncond = noise_pred.narrow(0, 0, 1)?;
                let text = noise_pred.narrow(0, 1, 1)?;
                (&uncond + ((text - &uncond)? * params.guidance_scale)?)?
            } else {
                noise_pred
            };
            // The reference steps the scheduler on (batch·frames, C, h, w): DDIM's η-noise is
            // drawn in that shape.
            let (b, c, f, h, w) = latents.dims5()?;
            let to_frames =
                |x: &Tensor| -> Result<Tensor> { Ok(x.permute((0, 2, 1, 3, 4))?.reshape((b * f, c, h, w))?) };
            let mut noise = |shape: &[usize]| -> Result<Tensor> {
                if turbo && shape == [b * f, c, h, w] {
                    let z = generator.randn_tensor(&[b, c, f, h, w], &device)?.to_dtype(dtype)?;
                    return to_frames(&z);
                }
                Ok(generator.randn_tensor(shape, &device)?.to_dtype(dtype)?)
            };
            let stepped = scheduler.step(&to_frames(&noise_pred)?, t, &to_frames(&latents)?, &mut noise)?;
            let sample = std::mem::replace(
                &mut latents,
                stepped.reshape((b, f, c, h, w))?.permute((0, 2, 1, 3, 4))?.contiguous()?,
            );
            // One reduction a step: NaN and infinities propagate into the sum.
            if !all_finite(&latents)? {
                return Err(Error::NonFiniteLatents { step: i + 1, total: timesteps.len() });
            }
            let progress = StepProgress {
                step: i + 1,
                total_steps: timesteps.len(),
                timestep: t,
                elapsed: started.elapsed(),
                sample,
                model_output: noise_pred,
                latents: latents.clone(),
            };
            if on_step(&progress) == Control::Cancel {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }

    /// Latents (1, C, frames, h, w) → frames (frames, H, W, 3) in [0, 1]: divide by the VAE's
    /// `scaling_factor`, decode each frame, map [-1, 1] to [0, 1] and clamp.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = (latents / self.vae.config().scaling_factor)?;
        let (b, c, f, h, w) = latents.dims5()?;
        if b != 1 {
            return Err(Error::InvalidArgument(format!("decode_latents takes one video, got a batch of {b}")));
        }
        let per_frame = latents.permute((0, 2, 1, 3, 4))?.reshape((b * f, c, h, w))?;
        crate::kernels::release_freed_memory();
        let images = self.vae.decode(&per_frame)?;
        if !all_finite(&images)? {
            return Err(Error::NonFiniteFrames);
        }
        let images = ((images / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        Ok(images.permute((0, 2, 3, 1))?.to_dtype(DType::F32)?.contiguous()?)
    }
}

impl TextToVideo {
    /// [`TextToVideo::decode_latents`] frame by frame as the VAE decodes them: `each(i, frame)`
    /// gets frame i as (H, W, 3) float32 in [0, 1], the same values as row i of
    /// `decode_latents`, so that a consumer (an MP4 encoder) can take each frame as it comes and
    /// the whole video is never held. A frame that is not finite stops the decoding with
    /// [`Error::NonFiniteFrames`] (the frames before it have been handed on); an error from
    /// `each` stops it too.
    pub fn decode_latents_each(
        &self,
        latents: &Tensor,
        each: &mut dyn FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let latents = (latents / self.vae.config().scaling_factor)?;
        let (b, c, f, h, w) = latents.dims5()?;
        if b != 1 {
            return Err(Error::InvalidArgument(format!("decode_latents takes one video, got a batch of {b}")));
        }
        let per_frame = latents.permute((0, 2, 1, 3, 4))?.reshape((b * f, c, h, w))?;
        crate::kernels::release_freed_memory();
        for i in 0..f {
            let image = self.vae.decode(&per_frame.narrow(0, i, 1)?)?;
            if !all_finite(&image)? {
                return Err(Error::NonFiniteFrames);
            }
            let image = ((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            each(i, image.permute((0, 2, 3, 1))?.to_dtype(DType::F32)?.contiguous()?.squeeze(0)?)?;
        }
        Ok(())
    }
}

/// Whether every value of `x` is finite: its sum in float32 is (a float16 sum could overflow).
fn all_finite(x: &Tensor) -> Result<bool> {
    Ok(x.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?.is_finite())
}

/// Checks `params` against a checkpoint's configs alone (no weights are read), so that bad
/// input fails before any model work: every config validated, the sizes representable, the
/// scheduler buildable for the steps asked. Returns (height, width) with the defaults resolved.
pub fn check_params(root: impl AsRef<Path>, params: &GenerationParams) -> Result<(usize, usize)> {
    let (shape, _, _) = check_configs(&ModelFolder::open(root)?, params)?;
    Ok((shape.height, shape.width))
}

fn check_configs(
    folder: &ModelFolder,
    params: &GenerationParams,
) -> Result<(sizing::RunShape, unet3d::Config, vae::Config)> {
    let _: text_encoder::Config = folder.config("text_encoder", "config.json")?;
    let unet_cfg: unet3d::Config = folder.config("unet", "config.json")?;
    let vae_cfg: vae::Config = folder.config("vae", "config.json")?;
    let shape = sizing::run_shape(&unet_cfg, &vae_cfg, params)?;
    let path = folder.component_dir("scheduler").join("scheduler_config.json");
    let scheduler_config = schedulers::load_scheduler_config(&path)?;
    schedulers::build_scheduler(params.scheduler, &scheduler_config, &path, params.num_inference_steps, params.eta)?;
    Ok((shape, unet_cfg, vae_cfg))
}

/// A run checked before any work by [`plan_run`].
#[derive(Debug, Clone, Copy)]
pub struct RunPlan {
    pub shape: sizing::RunShape,
    pub memory: sizing::MemoryEstimate,
}

/// [`check_params`], then the memory the run needs (weights as `options` load them, plus the
/// activations: see [`sizing`]); on the CPU a run that cannot fit in the memory available is
/// refused, saying how much it needs and what to lower.
pub fn plan_run(root: impl AsRef<Path>, params: &GenerationParams, options: &LoadOptions) -> Result<RunPlan> {
    let folder = ModelFolder::open(root)?;
    let (shape, unet_cfg, vae_cfg) = check_configs(&folder, params)?;
    let weights = weights_bytes(&folder, options)?;
    let memory = sizing::estimate(&unet_cfg, &vae_cfg, &shape, options.compute_dtypes().0, weights)?;
    if options.device.is_cpu() {
        sizing::check_fits(&memory, &shape, sizing::available_memory(), false)?;
    }
    Ok(RunPlan { shape, memory })
}

/// The bytes the weights of a checkpoint take once loaded with `options`.
pub fn weights_bytes(folder: &ModelFolder, options: &LoadOptions) -> Result<u64> {
    let mut total = 0u64;
    for component in ["text_encoder", "unet", "vae"] {
        let files = folder.weights_files(component, options.variant)?;
        for path in &files.paths {
            let bytes = match files.format {
                WeightsFormat::Safetensors => {
                    inspect_safetensors(path)?.resident_bytes(options.dtype, options.keep_narrow_weights)
                }
                WeightsFormat::PytorchBin => {
                    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
                    len.saturating_mul((options.dtype.size_in_bytes() as u64 / 2).max(1))
                }
            };
            total = total.saturating_add(bytes);
        }
    }
    Ok(total)
}

/// The frame size: as asked, or the UNet's `sample_size` times the VAE scale (the reference's
/// default); then every check of [`validate_params`] and [`sizing::run_shape`].
pub fn resolve_size(unet: &unet3d::Config, vae: &vae::Config, params: &GenerationParams) -> Result<(usize, usize)> {
    let shape = sizing::run_shape(unet, vae, params)?;
    Ok((shape.height, shape.width))
}

/// The model card: "only English is supported". A prompt whose letters are mostly outside the
/// Latin script gets a warning (it still runs).
pub fn non_english_warning(prompt: &str) -> Option<String> {
    let letters: Vec<char> = prompt.chars().filter(|c| c.is_alphabetic()).collect();
    if letters.is_empty() {
        return None;
    }
    let latin = letters.iter().filter(|&&c| is_latin(c)).count();
    if latin * 2 < letters.len() {
        Some(
            "the prompt is mostly not in the Latin script: the model understands English only, so expect a video that ignores much of it"
                .into(),
        )
    } else {
        None
    }
}

fn is_latin(c: char) -> bool {
    c.is_ascii_alphabetic()
        || matches!(c as u32, 0x00C0..=0x024F | 0x1E00..=0x1EFF | 0x2C60..=0x2C7F | 0xA720..=0xA7FF | 0xFF21..=0xFF3A | 0xFF41..=0xFF5A)
}

/// Reads `loras` and checks every module against the checkpoint at `root` (the safetensors
/// headers only: nothing is loaded). Returns how many tensors each LoRA changes, or `None` when
/// the checkpoint's weights are PyTorch `.bin` files (read whole, so checked at load instead).
pub fn check_loras(root: impl AsRef<Path>, loras: &[LoraSpec], variant: WeightsVariant) -> Result<Option<Vec<usize>>> {
    check_loras_with(root, loras, variant, None)
}

/// [`check_loras`] for a UNet loaded with [`LoadOptions::time_cond_proj_dim`].
pub fn check_loras_with(
    root: impl AsRef<Path>,
    loras: &[LoraSpec],
    variant: WeightsVariant,
    time_cond_proj_dim: Option<usize>,
) -> Result<Option<Vec<usize>>> {
    if loras.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let folder = ModelFolder::open(root)?;
    let unet_cfg = unet_config(&folder, time_cond_proj_dim)?;
    let mut shapes = std::collections::HashMap::new();
    for target in [LoraTarget::Unet, LoraTarget::TextEncoder] {
        let files = folder.weights_files(target.component(), variant)?;
        if files.format != WeightsFormat::Safetensors {
            return Ok(None);
        }
        let weights = folder.weights_with(target.component(), variant, DType::F32, &Device::Cpu, true)?;
        if target == LoraTarget::Unet {
            zero_cond_proj(&weights, &unet_cfg);
        }
        shapes.insert(target, weights.tensor_shapes());
    }
    let names = lora_module_names(&unet_cfg);
    let counts = loras
        .iter()
        .map(|spec| {
            let file = LoraFile::open(&spec.path)?;
            let deltas = lora::resolve_with_names(&[(file, spec.weight)], &shapes, &names)?;
            Ok(deltas.values().map(|d| d.len()).sum())
        })
        .collect::<Result<Vec<usize>>>()?;
    Ok(Some(counts))
}
