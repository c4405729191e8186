//! Ours: candle's pickle reader accepts any global (it has no allow-list) and clones memo entries
//! without bound, so every pickle is walked here, on an abstract stack, before candle sees it.
//!
//! The walker follows every opcode of every protocol (0 to 5) and resolves `GLOBAL`, `INST`,
//! `STACK_GLOBAL` (through string pushes and the memo) and the copyreg extension opcodes, so a
//! forbidden name is reported whatever form it takes. It also refuses, as corrupt, what candle's
//! machine would misread or that could make it misbehave: opcodes it does not implement (or
//! implements wrongly, like `DICT`), truncated or malformed opcodes, memo references to nothing,
//! pickles that nest too deep (recursive drops) or expand through the memo into gigabytes.
//!
//! One file: one walker over one opcode table; a split would part the opcodes from the stack they act
//! on.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use candle_core::DType;

use crate::error::Error;

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

/// Deepest nesting of pickle objects accepted (a state dict needs about 8).
const MAX_NESTING: u32 = 64;
/// Approximate bytes of one candle `Object` node, for the expansion budget.
const NODE_COST: u64 = 64;

/// Why a pickle is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Unsafe(String),
    Corrupt(String),
}

impl Problem {
    pub(super) fn into_error(self, path: &Path, entry: &str) -> Error {
        match self {
            Problem::Unsafe(global) => Error::UnsafePickle { path: path.to_path_buf(), global },
            Problem::Corrupt(reason) => super::corrupt(path, format!("{entry}: {reason}")),
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
        AVal { kind: Kind::Other, cost: NODE_COST, depth: 1 }
    }
    fn string(s: &str) -> Self {
        AVal { kind: Kind::Str(Rc::from(s)), cost: NODE_COST + s.len() as u64, depth: 1 }
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
    let allowed = ALLOWED_GLOBALS.iter().any(|&(m, n)| m == module && n == name)
        || (module == "torch" && STORAGE_TYPES.iter().any(|&(n, _)| n == name));
    if allowed {
        Ok(())
    } else {
        Err(printable(&format!("{module}.{name}")))
    }
}

/// Escape control characters and cut very long names, for an error message.
pub(super) fn printable(s: &str) -> String {
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
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            format!("truncated pickle: an argument of {n} bytes at byte {} runs past its end", self.pos)
        })?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn le(&mut self, n: usize) -> std::result::Result<u64, String> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64))
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
            Some(AVal { kind: Kind::Mark, .. }) | None => {
                Err(format!("malformed pickle: stack underflow at byte {}", self.pos))
            }
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
            Some(AVal { kind: Kind::Mark, .. }) | None => {
                Err(format!("malformed pickle: stack underflow at byte {pos}"))
            }
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
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("malformed pickle: memo entry {key} is read before it is written"))?;
        self.charge(v.cost)?; // and clones it again on every read
        self.stack.push(v);
        Ok(())
    }
    fn global(&mut self, module: &[u8], name: &[u8]) {
        let (Ok(module), Ok(name)) = (std::str::from_utf8(module), std::str::from_utf8(name)) else {
            let g = printable(&format!("{}.{}", String::from_utf8_lossy(module), String::from_utf8_lossy(name)));
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
        let op = self.u8().map_err(|_| "truncated pickle: it ends without a STOP opcode".to_string())?;
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
            b'(' => self.stack.push(AVal { kind: Kind::Mark, cost: 0, depth: 0 }),
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
                let s = std::str::from_utf8(bytes)
                    .map_err(|_| format!("malformed pickle: invalid UTF-8 in a string at byte {at}"))?;
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
                        self.unsafe_global
                            .get_or_insert_with(|| "a STACK_GLOBAL whose name is not a plain string".into());
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
                    return Err(format!("malformed pickle: OBJ without a class at byte {at}"));
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
                self.unsafe_global.get_or_insert_with(|| format!("copyreg extension code {code}"));
                self.unsupported("EXT1/EXT2/EXT4", at);
                self.push(AVal::other())?;
            }
            other => {
                return Err(format!("not a pickle: unknown opcode 0x{other:02x} at byte {at}"));
            }
        }
        Ok(false)
    }
}

/// Walk a whole pickle. A forbidden global anywhere before the walk has to stop wins over every
/// other problem.
pub fn validate_pickle(data: &[u8]) -> std::result::Result<(), Problem> {
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
