mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use t2v::noise::TorchGenerator;

const MODELS: [&str; 2] = ["tiny-t2v", "small-t2v"];
const TOL: f32 = 1e-6;

fn load(model: &str) -> HashMap<String, Tensor> {
    common::reference(model)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// `rng.{seed}.{d0}x{d1}...` -> (seed, shape)
fn parse_rng_key(key: &str) -> (u64, Vec<usize>) {
    let rest = key.strip_prefix("rng.").unwrap();
    let (seed, shape) = rest.split_once('.').unwrap();
    let shape = shape.split('x').map(|d| d.parse().unwrap()).collect();
    (seed.parse().unwrap(), shape)
}

#[test]
fn rng_keys_match_torch() {
    for model in MODELS {
        let refs = load(model);
        let mut keys: Vec<&String> = refs.keys().filter(|k| k.starts_with("rng.")).collect();
        keys.sort();
        assert!(keys.len() >= 32, "{model}: only {} rng keys", keys.len());
        let mut worst = 0f32;
        for key in keys {
            let (seed, shape) = parse_rng_key(key);
            let want = &refs[key];
            assert_eq!(want.dims(), &shape[..], "{model} {key}: shape");
            let got = TorchGenerator::new(seed).randn_tensor(&shape, &Device::Cpu).unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = max_abs_diff(&values(&got), &values(want));
            assert!(err <= TOL, "{model} {key}: max abs diff {err:e}");
            worst = worst.max(err);
        }
        eprintln!("{model}: rng.* max abs diff {worst:e}");
    }
}

#[test]
fn initial_latents_match_torch() {
    for model in MODELS {
        let refs = load(model);
        let json = common::reference_json(model);
        let mut n = 0;
        for i in 0.. {
            let key = format!("run.{i}.initial_latents");
            let Some(want) = refs.get(&key) else { break };
            let seed = json["runs"][i]["seed"].as_u64().expect("seed");
            let got = TorchGenerator::new(seed).randn(want.dims());
            let err = max_abs_diff(&got, &values(want));
            eprintln!("{model} {key} seed {seed} shape {:?}: max abs diff {err:e}", want.dims());
            assert!(err <= TOL, "{model} {key}: max abs diff {err:e}");
            n += 1;
        }
        assert!(n > 0, "{model}: no run.*.initial_latents");
    }
}

/// State advance across calls, derived from the source rather than from a torch run:
/// * the fill path (numel >= 16) consumes exactly one 32-bit word per element (plus 16 for a
///   ragged tail) and ignores the cached normal, so `randn(16)` twice == `randn(32)`, and the
///   first 16 of `randn(33)` equal `randn(16)` (only the last 16 slots are recomputed);
/// * the scalar path (numel < 16) returns `r cos` and caches `r sin` in the generator, so five
///   `randn(1)` calls == `randn(5)`, and the cache survives an intervening fill-path call.
#[test]
fn successive_calls_advance_state() {
    let refs = load("tiny-t2v");
    for seed in [0u64, 1, 42, 1234567] {
        let mut g = TorchGenerator::new(seed);
        let a = g.randn(&[16]);
        let b = g.randn(&[16]);
        let both = TorchGenerator::new(seed).randn(&[32]);
        assert_eq!([a.clone(), b].concat(), both, "seed {seed}: randn(16)+randn(16) != randn(32)");
        // first block of randn(33) is untouched by the tail recomputation
        let r33 = values(&refs[&format!("rng.{seed}.33")]);
        assert!(max_abs_diff(&a, &r33[..16]) <= TOL);
        let r16 = values(&refs[&format!("rng.{seed}.16")]);
        assert!(max_abs_diff(&a, &r16) <= TOL);

        // Scalar path: randn(1) returns r*cos and caches r*sin; a following randn(1) returns the
        // cache without drawing. So randn(1), randn(1) == randn(2), and randn(1) x5 == randn(5).
        let mut g = TorchGenerator::new(seed);
        let singles: Vec<f32> = (0..5).flat_map(|_| g.randn(&[1])).collect();
        let r5 = values(&refs[&format!("rng.{seed}.5")]);
        assert!(max_abs_diff(&singles, &r5) <= TOL, "seed {seed}: 5 x randn(1) != randn(5)");

        // The cache survives a fill-path call (which consumes 16 words, leaves the cache alone).
        let mut g = TorchGenerator::new(seed);
        let first = g.randn(&[1]);
        let _ = g.randn(&[16]);
        let second = g.randn(&[1]);
        let r2 = TorchGenerator::new(seed).randn(&[2]);
        assert_eq!(first[0], r2[0]);
        assert_eq!(second[0], r2[1]);
    }
}

#[test]
fn empty_and_tensor_shape() {
    let mut g = TorchGenerator::new(0);
    assert!(g.randn(&[0, 4]).is_empty());
    let t = g.randn_tensor(&[1, 4, 2, 4, 4], &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 4, 2, 4, 4]);
    assert_eq!(t.dtype(), DType::F32);
}
