//! Stable LoRA files (the webui extension's format): recognised by their metadata, read as
//! `<module>.lora_A` / `.lora_B` pairs under ModelScope's names (see the parent module).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};

use super::{Delta, LoraModule, LoraTarget, ModuleName, ModuleNames, TensorShapes};
use crate::error::{Error, Result};

/// Whether a safetensors file is a Stable LoRA: its header's `__metadata__` has the key
/// `stable_lora_text_to_video` (what the webui extension looks for).
pub(super) fn is_stable_lora(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut file = crate::files::open_regular(path, crate::files::FileKind::Weights)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    // inspect_safetensors has bounded and checked the header already.
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::CorruptWeights { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(header.get("__metadata__").and_then(|m| m.get("stable_lora_text_to_video")).is_some())
}

/// A Stable LoRA's `<module>.lora_A` / `.lora_B` pairs (scale 1: `lora_alpha` = r).
pub(super) fn stable_modules(tensors: HashMap<String, Tensor>, path: &Path) -> Result<Vec<LoraModule>> {
    let bad = |reason: String| Error::Lora { path: path.to_path_buf(), reason };
    let sorted: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let mut modules = Vec::new();
    for (key, a) in &sorted {
        let Some(module) = key.strip_suffix(".lora_A") else {
            if key.ends_with(".lora_B") {
                let m = &key[..key.len() - ".lora_B".len()];
                if !sorted.contains_key(&format!("{m}.lora_A")) {
                    return Err(bad(format!("key `{key}` has no matching `{m}.lora_A`")));
                }
                continue;
            }
            return Err(bad(format!(
                "key `{key}`: a Stable LoRA holds `<module>.lora_A` / `.lora_B` pairs only (LoRA biases are not \
                 supported)"
            )));
        };
        let b_key = format!("{module}.lora_B");
        let b = sorted.get(&b_key).ok_or_else(|| bad(format!("key `{key}` has no matching `{b_key}`")))?;
        // Its converter unsqueezes the pairs of `proj_in`/`proj_out` to (…, 1): dropped here.
        let squeeze = |t: &Tensor| -> Result<Tensor> {
            let mut t = t.to_dtype(DType::F32)?;
            while t.rank() > 2 && t.dims().last() == Some(&1) {
                t = t.squeeze(t.rank() - 1)?;
            }
            Ok(t)
        };
        let (a, b) = (squeeze(a)?, squeeze(b)?);
        if a.rank() != 2 || b.rank() != 2 || b.dim(1)? != a.dim(0)? || a.dim(0)? == 0 {
            return Err(bad(format!(
                "keys `{key}` {:?} and `{b_key}` {:?}: a Stable LoRA pair is two matrices, (r, in) and (out, r)",
                a.dims(),
                b.dims()
            )));
        }
        let target = if module.starts_with("resblocks.") { LoraTarget::TextEncoder } else { LoraTarget::Unet };
        modules.push(LoraModule {
            target,
            key: key.clone(),
            name: ModuleName::Stable(module.to_string()),
            down: a,
            up: b,
            scale: 1.0,
        });
    }
    Ok(modules)
}

/// The text encoder's names for a Stable LoRA's open_clip-style `resblocks.N.…` module.
pub(super) fn stable_text_names(module: &str) -> Vec<String> {
    let Some(rest) = module.strip_prefix("resblocks.") else { return vec![module.to_string()] };
    let rest =
        rest.replace(".attn.", ".self_attn.").replace(".mlp.c_fc", ".mlp.fc1").replace(".mlp.c_proj", ".mlp.fc2");
    vec![format!("text_model.encoder.layers.{rest}"), format!("encoder.layers.{rest}")]
}

/// A Stable LoRA module against the model: the tensor it changes and its update, or why it does not
/// fit (the key named).
pub(super) fn resolve(
    module: &LoraModule,
    ms: &str,
    weight: f64,
    shapes: &HashMap<LoraTarget, TensorShapes>,
    names: &ModuleNames,
) -> std::result::Result<(String, Delta), String> {
    let component = module.target.component();
    let Some(tensors) = shapes.get(&module.target) else {
        return Err(format!("key `{}` names a module of the {component}, which this model lacks", module.key));
    };
    let candidates = match module.target {
        LoraTarget::TextEncoder => stable_text_names(ms),
        // ModelScope's name, or a diffusers one its converter left alone.
        LoraTarget::Unet => names
            .aliases
            .get(&LoraTarget::Unet)
            .and_then(|a| a.get(ms))
            .cloned()
            .into_iter()
            .chain([ms.to_string()])
            .collect(),
    };
    let Some((name, w_shape)) =
        candidates.iter().map(|m| format!("{m}.weight")).find_map(|n| tensors.get(&n).map(|s| (n, s.clone())))
    else {
        return Err(format!(
            "key `{}` names no module of this model's {component}: the LoRA was made for another model",
            module.key
        ));
    };
    let (a, b) = (module.down.dims(), module.up.dims());
    let (out_dim, in_dim) = (w_shape[0], w_shape.get(1).copied().unwrap_or(0));
    // Linear: (r, in), (out, r). Conv2d (out, in, k, k): (r·k, in·k), (out·k, r·k).
    // Conv3d (out, in, k, 1, 1): the same with k its temporal extent, averaged.
    let k = if w_shape.len() >= 3 { w_shape[2] } else { 1 };
    let fits = match w_shape.len() {
        2 => a[1] == in_dim && b[0] == out_dim,
        4 => w_shape[3] == k && a[1] == in_dim * k && b[0] == out_dim * k,
        5 => w_shape[3] == 1 && w_shape[4] == 1 && a[1] == in_dim * k && b[0] == out_dim * k,
        _ => false,
    };
    if !fits {
        return Err(format!(
            "key `{}`: its matrices {a:?} (lora_A) and {b:?} (lora_B) do not fit the model's `{name}` of \
             shape {w_shape:?}: the LoRA was made for another model",
            module.key
        ));
    }
    let delta = Delta {
        down: module.down.clone(),
        up: module.up.clone(),
        scale: weight * module.scale,
        temporal_mean: (w_shape.len() == 5).then_some(k),
    };
    Ok((name, delta))
}
