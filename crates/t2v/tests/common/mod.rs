//! Shared helpers of the fixture tests: where the fixtures are, the error measure that the
//! fixtures' README defines, and a loopback HTTP server ([`http`]).
#![allow(dead_code)]

pub mod http;
pub mod stages;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The published 1.7B checkpoint's configuration (no weights), kept with the library for `t2v bench`.
pub fn full_config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs").join("full-1.7b")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The reference tensors of a fixture model (`reference.safetensors`).
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name).join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors loads")
}

pub fn reference_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Max absolute difference relative to the reference's max absolute value.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shape");
    let a = actual.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let e = expected.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let max_diff = a.iter().zip(&e).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let scale = e.iter().map(|y| y.abs()).fold(0.0, f64::max);
    max_diff / scale.max(1e-30)
}

pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shape");
    (actual.to_dtype(DType::F64).unwrap() - expected.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The README's module tolerance: 1e-4 relative.
pub const MODULE_TOL: f64 = 1e-4;

/// Copies the folder `from` into `to`, sub-folders included.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}
