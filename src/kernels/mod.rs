//! CPU kernels for the operations where candle's general ones cost the most time, each behind
//! candle's custom-op interface and used only for contiguous float32 tensors on the CPU; every
//! other device and dtype takes candle's standard ops, so the model code stays device-generic.

pub mod add;
pub mod attention;
pub mod conv;
pub mod copy;
pub mod geglu;
pub mod group_norm;
pub mod linear;
