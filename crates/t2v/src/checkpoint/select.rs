//! Which weights files of a component to read: one rule, used on a folder's listing by the loader
//! ([`super::ModelFolder::weights_files`]) and on a repo's listing by the download
//! ([`super::hub::select_files`]).

use std::path::PathBuf;

/// Which weights file of a component to read when a folder holds several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsVariant {
    /// The plain file; the `fp16` variant only when it is the only one there.
    #[default]
    Auto,
    /// The `fp16` variant (`*.fp16.safetensors`), an error when there is none.
    Fp16,
    /// The plain file, an error when there is none.
    Full,
}

impl WeightsVariant {
    /// The name that [`FromStr`](std::str::FromStr) reads back: `auto`, `fp16` or `full`.
    pub fn name(self) -> &'static str {
        match self {
            WeightsVariant::Auto => "auto",
            WeightsVariant::Fp16 => "fp16",
            WeightsVariant::Full => "full",
        }
    }
}

impl std::fmt::Display for WeightsVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightsVariant {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(WeightsVariant::Auto),
            "fp16" => Ok(WeightsVariant::Fp16),
            "full" | "fp32" => Ok(WeightsVariant::Full),
            other => {
                Err(crate::Error::InvalidArgument(format!("unknown weights variant `{other}`: use auto, fp16 or full")))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    Safetensors,
    PytorchBin,
}

/// The weights files chosen for one component (several when the checkpoint is sharded).
#[derive(Debug, Clone)]
pub struct WeightsFiles {
    pub format: WeightsFormat,
    pub paths: Vec<PathBuf>,
}

/// The weights files of one component that `variant` selects among `names` (the file names in the
/// component's folder), sorted so that shards come in order; `None` when there is none.
///
/// `*.safetensors` comes before `*.bin` (it is mapped, not unpickled). The `fp16` variant is named
/// as diffusers names it: `model.fp16.safetensors`, and the shards
/// `model.fp16-00001-of-00002.safetensors`. [`WeightsVariant::Auto`] takes the plain files, else
/// the variant; [`WeightsVariant::Fp16`] only the variant; [`WeightsVariant::Full`] only the plain
/// files.
pub fn select_weights<'a>(
    names: impl IntoIterator<Item = &'a str>,
    variant: WeightsVariant,
) -> Option<(WeightsFormat, Vec<&'a str>)> {
    // [plain, fp16][safetensors, bin]
    let mut found: [[Vec<&str>; 2]; 2] = Default::default();
    for name in names {
        let format = if name.ends_with(".safetensors") {
            0
        } else if name.ends_with(".bin") {
            1
        } else {
            continue;
        };
        let fp16 = name.contains(".fp16.") || name.contains(".fp16-");
        found[fp16 as usize][format].push(name);
    }
    let precisions: &[usize] = match variant {
        WeightsVariant::Auto => &[0, 1],
        WeightsVariant::Fp16 => &[1],
        WeightsVariant::Full => &[0],
    };
    for &precision in precisions {
        for (format, kind) in [WeightsFormat::Safetensors, WeightsFormat::PytorchBin].into_iter().enumerate() {
            let names = &mut found[precision][format];
            if !names.is_empty() {
                names.sort_unstable();
                return Some((kind, std::mem::take(names)));
            }
        }
    }
    None
}
