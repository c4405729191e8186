//! LoRA adapters merged into the weights at load: `W + weight · (alpha / r) · B·A`, in float32,
//! once (never per step), as PEFT's `merge_and_unload` and diffusers' `fuse_lora` compute it.
//!
//! Formats read (safetensors files, or a folder holding one):
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` (r, in[, k…]) and `unet.<module>.lora_B.weight`
//!   (out, r[, 1…]), `text_encoder.<module>…` for the text encoder; alpha = r unless a
//!   `<module>.alpha` is stored. The older `<module>.lora.down.weight` / `.lora.up.weight`, and the
//!   attention-processor form `…attn1.processor.to_q_lora.down.weight`.
//! - a PEFT adapter folder: `adapter_config.json` (`r`, `lora_alpha`, `rank_pattern`,
//!   `alpha_pattern`, `use_rslora`) beside `adapter_model.safetensors`, keys
//!   `base_model.model.<module>.lora_A.weight` (the UNet's modules).
//! - kohya: `lora_unet_<module with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`
//!   (`lora_te_` for the text encoder); the underscores are resolved against the model's own
//!   module names.
//!
//! - the key-less lists of Text-To-Video-Finetuning (`{step}_unet.pt`) and T2V-Turbo
//!   (`unet_lora.pt`): a `torch.save`d list `[up0, down0, up1, down1, …]`, one pair per
//!   `nn.Linear` / `nn.Conv2d` / `nn.Conv3d` of the UNet in `named_modules()` order (see
//!   [`crate::unet3d::lora_module_order`]). Their `collapse_lora` merges `W + up·down` (the
//!   injected layers' `scale` is 1 and no alpha is stored), so the scale is 1 whatever the
//!   rank; the pairs are matched to the model's modules by position, the count and every shape
//!   checked.
//!
//! - "Stable LoRA" (the webui extension's format, written by Text-To-Video-Finetuning's
//!   `stable_lora`): safetensors with the metadata key `stable_lora_text_to_video`, keys
//!   `<module>.lora_A` / `.lora_B` (no `.weight`) under ModelScope's original module names
//!   (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`, mapped back by
//!   [`crate::unet3d::modelscope_name`]; `resblocks.N.…` for the text encoder), scale 1 (its
//!   layers' `lora_alpha` is r). Linear pairs may carry a trailing 1 (`proj_in`/`proj_out`, which
//!   its converter unsqueezes); a Conv2d's pair is (r·k, in·k) and (out·k, r·k) whose product is
//!   reshaped to the kernel, a Conv3d's (kernel (k, 1, 1)) is viewed (out, in, k, k, 1) and
//!   averaged over its fourth axis, as the webui's `lora_conv_forward` does.
//!
//! Every key is checked against the model's tensors (by name and shape, from the headers, no
//! data read) before any layer is built; the first that does not fit is named in the error.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

mod list;
mod stable;
use list::{is_torch_zip, list_modules};
use stable::{is_stable_lora, stable_modules};

/// A LoRA to apply and its weight (the `:WEIGHT` of `--lora PATH:WEIGHT`; 1 by default).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// A LoRA file, or a folder holding one (a PEFT adapter folder, or one `.safetensors`).
    pub path: PathBuf,
    pub weight: f64,
}

impl LoraSpec {
    pub fn new(path: impl Into<PathBuf>, weight: f64) -> Self {
        Self { path: path.into(), weight }
    }

    /// Parses `PATH[:WEIGHT]`: a trailing `:number` is the weight (a path that itself ends in
    /// `:number` can be given as `PATH:1`).
    pub fn parse(text: &str) -> Result<Self> {
        if let Some((path, weight)) = text.rsplit_once(':') {
            if let Ok(w) = weight.trim().parse::<f64>() {
                if !w.is_finite() {
                    return Err(Error::InvalidArgument(format!("the LoRA weight in `{text}` must be a finite number")));
                }
                if path.is_empty() {
                    return Err(Error::InvalidArgument(format!("`{text}` names no LoRA file before its weight")));
                }
                return Ok(Self::new(path, w));
            }
        }
        if text.trim().is_empty() {
            return Err(Error::InvalidArgument("an empty LoRA path".into()));
        }
        Ok(Self::new(text, 1.0))
    }
}

/// The model component a LoRA module applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Unet,
    TextEncoder,
}

impl LoraTarget {
    /// The component's folder name in the checkpoint.
    pub fn component(self) -> &'static str {
        match self {
            LoraTarget::Unet => "unet",
            LoraTarget::TextEncoder => "text_encoder",
        }
    }
}

/// How the module is named in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ModuleName {
    /// The model's own dotted path (`down_blocks.0.attentions.0.proj_in`).
    Dotted(String),
    /// kohya's: the dotted path with `_` for `.`, resolved against the model.
    Kohya(String),
    /// The n-th pair of a key-less list, resolved against the model's module order.
    Ordered(usize),
    /// A Stable LoRA key's module: ModelScope's name (or, for modules its converter leaves
    /// alone, the diffusers one).
    Stable(String),
}

#[derive(Debug, Default)]
struct PendingModule {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, f32)>,
}

/// One module's low-rank update, read from a file.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub target: LoraTarget,
    /// The file's key of the down (A) matrix, for messages.
    pub key: String,
    name: ModuleName,
    /// A: (r, in[, k…]), float32.
    pub down: Tensor,
    /// B: (out, r[, 1…]), float32.
    pub up: Tensor,
    /// `alpha / r` (`alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
}

/// A LoRA file read into memory (they are small: megabytes).
#[derive(Debug, Clone)]
pub struct LoraFile {
    /// The path as given.
    pub path: PathBuf,
    /// The weights file read (inside the folder when `path` is one).
    pub weights_path: PathBuf,
    pub modules: Vec<LoraModule>,
}

/// The PEFT adapter config keys read.
#[derive(Debug, Clone, serde::Deserialize)]
struct AdapterConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    alpha_pattern: HashMap<String, f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
}

impl AdapterConfig {
    /// PEFT's pattern lookup: a pattern key matches a module whose name ends with it.
    fn alpha_and_rank(&self, module: &str) -> (f64, usize) {
        let find = |keys: Vec<&String>| -> Option<String> {
            keys.into_iter().find(|k| module == k.as_str() || module.ends_with(&format!(".{k}"))).cloned()
        };
        let r =
            find(self.rank_pattern.keys().collect()).and_then(|k| self.rank_pattern.get(&k).copied()).unwrap_or(self.r);
        let alpha = find(self.alpha_pattern.keys().collect())
            .and_then(|k| self.alpha_pattern.get(&k).copied())
            .unwrap_or(self.lora_alpha);
        (alpha, r)
    }
}

impl LoraFile {
    /// Reads a LoRA: a safetensors file, a PEFT adapter folder, or a folder holding one
    /// `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |reason: String| Error::Lora { path: path.to_path_buf(), reason };
        if !path.exists() {
            return Err(bad("no such file or folder".into()));
        }
        let (weights_path, adapter) = if path.is_dir() {
            let config = path.join("adapter_config.json");
            let adapter = if config.is_file() {
                let text = crate::files::read_text(&config, crate::files::FileKind::Config)?;
                let cfg: AdapterConfig = serde_json::from_str(&text)
                    .map_err(|e| bad(format!("adapter_config.json is not a PEFT LoRA config: {e}")))?;
                Some(cfg)
            } else {
                None
            };
            let listed: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            let with_ext = |ext: &str| -> Vec<PathBuf> {
                listed.iter().filter(|p| p.extension().is_some_and(|e| e == ext)).cloned().collect()
            };
            let mut files = with_ext("safetensors");
            if files.is_empty() && adapter.is_none() {
                // A Text-To-Video-Finetuning / T2V-Turbo folder: its UNet list (`unet_lora.pt`,
                // `{step}_unet.pt`), as their loaders pick it.
                files = with_ext("pt").into_iter().filter(|p| p.to_string_lossy().contains("unet")).collect();
            }
            files.sort();
            let preferred = ["adapter_model.safetensors", "pytorch_lora_weights.safetensors"];
            let chosen = files
                .iter()
                .find(|p| p.file_name().is_some_and(|n| preferred.iter().any(|w| n == *w)))
                .cloned()
                .or_else(|| if files.len() == 1 { files.first().cloned() } else { None });
            match chosen {
                Some(p) => (p, adapter),
                None if files.is_empty() => {
                    return Err(bad("the folder holds no .safetensors LoRA file (nor a *unet*.pt list)".into()));
                }
                None => {
                    return Err(bad(format!("the folder holds {} LoRA files: name the LoRA file itself", files.len())))
                }
            }
        } else {
            (path.to_path_buf(), None)
        };
        if is_torch_zip(&weights_path)? {
            let modules = list_modules(&weights_path)?;
            return Ok(Self { path: path.to_path_buf(), weights_path, modules });
        }
        super::inspect_safetensors(&weights_path)?;
        let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .map_err(|e| Error::CorruptWeights { path: weights_path.clone(), reason: e.to_string() })?;
        let modules = if is_stable_lora(&weights_path)? {
            stable_modules(tensors, &weights_path)?
        } else {
            parse_modules(tensors, adapter.as_ref(), &weights_path)?
        };
        if modules.is_empty() {
            return Err(bad(
                "it holds no LoRA weights (no lora_A/lora_B, lora.down/lora.up or lora_down/lora_up keys)".into(),
            ));
        }
        Ok(Self { path: path.to_path_buf(), weights_path, modules })
    }
}

/// What a key of a LoRA file names: (target, module, part).
fn classify(key: &str, peft: bool) -> Option<(LoraTarget, ModuleName, Part)> {
    let (stem, part) = if let Some(s) = key.strip_suffix(".lora_A.weight") {
        (s.to_string(), Part::Down)
    } else if let Some(s) = key.strip_suffix(".lora_B.weight") {
        (s.to_string(), Part::Up)
    } else if let Some(s) = key.strip_suffix(".lora.down.weight") {
        (s.to_string(), Part::Down)
    } else if let Some(s) = key.strip_suffix(".lora.up.weight") {
        (s.to_string(), Part::Up)
    } else if let Some(s) = key.strip_suffix(".lora_down.weight") {
        (s.to_string(), Part::Down)
    } else if let Some(s) = key.strip_suffix(".lora_up.weight") {
        (s.to_string(), Part::Up)
    } else if let Some(s) = key.strip_suffix("_lora.down.weight") {
        // attention processors: `attn1.processor.to_q_lora.down.weight` → `attn1.to_q`
        (processor_module(s)?, Part::Down)
    } else if let Some(s) = key.strip_suffix("_lora.up.weight") {
        (processor_module(s)?, Part::Up)
    } else if let Some(s) = key.strip_suffix(".alpha") {
        (s.to_string(), Part::Alpha)
    } else {
        return None;
    };
    if let Some(rest) = stem.strip_prefix("lora_unet_") {
        return Some((LoraTarget::Unet, ModuleName::Kohya(rest.to_string()), part));
    }
    if let Some(rest) = stem.strip_prefix("lora_te_") {
        return Some((LoraTarget::TextEncoder, ModuleName::Kohya(rest.to_string()), part));
    }
    let stem = stem.strip_prefix("base_model.model.").unwrap_or(&stem);
    if let Some(rest) = stem.strip_prefix("unet.") {
        return Some((LoraTarget::Unet, ModuleName::Dotted(rest.to_string()), part));
    }
    if let Some(rest) = stem.strip_prefix("text_encoder.") {
        return Some((LoraTarget::TextEncoder, ModuleName::Dotted(rest.to_string()), part));
    }
    // Unprefixed names (PEFT adapters of the UNet, attention-processor files) are the UNet's.
    let _ = peft;
    Some((LoraTarget::Unet, ModuleName::Dotted(stem.to_string()), part))
}

fn processor_module(stem: &str) -> Option<String> {
    let (block, proj) = stem.rsplit_once(".processor.")?;
    let proj = if proj == "to_out" { "to_out.0" } else { proj };
    Some(format!("{block}.{proj}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

fn parse_modules(
    tensors: HashMap<String, Tensor>,
    adapter: Option<&AdapterConfig>,
    path: &Path,
) -> Result<Vec<LoraModule>> {
    let bad = |reason: String| Error::Lora { path: path.to_path_buf(), reason };
    if let Some(cfg) = adapter {
        if cfg.use_dora {
            return Err(bad("a DoRA adapter (use_dora): t2v merges plain LoRA only".into()));
        }
    }
    let sorted: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let mut pending: BTreeMap<(LoraTarget, ModuleName), PendingModule> = BTreeMap::new();
    for (key, tensor) in sorted {
        let Some((target, name, part)) = classify(&key, adapter.is_some()) else {
            let hint = if key.contains("lora_magnitude_vector") || key.ends_with(".dora_scale") {
                "a DoRA magnitude: t2v merges plain LoRA only"
            } else {
                "not a LoRA key (expected …lora_A.weight / lora_B.weight, …lora.down.weight / lora.up.weight, \
                 lora_unet_…lora_down.weight / lora_up.weight, or …alpha)"
            };
            return Err(bad(format!("key `{key}`: {hint}")));
        };
        let entry = pending.entry((target, name)).or_default();
        match part {
            Part::Down => entry.down = Some((key, tensor.to_dtype(DType::F32)?)),
            Part::Up => entry.up = Some((key, tensor.to_dtype(DType::F32)?)),
            Part::Alpha => {
                let value = tensor
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .first()
                    .copied()
                    .ok_or_else(|| bad(format!("key `{key}`: an empty alpha")))?;
                entry.alpha = Some((key, value));
            }
        }
    }
    let mut modules = Vec::with_capacity(pending.len());
    for ((target, name), module) in pending {
        let (down_key, down) = match module.down {
            Some(d) => d,
            None => {
                let key = module.up.map(|u| u.0).or(module.alpha.map(|a| a.0)).unwrap_or_default();
                return Err(bad(format!("key `{key}` has no matching down (lora_A) matrix")));
            }
        };
        let (up_key, up) =
            module.up.ok_or_else(|| bad(format!("key `{down_key}` has no matching up (lora_B) matrix")))?;
        if down.rank() < 2 || up.rank() < 2 || up.rank() != down.rank() {
            return Err(bad(format!(
                "keys `{down_key}` {:?} and `{up_key}` {:?}: a LoRA pair is two matrices (or kernels) of the same rank",
                down.dims(),
                up.dims()
            )));
        }
        let r = down.dim(0)?;
        if up.dim(1)? != r || up.dims()[2..].iter().any(|&d| d != 1) || r == 0 {
            return Err(bad(format!(
                "keys `{down_key}` {:?} and `{up_key}` {:?}: the up matrix must be (out, r[, 1…]) for the down \
                 matrix's rank r",
                down.dims(),
                up.dims()
            )));
        }
        let module_path = match &name {
            ModuleName::Dotted(s) | ModuleName::Kohya(s) => s.clone(),
            ModuleName::Ordered(i) => i.to_string(),
            ModuleName::Stable(s) => s.clone(),
        };
        let (alpha, rank) = match (&module.alpha, adapter) {
            (Some((_, a)), _) => (*a as f64, r),
            (None, Some(cfg)) => cfg.alpha_and_rank(&module_path),
            (None, None) => (r as f64, r),
        };
        if rank != r {
            return Err(bad(format!(
                "key `{down_key}` has rank {r}, but adapter_config.json gives this module rank {rank}"
            )));
        }
        let rsl = adapter.is_some_and(|c| c.use_rslora);
        let scale = if rsl { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        modules.push(LoraModule { target, key: down_key, name, down, up, scale });
    }
    Ok(modules)
}

/// The shape of each tensor of one component, by name (from the weights' headers).
pub type TensorShapes = HashMap<String, Vec<usize>>;

/// One update to merge into a tensor: `scale · up·down`, the product (rows of `up`, columns of
/// `down`) read in row-major order as the tensor's shape.
#[derive(Debug, Clone)]
pub struct Delta {
    pub down: Tensor,
    pub up: Tensor,
    /// `weight · alpha / r`.
    pub scale: f64,
    /// Stable LoRA's Conv3d pairs: the product, (out·k, in·k), is viewed (out, in, k, k) and
    /// averaged over its last axis into the (out, in, k, 1, 1) kernel. `None`: reshaped.
    pub temporal_mean: Option<usize>,
}

/// The deltas of one component, by the tensor name they add to (`<module>.weight`).
pub type ComponentDeltas = HashMap<String, Vec<Delta>>;

/// Matches every module of `loras` (with their weights) to a tensor of the model: `shapes` holds
/// each component's tensors. Refuses the first module whose name is not the model's or whose
/// shapes do not fit. Key-less lists need the module order: see [`resolve_with_names`].
pub fn resolve(
    loras: &[(LoraFile, f64)],
    shapes: &HashMap<LoraTarget, TensorShapes>,
) -> Result<HashMap<LoraTarget, ComponentDeltas>> {
    resolve_with_names(loras, shapes, &ModuleNames::default())
}

/// What the model tells the formats that do not use its own module names.
#[derive(Debug, Clone, Default)]
pub struct ModuleNames {
    /// Each component's `nn.Linear`/`Conv2d`/`Conv3d` modules in `named_modules()` order (the
    /// UNet's: [`crate::unet3d::lora_module_order`]), for the key-less lists: their n-th pair is
    /// the n-th module's, the count must be the model's and every shape must fit.
    pub order: HashMap<LoraTarget, Vec<String>>,
    /// Another name of a module → the model's: ModelScope's original names (Stable LoRA), from
    /// [`crate::unet3d::modelscope_name`].
    pub aliases: HashMap<LoraTarget, HashMap<String, String>>,
}

/// [`resolve`], for every format: `names` places the key-less lists and the Stable LoRA keys.
pub fn resolve_with_names(
    loras: &[(LoraFile, f64)],
    shapes: &HashMap<LoraTarget, TensorShapes>,
    names: &ModuleNames,
) -> Result<HashMap<LoraTarget, ComponentDeltas>> {
    let order = &names.order;
    let mut out: HashMap<LoraTarget, ComponentDeltas> = HashMap::new();
    let mut kohya: HashMap<LoraTarget, HashMap<String, String>> = HashMap::new();
    for (file, weight) in loras {
        let bad = |reason: String| Error::Lora { path: file.path.clone(), reason };
        let ordered = file.modules.iter().filter(|m| matches!(m.name, ModuleName::Ordered(_))).count();
        for module in &file.modules {
            if let ModuleName::Ordered(i) = module.name {
                let listed = order.get(&module.target).map(Vec::as_slice).unwrap_or_default();
                if listed.is_empty() {
                    return Err(bad("a key-less LoRA list needs the model's module order to be applied".into()));
                }
                let Some(m) = listed.get(i) else {
                    return Err(bad(format!(
                        "{}: the list holds {ordered} pairs, but this model's UNet has {} Linear/Conv2d/Conv3d \
                         modules: the LoRA was made for another model",
                        module.key,
                        listed.len()
                    )));
                };
                let name = format!("{m}.weight");
                let tensors = shapes.get(&module.target);
                let Some(w_shape) = tensors.and_then(|t| t.get(&name)).cloned() else {
                    return Err(bad(format!("{}: this model has no tensor `{name}`", module.key)));
                };
                let (down, up) = (module.down.dims(), module.up.dims());
                if w_shape.len() != down.len() || up[0] != w_shape[0] || down[1..] != w_shape[1..] {
                    return Err(bad(format!(
                        "{}: its matrices {up:?} (up) and {down:?} (down) do not fit module {i} of this model, \
                         `{m}` of shape {w_shape:?}: the LoRA was made for another model",
                        module.key
                    )));
                }
                out.entry(module.target).or_default().entry(name).or_default().push(Delta {
                    down: module.down.clone(),
                    up: module.up.clone(),
                    scale: weight * module.scale,
                    temporal_mean: None,
                });
                continue;
            }
            if let ModuleName::Stable(ms) = &module.name {
                let (name, delta) = stable::resolve(module, ms, *weight, shapes, names).map_err(bad)?;
                out.entry(module.target).or_default().entry(name).or_default().push(delta);
                continue;
            }
            let component = module.target.component();
            let Some(tensors) = shapes.get(&module.target) else {
                return Err(bad(format!(
                    "key `{}` names a module of the {component}, which this model lacks",
                    module.key
                )));
            };
            let dotted = match &module.name {
                ModuleName::Dotted(s) => Some(s.clone()),
                ModuleName::Ordered(_) | ModuleName::Stable(_) => None,
                ModuleName::Kohya(s) => {
                    let map = kohya.entry(module.target).or_insert_with(|| {
                        tensors
                            .keys()
                            .filter_map(|k| k.strip_suffix(".weight"))
                            .map(|m| (m.replace('.', "_"), m.to_string()))
                            .collect()
                    });
                    map.get(s).cloned()
                }
            };
            let weight_name = dotted.map(|m| format!("{m}.weight"));
            let Some((name, w_shape)) = weight_name.and_then(|n| tensors.get(&n).map(|s| (n, s.clone()))) else {
                return Err(bad(format!(
                    "key `{}` names no module of this model's {component}: the LoRA was made for another model",
                    module.key
                )));
            };
            let (down, up) = (module.down.dims(), module.up.dims());
            let out_dim = w_shape.first().copied().unwrap_or(0);
            let w_rest: usize = w_shape.iter().skip(1).product();
            let down_rest: usize = down.iter().skip(1).product();
            if w_shape.len() < 2 || up[0] != out_dim || down_rest != w_rest || down[1] != w_shape[1] {
                return Err(bad(format!(
                    "key `{}`: its matrices {down:?} (down) and {up:?} (up) do not fit the model's `{name}` of shape \
                     {w_shape:?}: the LoRA was made for another model",
                    module.key
                )));
            }
            out.entry(module.target).or_default().entry(name).or_default().push(Delta {
                down: module.down.clone(),
                up: module.up.clone(),
                scale: weight * module.scale,
                temporal_mean: None,
            });
        }
        if ordered > 0 {
            let expected = order.get(&LoraTarget::Unet).map_or(0, Vec::len);
            if ordered != expected {
                return Err(bad(format!(
                    "the list holds {ordered} pairs, but this model's UNet has {expected} Linear/Conv2d/Conv3d \
                     modules: the LoRA was made for another model"
                )));
            }
        }
    }
    Ok(out)
}

/// `w + Σ scale · up·down`, in float32, reshaped to `w`'s shape; returned in `dtype`.
pub fn merge(w: &Tensor, deltas: &[Delta], dtype: DType) -> candle_core::Result<Tensor> {
    let shape = w.dims().to_vec();
    let out = shape[0];
    let rest: usize = shape[1..].iter().product();
    let device = w.device();
    let mut merged = w.to_dtype(DType::F32)?.reshape((out, rest))?;
    for d in deltas {
        let r = d.down.dim(0)?;
        let rows = d.up.dim(0)?;
        let up = d.up.to_device(device)?.reshape((rows, r))?;
        let down = d.down.to_device(device)?.reshape((r, d.down.elem_count() / r))?;
        let product = up.matmul(&down)?;
        let delta = match d.temporal_mean {
            Some(k) => product.reshape((out, rest / k, k, k))?.mean(3)?.reshape((out, rest))?,
            None => product.reshape((out, rest))?,
        };
        merged = (merged + delta.affine(d.scale, 0.0)?)?;
    }
    merged.reshape(shape)?.to_dtype(dtype)
}
