//! Ours rather than candle's `pickle::read_all`/`PthTensors`, which refuse views that are neither
//! C- nor Fortran-contiguous, skip Int/Short/Bool storages and legacy `_rebuild_tensor` records
//! (with a line on stderr), panic on short argument tuples and check no storage's size.
//!
//! The (validated) pickle runs through `candle_core::pickle::Stack`, and the state dict is read out
//! of the resulting objects strictly: every tensor names a storage of a known type, every view lies
//! inside its storage, no name appears twice.

use std::collections::{HashMap, HashSet};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use super::pickle::{printable, STORAGE_TYPES};

/// One storage of the archive, as the pickle's persistent id describes it.
pub(super) struct StorageRef {
    /// Zip entry holding the raw bytes: `<prefix>data/<key>`.
    pub(super) entry: String,
    pub(super) dtype: DType,
    /// Number of elements, as the persistent id gives it.
    pub(super) numel: usize,
}

/// One tensor of the state dict: a view into a storage.
pub(super) struct TensorSpec {
    pub(super) name: String,
    /// Index into [`StateDict::storages`].
    pub(super) storage: usize,
    /// In elements.
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The tensors of a state dict and the storages they view; no tensor data yet.
pub(super) struct StateDict {
    pub(super) storages: Vec<StorageRef>,
    pub(super) tensors: Vec<TensorSpec>,
}

/// What the pickle's root must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Root {
    /// A state dict (`{name: tensor}`, or one under `"state_dict"`).
    StateDict,
    /// A list (or tuple) of tensors and nothing else, as `torch.save([t0, t1, …])` writes: the
    /// key-less LoRA files of Text-To-Video-Finetuning and T2V-Turbo. Tensors are named by
    /// their index (`"0"`, `"1"`, …).
    List,
}

/// Runs a validated pickle through candle's machine and reads the state dict out of its objects.
/// `prefix` is the archive folder of `data.pkl`, where the storages lie under `data/`.
pub(super) fn read(pickle: &[u8], prefix: &str, root_kind: Root) -> R<StateDict> {
    // The validator guarantees candle's machine only meets opcodes it implements correctly.
    let mut stack = Stack::empty();
    let mut reader: &[u8] = pickle;
    stack.read_loop(&mut reader).map_err(|e| format!("cannot interpret the pickle: {e}"))?;
    let root = stack.finalize().map_err(|e| format!("the pickle leaves nothing: {e}"))?;
    let (storages, tensors) = match root_kind {
        Root::StateDict => read_state_dict(&root, prefix)?,
        Root::List => read_tensor_list(&root, prefix)?,
    };
    Ok(StateDict { storages, tensors })
}

/// A list of tensors: every item must be one.
fn read_tensor_list(root: &Object, prefix: &str) -> R<(Vec<StorageRef>, Vec<TensorSpec>)> {
    let (Object::List(items) | Object::Tuple(items)) = root else {
        return Err(format!("the pickle holds {}, not a list of tensors", describe(root)));
    };
    if items.is_empty() {
        return Err("the pickle holds an empty list".into());
    }
    let mut st = Storages { prefix, list: vec![], by_key: HashMap::new() };
    let mut tensors = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let name = i.to_string();
        match parse_tensor(item, &name, &mut st).map_err(|e| format!("item {i}: {e}"))? {
            Some(t) => tensors.push(t),
            None => return Err(format!("item {i} of the list is {}, not a tensor", describe(item))),
        }
    }
    check_views(&tensors, &st.list)?;
    Ok((st.list, tensors))
}

/// A reason, without the file and entry that the caller adds.
type R<T> = std::result::Result<T, String>;

fn describe(o: &Object) -> String {
    match o {
        Object::Class { module_name, class_name } => format!("{module_name}.{class_name}"),
        Object::Int(_) | Object::Long(_) => "an integer".into(),
        Object::Float(_) => "a float".into(),
        Object::Unicode(_) => "a string".into(),
        Object::Bool(_) => "a bool".into(),
        Object::None => "None".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::List(_) => "a list".into(),
        Object::Mark => "a mark".into(),
        Object::Dict(_) => "a dict".into(),
        Object::Reduce { callable, .. } => format!("a call of {}", describe(callable)),
        Object::Build { callable, .. } => format!("a built {}", describe(callable)),
        Object::PersistentLoad(_) => "a persistent id".into(),
    }
}

fn as_class(o: &Object) -> Option<(&str, &str)> {
    match o {
        Object::Class { module_name, class_name } => Some((module_name, class_name)),
        _ => None,
    }
}

fn as_usize(o: &Object, what: &str) -> R<usize> {
    let v = match o {
        Object::Int(v) => *v as i64,
        Object::Long(v) => *v,
        other => return Err(format!("{what} is {}, not an integer", describe(other))),
    };
    usize::try_from(v).map_err(|_| format!("{what} is negative ({v})"))
}

fn as_usizes(o: &Object, what: &str) -> R<Vec<usize>> {
    match o {
        Object::Tuple(items) | Object::List(items) => items.iter().map(|i| as_usize(i, what)).collect(),
        other => Err(format!("{what} is {}, not a tuple", describe(other))),
    }
}

struct Storages<'p> {
    prefix: &'p str,
    list: Vec<StorageRef>,
    by_key: HashMap<String, usize>,
}

impl Storages<'_> {
    fn get(&mut self, pid: &Object) -> R<usize> {
        let Object::PersistentLoad(id) = pid else {
            return Err(format!("its storage is {}, not a persistent id", describe(pid)));
        };
        let Object::Tuple(id) = id.as_ref() else {
            return Err(format!("its storage id is {}, not a tuple", describe(id)));
        };
        let [tag, ty, key, _location, numel] = id.as_slice() else {
            return Err(format!("its storage id has {} fields, not 5", id.len()));
        };
        if *tag != Object::Unicode("storage".into()) {
            return Err(format!("its persistent id is {}, not a storage", describe(tag)));
        }
        let ty = match as_class(ty) {
            Some(("torch", name)) => name,
            _ => return Err(format!("its storage type is {}", describe(ty))),
        };
        let dtype = match STORAGE_TYPES.iter().find(|(n, _)| *n == ty) {
            Some((_, Some(dtype))) => *dtype,
            Some((_, None)) => return Err(format!("its storage type torch.{ty} has no candle dtype")),
            None => return Err(format!("unknown storage type torch.{ty}")),
        };
        let Object::Unicode(key) = key else {
            return Err(format!("its storage key is {}", describe(key)));
        };
        let numel = as_usize(numel, "the storage size")?;
        if let Some(&i) = self.by_key.get(key) {
            let s = &self.list[i];
            if s.dtype != dtype || s.numel != numel {
                return Err(format!("storage {key} is declared twice, differently"));
            }
            return Ok(i);
        }
        self.list.push(StorageRef { entry: format!("{}data/{key}", self.prefix), dtype, numel });
        self.by_key.insert(key.clone(), self.list.len() - 1);
        Ok(self.list.len() - 1)
    }
}

/// `Some` if `value` is a tensor (a rebuild call), `None` if it is some other plain value.
fn parse_tensor(value: &Object, name: &str, st: &mut Storages) -> R<Option<TensorSpec>> {
    match value {
        Object::Reduce { callable, args } => parse_call(callable, args, name, st),
        _ => Ok(None),
    }
}

fn parse_call(callable: &Object, args: &Object, name: &str, st: &mut Storages) -> R<Option<TensorSpec>> {
    let Some((module, func)) = as_class(callable) else {
        return Ok(None);
    };
    let Object::Tuple(a) = args else {
        return Err(format!("the arguments of {module}.{func} are {}, not a tuple", describe(args)));
    };
    let wrapped = |inner: Option<TensorSpec>| {
        inner.map(Some).ok_or_else(|| format!("{module}.{func} wraps something that is not a tensor"))
    };
    match (module, func) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let arity = if func == "_rebuild_tensor" { 4..=4 } else { 6..=7 };
            if !arity.contains(&a.len()) {
                return Err(format!("{module}.{func} takes {arity:?} arguments, not {}", a.len()));
            }
            let storage = st.get(&a[0])?;
            let offset = as_usize(&a[1], "the storage offset")?;
            let shape = as_usizes(&a[2], "the size")?;
            let stride = as_usizes(&a[3], "the stride")?;
            if shape.len() != stride.len() {
                return Err(format!("size {shape:?} and stride {stride:?} differ in rank"));
            }
            Ok(Some(TensorSpec { name: name.to_string(), storage, offset, shape, stride }))
        }
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            let data = a.first().ok_or_else(|| format!("{module}.{func} without arguments"))?;
            wrapped(parse_tensor(data, name, st)?)
        }
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let [func, ty, inner_args, _state] = a.as_slice() else {
                return Err(format!("{module}.{func} takes 4 arguments, not {}", a.len()));
            };
            match as_class(ty) {
                Some(("torch.nn.parameter", "Parameter"))
                | Some(("torch._tensor", "Tensor"))
                | Some(("torch", "Tensor")) => {}
                _ => return Err(format!("a tensor of type {}", describe(ty))),
            }
            wrapped(parse_call(func, inner_args, name, st)?)
        }
        _ => Ok(None),
    }
}

fn read_state_dict(root: &Object, prefix: &str) -> R<(Vec<StorageRef>, Vec<TensorSpec>)> {
    let Object::Dict(top) = root else {
        return Err(format!("the pickle holds {}, not a state dict", describe(root)));
    };
    let mut st = Storages { prefix, list: vec![], by_key: HashMap::new() };
    let read = |entries: &[(Object, Object)], st: &mut Storages| -> R<Vec<TensorSpec>> {
        let mut tensors = vec![];
        for (key, value) in entries {
            let Object::Unicode(name) = key else { continue };
            if let Some(t) = parse_tensor(value, name, st).map_err(|e| format!("tensor `{name}`: {e}"))? {
                tensors.push(t);
            }
        }
        Ok(tensors)
    };
    let mut tensors = read(top, &mut st)?;
    if tensors.is_empty() {
        // A training checkpoint: {"state_dict": {...}, "epoch": ..., ...}
        let nested = top.iter().find_map(|(k, v)| match (k, v) {
            (Object::Unicode(k), Object::Dict(d)) if k == "state_dict" => Some(d),
            _ => None,
        });
        if let Some(nested) = nested {
            tensors = read(nested, &mut st)?;
        }
    }
    if tensors.is_empty() {
        let keys: Vec<String> = top
            .iter()
            .take(8)
            .map(|(k, _)| match k {
                Object::Unicode(k) => printable(k),
                other => describe(other),
            })
            .collect();
        return Err(format!("no tensors at the top level of the pickle nor under \"state_dict\" (keys: {keys:?})"));
    }
    check_views(&tensors, &st.list)?;
    Ok((st.list, tensors))
}

/// No name twice, every view inside its storage, every tensor addressable on this machine.
fn check_views(tensors: &[TensorSpec], storages: &[StorageRef]) -> R<()> {
    let mut seen = HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(format!("tensor `{}` appears twice", t.name));
        }
        let s = &storages[t.storage];
        // Every element the view addresses must lie inside the storage.
        let numel: Option<u128> = t.shape.iter().try_fold(1u128, |acc, &d| acc.checked_mul(d as u128));
        let numel = numel.ok_or_else(|| format!("tensor `{}` has an impossible size", t.name))?;
        if numel == 0 {
            continue;
        }
        let last = t.shape.iter().zip(&t.stride).try_fold(t.offset as u128, |acc, (&d, &s)| {
            (d as u128 - 1).checked_mul(s as u128).and_then(|x| acc.checked_add(x))
        });
        match last {
            Some(last) if last < s.numel as u128 => {}
            _ => {
                return Err(format!(
                    "tensor `{}` (offset {}, size {:?}, stride {:?}) reaches past the end of its storage \
                     of {} elements",
                    t.name, t.offset, t.shape, t.stride, s.numel
                ))
            }
        }
        if usize::try_from(numel.saturating_mul(s.dtype.size_in_bytes() as u128)).is_err() {
            return Err(format!("tensor `{}` is too large for this machine", t.name));
        }
    }
    Ok(())
}

/// Build one tensor, on the CPU, from the raw little-endian bytes of its storage (bounds checked
/// beforehand).
pub(super) fn build_tensor(storage: &[u8], dtype: DType, t: &TensorSpec) -> candle_core::Result<Tensor> {
    let device = &Device::Cpu;
    let es = dtype.size_in_bytes();
    let numel: usize = t.shape.iter().product();
    if numel == 0 {
        return Tensor::zeros(t.shape.as_slice(), dtype, device);
    }
    // Contiguous in torch's sense: strides of the dimensions of size 1 do not matter.
    let mut expected = 1usize;
    let mut contiguous = true;
    for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
        if d != 1 && s != expected {
            contiguous = false;
            break;
        }
        expected *= d;
    }
    if contiguous {
        let bytes = &storage[t.offset * es..(t.offset + numel) * es];
        return Tensor::from_raw_buffer(bytes, dtype, &t.shape, device);
    }
    // Any other view (transposed, sliced, expanded): gather its elements in row-major order.
    let mut out = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; t.shape.len()];
    let mut at = t.offset;
    loop {
        out.extend_from_slice(&storage[at * es..(at + 1) * es]);
        let mut dim = t.shape.len();
        loop {
            if dim == 0 {
                return Tensor::from_raw_buffer(&out, dtype, &t.shape, device);
            }
            dim -= 1;
            index[dim] += 1;
            at += t.stride[dim];
            if index[dim] < t.shape[dim] {
                break;
            }
            at -= t.stride[dim] * index[dim];
            index[dim] = 0;
        }
    }
}
