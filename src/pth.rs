//! Placeholder until the checked pickle reader lands.
use std::path::Path;
use crate::error::{Error, Result};
pub fn open_checked(path: &Path) -> Result<candle_core::pickle::PthTensors> {
    candle_core::pickle::PthTensors::new(path, None).map_err(|e| Error::CorruptWeights { path: path.to_path_buf(), reason: e.to_string() })
}
