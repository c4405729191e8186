//! The key-less list files of Text-To-Video-Finetuning and T2V-Turbo: `torch.save`d
//! `[up0, down0, up1, down1, …]`, read with the vetted pickle reader (see the parent module).

use std::path::Path;

use candle_core::DType;

use super::{LoraModule, LoraTarget, ModuleName};
use crate::error::{Error, Result};

/// Whether `path` is a `torch.save` zip (`PK\x03\x04`) rather than safetensors.
pub(super) fn is_torch_zip(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut file = crate::files::open_regular(path, crate::files::FileKind::Weights)?;
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"PK\x03\x04"),
        Err(_) => Ok(false),
    }
}

/// A key-less list `[up0, down0, up1, down1, …]`: read with the vetted pickle reader (nothing
/// but tensors allowed), checked pairwise (up (out, r[, 1…]), down (r, in[, k…])).
pub(super) fn list_modules(path: &Path) -> Result<Vec<LoraModule>> {
    let bad = |reason: String| Error::Lora { path: path.to_path_buf(), reason };
    let tensors = crate::checkpoint::pth::load_pth_tensor_list(path)?;
    if tensors.len() % 2 != 0 {
        return Err(bad(format!(
            "a key-less LoRA list holds (up, down) pairs, but this one has {} tensors",
            tensors.len()
        )));
    }
    let mut modules = Vec::with_capacity(tensors.len() / 2);
    for (i, pair) in tensors.chunks(2).enumerate() {
        let (up, down) = (&pair[0], &pair[1]);
        let key = format!("pair {i} (items {} and {})", 2 * i, 2 * i + 1);
        if !up.dtype().is_float() || !down.dtype().is_float() {
            return Err(bad(format!("{key}: LoRA matrices are floating point, not {:?}", up.dtype())));
        }
        let (ud, dd) = (up.dims(), down.dims());
        let ok =
            ud.len() >= 2 && ud.len() == dd.len() && ud[1] == dd[0] && dd[0] > 0 && ud[2..].iter().all(|&d| d == 1);
        if !ok {
            return Err(bad(format!(
                "{key}: {ud:?} (up) and {dd:?} (down) are not a LoRA pair (up (out, r[, 1…]), down (r, in[, k…]))"
            )));
        }
        modules.push(LoraModule {
            target: LoraTarget::Unet,
            key,
            name: ModuleName::Ordered(i),
            down: down.to_dtype(DType::F32)?,
            up: up.to_dtype(DType::F32)?,
            scale: 1.0,
        });
    }
    Ok(modules)
}
