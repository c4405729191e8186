//! Typed errors of the library. Every message says what went wrong and what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "model folder {path} does not exist: name a folder in the diffusers layout \
         (model_index.json, scheduler/, text_encoder/, tokenizer/, unet/, vae/)"
    )]
    ModelFolderMissing { path: PathBuf },

    #[error("{path} is missing: {hint}")]
    FileMissing { path: PathBuf, hint: String },

    #[error(
        "tensor `{name}` is missing from the weights of {component} ({path}): the checkpoint does not \
         match its config.json, or the download is incomplete"
    )]
    TensorMissing { component: String, name: String, path: PathBuf },

    #[error(
        "tensor `{name}` in the weights of {component} ({path}) has shape {found:?}, but its config.json \
         expects {expected:?}: the weights and the config belong to different models"
    )]
    ShapeMismatch { component: String, name: String, path: PathBuf, expected: Box<[usize]>, found: Box<[usize]> },

    #[error("weights file {path} is corrupt or truncated ({reason}): download it again")]
    CorruptWeights { path: PathBuf, reason: String },

    #[error(
        "refusing to load {path}: its pickle references `{global}`, which is not tensor storage. \
         A PyTorch .bin file can run arbitrary code when unpickled; t2v only reads plain state dicts. \
         Convert the checkpoint to safetensors, or use one from a source you trust"
    )]
    UnsafePickle { path: PathBuf, global: String },

    #[error("{component} class `{class}` is not supported (supported: {supported}); {hint}")]
    UnsupportedClass { component: String, class: String, supported: String, hint: String },

    #[error("cannot parse {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    /// A config that parses but holds a value the model cannot be built or run with.
    #[error("{path}: `{key}` {reason}")]
    InvalidConfig { path: PathBuf, key: String, reason: String },

    #[error("{path} is {found}, not a regular file: {what} must be a file")]
    NotAFile { path: PathBuf, found: &'static str, what: &'static str },

    #[error("{path} is {size} bytes, more than the {limit} bytes {what} can be: it is not {what}, or it is damaged")]
    FileTooLarge { path: PathBuf, size: u64, limit: u64, what: &'static str },

    /// A run whose sizes cannot even be represented (they overflow 64 bits).
    #[error("{0}")]
    TooLarge(String),

    #[error(
        "this run needs about {} of memory ({}), but only {} is available: {hint}",
        gib(*needed), breakdown, gib(*available)
    )]
    InsufficientMemory { needed: u64, available: u64, breakdown: String, hint: String },

    #[error(
        "the latents stopped being finite (NaN or infinity) at denoising step {step} of {total}: the weights, \
         the scheduler config or the guidance scale give values out of range; nothing was written"
    )]
    NonFiniteLatents { step: usize, total: usize },

    #[error(
        "the decoded frames are not finite (NaN or infinity): the VAE's weights or its scaling_factor give values \
         out of range; nothing was written"
    )]
    NonFiniteFrames,

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{0}")]
    InvalidArgument(String),

    /// A LoRA that cannot be applied to this model, refused before any work.
    #[error("LoRA {path}: {reason}")]
    Lora { path: PathBuf, reason: String },

    #[error("{0}")]
    Device(String),

    #[error("{path} exists: choose another output path, or allow replacing it")]
    OutputExists { path: PathBuf },

    #[error("cannot read the video {path}: {reason}")]
    VideoInput { path: PathBuf, reason: String },

    #[error("generation cancelled")]
    Cancelled,

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The I/O error is in the message, not a `source`: chained printing (anyhow's `{:#}`) would
    /// repeat it.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    #[error(
        "no model folder `{spec}`, and it is not a Hugging Face repo id: name a folder in the \
         diffusers layout (model_index.json, scheduler/, text_encoder/, tokenizer/, unet/, vae/) \
         or a repo id such as damo-vilab/text-to-video-ms-1.7b (optionally @revision)"
    )]
    ModelSpec { spec: String },

    #[error(
        "{file} of {repo} is not in the Hugging Face cache {cache}, and downloads are off \
         (offline mode, or HF_HUB_OFFLINE): run once with network access and offline mode off (and \
         HF_HUB_OFFLINE unset) to download it, or point HF_HUB_CACHE or HF_HOME at the cache that \
         holds the model"
    )]
    Offline { repo: String, file: String, cache: PathBuf },

    #[error("cannot download {file} of the Hugging Face repo {repo}: {reason}")]
    Download { repo: String, file: String, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Bytes as GiB with one decimal (MiB under 1 GiB), for messages.
pub fn gib(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }
}
