//! PyTorch `.bin` / `.pth` checkpoints (the `torch.save` zip format), read without executing
//! anything: `archive` opens the zip, `pickle` vets every pickle in it against an allow-list,
//! `state_dict` reads the tensors out of the vetted pickle.
//!
//! A pickle is a program: in Python, unpickling a `.bin` can call any function it names
//! (`os.system`, `builtins.eval`, ...). Nothing here runs Python, and candle's pickle machine only
//! interprets opcodes, but t2v goes further and refuses, *before any tensor is built*, every pickle
//! that names anything other than what a plain state dict of tensors needs ([`ALLOWED_GLOBALS`] and
//! the `torch.*Storage` types of [`STORAGE_TYPES`]), and every archive whose storages do not match
//! what its pickle declares.

mod archive;
pub(crate) mod pickle;
mod state_dict;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use archive::Archive;
use state_dict::{Root, StateDict, TensorSpec};

pub use pickle::{ALLOWED_GLOBALS, STORAGE_TYPES};

/// Largest `data.pkl` accepted (a 1.7B-parameter checkpoint's is well under 1 MiB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Check that `path` is a `torch.save` zip whose pickle is a plain state dict of tensors (or a dict
/// holding one under `"state_dict"`), that every storage it references is in the archive with the
/// right size, and that every tensor lies inside its storage. Reads no tensor data.
///
/// Errors: [`Error::UnsafePickle`] if the pickle references any global other than tensor storage
/// (the offending `module.name` in `global`), [`Error::CorruptWeights`] for anything broken,
/// truncated or not loadable, [`Error::Io`] if the file cannot be opened.
pub fn check_pth_is_plain_state_dict(path: &Path) -> Result<()> {
    Checked::open(path).map(|_| ())
}

/// Validate, then load every tensor of a `.bin` state dict onto `device`. Floating-point tensors are
/// converted to `dtype` when it is a floating-point type; integer tensors keep their dtype.
/// Validation (see [`check_pth_is_plain_state_dict`]) completes before any tensor is built.
pub fn load_pth_tensors(path: &Path, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    Checked::open(path)?.load(dtype, device)
}

/// Validate, then load a `torch.save` file whose pickle is a list of tensors (`[t0, t1, …]`, as
/// the key-less LoRA files of Text-To-Video-Finetuning and T2V-Turbo are), in list order, as
/// float32. The same checks as [`load_pth_tensors`]; anything in the list that is not a tensor
/// is refused.
pub fn load_pth_tensor_list(path: &Path) -> Result<Vec<Tensor>> {
    let checked = Checked::open_as(path, Root::List)?;
    let count = checked.state_dict.tensors.len();
    let mut by_name = checked.load(DType::F32, &Device::Cpu)?;
    (0..count)
        .map(|i| by_name.remove(&i.to_string()).ok_or_else(|| corrupt(path, format!("item {i} was not read"))))
        .collect()
}

/// Validate then open a .bin as a VarBuilder. Validation happens before any tensor is built.
///
/// All tensors are read eagerly (so a damaged storage is reported here as
/// [`Error::CorruptWeights`], not later as a candle error), already converted to `dtype` and placed
/// on `device`: the VarBuilder hands out clones of them without copying.
pub fn var_builder_from_pth(path: &Path, dtype: DType, device: &Device) -> Result<candle_nn::VarBuilder<'static>> {
    let tensors = load_pth_tensors(path, dtype, device)?;
    Ok(candle_nn::VarBuilder::from_tensors(tensors, dtype, device))
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptWeights { path: path.to_path_buf(), reason: reason.into() }
}

/// An archive whose pickles are vetted and whose storages match its state dict.
struct Checked {
    archive: Archive,
    state_dict: StateDict,
}

impl Checked {
    fn open(path: &Path) -> Result<Self> {
        Self::open_as(path, Root::StateDict)
    }

    fn open_as(path: &Path, root: Root) -> Result<Self> {
        let mut archive = Archive::open(path)?;
        let data_pkl = archive.data_pkl().to_string();

        // Every pickle in the archive is vetted, not only the one read.
        let mut data_pkl_bytes = None;
        for name in archive.pickles().to_vec() {
            let bytes = archive.read(&name, MAX_PICKLE_BYTES)?;
            pickle::validate_pickle(&bytes).map_err(|p| p.into_error(path, &name))?;
            if name == data_pkl {
                data_pkl_bytes = Some(bytes);
            }
        }
        let data_pkl_bytes = data_pkl_bytes.unwrap_or_default();
        archive.check_byteorder()?;

        let state_dict = state_dict::read(&data_pkl_bytes, archive.prefix(), root)
            .map_err(|reason| corrupt(path, format!("{data_pkl}: {reason}")))?;
        // Every storage must be in the archive, uncompressed, with exactly the bytes its id gives.
        for s in &state_dict.storages {
            archive.check_storage(&s.entry, s.dtype, s.numel)?;
        }
        Ok(Self { archive, state_dict })
    }

    fn load(mut self, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
        let path = self.archive.path().to_path_buf();
        let StateDict { storages, tensors } = &self.state_dict;
        let mut by_storage: BTreeMap<usize, Vec<&TensorSpec>> = BTreeMap::new();
        for t in tensors {
            by_storage.entry(t.storage).or_default().push(t);
        }
        // Read the storages in archive order: one sequential pass over the file.
        let mut order: Vec<(usize, usize)> =
            by_storage.keys().map(|&s| (self.archive.position(&storages[s].entry), s)).collect();
        order.sort_unstable();

        let mut out = HashMap::with_capacity(tensors.len());
        for (_, s) in order {
            let storage = &storages[s];
            let bytes = self.archive.read(&storage.entry, u64::MAX)?;
            for t in &by_storage[&s] {
                // Checked bounds make this infallible in practice; a failure is the file's fault.
                let tensor = state_dict::build_tensor(&bytes, storage.dtype, t)
                    .map_err(|e| corrupt(&path, format!("tensor `{}`: {e}", t.name)))?;
                // A failure here (out of device memory...) is not: it stays a candle error.
                let tensor = tensor.to_device(device)?;
                let tensor =
                    if tensor.dtype().is_float() && dtype.is_float() { tensor.to_dtype(dtype)? } else { tensor };
                out.insert(t.name.clone(), tensor);
            }
        }
        Ok(out)
    }
}
