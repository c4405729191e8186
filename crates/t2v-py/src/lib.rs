//! `t2v._t2v`: the native half of the Python package `t2v`. It loads checkpoints, runs the
//! pipeline with the GIL released and writes videos; the diffusers-shaped API (pipelines,
//! schedulers, generators, `export_to_video`) is the pure-Python half in `python/t2v`.

// The closures run without the GIL return the library's `Result` as it is.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArray4, PyArrayDyn, PyReadonlyArray4, PyUntypedArrayMethods};
use pyo3::exceptions::{
    PyConnectionError, PyFileExistsError, PyFileNotFoundError, PyOSError, PyPermissionError, PyRuntimeError,
    PyValueError,
};
use pyo3::prelude::*;
use t2v::checkpoint::{self as hub, HubOptions, ModelFolder, WeightsVariant};
use t2v::long_video::{ContextWeighting, ContextWindows, LongVideo};
use t2v::lora::LoraSpec;
use t2v::pipeline::{self, Control, GenerationParams, LoadOptions, TextToVideo};
use t2v::schedulers::{self, SchedulerKind};
use t2v::video::input::ReadOptions;
use t2v::video::{EncodeOptions, Frames, Quality, VideoFormat};

/// The library's error as the Python exception a caller expects: FileNotFoundError for a model
/// or file that is not there, ValueError for a bad value or a checkpoint that does not fit,
/// OSError for the file system, RuntimeError for devices and the tensor backend.
fn py_err(err: t2v::Error) -> PyErr {
    use t2v::Error as E;
    let msg = err.to_string();
    match &err {
        E::ModelFolderMissing { .. } | E::FileMissing { .. } | E::ModelSpec { .. } | E::Offline { .. } => {
            PyFileNotFoundError::new_err(msg)
        }
        E::OutputExists { .. } => PyFileExistsError::new_err(msg),
        E::Io { error, .. } => match error.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        E::Download { .. } => PyConnectionError::new_err(msg),
        E::Device(_) | E::Candle(_) | E::Cancelled => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

fn candle_err(err: candle_core::Error) -> PyErr {
    py_err(t2v::Error::Candle(err))
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    // The library's parser (one for every door); Python's names in the message.
    t2v::params::parse_dtype(name).map_err(|_| {
        PyValueError::new_err(format!("unknown dtype `{}`: use float32, float16 or bfloat16", name.trim()))
    })
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

fn parse_variant(variant: Option<&str>) -> PyResult<WeightsVariant> {
    match variant {
        None => Ok(WeightsVariant::Auto),
        Some(v) => v.parse().map_err(py_err),
    }
}

/// Long-video settings from the pipeline's keyword arguments (`enable_free_noise` and keyframe
/// prompts): `context_length` None or 0 is off.
fn long_video(
    context_length: Option<usize>,
    context_stride: usize,
    context_weighting: &str,
    prompts: Option<BTreeMap<usize, String>>,
    negative_prompts: Option<BTreeMap<usize, String>>,
) -> PyResult<LongVideo> {
    let weighting = context_weighting.parse::<ContextWeighting>().map_err(py_err)?;
    Ok(LongVideo {
        context: context_length.filter(|&l| l > 0).map(|l| ContextWindows::new(l, context_stride, weighting)),
        prompts: prompts.unwrap_or_default(),
        negative_prompts: negative_prompts.unwrap_or_default(),
    })
}

fn parse_scheduler(class_name: &str) -> PyResult<SchedulerKind> {
    SchedulerKind::from_class_name(class_name).map_or_else(|| SchedulerKind::parse(class_name).map_err(py_err), Ok)
}

/// Where an overridden scheduler configuration is named in error messages.
const CONFIG_SOURCE: &str = "scheduler config";

fn scheduler_config(json: &str) -> PyResult<serde_json::Value> {
    schedulers::parse_scheduler_config(json, Path::new(CONFIG_SOURCE)).map_err(py_err)
}

fn to_numpy<'py>(py: Python<'py>, tensor: &Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dims = tensor.dims().to_vec();
    let data = tensor
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(candle_err)?;
    let array = ArrayD::from_shape_vec(IxDyn(&dims), data).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(array.into_pyarray(py))
}

/// Resolves a model given as a local folder or a Hugging Face repo id (`owner/name[@revision]`,
/// downloaded once into the Hugging Face cache) to its folder.
#[pyfunction]
#[pyo3(signature = (spec, *, variant=None, offline=false, cache_dir=None, token=None))]
fn resolve_model(
    py: Python<'_>,
    spec: &str,
    variant: Option<&str>,
    offline: bool,
    cache_dir: Option<PathBuf>,
    token: Option<String>,
) -> PyResult<PathBuf> {
    let mut opts = HubOptions::from_env();
    opts.offline |= offline;
    opts.variant = parse_variant(variant)?;
    if let Some(dir) = cache_dir {
        opts.cache_dir = dir;
    }
    if token.is_some() {
        opts.token = token;
    }
    py.detach(|| hub::resolve_model(spec, &opts)).map_err(py_err)
}

/// Checks a checkpoint folder without reading its weights: the classes of `model_index.json`, the
/// configs, and that each component has the weights file `variant` asks for. Returns the default
/// (height, width) of a frame.
#[pyfunction]
#[pyo3(signature = (root, *, variant=None))]
fn check_model(py: Python<'_>, root: PathBuf, variant: Option<&str>) -> PyResult<(usize, usize)> {
    let variant = parse_variant(variant)?;
    py.detach(|| {
        let folder = ModelFolder::open(&root)?;
        for component in ["text_encoder", "unet", "vae"] {
            folder.weights_files(component, variant)?;
        }
        pipeline::check_params(&root, &GenerationParams::new("", 0))
    })
    .map_err(py_err)
}

/// Checks the names of a device and opens it; returns its canonical name.
#[pyfunction]
fn open_device(spec: &str) -> PyResult<String> {
    let device = pipeline::select_device(spec).map_err(py_err)?;
    Ok(device_name(&device))
}

fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The library's defaults (the model card's recipe), for the Python signatures' tests.
#[pyfunction]
fn library_defaults() -> std::collections::BTreeMap<&'static str, f64> {
    use t2v::params::*;
    std::collections::BTreeMap::from([
        ("num_inference_steps", DEFAULT_STEPS as f64),
        ("guidance_scale", DEFAULT_GUIDANCE_SCALE),
        ("num_frames", DEFAULT_NUM_FRAMES as f64),
        ("strength", DEFAULT_STRENGTH),
        ("fps", t2v::video::DEFAULT_FPS as f64),
    ])
}

/// The timesteps a scheduler of class `scheduler` built from `config_json` visits for
/// `num_inference_steps` steps, in order; raises ValueError for a configuration it cannot use.
#[pyfunction]
fn scheduler_timesteps(scheduler: &str, config_json: &str, num_inference_steps: usize) -> PyResult<Vec<f64>> {
    let kind = parse_scheduler(scheduler)?;
    let config = scheduler_config(config_json)?;
    let built = schedulers::build_scheduler(kind, &config, Path::new(CONFIG_SOURCE), num_inference_steps, 0.0)
        .map_err(py_err)?;
    // As the UNet receives them: the Euler schedulers' may be fractional.
    Ok(built.timesteps().iter().map(|&t| built.model_timestep(t)).collect())
}

/// diffusers' `Scheduler.from_config(config, **overrides).config` for the class `scheduler`
/// (`config_json` of any class, `overrides_json` an object), by the library's one rule
/// ([`schedulers::from_config`]: `_use_default_values` respected, other classes' keys kept).
/// Raises ValueError for a configuration it cannot use.
#[pyfunction]
fn scheduler_from_config(scheduler: &str, config_json: &str, overrides_json: &str) -> PyResult<String> {
    let kind = parse_scheduler(scheduler)?;
    let config = scheduler_config(config_json)?;
    let overrides = match scheduler_config(overrides_json)? {
        serde_json::Value::Object(o) => o,
        _ => return Err(PyValueError::new_err("the scheduler overrides must be keyword arguments")),
    };
    let source = Path::new(CONFIG_SOURCE);
    let built = schedulers::from_config(kind, &config, &overrides, source).map_err(py_err)?;
    // Build it once, so that values that only fail together fail here.
    schedulers::build_scheduler(kind, &built.config, source, 1, 0.0).map_err(py_err)?;
    Ok(built.config.to_string())
}

/// Writes frames (F, H, W, 3) float32 in [0, 1] as `format` (mp4, gif, npy, png) to `path`,
/// replacing it, exactly as the command line writes them; the file appears only once complete.
#[pyfunction]
#[pyo3(signature = (frames, path, *, format, fps, qp, metadata=None))]
fn write_video(
    py: Python<'_>,
    frames: PyReadonlyArray4<'_, f32>,
    path: PathBuf,
    format: &str,
    fps: u32,
    qp: u8,
    metadata: Option<String>,
) -> PyResult<()> {
    let format: VideoFormat = format.parse().map_err(py_err)?;
    let quality: Quality = qp.to_string().parse().map_err(py_err)?;
    let shape = frames.shape().to_vec();
    if shape[3] != 3 {
        return Err(PyValueError::new_err(format!(
            "frames must be (frames, height, width, 3) RGB, got the shape {shape:?}"
        )));
    }
    let data: Vec<f32> = match frames.as_slice() {
        Ok(slice) => slice.to_vec(),
        Err(_) => frames.as_array().iter().copied().collect(),
    };
    let opts = EncodeOptions { fps, quality, metadata };
    py.detach(|| {
        let clip = Frames::new(&data, shape[0], shape[1], shape[2])?;
        t2v::video::write_video(&clip, format, &path, &opts)
    })
    .map_err(py_err)
}

/// The settings comment of an MP4 written with metadata, if it has one.
#[pyfunction]
fn read_mp4_metadata(path: PathBuf) -> PyResult<Option<String>> {
    t2v::video::read_mp4_metadata(&path).map_err(py_err)
}

/// Reads the frames of a video file (MP4 with H.264, GIF, `.npy`) or a folder of PNG/JPEG frames
/// as 8-bit RGB (frames, height, width, 3), at most `max_frames` of them (64 when None), every
/// `every`-th from `start_frame`. Returns the frames and the reader's notes (frames left out, a
/// rotation, a variable frame rate).
#[pyfunction]
#[pyo3(signature = (path, *, start_frame=0, every=1, max_frames=None))]
fn read_video<'py>(
    py: Python<'py>,
    path: PathBuf,
    start_frame: usize,
    every: usize,
    max_frames: Option<usize>,
) -> PyResult<(Bound<'py, PyArray4<u8>>, Vec<String>)> {
    let options = ReadOptions { start_frame, every, num_frames: max_frames, ..ReadOptions::default() };
    let clip = py.detach(|| t2v::video::input::read_video(&path, &options)).map_err(py_err)?;
    let shape = (clip.frames, clip.height, clip.width, 3);
    let array = numpy::ndarray::Array4::from_shape_vec(shape, clip.to_rgb8())
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok((array.into_pyarray(py), clip.warnings))
}

/// Frames (frames, height, width, 3) in [0, 1] handed on to a video-to-video pass at another
/// size, as zeroscope's recipe and `t2v generate --upscale` do: 8-bit (clamped, rounded), resized
/// with the Lanczos filter to `width`×`height`. Returns (frames, height, width, 3) uint8.
#[pyfunction]
fn first_pass_frames<'py>(
    py: Python<'py>,
    frames: PyReadonlyArray4<'py, f32>,
    height: usize,
    width: usize,
) -> PyResult<Bound<'py, PyArray4<u8>>> {
    let shape = frames.shape().to_vec();
    let data: Vec<f32> = match frames.as_slice() {
        Ok(slice) => slice.to_vec(),
        Err(_) => frames.as_array().iter().copied().collect(),
    };
    let clip = py
        .detach(|| -> t2v::Result<_> {
            let tensor = Tensor::from_vec(data, (shape[0], shape[1], shape[2], shape[3]), &candle_core::Device::Cpu)?;
            pipeline::upscale::first_pass_frames(&tensor, height, width)
        })
        .map_err(py_err)?;
    let array = numpy::ndarray::Array4::from_shape_vec((clip.frames, clip.height, clip.width, 3), clip.to_rgb8())
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(array.into_pyarray(py))
}

/// A loaded checkpoint on one device.
#[pyclass(frozen, module = "t2v._t2v")]
struct Model {
    pipe: Arc<TextToVideo>,
    device: String,
    dtype: DType,
}

/// How a run ended early.
enum Stop {
    /// The step callback asked to stop (diffusers' `pipe._interrupt`): decode what is there.
    Interrupt(Tensor),
    /// The step callback raised, or a signal handler did (KeyboardInterrupt).
    Raised(PyErr),
}

#[pymethods]
impl Model {
    /// Loads every component of the checkpoint folder `root` onto `device` in `dtype`.
    #[new]
    #[pyo3(signature = (root, *, device="cpu", dtype="float32", variant=None, loras=None))]
    fn new(
        py: Python<'_>,
        root: PathBuf,
        device: &str,
        dtype: &str,
        variant: Option<&str>,
        loras: Option<Vec<(PathBuf, f64)>>,
    ) -> PyResult<Self> {
        let device = pipeline::select_device(device).map_err(py_err)?;
        let dtype = parse_dtype(dtype)?;
        let loras = loras.unwrap_or_default().into_iter().map(|(path, weight)| LoraSpec::new(path, weight)).collect();
        let options = LoadOptions {
            device: device.clone(),
            dtype,
            variant: parse_variant(variant)?,
            loras,
            ..LoadOptions::default()
        };
        let pipe = py.detach(|| TextToVideo::load(&root, &options)).map_err(py_err)?;
        Ok(Self { pipe: Arc::new(pipe), device: device_name(&device), dtype })
    }

    #[getter]
    fn device(&self) -> String {
        self.device.clone()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.dtype)
    }

    /// The checkpoint's scheduler configuration as JSON.
    fn scheduler_config(&self) -> String {
        self.pipe.scheduler_config().to_string()
    }

    /// Warnings about a prompt the model will not read as written (too long, not English).
    fn prompt_warnings(&self, prompt: &str) -> PyResult<Vec<String>> {
        self.pipe.prompt_warnings(prompt).map_err(py_err)
    }

    /// Checks the settings against the model; returns (height, width) with the defaults resolved.
    #[pyo3(signature = (
        *, num_inference_steps, guidance_scale, eta, num_frames, height, width, context_length=None,
        context_stride=4, context_weighting="pyramid", prompts=None, negative_prompts=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn validate(
        &self,
        num_inference_steps: usize,
        guidance_scale: f64,
        eta: f64,
        num_frames: usize,
        height: Option<usize>,
        width: Option<usize>,
        context_length: Option<usize>,
        context_stride: usize,
        context_weighting: &str,
        prompts: Option<BTreeMap<usize, String>>,
        negative_prompts: Option<BTreeMap<usize, String>>,
    ) -> PyResult<(usize, usize)> {
        let mut params = GenerationParams::new("", 0);
        params.num_inference_steps = num_inference_steps;
        params.guidance_scale = guidance_scale;
        params.eta = eta;
        params.num_frames = num_frames;
        params.height = height;
        params.width = width;
        params.long = long_video(context_length, context_stride, context_weighting, prompts, negative_prompts)?;
        self.pipe.validate(&params).map_err(py_err)
    }

    /// Checks a video-to-video request against the model: `shape` is the input's (frames, height,
    /// width, channels); the sides must be multiples of the VAE's scale and `strength` must run at
    /// least one of `num_inference_steps` steps. Returns how many steps run.
    #[pyo3(signature = (shape, *, strength, num_inference_steps, guidance_scale, eta))]
    fn validate_video(
        &self,
        shape: (usize, usize, usize, usize),
        strength: f64,
        num_inference_steps: usize,
        guidance_scale: f64,
        eta: f64,
    ) -> PyResult<usize> {
        let (frames, height, width, channels) = shape;
        let mut params = GenerationParams::new("", 0);
        params.num_inference_steps = num_inference_steps;
        params.guidance_scale = guidance_scale;
        params.eta = eta;
        let begin =
            self.pipe.validate_video_to_video(&params, &[frames, channels, height, width], strength).map_err(py_err)?;
        Ok(num_inference_steps - begin)
    }

    /// Runs the pipeline with the GIL released. `on_step(step, timestep, latents)` runs after
    /// each step (step from 0; latents (1, C, F, h, w) when `step_latents`, else None) and returns
    /// True to stop there, as diffusers' `pipe._interrupt`: the frames decoded so far come back.
    /// Signals (Ctrl-C) are checked after each step. Returns the frames (F, H, W, 3) in [0, 1],
    /// or with `latent=True` the final latents (1, C, F, h, w).
    ///
    /// With `video` (frames, H, W, 3) float32 already in [-1, 1], the run is video-to-video: the
    /// last int(steps × `strength`) steps re-render it, and `num_frames`, `height` and `width` come
    /// from the video.
    #[pyo3(signature = (
        prompt, *, negative_prompt, seed, num_inference_steps, guidance_scale, scheduler,
        scheduler_config, eta, num_frames, height, width, on_step=None, step_latents=false, latent=false,
        video=None, strength=None, context_length=None, context_stride=4, context_weighting="pyramid",
        prompts=None, negative_prompts=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: String,
        negative_prompt: Option<String>,
        seed: u64,
        num_inference_steps: usize,
        guidance_scale: f64,
        scheduler: &str,
        scheduler_config: &str,
        eta: f64,
        num_frames: usize,
        height: Option<usize>,
        width: Option<usize>,
        on_step: Option<Py<PyAny>>,
        step_latents: bool,
        latent: bool,
        video: Option<PyReadonlyArray4<'py, f32>>,
        strength: Option<f64>,
        context_length: Option<usize>,
        context_stride: usize,
        context_weighting: &str,
        prompts: Option<BTreeMap<usize, String>>,
        negative_prompts: Option<BTreeMap<usize, String>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        // The input frames as `InputVideo::to_model_input` lays them out: (frames, 3, H, W).
        let input = match video {
            None => None,
            Some(array) => {
                let shape = array.shape().to_vec();
                let data: Vec<f32> = match array.as_slice() {
                    Ok(slice) => slice.to_vec(),
                    Err(_) => array.as_array().iter().copied().collect(),
                };
                let tensor =
                    Tensor::from_vec(data, (shape[0], shape[1], shape[2], shape[3]), &candle_core::Device::Cpu)
                        .and_then(|t| t.permute((0, 3, 1, 2)))
                        .and_then(|t| t.contiguous())
                        .map_err(candle_err)?;
                let strength = strength.ok_or_else(|| PyValueError::new_err("video-to-video needs a strength"))?;
                Some((tensor, strength))
            }
        };
        let params = GenerationParams {
            prompt,
            negative_prompt,
            seed,
            num_inference_steps,
            guidance_scale,
            scheduler: parse_scheduler(scheduler)?,
            eta,
            num_frames,
            height,
            width,
            long: long_video(context_length, context_stride, context_weighting, prompts, negative_prompts)?,
        };
        let config = self::scheduler_config(scheduler_config)?;
        let pipe = self.pipe.clone();
        let mut stop: Option<Stop> = None;
        let result = py.detach(|| -> t2v::Result<Tensor> {
            let run = {
                let mut report = |p: &pipeline::StepProgress| -> Control {
                    let outcome = Python::attach(|py| -> PyResult<bool> {
                        py.check_signals()?;
                        match &on_step {
                            None => Ok(false),
                            Some(callback) => {
                                let latents = if step_latents { Some(to_numpy(py, &p.latents)?) } else { None };
                                callback.bind(py).call1((p.step - 1, p.timestep, latents))?.is_truthy()
                            }
                        }
                    });
                    match outcome {
                        Ok(false) => Control::Continue,
                        Ok(true) => {
                            stop = Some(Stop::Interrupt(p.latents.clone()));
                            Control::Cancel
                        }
                        Err(err) => {
                            stop = Some(Stop::Raised(err));
                            Control::Cancel
                        }
                    }
                };
                let latents = match &input {
                    Some((video, strength)) => {
                        pipe.denoise_video_with_scheduler(&params, &config, video, *strength, &mut report)
                    }
                    None => pipe.denoise_with_scheduler(&params, &config, &mut report),
                };
                match latents {
                    Ok((latents, _)) if !latent => pipe.decode_latents(&latents),
                    other => other.map(|(latents, _)| latents),
                }
            };
            match (run, &stop) {
                (Err(t2v::Error::Cancelled), Some(Stop::Interrupt(latents))) if latent => Ok(latents.clone()),
                (Err(t2v::Error::Cancelled), Some(Stop::Interrupt(latents))) => pipe.decode_latents(latents),
                (run, _) => run,
            }
        });
        match (result, stop) {
            (Err(t2v::Error::Cancelled), Some(Stop::Raised(err))) => Err(err),
            (result, _) => to_numpy(py, &result.map_err(py_err)?),
        }
    }
}

/// Reads a LoRA (a safetensors file or an adapter folder) and checks it against the checkpoint
/// at `root` before any work; returns how many weight tensors it changes (None when the
/// checkpoint's weights are `.bin` files: checked when the model loads).
#[pyfunction]
#[pyo3(signature = (root, path, *, variant=None))]
fn check_lora(py: Python<'_>, root: PathBuf, path: PathBuf, variant: Option<&str>) -> PyResult<Option<usize>> {
    let variant = parse_variant(variant)?;
    let counts =
        py.detach(|| t2v::pipeline::check_loras(&root, &[LoraSpec::new(path, 1.0)], variant)).map_err(py_err)?;
    Ok(counts.and_then(|c| c.first().copied()))
}

#[pymodule]
fn _t2v(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_FPS", t2v::video::DEFAULT_FPS)?;
    m.add("DEFAULT_QP", Quality::DEFAULT_QP)?;
    m.add("MIN_QP", Quality::MIN_QP)?;
    m.add("MAX_QP", Quality::MAX_QP)?;
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(resolve_model, m)?)?;
    m.add_function(wrap_pyfunction!(check_model, m)?)?;
    m.add_function(wrap_pyfunction!(open_device, m)?)?;
    m.add_function(wrap_pyfunction!(scheduler_timesteps, m)?)?;
    m.add_function(wrap_pyfunction!(scheduler_from_config, m)?)?;
    m.add_function(wrap_pyfunction!(library_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(write_video, m)?)?;
    m.add_function(wrap_pyfunction!(read_mp4_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(read_video, m)?)?;
    m.add_function(wrap_pyfunction!(first_pass_frames, m)?)?;
    m.add_function(wrap_pyfunction!(check_lora, m)?)?;
    Ok(())
}
