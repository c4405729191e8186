//! The settings record shared with `t2v serve` and the Python package.
pub use t2v_settings::*;
