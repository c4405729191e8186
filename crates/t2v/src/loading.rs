//! Opening a checkpoint folder in the diffusers layout: `model_index.json`, each component's
//! config, and its weights (`*.safetensors`, the `fp16` variant `*.fp16.safetensors`, or a PyTorch
//! `.bin` read without executing its pickle).
//!
//! Weights are memory-mapped and converted to the compute dtype tensor by tensor as each layer is
//! built. Every failure names the file or tensor and says what to do.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Which weights file of a component to read when a folder holds several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsVariant {
    /// The plain file; the `fp16` variant only when it is the only one there.
    #[default]
    Auto,
    /// The `fp16` variant (`*.fp16.safetensors`), an error when there is none.
    Fp16,
    /// The plain file, an error when there is none.
    Full,
}

impl WeightsVariant {
    /// The name that [`FromStr`](std::str::FromStr) reads back: `auto`, `fp16` or `full`.
    pub fn name(self) -> &'static str {
        match self {
            WeightsVariant::Auto => "auto",
            WeightsVariant::Fp16 => "fp16",
            WeightsVariant::Full => "full",
        }
    }
}

impl std::fmt::Display for WeightsVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightsVariant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(WeightsVariant::Auto),
            "fp16" => Ok(WeightsVariant::Fp16),
            "full" | "fp32" => Ok(WeightsVariant::Full),
            other => Err(Error::InvalidArgument(format!(
                "unknown weights variant `{other}`: use auto, fp16 or full"
            ))),
        }
    }
}

/// The classes t2v knows, per component, as `model_index.json` names them.
const SUPPORTED_CLASSES: &[(&str, &[&str])] = &[
    ("text_encoder", &["CLIPTextModel"]),
    ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"]),
    ("unet", &["UNet3DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    (
        "scheduler",
        &["DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "DDPMScheduler"],
    ),
];

/// A checkpoint folder in the diffusers layout.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    index: serde_json::Value,
}

impl ModelFolder {
    /// Opens `root`, reads `model_index.json` and checks that every component class is one that
    /// t2v implements.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(Error::ModelFolderMissing { path: root });
        }
        let index_path = root.join("model_index.json");
        let index: serde_json::Value = read_json(&index_path, "the folder is not a diffusers checkpoint: it needs model_index.json beside scheduler/, text_encoder/, tokenizer/, unet/ and vae/")?;
        for (component, supported) in SUPPORTED_CLASSES {
            // model_index.json names each component as ["library", "Class"].
            let class = index
                .get(component)
                .and_then(|v| v.as_array())
                .and_then(|a| a.get(1))
                .and_then(|c| c.as_str());
            match class {
                Some(class) if supported.contains(&class) => {}
                Some(class) => {
                    return Err(Error::UnsupportedClass {
                        component: (*component).to_string(),
                        class: class.to_string(),
                        supported: supported.join(", "),
                        hint: "t2v runs ModelScope text-to-video checkpoints such as \
                               damo-vilab/text-to-video-ms-1.7b and the zeroscope models"
                            .to_string(),
                    })
                }
                None => {
                    return Err(Error::Config {
                        path: index_path,
                        reason: format!("it does not name a class for the `{component}` component"),
                    })
                }
            }
        }
        let folder = Self { root, index };
        for component in ["text_encoder", "tokenizer", "unet", "vae", "scheduler"] {
            let dir = folder.root.join(component);
            if !dir.is_dir() {
                return Err(Error::FileMissing {
                    path: dir,
                    hint: "the checkpoint is incomplete: download the whole model folder".into(),
                });
            }
        }
        Ok(folder)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn model_index(&self) -> &serde_json::Value {
        &self.index
    }

    pub fn component_dir(&self, component: &str) -> PathBuf {
        self.root.join(component)
    }

    /// Parses `component/file` (for example `unet/config.json`) into `T`. Keys that `T` does not
    /// know are ignored; keys that are missing take `T`'s defaults, which mirror the reference's.
    pub fn config<T: DeserializeOwned>(&self, component: &str, file: &str) -> Result<T> {
        let path = self.component_dir(component).join(file);
        let value: serde_json::Value = read_json(&path, "the checkpoint is incomplete: download the whole model folder")?;
        serde_json::from_value(value).map_err(|e| Error::Config { path, reason: e.to_string() })
    }

    /// Checks that `component/config.json` describes the class t2v implements for it.
    pub fn check_config_class(&self, component: &str, config_file: &str, expected: &[&str]) -> Result<()> {
        let path = self.component_dir(component).join(config_file);
        let value: serde_json::Value = read_json(&path, "the checkpoint is incomplete: download the whole model folder")?;
        // diffusers configs carry `_class_name`, transformers configs `architectures`.
        let class = value
            .get("_class_name")
            .and_then(|c| c.as_str())
            .or_else(|| value.get("architectures").and_then(|a| a.get(0)).and_then(|c| c.as_str()));
        match class {
            Some(class) if !expected.contains(&class) => Err(Error::UnsupportedClass {
                component: component.to_string(),
                class: class.to_string(),
                supported: expected.join(", "),
                hint: format!("{} describes another kind of model", path.display()),
            }),
            _ => Ok(()),
        }
    }

    /// Finds the weights files of `component` for the requested variant.
    pub fn weights_files(&self, component: &str, variant: WeightsVariant) -> Result<WeightsFiles> {
        let dir = self.component_dir(component);
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut safetensors = (Vec::new(), Vec::new()); // (plain, fp16)
        let mut bins = (Vec::new(), Vec::new());
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            let name = match path.file_name().and_then(|n| n.to_str()) {
                Some(n) => n.to_string(),
                None => continue,
            };
            let is_fp16 = name.contains(".fp16.") || name.contains(".fp16-");
            let bucket = if name.ends_with(".safetensors") {
                &mut safetensors
            } else if name.ends_with(".bin") {
                &mut bins
            } else {
                continue;
            };
            if is_fp16 { bucket.1.push(path) } else { bucket.0.push(path) }
        }
        for list in [&mut safetensors.0, &mut safetensors.1, &mut bins.0, &mut bins.1] {
            list.sort();
        }
        // safetensors first: it is mapped, not unpickled.
        let pick = |plain: bool| -> Option<WeightsFiles> {
            let (st, bin) = if plain { (&safetensors.0, &bins.0) } else { (&safetensors.1, &bins.1) };
            if !st.is_empty() {
                Some(WeightsFiles { format: WeightsFormat::Safetensors, paths: st.clone() })
            } else if !bin.is_empty() {
                Some(WeightsFiles { format: WeightsFormat::PytorchBin, paths: bin.clone() })
            } else {
                None
            }
        };
        let found = match variant {
            WeightsVariant::Auto => pick(true).or_else(|| pick(false)),
            WeightsVariant::Fp16 => pick(false),
            WeightsVariant::Full => pick(true),
        };
        found.ok_or_else(|| {
            let wanted = match variant {
                WeightsVariant::Auto => "no weights file (*.safetensors or *.bin)",
                WeightsVariant::Fp16 => "no fp16 weights file (*.fp16.safetensors or *.fp16.bin)",
                WeightsVariant::Full => "no full-precision weights file (*.safetensors without .fp16)",
            };
            Error::FileMissing {
                path: dir.clone(),
                hint: format!(
                    "{component} has {wanted}; download the weights, or choose another variant"
                ),
            }
        })
    }

    /// A `VarBuilder` over the weights of `component`, converting each tensor to `dtype` on
    /// `device` as it is read. Use with [`ComponentWeights::build`] to get typed errors.
    pub fn weights(
        &self,
        component: &str,
        variant: WeightsVariant,
        dtype: DType,
        device: &Device,
    ) -> Result<ComponentWeights> {
        self.weights_with(component, variant, dtype, device, false)
    }

    /// [`ModelFolder::weights`], keeping float16 matrices narrow when `keep_narrow` (see
    /// [`ComponentWeights::open`]).
    pub fn weights_with(
        &self,
        component: &str,
        variant: WeightsVariant,
        dtype: DType,
        device: &Device,
        keep_narrow: bool,
    ) -> Result<ComponentWeights> {
        let files = self.weights_files(component, variant)?;
        ComponentWeights::open(component, &files, dtype, device, keep_narrow)
    }
}

fn read_json<T: DeserializeOwned>(path: &Path, hint: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::FileMissing { path: path.to_path_buf(), hint: hint.to_string() }
        } else {
            Error::io(path, e)
        }
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_path_buf(), reason: e.to_string() })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    Safetensors,
    PytorchBin,
}

/// The weights files chosen for one component (several when the checkpoint is sharded).
#[derive(Debug, Clone)]
pub struct WeightsFiles {
    pub format: WeightsFormat,
    pub paths: Vec<PathBuf>,
}

/// The opened weights of one component, and where the first failure of a model build is kept
/// in typed form (candle's errors carry only text).
pub struct ComponentWeights {
    vb: VarBuilder<'static>,
    failure: Arc<Mutex<Option<Error>>>,
}

impl ComponentWeights {
    /// With `keep_narrow`, weight matrices and kernels stored in a narrower float dtype than
    /// `dtype` (float16 checkpoints) stay in it; the layers of [`crate::nn`] widen them when
    /// used. Vectors (biases, norms) are always converted.
    pub fn open(component: &str, files: &WeightsFiles, dtype: DType, device: &Device, keep_narrow: bool) -> Result<Self> {
        let path = files.paths[0].clone();
        let source = match files.format {
            WeightsFormat::Safetensors => {
                for p in &files.paths {
                    check_safetensors_header(p)?;
                }
                // SAFETY: the files are mapped read-only; like every mmap reader we rely on them not
                // being truncated while the model is loaded.
                let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files.paths) }
                    .map_err(|e| Error::CorruptWeights { path: path.clone(), reason: e.to_string() })?;
                Source::Safetensors(st)
            }
            WeightsFormat::PytorchBin => {
                if files.paths.len() != 1 {
                    return Err(Error::InvalidArgument(format!(
                        "{component} has {} .bin shards; t2v reads sharded checkpoints only as safetensors",
                        files.paths.len()
                    )));
                }
                // Checked and read whole: a pickle is parsed, not mapped.
                Source::Tensors(crate::pth::load_pth_tensors(&path, dtype, device)?)
            }
        };
        let failure = Arc::new(Mutex::new(None));
        let backend = CheckedBackend {
            source,
            keep_narrow,
            component: component.to_string(),
            path,
            failure: failure.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        Ok(Self { vb, failure })
    }

    pub fn var_builder(&self) -> VarBuilder<'static> {
        self.vb.clone()
    }

    /// Runs a model constructor over these weights; a failure caused by a missing tensor or a
    /// tensor of the wrong shape comes back as the typed error that names it.
    pub fn build<T>(&self, f: impl FnOnce(VarBuilder<'static>) -> Result<T>) -> Result<T> {
        match f(self.vb.clone()) {
            Err(Error::Candle(err)) => {
                let recorded = self.failure.lock().ok().and_then(|mut slot| slot.take());
                Err(recorded.unwrap_or(Error::Candle(err)))
            }
            other => other,
        }
    }
}

/// Checks the safetensors header before mapping, so that a truncated or garbled file gets a clear
/// message instead of a bounds error.
fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let corrupt = |reason: String| Error::CorruptWeights { path: path.to_path_buf(), reason };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| corrupt(format!("the file is only {file_len} bytes long")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(corrupt(format!(
            "its header claims {header_len} bytes but the file holds {file_len}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| corrupt(e.to_string()))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("unreadable header: {e}")))?;
    let data_len = file_len - 8 - header_len;
    let mut end = 0u64;
    if let Some(map) = header.as_object() {
        for (name, info) in map {
            if name == "__metadata__" {
                continue;
            }
            if let Some(e) = info.get("data_offsets").and_then(|o| o.get(1)).and_then(|v| v.as_u64()) {
                end = end.max(e);
            }
        }
    }
    if end > data_len {
        return Err(corrupt(format!(
            "it is truncated: its tensors need {end} bytes of data but only {data_len} are there"
        )));
    }
    Ok(())
}

enum Source {
    /// Memory-mapped; tensors are read (and converted) as layers are built.
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    /// Already read, in the compute dtype (PyTorch `.bin` files).
    Tensors(std::collections::HashMap<String, Tensor>),
}

impl Source {
    fn backend(&self) -> &dyn SimpleBackend {
        match self {
            Source::Safetensors(st) => st,
            Source::Tensors(map) => map,
        }
    }
}

/// Wraps a weights reader: checks each tensor's presence and shape and keeps a typed error for
/// the model builder to report.
struct CheckedBackend {
    source: Source,
    keep_narrow: bool,
    component: String,
    path: PathBuf,
    failure: Arc<Mutex<Option<Error>>>,
}

impl CheckedBackend {
    fn fail(&self, err: Error) -> candle_core::Error {
        let msg = err.to_string();
        if let Ok(mut slot) = self.failure.lock() {
            *slot = Some(err);
        }
        candle_core::Error::Msg(msg)
    }

    fn missing(&self, name: &str) -> candle_core::Error {
        self.fail(Error::TensorMissing {
            component: self.component.clone(),
            name: name.to_string(),
            path: self.path.clone(),
        })
    }
}

impl SimpleBackend for CheckedBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if !self.source.backend().contains_tensor(name) {
            return Err(self.missing(name));
        }
        let tensor = match &self.source {
            Source::Safetensors(st) if self.keep_narrow && s.rank() >= 2 => {
                let stored = st.load(name, dev)?;
                let narrower = stored.dtype().size_in_bytes() < dtype.size_in_bytes()
                    && matches!(stored.dtype(), DType::F16 | DType::BF16);
                if narrower { stored } else { stored.to_dtype(dtype)? }
            }
            source => source.backend().get_unchecked(name, dtype, dev)?,
        };
        if tensor.shape() != &s {
            return Err(self.fail(Error::ShapeMismatch {
                component: self.component.clone(),
                name: name.to_string(),
                path: self.path.clone(),
                expected: s.dims().to_vec(),
                found: tensor.dims().to_vec(),
            }));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if !self.source.backend().contains_tensor(name) {
            return Err(self.missing(name));
        }
        self.source.backend().get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.backend().contains_tensor(name)
    }
}
