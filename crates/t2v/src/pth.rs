//! PyTorch `.bin` / `.pth` checkpoints (the `torch.save` zip format: `<prefix>/data.pkl` plus one
//! raw little-endian storage per `<prefix>/data/<key>` entry), read without executing anything.
//!
//! A pickle is a program: in Python, unpickling a `.bin` can call any function it names
//! (`os.system`, `builtins.eval`, ...). Nothing here runs Python, and candle's pickle machine only
//! interprets opcodes, but t2v goes further and refuses, *before any tensor is built*, every pickle
//! that names anything other than what a plain state dict of tensors needs ([`ALLOWED_GLOBALS`] and
//! the `torch.*Storage` types). The validator walks every opcode of every protocol (0 to 5) and
//! resolves `GLOBAL`, `INST`, `STACK_GLOBAL` (through string pushes and the memo) and the copyreg
//! extension opcodes, so a forbidden name is reported whatever form it takes.
//!
//! It also refuses, as corrupt, anything that candle's machine would misread or that could make it
//! misbehave: opcodes it does not implement (or implements wrongly, like `DICT`), truncated or
//! malformed opcodes, memo references to nothing, pickles that nest too deep (recursive drops) or
//! expand through the memo into gigabytes (candle clones memo entries). After that the pickle is run
//! through `candle_core::pickle::Stack`, and the state dict is read out of the resulting objects
//! strictly: every tensor's storage must exist in the archive with exactly the size its pickle gives,
//! and every view must lie inside its storage.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Globals a state dict written by `torch.save` may reference, besides the `torch.*Storage` types
/// ([`STORAGE_TYPES`]). `(module, name)` exactly as the pickle's `GLOBAL` opcode spells them.
pub const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    // The container of `Module.state_dict()`; also the (empty) `backward_hooks` of every tensor.
    ("collections", "OrderedDict"),
    // `Tensor.__reduce_ex__`: (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]).
    ("torch._utils", "_rebuild_tensor_v2"),
    // The same without requires_grad/backward_hooks (PyTorch < 1.0).
    ("torch._utils", "_rebuild_tensor"),
    // `Parameter.__reduce_ex__` (a state dict saved with `keep_vars=True`).
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    // Tensor subclasses or tensors carrying Python attributes: (func, type, args, state).
    ("torch._tensor", "_rebuild_from_type_v2"),
    // The only types accepted as the `type` argument of `_rebuild_from_type_v2`.
    ("torch.nn.parameter", "Parameter"),
    ("torch._tensor", "Tensor"),
    ("torch", "Tensor"),
];

/// The legacy storage classes `torch.save` names in its persistent ids (`torch.FloatStorage`, ...),
/// with the candle dtype each loads as (`None`: tensor storage, but not loadable by candle).
pub const STORAGE_TYPES: &[(&str, Option<DType>)] = &[
    ("FloatStorage", Some(DType::F32)),
    ("DoubleStorage", Some(DType::F64)),
    ("HalfStorage", Some(DType::F16)),
    ("BFloat16Storage", Some(DType::BF16)),
    ("LongStorage", Some(DType::I64)),
    ("IntStorage", Some(DType::I32)),
    ("ShortStorage", Some(DType::I16)),
    ("ByteStorage", Some(DType::U8)),
    // torch.bool is one byte holding 0 or 1: loaded as u8.
    ("BoolStorage", Some(DType::U8)),
    ("CharStorage", None),
    ("ComplexFloatStorage", None),
    ("ComplexDoubleStorage", None),
    ("QUInt8Storage", None),
    ("QInt8Storage", None),
    ("QInt32Storage", None),
    ("QUInt4x2Storage", None),
    ("QUInt2x4Storage", None),
];

/// Largest `data.pkl` accepted (a 1.7B-parameter checkpoint's is well under 1 MiB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Deepest nesting of pickle objects accepted (a state dict needs about 8).
const MAX_NESTING: u32 = 64;
/// Approximate bytes of one candle `Object` node, for the expansion budget.
const NODE_COST: u64 = 64;

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
pub fn load_pth_tensors(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    Checked::open(path)?.load(dtype, device)
}

/// Validate then open a .bin as a VarBuilder. Validation happens before any tensor is built.
///
/// All tensors are read eagerly (so a damaged storage is reported here as
/// [`Error::CorruptWeights`], not later as a candle error), already converted to `dtype` and placed
/// on `device`: the VarBuilder hands out clones of them without copying.
pub fn var_builder_from_pth(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<candle_nn::VarBuilder<'static>> {
    let tensors = load_pth_tensors(path, dtype, device)?;
    Ok(candle_nn::VarBuilder::from_tensors(tensors, dtype, device))
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptWeights {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

// ------------------------------------------------------------------------------------------------
// Archive

struct StorageRef {
    /// Zip entry holding the raw bytes: `<prefix>/data/<key>`.
    entry: String,
    dtype: DType,
    /// Number of elements, as the persistent id gives it.
    numel: usize,
}

struct TensorSpec {
    name: String,
    storage: usize,
    /// In elements.
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

struct Checked {
    path: PathBuf,
    archive: zip::ZipArchive<BufReader<File>>,
    storages: Vec<StorageRef>,
    tensors: Vec<TensorSpec>,
}

impl Checked {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(corrupt(path, "the file is empty"));
        }
        let mut archive = match zip::ZipArchive::new(BufReader::new(file)) {
            Ok(archive) => archive,
            Err(e) => return Err(corrupt(path, not_a_zip_reason(path, &e))),
        };

        let names: Vec<String> = archive
            .file_names_raw()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        let pickles: Vec<&String> = names.iter().filter(|n| n.ends_with(".pkl")).collect();
        let data_pkls: Vec<&String> = pickles
            .iter()
            .copied()
            .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let data_pkl =
            match data_pkls.as_slice() {
                [one] => (*one).clone(),
                [] => return Err(corrupt(
                    path,
                    "the zip archive has no data.pkl: it is not a checkpoint written by torch.save",
                )),
                several => {
                    return Err(corrupt(
                        path,
                        format!("the zip archive has several data.pkl ({several:?})"),
                    ))
                }
            };
        let prefix = data_pkl
            .strip_suffix("data.pkl")
            .unwrap_or_default()
            .to_string();

        // Every pickle in the archive is vetted, not only the one read.
        let mut data_pkl_bytes = None;
        for name in &pickles {
            let bytes = read_entry(&mut archive, path, name, MAX_PICKLE_BYTES)?;
            validate_pickle(&bytes).map_err(|p| p.into_error(path, name))?;
            if **name == data_pkl {
                data_pkl_bytes = Some(bytes);
            }
        }
        let data_pkl_bytes = data_pkl_bytes.unwrap_or_default();

        // Storages are raw bytes in the byte order of the machine that saved them.
        let byteorder = format!("{prefix}byteorder");
        if archive.index_for_name(&byteorder).is_some() {
            let order = read_entry(&mut archive, path, &byteorder, 64)?;
            if order.trim_ascii() != b"little" {
                return Err(corrupt(
                    path,
                    format!(
                        "its storages are {} (the `byteorder` record), only little-endian checkpoints are read",
                        String::from_utf8_lossy(order.trim_ascii())
                    ),
                ));
            }
        }

        // The validator guarantees candle's machine only meets opcodes it implements correctly.
        let mut stack = Stack::empty();
        let mut reader: &[u8] = &data_pkl_bytes;
        stack.read_loop(&mut reader).map_err(|e| {
            corrupt(
                path,
                format!("{data_pkl}: cannot interpret the pickle: {e}"),
            )
        })?;
        let root = stack
            .finalize()
            .map_err(|e| corrupt(path, format!("{data_pkl}: the pickle leaves nothing: {e}")))?;
        let (storages, tensors) = read_state_dict(&root, &prefix)
            .map_err(|reason| corrupt(path, format!("{data_pkl}: {reason}")))?;

        // Every storage must be in the archive, uncompressed, with exactly the bytes its id gives.
        for s in &storages {
            let index = archive.index_for_name(&s.entry).ok_or_else(|| {
                corrupt(
                    path,
                    format!(
                        "the storage {} of the pickle is missing from the archive",
                        s.entry
                    ),
                )
            })?;
            let entry = archive
                .by_index_data(index)
                .map_err(|e| corrupt(path, format!("{}: {e}", s.entry)))?;
            if entry.compression() != zip::CompressionMethod::Stored {
                return Err(corrupt(
                    path,
                    format!(
                        "{} is compressed ({}), torch.save stores storages uncompressed",
                        s.entry,
                        entry.compression()
                    ),
                ));
            }
            let expected = (s.numel as u64).checked_mul(s.dtype.size_in_bytes() as u64);
            if expected != Some(entry.size()) {
                return Err(corrupt(
                    path,
                    format!(
                        "{} holds {} bytes, but the pickle declares {} elements of {:?}",
                        s.entry,
                        entry.size(),
                        s.numel,
                        s.dtype
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            archive,
            storages,
            tensors,
        })
    }

    fn load(mut self, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
        let path = self.path.clone();
        let mut by_storage: BTreeMap<usize, Vec<&TensorSpec>> = BTreeMap::new();
        for t in &self.tensors {
            by_storage.entry(t.storage).or_default().push(t);
        }
        // Read the storages in archive order: one sequential pass over the file.
        let mut order: Vec<(usize, usize)> = by_storage
            .keys()
            .map(|&s| {
                (
                    self.archive
                        .index_for_name(&self.storages[s].entry)
                        .unwrap_or(usize::MAX),
                    s,
                )
            })
            .collect();
        order.sort_unstable();

        let mut out = HashMap::with_capacity(self.tensors.len());
        for (_, s) in order {
            let storage = &self.storages[s];
            let bytes = read_entry(&mut self.archive, &path, &storage.entry, u64::MAX)?;
            for t in &by_storage[&s] {
                // Checked bounds make this infallible in practice; a failure is the file's fault.
                let tensor = build_tensor(&bytes, storage.dtype, t)
                    .map_err(|e| corrupt(&path, format!("tensor `{}`: {e}", t.name)))?;
                // A failure here (out of device memory...) is not: it stays a candle error.
                let tensor = tensor.to_device(device)?;
                let tensor = if tensor.dtype().is_float() && dtype.is_float() {
                    tensor.to_dtype(dtype)?
                } else {
                    tensor
                };
                out.insert(t.name.clone(), tensor);
            }
        }
        Ok(out)
    }
}

fn not_a_zip_reason(path: &Path, e: &zip::result::ZipError) -> String {
    const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
    let mut head = [0u8; 64];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let head = &head[..n];
    if head.starts_with(b"version https://git-lfs") {
        "it is a Git LFS pointer file, not the weights: fetch the LFS object (git lfs pull) or download the file itself".into()
    } else if head.starts_with(LEGACY_MAGIC) {
        "it is in the legacy (PyTorch < 1.6) torch.save format, which t2v does not read: \
         re-save it with a current torch.save, or convert it to safetensors"
            .into()
    } else if head.starts_with(b"PK") {
        format!("the zip archive is truncated or damaged ({e})")
    } else if head.trim_ascii_start().starts_with(b"<") {
        format!("it looks like an HTML or XML page, not a torch.save zip archive ({e})")
    } else {
        format!("not a torch.save zip archive ({e})")
    }
}

/// Read a whole zip entry, checking its CRC, refusing more than `limit` bytes.
fn read_entry(
    archive: &mut zip::ZipArchive<BufReader<File>>,
    path: &Path,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>> {
    let index = archive
        .index_for_name(name)
        .ok_or_else(|| corrupt(path, format!("{name} is missing from the archive")))?;
    let (size, crc, stored) = {
        let entry = archive
            .by_index_data(index)
            .map_err(|e| corrupt(path, format!("{name}: {e}")))?;
        (
            entry.size(),
            entry.crc32(),
            entry.compression() == zip::CompressionMethod::Stored,
        )
    };
    if size > limit {
        return Err(corrupt(
            path,
            format!("{name} is implausibly large ({size} bytes)"),
        ));
    }
    // torch.save with `set_crc32_options(False)` writes a zero CRC: read such stored entries raw.
    let reader = if crc == 0 && size > 0 && stored {
        archive.by_index_raw(index)
    } else {
        archive.by_index(index)
    };
    let reader = reader.map_err(|e| corrupt(path, format!("{name}: {e}")))?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(size as usize)
        .map_err(|e| corrupt(path, format!("{name}: cannot allocate {size} bytes: {e}")))?;
    reader
        .take(size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| corrupt(path, format!("{name}: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(corrupt(
            path,
            format!(
                "{name} has {} bytes where the archive declares {size}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

// ------------------------------------------------------------------------------------------------
// Validation: every opcode of every pickle protocol, on an abstract stack.

/// Why a pickle is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    Unsafe(String),
    Corrupt(String),
}

impl Problem {
    fn into_error(self, path: &Path, entry: &str) -> Error {
        match self {
            Problem::Unsafe(global) => Error::UnsafePickle {
                path: path.to_path_buf(),
                global,
            },
            Problem::Corrupt(reason) => corrupt(path, format!("{entry}: {reason}")),
        }
    }
}

#[derive(Clone)]
enum Kind {
    Mark,
    Str(Rc<str>),
    Other,
}

/// What the validator knows of a stack item: its string value if any, and what building it would
/// cost candle (approximate bytes) and how deep it nests.
#[derive(Clone)]
struct AVal {
    kind: Kind,
    cost: u64,
    depth: u32,
}

impl AVal {
    fn other() -> Self {
        AVal {
            kind: Kind::Other,
            cost: NODE_COST,
            depth: 1,
        }
    }
    fn string(s: &str) -> Self {
        AVal {
            kind: Kind::Str(Rc::from(s)),
            cost: NODE_COST + s.len() as u64,
            depth: 1,
        }
    }
    fn container(items: &[AVal]) -> Self {
        let mut v = AVal::other();
        for item in items {
            v.absorb(item);
        }
        v
    }
    fn absorb(&mut self, item: &AVal) {
        self.kind = Kind::Other;
        self.cost = self.cost.saturating_add(item.cost);
        self.depth = self.depth.max(item.depth.saturating_add(1));
    }
}

/// Whether a global is allowed; `module.name` otherwise, made printable.
fn check_global(module: &str, name: &str) -> std::result::Result<(), String> {
    let allowed = ALLOWED_GLOBALS
        .iter()
        .any(|&(m, n)| m == module && n == name)
        || (module == "torch" && STORAGE_TYPES.iter().any(|&(n, _)| n == name));
    if allowed {
        Ok(())
    } else {
        Err(printable(&format!("{module}.{name}")))
    }
}

/// Escape control characters and cut very long names, for an error message.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(|c| c.escape_debug()).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<AVal>,
    memo: HashMap<u64, AVal>,
    spent: u64,
    budget: u64,
    /// The first forbidden global met.
    unsafe_global: Option<String>,
    /// The first opcode candle cannot handle (or handles wrongly), with its position.
    unsupported: Option<String>,
}

impl<'a> Walker<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "truncated pickle: an argument of {n} bytes at byte {} runs past its end",
                    self.pos
                )
            })?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn le(&mut self, n: usize) -> std::result::Result<u64, String> {
        Ok(self
            .take(n)?
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }
    fn line(&mut self) -> std::result::Result<&'a [u8], String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated pickle: unterminated line at byte {}", self.pos))?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }
    fn len_prefixed(&mut self, width: usize) -> std::result::Result<&'a [u8], String> {
        let n = self.le(width)?;
        let n = usize::try_from(n).map_err(|_| format!("impossible length {n}"))?;
        self.take(n)
    }

    fn charge(&mut self, cost: u64) -> std::result::Result<(), String> {
        self.spent = self.spent.saturating_add(cost);
        if self.spent > self.budget {
            return Err(format!(
                "the pickle would expand to more than {} MiB in memory (memo references multiply it)",
                self.budget >> 20
            ));
        }
        Ok(())
    }
    fn push(&mut self, v: AVal) -> std::result::Result<(), String> {
        if v.depth > MAX_NESTING {
            return Err(format!("objects nest more than {MAX_NESTING} deep"));
        }
        self.charge(match &v.kind {
            Kind::Str(s) => NODE_COST + s.len() as u64,
            _ => NODE_COST,
        })?;
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> std::result::Result<AVal, String> {
        match self.stack.pop() {
            Some(AVal {
                kind: Kind::Mark, ..
            })
            | None => Err(format!(
                "malformed pickle: stack underflow at byte {}",
                self.pos
            )),
            Some(v) => Ok(v),
        }
    }
    fn pop_mark(&mut self) -> std::result::Result<Vec<AVal>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| matches!(v.kind, Kind::Mark))
            .ok_or_else(|| format!("malformed pickle: no MARK before byte {}", self.pos))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> std::result::Result<&mut AVal, String> {
        let pos = self.pos;
        match self.stack.last_mut() {
            Some(AVal {
                kind: Kind::Mark, ..
            })
            | None => Err(format!("malformed pickle: stack underflow at byte {pos}")),
            Some(v) => Ok(v),
        }
    }
    /// Merge items into the container on top (APPEND, SETITEMS, BUILD, ...).
    fn add_to_top(&mut self, items: &[AVal]) -> std::result::Result<(), String> {
        let top = self.top()?;
        for item in items {
            top.absorb(item);
        }
        if top.depth > MAX_NESTING {
            return Err(format!("objects nest more than {MAX_NESTING} deep"));
        }
        Ok(())
    }
    fn memo_put(&mut self, key: u64) -> std::result::Result<(), String> {
        let v = self.top()?.clone();
        self.charge(v.cost)?; // candle clones the object into its memo
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u64) -> std::result::Result<(), String> {
        let v = self.memo.get(&key).cloned().ok_or_else(|| {
            format!("malformed pickle: memo entry {key} is read before it is written")
        })?;
        self.charge(v.cost)?; // and clones it again on every read
        self.stack.push(v);
        Ok(())
    }
    fn global(&mut self, module: &[u8], name: &[u8]) {
        let (Ok(module), Ok(name)) = (std::str::from_utf8(module), std::str::from_utf8(name))
        else {
            let g = printable(&format!(
                "{}.{}",
                String::from_utf8_lossy(module),
                String::from_utf8_lossy(name)
            ));
            self.unsafe_global.get_or_insert(g);
            return;
        };
        if let Err(g) = check_global(module, name) {
            self.unsafe_global.get_or_insert(g);
        }
    }
    fn unsupported(&mut self, what: &str, at: usize) {
        self.unsupported.get_or_insert_with(|| {
            format!("opcode {what} at byte {at}, which candle's pickle reader does not implement")
        });
    }

    /// One opcode; `Ok(true)` at STOP.
    fn step(&mut self) -> std::result::Result<bool, String> {
        let at = self.pos;
        let op = self
            .u8()
            .map_err(|_| "truncated pickle: it ends without a STOP opcode".to_string())?;
        match op {
            // ---- implemented by candle ------------------------------------------------------------
            0x80 => {
                // PROTO
                let v = self.u8()?;
                if v > 5 {
                    return Err(format!("unknown pickle protocol {v}"));
                }
            }
            b'.' => {
                // STOP
                self.pop()?;
                return Ok(true);
            }
            b'c' => {
                // GLOBAL module\nname\n
                let module = self.line()?;
                let name = self.line()?;
                self.global(module, name);
                self.push(AVal::other())?;
            }
            b'q' => {
                let k = self.le(1)?;
                self.memo_put(k)?;
            }
            b'r' => {
                let k = self.le(4)?;
                self.memo_put(k)?;
            }
            b'h' => {
                let k = self.le(1)?;
                self.memo_get(k)?;
            }
            b'j' => {
                let k = self.le(4)?;
                self.memo_get(k)?;
            }
            b'(' => self.stack.push(AVal {
                kind: Kind::Mark,
                cost: 0,
                depth: 0,
            }),
            b')' | b']' | b'}' | b'N' | 0x88 | 0x89 => self.push(AVal::other())?,
            b'K' => {
                self.take(1)?;
                self.push(AVal::other())?;
            }
            b'M' => {
                self.take(2)?;
                self.push(AVal::other())?;
            }
            b'J' => {
                self.take(4)?;
                self.push(AVal::other())?;
            }
            b'G' => {
                self.take(8)?;
                self.push(AVal::other())?;
            }
            0x8a => {
                // LONG1: candle decodes at most 8 bytes (more would overflow its shift).
                let n = self.u8()? as usize;
                self.take(n)?;
                if n > 8 {
                    self.unsupported("LONG1 wider than 8 bytes", at);
                }
                self.push(AVal::other())?;
            }
            b'X' => {
                // BINUNICODE
                let bytes = self.len_prefixed(4)?;
                let s = std::str::from_utf8(bytes).map_err(|_| {
                    format!("malformed pickle: invalid UTF-8 in a string at byte {at}")
                })?;
                self.push(AVal::string(s))?;
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push(AVal::container(&items))?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                self.push(AVal::container(&items))?;
            }
            b'Q' | 0x98 => {
                // BINPERSID, READONLY_BUFFER: one in, one out
                if op == 0x98 {
                    self.unsupported("READONLY_BUFFER", at);
                }
                let v = self.pop()?;
                self.push(AVal::container(&[v]))?;
            }
            b'R' | b'b' | 0x81 => {
                // REDUCE, BUILD, NEWOBJ: two in, one out
                let arg = self.pop()?;
                let f = self.pop()?;
                self.push(AVal::container(&[f, arg]))?;
            }
            b'a' | b's' => {
                // APPEND, SETITEM
                let n = if op == b'a' { 1 } else { 2 };
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                self.add_to_top(&items)?;
            }
            b'e' | b'u' => {
                // APPENDS, SETITEMS
                let items = self.pop_mark()?;
                self.add_to_top(&items)?;
            }

            // ---- not implemented by candle: walked for their globals, then refused ----------------
            b'd' => {
                // DICT: candle mistakes it for EMPTY_DICT
                self.unsupported("DICT", at);
                let items = self.pop_mark()?;
                self.push(AVal::container(&items))?;
            }
            b'l' | 0x91 => {
                self.unsupported(if op == b'l' { "LIST" } else { "FROZENSET" }, at);
                let items = self.pop_mark()?;
                self.push(AVal::container(&items))?;
            }
            0x90 => {
                self.unsupported("ADDITEMS", at);
                let items = self.pop_mark()?;
                self.add_to_top(&items)?;
            }
            0x8f => {
                self.unsupported("EMPTY_SET", at);
                self.push(AVal::other())?;
            }
            b'0' => {
                self.unsupported("POP", at);
                self.pop()?;
            }
            b'1' => {
                self.unsupported("POP_MARK", at);
                self.pop_mark()?;
            }
            b'2' => {
                self.unsupported("DUP", at);
                let v = self.top()?.clone();
                self.charge(v.cost)?;
                self.stack.push(v);
            }
            b'I' | b'L' | b'F' => {
                // INT, LONG, FLOAT as text
                self.unsupported("INT/LONG/FLOAT (text)", at);
                self.line()?;
                self.push(AVal::other())?;
            }
            0x8b => {
                self.unsupported("LONG4", at);
                self.len_prefixed(4)?;
                self.push(AVal::other())?;
            }
            b'S' => {
                // STRING 'repr'\n
                self.unsupported("STRING", at);
                let line = self.line()?;
                let unquoted = match line {
                    [q, inner @ .., q2] if (*q == b'\'' || *q == b'"') && q == q2 => inner,
                    other => other,
                };
                self.push(AVal::string(&String::from_utf8_lossy(unquoted)))?;
            }
            b'V' => {
                // UNICODE raw-unicode-escape\n
                self.unsupported("UNICODE", at);
                let line = self.line()?;
                self.push(AVal::string(&String::from_utf8_lossy(line)))?;
            }
            b'T' | b'U' | 0x8c | 0x8d => {
                // BINSTRING, SHORT_BINSTRING, SHORT_BINUNICODE, BINUNICODE8
                let (width, what) = match op {
                    b'T' => (4, "BINSTRING"),
                    b'U' => (1, "SHORT_BINSTRING"),
                    0x8c => (1, "SHORT_BINUNICODE"),
                    _ => (8, "BINUNICODE8"),
                };
                self.unsupported(what, at);
                let bytes = self.len_prefixed(width)?;
                self.push(AVal::string(&String::from_utf8_lossy(bytes)))?;
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                let width = match op {
                    b'C' => 1,
                    b'B' => 4,
                    _ => 8,
                };
                self.unsupported("BINBYTES/BYTEARRAY", at);
                self.len_prefixed(width)?;
                self.push(AVal::other())?;
            }
            0x97 => {
                self.unsupported("NEXT_BUFFER", at);
                self.push(AVal::other())?;
            }
            b'P' => {
                self.unsupported("PERSID", at);
                self.line()?;
                self.push(AVal::other())?;
            }
            b'p' | b'g' => {
                // PUT, GET with a decimal index
                self.unsupported(if op == b'p' { "PUT" } else { "GET" }, at);
                let line = self.line()?;
                let k = std::str::from_utf8(line)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| format!("malformed pickle: bad memo index at byte {at}"))?;
                if op == b'p' {
                    self.memo_put(k)?;
                } else {
                    self.memo_get(k)?;
                }
            }
            0x94 => {
                self.unsupported("MEMOIZE", at);
                let k = self.memo.len() as u64;
                self.memo_put(k)?;
            }
            0x95 => {
                self.unsupported("FRAME", at);
                self.take(8)?;
            }
            0x93 => {
                // STACK_GLOBAL: module and name come from the stack
                self.unsupported("STACK_GLOBAL", at);
                let name = self.pop()?;
                let module = self.pop()?;
                match (&module.kind, &name.kind) {
                    (Kind::Str(m), Kind::Str(n)) => {
                        let (m, n) = (m.clone(), n.clone());
                        self.global(m.as_bytes(), n.as_bytes());
                    }
                    _ => {
                        self.unsafe_global.get_or_insert_with(|| {
                            "a STACK_GLOBAL whose name is not a plain string".into()
                        });
                    }
                }
                self.push(AVal::other())?;
            }
            b'i' => {
                // INST module\nname\n: builds an instance of the named class
                self.unsupported("INST", at);
                let module = self.line()?;
                let name = self.line()?;
                self.global(module, name);
                let items = self.pop_mark()?;
                self.push(AVal::container(&items))?;
            }
            b'o' => {
                // OBJ: the class (first item after the mark) was pushed by a global opcode, vetted then
                self.unsupported("OBJ", at);
                let items = self.pop_mark()?;
                if items.is_empty() {
                    return Err(format!(
                        "malformed pickle: OBJ without a class at byte {at}"
                    ));
                }
                self.push(AVal::container(&items))?;
            }
            0x92 => {
                self.unsupported("NEWOBJ_EX", at);
                let a = self.pop()?;
                let b = self.pop()?;
                let c = self.pop()?;
                self.push(AVal::container(&[a, b, c]))?;
            }
            0x82..=0x84 => {
                // EXT1, EXT2, EXT4: a global from copyreg's extension registry
                let width = [1usize, 2, 4][(op - 0x82) as usize];
                let code = self.le(width)?;
                self.unsafe_global
                    .get_or_insert_with(|| format!("copyreg extension code {code}"));
                self.unsupported("EXT1/EXT2/EXT4", at);
                self.push(AVal::other())?;
            }
            other => {
                return Err(format!(
                    "not a pickle: unknown opcode 0x{other:02x} at byte {at}"
                ));
            }
        }
        Ok(false)
    }
}

/// Walk a whole pickle. A forbidden global anywhere before the walk has to stop wins over every
/// other problem.
fn validate_pickle(data: &[u8]) -> std::result::Result<(), Problem> {
    // torch.save's own pickles spend about 50 (approximate) bytes per pickle byte: a wide margin
    // for them, a hard stop for memo doubling (which reaches any bound within a few dozen opcodes).
    let budget = (64u64 << 20).saturating_add((data.len() as u64).saturating_mul(1024));
    let mut w = Walker {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        spent: 0,
        budget,
        unsafe_global: None,
        unsupported: None,
    };
    let walked = loop {
        match w.step() {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
    };
    if let Some(g) = w.unsafe_global {
        return Err(Problem::Unsafe(g));
    }
    walked.map_err(Problem::Corrupt)?;
    if let Some(u) = w.unsupported {
        return Err(Problem::Corrupt(u));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Reading the state dict out of candle's objects.

type R<T> = std::result::Result<T, String>;

fn describe(o: &Object) -> String {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => format!("{module_name}.{class_name}"),
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
        Object::Class {
            module_name,
            class_name,
        } => Some((module_name, class_name)),
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
        Object::Tuple(items) | Object::List(items) => {
            items.iter().map(|i| as_usize(i, what)).collect()
        }
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
            return Err(format!(
                "its storage is {}, not a persistent id",
                describe(pid)
            ));
        };
        let Object::Tuple(id) = id.as_ref() else {
            return Err(format!("its storage id is {}, not a tuple", describe(id)));
        };
        let [tag, ty, key, _location, numel] = id.as_slice() else {
            return Err(format!("its storage id has {} fields, not 5", id.len()));
        };
        if *tag != Object::Unicode("storage".into()) {
            return Err(format!(
                "its persistent id is {}, not a storage",
                describe(tag)
            ));
        }
        let ty = match as_class(ty) {
            Some(("torch", name)) => name,
            _ => return Err(format!("its storage type is {}", describe(ty))),
        };
        let dtype = match STORAGE_TYPES.iter().find(|(n, _)| *n == ty) {
            Some((_, Some(dtype))) => *dtype,
            Some((_, None)) => {
                return Err(format!("its storage type torch.{ty} has no candle dtype"))
            }
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
        self.list.push(StorageRef {
            entry: format!("{}data/{key}", self.prefix),
            dtype,
            numel,
        });
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

fn parse_call(
    callable: &Object,
    args: &Object,
    name: &str,
    st: &mut Storages,
) -> R<Option<TensorSpec>> {
    let Some((module, func)) = as_class(callable) else {
        return Ok(None);
    };
    let Object::Tuple(a) = args else {
        return Err(format!(
            "the arguments of {module}.{func} are {}, not a tuple",
            describe(args)
        ));
    };
    let wrapped = |inner: Option<TensorSpec>| {
        inner
            .map(Some)
            .ok_or_else(|| format!("{module}.{func} wraps something that is not a tensor"))
    };
    match (module, func) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let arity = if func == "_rebuild_tensor" {
                4..=4
            } else {
                6..=7
            };
            if !arity.contains(&a.len()) {
                return Err(format!(
                    "{module}.{func} takes {arity:?} arguments, not {}",
                    a.len()
                ));
            }
            let storage = st.get(&a[0])?;
            let offset = as_usize(&a[1], "the storage offset")?;
            let shape = as_usizes(&a[2], "the size")?;
            let stride = as_usizes(&a[3], "the stride")?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "size {shape:?} and stride {stride:?} differ in rank"
                ));
            }
            Ok(Some(TensorSpec {
                name: name.to_string(),
                storage,
                offset,
                shape,
                stride,
            }))
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => {
            let data = a
                .first()
                .ok_or_else(|| format!("{module}.{func} without arguments"))?;
            wrapped(parse_tensor(data, name, st)?)
        }
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let [func, ty, inner_args, _state] = a.as_slice() else {
                return Err(format!(
                    "{module}.{func} takes 4 arguments, not {}",
                    a.len()
                ));
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
        return Err(format!(
            "the pickle holds {}, not a state dict",
            describe(root)
        ));
    };
    let mut st = Storages {
        prefix,
        list: vec![],
        by_key: HashMap::new(),
    };
    let read = |entries: &[(Object, Object)], st: &mut Storages| -> R<Vec<TensorSpec>> {
        let mut tensors = vec![];
        for (key, value) in entries {
            let Object::Unicode(name) = key else { continue };
            if let Some(t) =
                parse_tensor(value, name, st).map_err(|e| format!("tensor `{name}`: {e}"))?
            {
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
        return Err(format!(
            "no tensors at the top level of the pickle nor under \"state_dict\" (keys: {keys:?})"
        ));
    }
    let mut seen = HashSet::new();
    for t in &tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(format!("tensor `{}` appears twice", t.name));
        }
        let s = &st.list[t.storage];
        // Every element the view addresses must lie inside the storage.
        let numel: Option<u128> = t
            .shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128));
        let numel = numel.ok_or_else(|| format!("tensor `{}` has an impossible size", t.name))?;
        if numel == 0 {
            continue;
        }
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset as u128, |acc, (&d, &s)| {
                (d as u128 - 1)
                    .checked_mul(s as u128)
                    .and_then(|x| acc.checked_add(x))
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
    Ok((st.list, tensors))
}

/// Build one tensor, on the CPU, from the raw little-endian bytes of its storage (bounds checked
/// beforehand).
fn build_tensor(storage: &[u8], dtype: DType, t: &TensorSpec) -> candle_core::Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn globals_of(pickle: &[u8]) -> std::result::Result<(), Problem> {
        validate_pickle(pickle)
    }

    #[test]
    fn stack_global_through_memo_is_named() {
        // proto 4: SHORT_BINUNICODE 'os', MEMOIZE, SHORT_BINUNICODE 'system', MEMOIZE, BINGET 0, BINGET 1, STACK_GLOBAL
        let p = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93\x8c\x02ls\x85R.";
        assert_eq!(globals_of(p), Err(Problem::Unsafe("os.system".into())));
    }

    #[test]
    fn inst_and_ext_are_refused() {
        assert_eq!(
            globals_of(b"(S'ls'\nios\nsystem\n."),
            Err(Problem::Unsafe("os.system".into()))
        );
        assert_eq!(
            globals_of(b"\x80\x02\x82\x07."),
            Err(Problem::Unsafe("copyreg extension code 7".into()))
        );
    }

    #[test]
    fn allowed_globals_in_unsupported_opcodes_are_corrupt() {
        let p = b"\x80\x04\x8c\x0bcollections\x8c\x0bOrderedDict\x93)R.";
        assert!(
            matches!(globals_of(p), Err(Problem::Corrupt(r)) if r.contains("SHORT_BINUNICODE"))
        );
    }

    #[test]
    fn memory_bomb_and_deep_nesting_are_corrupt() {
        // K 0, BINPUT 0, then repeatedly: BINGET 0 BINGET 0 TUPLE2 BINPUT 0 (doubles each time)
        let mut p = b"\x80\x02K\x00q\x00".to_vec();
        for _ in 0..64 {
            p.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        assert!(matches!(globals_of(&p), Err(Problem::Corrupt(r)) if r.contains("expand")));
        let mut p = b"\x80\x02K\x00".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 100_000));
        p.push(b'.');
        assert!(matches!(globals_of(&p), Err(Problem::Corrupt(r)) if r.contains("nest")));
    }

    #[test]
    fn truncated_and_garbage_are_corrupt() {
        assert!(matches!(
            globals_of(b"\x80\x02X\xff\x00\x00\x00ab"),
            Err(Problem::Corrupt(_))
        ));
        assert!(
            matches!(globals_of(b"\x80\x02}q\x00"), Err(Problem::Corrupt(r)) if r.contains("STOP"))
        );
        assert!(
            matches!(globals_of(b"\xff\xfe"), Err(Problem::Corrupt(r)) if r.contains("unknown opcode"))
        );
        assert!(
            matches!(globals_of(b"\x80\x02h\x05."), Err(Problem::Corrupt(r)) if r.contains("memo"))
        );
        assert!(
            matches!(globals_of(b"\x80\x02R."), Err(Problem::Corrupt(r)) if r.contains("underflow"))
        );
    }
}
