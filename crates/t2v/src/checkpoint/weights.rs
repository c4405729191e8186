//! The opened weights of one component: safetensors memory-mapped and converted to the compute
//! dtype tensor by tensor as each layer is built, or a PyTorch `.bin` read whole through
//! [`super::pth`]. Every missing tensor or wrong shape comes back as a typed error that names it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

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
    source: Arc<Source>,
    /// LoRA updates merged into the named tensors as the layers fetch them (set once, before
    /// the model is built).
    lora: Arc<OnceLock<super::lora::ComponentDeltas>>,
    /// The dtype weight matrices and kernels are stored in when set (bfloat16 on the CPU with
    /// `--dtype bf16`: see [`crate::kernels::bf16`]).
    matrices: Arc<OnceLock<DType>>,
    /// Tensors no file holds, read as zeros (with their LoRA updates merged).
    zeros: Arc<Mutex<std::collections::HashMap<String, Vec<usize>>>>,
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
                    inspect_safetensors(p)?;
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
                let tensors = super::pth::load_pth_tensors(&path, dtype, device)?;
                if let Some((name, t)) = tensors.iter().find(|(_, t)| !t.dtype().is_float()) {
                    return Err(Error::CorruptWeights {
                        path: path.clone(),
                        reason: format!(
                            "tensor `{name}` holds {:?} values: model weights are floating point",
                            t.dtype()
                        ),
                    });
                }
                Source::Tensors(tensors)
            }
        };
        let failure = Arc::new(Mutex::new(None));
        let source = Arc::new(source);
        let lora = Arc::new(OnceLock::new());
        let matrices = Arc::new(OnceLock::new());
        let zeros = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let backend = CheckedBackend {
            zeros: zeros.clone(),
            source: source.clone(),
            keep_narrow,
            component: component.to_string(),
            path,
            failure: failure.clone(),
            lora: lora.clone(),
            matrices: matrices.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        Ok(Self { vb, failure, source, lora, matrices, zeros })
    }

    /// Stores every weight matrix and kernel (rank ≥ 2) in `dtype` whatever it is stored in
    /// (LoRA updates merged first), vectors still in the compute dtype: bfloat16 matrices for
    /// float32 compute on the CPU (`--dtype bf16`). Call before building the model; a second
    /// call is refused.
    pub fn store_matrices_as(&self, dtype: DType) -> Result<()> {
        if !dtype.is_float() {
            return Err(Error::InvalidArgument(format!("weight matrices cannot be stored as {dtype:?}")));
        }
        self.matrices
            .set(dtype)
            .map_err(|_| Error::InvalidArgument("the weight matrices' dtype was already set".into()))
    }

    /// Every tensor's shape, by name, from the headers (no data is read for safetensors), and
    /// those [`ComponentWeights::zero_if_absent`] adds.
    pub fn tensor_shapes(&self) -> super::lora::TensorShapes {
        let mut shapes: super::lora::TensorShapes = match self.source.as_ref() {
            Source::Safetensors(st) => {
                st.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect()
            }
            Source::Tensors(map) => map.iter().map(|(name, t)| (name.clone(), t.dims().to_vec())).collect(),
        };
        if let Ok(zeros) = self.zeros.lock() {
            for (name, shape) in zeros.iter() {
                shapes.entry(name.clone()).or_insert_with(|| shape.clone());
            }
        }
        shapes
    }

    /// A tensor the model needs but no published file holds (T2V-Turbo's `cond_proj`, whose
    /// base weight is not saved: only its LoRA is) is read as zeros of `shape` plus its LoRA
    /// updates. Has no effect when the weights hold `name`. Call before building the model.
    pub fn zero_if_absent(&self, name: &str, shape: &[usize]) {
        if !self.source.backend().contains_tensor(name) {
            if let Ok(mut zeros) = self.zeros.lock() {
                zeros.insert(name.to_string(), shape.to_vec());
            }
        }
    }

    /// Merges LoRA updates into the named tensors as the model fetches them (see
    /// [`crate::lora`]): in float32, then converted to the compute dtype (a float16-stored
    /// matrix with an update is kept in the compute dtype, not narrowed again). Call before
    /// building the model; a second call is refused.
    pub fn set_lora(&self, deltas: super::lora::ComponentDeltas) -> Result<()> {
        self.lora
            .set(deltas)
            .map_err(|_| Error::InvalidArgument("LoRA updates were already set for these weights".into()))
    }

    pub fn var_builder(&self) -> VarBuilder<'static> {
        self.vb.clone()
    }

    /// Runs a model constructor over these weights; a failure caused by a missing tensor or a
    /// tensor of the wrong shape comes back as the typed error that names it. Where the matrices
    /// were asked for in float16 ([`ComponentWeights::store_matrices_as`], `--dtype f16` on the
    /// CPU), the layers are built to multiply them in float16 where the CPU can
    /// ([`crate::kernels::with_f16_products`]); float16 matrices kept narrow in a float32 run
    /// are widened.
    pub fn build<T>(&self, f: impl FnOnce(VarBuilder<'static>) -> Result<T>) -> Result<T> {
        let f16_products = self.matrices.get() == Some(&DType::F16);
        match crate::kernels::with_f16_products(f16_products, || f(self.vb.clone())) {
            Err(Error::Candle(err)) => {
                let recorded = self.failure.lock().ok().and_then(|mut slot| slot.take());
                Err(recorded.unwrap_or(Error::Candle(err)))
            }
            other => other,
        }
    }
}

/// What a safetensors file holds, from its header alone (the data is not read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SafetensorsSummary {
    pub tensors: usize,
    /// Elements of tensors of rank 2 or more (matrices and kernels), stored as float16/bfloat16.
    pub narrow_matrix_elements: u64,
    /// Every other element.
    pub other_elements: u64,
}

impl SafetensorsSummary {
    /// Bytes these tensors take once loaded for compute in `dtype` (see [`ComponentWeights::open`]:
    /// with `keep_narrow`, narrow matrices stay in 2 bytes).
    pub fn resident_bytes(&self, dtype: DType, keep_narrow: bool) -> u64 {
        let wide = dtype.size_in_bytes() as u64;
        let narrow = if keep_narrow { wide.min(2) } else { wide };
        self.narrow_matrix_elements.saturating_mul(narrow).saturating_add(self.other_elements.saturating_mul(wide))
    }
}

/// The largest safetensors header accepted (the 1.7B UNet's is about 200 kB).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Checks a safetensors file's header before it is mapped, so that a truncated or garbled file, or
/// one holding tensors that are not floating point, gets a clear message instead of a bounds
/// error or meaningless frames; returns what it holds.
pub fn inspect_safetensors(path: &Path) -> Result<SafetensorsSummary> {
    use std::io::Read;
    let corrupt = |reason: String| Error::CorruptWeights { path: path.to_path_buf(), reason };
    let mut file = crate::files::open_regular(path, crate::files::FileKind::Weights)?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| corrupt(format!("the file is only {file_len} bytes long")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_SAFETENSORS_HEADER || header_len > file_len.saturating_sub(8) {
        return Err(corrupt(format!("its header claims {header_len} bytes but the file holds {file_len}")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| corrupt(e.to_string()))?;
    summarize_safetensors_header(&header, file_len.saturating_sub(8 + header_len)).map_err(corrupt)
}

/// The checks of [`inspect_safetensors`] on a header's JSON and the length of the data after it.
pub fn summarize_safetensors_header(header: &[u8], data_len: u64) -> std::result::Result<SafetensorsSummary, String> {
    let header: serde_json::Value = serde_json::from_slice(header).map_err(|e| format!("unreadable header: {e}"))?;
    let map = header.as_object().ok_or("the header is not a JSON object")?;
    let mut summary = SafetensorsSummary::default();
    let mut end = 0u64;
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or(format!("tensor `{name}` has no dtype"))?;
        let narrow = match dtype {
            "F16" | "BF16" => true,
            "F32" | "F64" => false,
            other => {
                return Err(format!(
                    "tensor `{name}` holds {other} values: model weights are floating point (F16, BF16, F32, F64)"
                ))
            }
        };
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect())
            .ok_or(format!("tensor `{name}` has no valid shape"))?;
        let elements = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or(format!("tensor `{name}` has an impossible shape {shape:?}"))?;
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|a| a.iter().map(|v| v.as_u64()).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or(format!("tensor `{name}` has no valid data_offsets"))?;
        let size = if narrow {
            2
        } else if dtype == "F32" {
            4
        } else {
            8
        };
        if elements.checked_mul(size) != Some(offsets[1] - offsets[0]) {
            return Err(format!(
                "tensor `{name}` of shape {shape:?} does not fill its {} bytes",
                offsets[1] - offsets[0]
            ));
        }
        end = end.max(offsets[1]);
        summary.tensors += 1;
        if narrow && shape.len() >= 2 {
            summary.narrow_matrix_elements = summary.narrow_matrix_elements.saturating_add(elements);
        } else {
            summary.other_elements = summary.other_elements.saturating_add(elements);
        }
    }
    if end > data_len {
        return Err(format!("it is truncated: its tensors need {end} bytes of data but only {data_len} are there"));
    }
    Ok(summary)
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
    source: Arc<Source>,
    keep_narrow: bool,
    component: String,
    path: PathBuf,
    failure: Arc<Mutex<Option<Error>>>,
    lora: Arc<OnceLock<super::lora::ComponentDeltas>>,
    matrices: Arc<OnceLock<DType>>,
    zeros: Arc<Mutex<std::collections::HashMap<String, Vec<usize>>>>,
}

impl CheckedBackend {
    /// A tensor no file holds, read as zeros (plus its LoRA updates).
    fn zero_default(&self, name: &str, dtype: DType, dev: &Device) -> Option<candle_core::Result<Tensor>> {
        let shape = self.zeros.lock().ok()?.get(name).cloned()?;
        let make = || -> candle_core::Result<Tensor> {
            let zeros = Tensor::zeros(shape.as_slice(), DType::F32, dev)?;
            match self.lora.get().and_then(|d| d.get(name)) {
                Some(deltas) => super::lora::merge(&zeros, deltas, dtype),
                None => zeros.to_dtype(dtype),
            }
        };
        Some(make())
    }

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
            return match self.zero_default(name, dtype, dev) {
                Some(t) => t,
                None => Err(self.missing(name)),
            };
        }
        let deltas = self.lora.get().and_then(|d| d.get(name));
        let tensor = match (deltas, self.source.as_ref()) {
            (Some(deltas), _) => {
                let stored = self.source.backend().get_unchecked(name, DType::F32, dev)?;
                super::lora::merge(&stored, deltas, dtype)?
            }
            (None, Source::Safetensors(st)) if self.keep_narrow && s.rank() >= 2 => {
                let stored = st.load(name, dev)?;
                let narrower = stored.dtype().size_in_bytes() < dtype.size_in_bytes()
                    && matches!(stored.dtype(), DType::F16 | DType::BF16);
                if narrower {
                    stored
                } else {
                    stored.to_dtype(dtype)?
                }
            }
            (None, source) => source.backend().get_unchecked(name, dtype, dev)?,
        };
        let tensor = match self.matrices.get() {
            Some(&m) if s.rank() >= 2 && tensor.dtype() != m => tensor.to_dtype(m)?,
            _ => tensor,
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
            return match self.zero_default(name, dtype, dev) {
                Some(t) => t,
                None => Err(self.missing(name)),
            };
        }
        if let Some(deltas) = self.lora.get().and_then(|d| d.get(name)) {
            let stored = self.source.backend().get_unchecked(name, DType::F32, dev)?;
            return super::lora::merge(&stored, deltas, dtype);
        }
        self.source.backend().get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.backend().contains_tensor(name) || self.zeros.lock().is_ok_and(|z| z.contains_key(name))
    }
}
