//! The opened weights of one component: safetensors memory-mapped and converted to the compute
//! dtype tensor by tensor as each layer is built, or a PyTorch `.bin` read whole through
//! [`super::pth`]. Every missing tensor or wrong shape comes back as a typed error that names it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::select::{WeightsFiles, WeightsFormat};
use crate::error::{Error, Result};

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
    pub fn open(
        component: &str,
        files: &WeightsFiles,
        dtype: DType,
        device: &Device,
        keep_narrow: bool,
    ) -> Result<Self> {
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
                Source::Tensors(super::pth::load_pth_tensors(&path, dtype, device)?)
            }
        };
        let failure = Arc::new(Mutex::new(None));
        let backend =
            CheckedBackend { source, keep_narrow, component: component.to_string(), path, failure: failure.clone() };
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
    file.read_exact(&mut len_bytes).map_err(|_| corrupt(format!("the file is only {file_len} bytes long")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(corrupt(format!("its header claims {header_len} bytes but the file holds {file_len}")));
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
                if narrower {
                    stored
                } else {
                    stored.to_dtype(dtype)?
                }
            }
            source => source.backend().get_unchecked(name, dtype, dev)?,
        };
        if tensor.shape() != &s {
            return Err(self.fail(Error::ShapeMismatch {
                component: self.component.clone(),
                name: name.to_string(),
                path: self.path.clone(),
                expected: s.dims().into(),
                found: tensor.dims().into(),
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
