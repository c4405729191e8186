//! A checkpoint folder in the diffusers layout: `model_index.json`, each component's config, and
//! which of its weights files to read. Every failure names the file and says what to do.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::de::DeserializeOwned;

use super::select::{select_weights, WeightsFiles, WeightsVariant};
use super::weights::ComponentWeights;
use crate::error::{Error, Result};
use crate::files::FileKind;

/// The classes t2v knows, per component, as `model_index.json` names them.
const SUPPORTED_CLASSES: &[(&str, &[&str])] = &[
    ("text_encoder", &["CLIPTextModel"]),
    ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"]),
    ("unet", &["UNet3DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    ("scheduler", &["DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "DDPMScheduler"]),
];

/// A component's parsed config, which checks its own values.
pub trait ComponentConfig: DeserializeOwned {
    fn validate(&self) -> Result<()>;
}

impl ComponentConfig for crate::unet3d::Config {
    fn validate(&self) -> Result<()> {
        crate::unet3d::Config::validate(self)
    }
}

impl ComponentConfig for crate::vae::Config {
    fn validate(&self) -> Result<()> {
        crate::vae::Config::validate(self)
    }
}

impl ComponentConfig for crate::text_encoder::Config {
    fn validate(&self) -> Result<()> {
        crate::text_encoder::Config::validate(self)
    }
}

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
            let class = index.get(component).and_then(|v| v.as_array()).and_then(|a| a.get(1)).and_then(|c| c.as_str());
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

    /// Parses `component/file` (for example `unet/config.json`) into `T` and validates it. Keys
    /// that `T` does not know are ignored; keys that are missing take `T`'s defaults, which mirror
    /// the reference's. A value no model can use is an [`Error::InvalidConfig`] naming the file.
    pub fn config<T: ComponentConfig>(&self, component: &str, file: &str) -> Result<T> {
        let path = self.component_dir(component).join(file);
        let value: serde_json::Value =
            read_json(&path, "the checkpoint is incomplete: download the whole model folder")?;
        let config: T =
            serde_json::from_value(value).map_err(|e| Error::Config { path: path.clone(), reason: e.to_string() })?;
        config.validate().map_err(|e| match e {
            Error::InvalidConfig { key, reason, .. } => Error::InvalidConfig { path, key, reason },
            e => e,
        })?;
        Ok(config)
    }

    /// Checks that `component/config.json` describes the class t2v implements for it.
    pub fn check_config_class(&self, component: &str, config_file: &str, expected: &[&str]) -> Result<()> {
        let path = self.component_dir(component).join(config_file);
        let value: serde_json::Value =
            read_json(&path, "the checkpoint is incomplete: download the whole model folder")?;
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

    /// Finds the weights files of `component` for the requested variant ([`select_weights`]).
    pub fn weights_files(&self, component: &str, variant: WeightsVariant) -> Result<WeightsFiles> {
        let dir = self.component_dir(component);
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut names = Vec::new();
        for entry in entries {
            if let Ok(name) = entry.map_err(|e| Error::io(&dir, e))?.file_name().into_string() {
                names.push(name);
            }
        }
        if let Some((format, chosen)) = select_weights(names.iter().map(String::as_str), variant) {
            return Ok(WeightsFiles { format, paths: chosen.iter().map(|name| dir.join(name)).collect() });
        }
        let wanted = match variant {
            WeightsVariant::Auto => "no weights file (*.safetensors or *.bin)",
            WeightsVariant::Fp16 => "no fp16 weights file (*.fp16.safetensors or *.fp16.bin)",
            WeightsVariant::Full => "no full-precision weights file (*.safetensors without .fp16)",
        };
        Err(Error::FileMissing {
            path: dir,
            hint: format!("{component} has {wanted}; download the weights, or choose another variant"),
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
    let text = crate::files::read_text(path, FileKind::Config).map_err(|e| {
        if crate::files::is_missing(&e) {
            Error::FileMissing { path: path.to_path_buf(), hint: hint.to_string() }
        } else {
            e
        }
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_path_buf(), reason: e.to_string() })
}
