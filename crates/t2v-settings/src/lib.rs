//! The settings of a run as they travel with the video: a JSON file beside every output and the
//! MP4's comment tag, so that `t2v generate --from` repeats the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use t2v::long_video::{ContextWeighting, ContextWindows};
use t2v::pipeline::GenerationParams;
use t2v::schedulers::SchedulerKind;

/// Everything that decides the frames, plus how they were written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub t2v_version: String,
    /// The model as given: a folder or a Hugging Face repo id.
    pub model: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    /// `ddim` or `dpm`.
    pub scheduler: String,
    pub guidance_scale: f64,
    #[serde(default)]
    pub eta: f64,
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
    #[serde(default = "default_fps")]
    pub fps: u32,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// The video re-rendered (video-to-video); absent for text-to-video.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputSettings>,
    /// The second pass of a two-pass run: the frames above, resized and re-rendered by another model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upscale: Option<UpscaleSettings>,
    /// FreeNoise: the temporal attention's window length in frames; absent when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    /// FreeNoise: frames between windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_stride: Option<usize>,
    /// FreeNoise: `pyramid`, `flat` or `delayed_reverse_sawtooth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_weighting: Option<String>,
    /// Prompt travel: the prompts of keyframes after frame 0 (frame 0's is `prompt`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prompts: BTreeMap<usize, String>,
    /// The negative prompts of keyframes after frame 0 (frame 0's is `negative_prompt`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub negative_prompts: BTreeMap<usize, String>,
    /// The LoRAs merged into the model, in order (absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraSettings>,
    /// The scheduler settings given over the checkpoint's (`--scheduler-config KEY=VALUE`, as
    /// diffusers' `from_config(config, **overrides)`), the values as given.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub scheduler_config: std::collections::BTreeMap<String, String>,
}

/// A LoRA of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    /// Absolute path of the LoRA file or folder.
    pub path: PathBuf,
    pub weight: f64,
    /// See [`lora_sha256`].
    pub sha256: String,
}

impl LoraSettings {
    /// The record of `spec`: its absolute path and SHA-256.
    pub fn of(spec: &t2v::lora::LoraSpec) -> Result<Self> {
        let path = std::fs::canonicalize(&spec.path)
            .with_context(|| format!("the LoRA {} is not readable", spec.path.display()))?;
        Ok(Self { sha256: lora_sha256(&path)?, path, weight: spec.weight })
    }

    /// The LoRA to load, refused when its file changed since the run (the video would differ).
    pub fn check(&self) -> Result<t2v::lora::LoraSpec> {
        if !self.path.exists() {
            anyhow::bail!(
                "the LoRA of these settings, {}, is missing: put it back to repeat the run",
                self.path.display()
            );
        }
        let now = lora_sha256(&self.path)?;
        if now != self.sha256 {
            anyhow::bail!(
                "the LoRA {} has changed since the run (SHA-256 {} recorded, {now} now): restore the original to \
                 repeat the run",
                self.path.display(),
                self.sha256
            );
        }
        Ok(t2v::lora::LoraSpec::new(&self.path, self.weight))
    }
}

/// The SHA-256 of a LoRA, as lowercase hex: of the file's bytes, or for a folder (a PEFT
/// adapter), of its `.safetensors` and `.json` files sorted by name, each contributing its
/// name, a NUL byte, its length as 8 little-endian bytes and its bytes.
pub fn lora_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    if path.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            let p = entry?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let ext = p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            if !name.starts_with('.') && matches!(ext.as_str(), "safetensors" | "json") && p.is_file() {
                files.push((name, p));
            }
        }
        files.sort();
        for (name, p) in files {
            let mut file = t2v::files::open_regular(&p, t2v::files::FileKind::Weights)?;
            let len = file.metadata().map_err(|e| t2v::Error::io(&p, e))?.len();
            hasher.update(name.as_bytes());
            hasher.update([0u8]);
            hasher.update(len.to_le_bytes());
            std::io::copy(&mut file, &mut hasher).map_err(|e| t2v::Error::io(&p, e))?;
        }
    } else {
        let mut file = t2v::files::open_regular(path, t2v::files::FileKind::Weights)?;
        std::io::copy(&mut file, &mut hasher).map_err(|e| t2v::Error::io(path, e))?;
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The input of a video-to-video run and how its frames were chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSettings {
    /// Absolute path of the file or frame folder.
    pub path: PathBuf,
    /// See [`input_sha256`].
    pub sha256: String,
    /// How much of the input is replaced, 0 to 1.
    pub strength: f64,
    pub start_frame: usize,
    pub every: usize,
    /// `resize`, `crop` or `pad`.
    pub fit: String,
}

/// The second pass of `--upscale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpscaleSettings {
    /// A folder (absolute) or a Hugging Face repo id.
    pub model: String,
    pub height: usize,
    pub width: usize,
    pub strength: f64,
    pub steps: usize,
}

/// The SHA-256 of a video input, as lowercase hex: of the file's bytes, or for a folder of
/// frames, of its frame files (the non-hidden `.png`, `.jpg`, `.jpeg` files the reader takes)
/// sorted by name, each contributing its name, a NUL byte, its length as 8 little-endian bytes
/// and its bytes.
pub fn input_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    if path.is_dir() {
        let mut frames = Vec::new();
        for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            let p = entry?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let ext = p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            if !name.starts_with('.') && matches!(ext.as_str(), "png" | "jpg" | "jpeg") && p.is_file() {
                frames.push((name, p));
            }
        }
        frames.sort();
        for (name, p) in frames {
            let bytes = t2v::files::read_bounded(&p, t2v::files::FileKind::Video)?;
            hasher.update(name.as_bytes());
            hasher.update([0u8]);
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        }
    } else {
        let mut file = t2v::files::open_regular(path, t2v::files::FileKind::Video)?;
        std::io::copy(&mut file, &mut hasher).map_err(|e| t2v::Error::io(path, e))?;
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn default_fps() -> u32 {
    t2v::video::DEFAULT_FPS
}

fn default_dtype() -> String {
    dtype_name(DType::F32).into()
}

/// The names `--dtype` takes and the settings record (the library's).
pub use t2v::params::dtype_name;

/// The library's dtype parser, with its message as a string (what clap's value parsers return).
pub fn parse_dtype(name: &str) -> Result<DType, String> {
    t2v::params::parse_dtype(name).map_err(|e| e.to_string())
}

impl RunSettings {
    /// The record of `params` (with the size resolved) run on `model`.
    pub fn new(model: &str, params: &GenerationParams, height: usize, width: usize, fps: u32, dtype: DType) -> Self {
        Self {
            t2v_version: env!("CARGO_PKG_VERSION").to_string(),
            model: model.to_string(),
            prompt: params.prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            seed: params.seed,
            steps: params.num_inference_steps,
            scheduler: params.scheduler.name().to_string(),
            guidance_scale: params.guidance_scale,
            eta: params.eta,
            num_frames: params.num_frames,
            height,
            width,
            fps,
            dtype: dtype_name(dtype).to_string(),
            input: None,
            upscale: None,
            context_length: params.long.context.map(|c| c.length),
            context_stride: params.long.context.map(|c| c.stride),
            context_weighting: params.long.context.map(|c| c.weighting.as_str().to_string()),
            prompts: params.long.prompts.clone(),
            negative_prompts: params.long.negative_prompts.clone(),
            loras: Vec::new(),
            scheduler_config: Default::default(),
        }
    }

    /// Sets every generation setting of `params` to the recorded one.
    pub fn apply_to(&self, params: &mut GenerationParams) -> Result<()> {
        params.prompt = self.prompt.clone();
        params.negative_prompt = self.negative_prompt.clone();
        params.seed = self.seed;
        params.num_inference_steps = self.steps;
        params.guidance_scale = self.guidance_scale;
        params.scheduler = self.scheduler.parse::<SchedulerKind>()?;
        params.eta = self.eta;
        params.num_frames = self.num_frames;
        params.height = Some(self.height);
        params.width = Some(self.width);
        params.long.context = match self.context_length {
            Some(length) => {
                let weighting = match &self.context_weighting {
                    Some(w) => w.parse::<ContextWeighting>()?,
                    None => ContextWeighting::default(),
                };
                Some(ContextWindows::new(
                    length,
                    self.context_stride.unwrap_or(ContextWindows::DEFAULT_STRIDE),
                    weighting,
                ))
            }
            None => None,
        };
        params.long.prompts = self.prompts.clone();
        params.long.negative_prompts = self.negative_prompts.clone();
        Ok(())
    }

    pub fn dtype(&self) -> Result<DType> {
        parse_dtype(&self.dtype).map_err(|e| anyhow!("the recorded settings name an {e}"))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("settings serialize")
    }

    /// Reads settings from a `.json` file that t2v wrote, or from the metadata of an MP4 it made.
    pub fn read(path: &Path) -> Result<Self> {
        let is_mp4 = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("mp4"));
        let text = if is_mp4 {
            t2v::video::read_mp4_metadata(path)?.ok_or_else(|| {
                anyhow!("this MP4 carries no t2v settings (it was not made by t2v, or its metadata was stripped)")
            })?
        } else {
            t2v::files::read_text(path, t2v::files::FileKind::Settings)?
        };
        serde_json::from_str(&text).context("these are not settings that t2v wrote")
    }
}

/// Where the settings of an output are written: its name with `.json` added (`clip.mp4.json`,
/// `clip.gif.json`; `frames.json` beside a PNG folder `frames/`), so that the formats of one
/// name never share a settings file.
pub fn settings_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".json");
    output.with_file_name(name)
}
