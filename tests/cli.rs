//! The command line as a user runs it: `t2v generate` reproduces the reference runs through
//! `.npy` files, bad input fails before any model work with a message that says what to do,
//! and `t2v tokenize` prints the reference ids.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::*;

fn t2v(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_t2v")).args(args).output().expect("t2v runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("t2v-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Reads a little-endian float32 `.npy` file as numpy writes and reads it.
fn read_npy(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "npy magic");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    assert_eq!((10 + header_len) % 64, 0, "header aligned to 64 bytes");
    let shape: Vec<usize> = header[header.find("'shape': (").unwrap() + 10..]
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data: Vec<f32> =
        bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn run_args(run: &serde_json::Value) -> Vec<String> {
    let mut args = vec![
        "generate".to_string(),
        run["prompt"].as_str().unwrap().to_string(),
        "--seed".into(),
        run["seed"].to_string(),
        "--steps".into(),
        run["steps"].to_string(),
        "--guidance-scale".into(),
        run["guidance_scale"].to_string(),
        "--scheduler".into(),
        run["scheduler"].as_str().unwrap().to_string(),
        "--num-frames".into(),
        run["num_frames"].to_string(),
        "--height".into(),
        run["height"].to_string(),
        "--width".into(),
        run["width"].to_string(),
        "--dtype".into(),
        "f32".into(),
    ];
    if let Some(neg) = run.get("negative_prompt").and_then(|v| v.as_str()) {
        args.extend(["--negative-prompt".to_string(), neg.to_string()]);
    }
    args
}

fn check_cli_runs(model: &str) {
    let dir = temp_dir(model);
    let refs = reference(model);
    for (i, run) in reference_json(model)["runs"].as_array().unwrap().iter().enumerate() {
        let out = dir.join(format!("run{i}.npy"));
        let mut args = run_args(run);
        args.extend(["--model".into(), model_dir(model).display().to_string(), "--output".into(), out.display().to_string()]);
        let o = t2v(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{model} run {i}: {}", stderr(&o));
        let frames = read_npy(&out);
        let err = max_abs_diff(&frames, &refs[run["frames_key"].as_str().unwrap()]);
        println!("cli {model} run {i}: frames max abs err {err:.2e}");
        assert!(err <= 1e-3, "{model} run {i}: {err:.2e}");
    }
}

#[test]
fn generate_reproduces_tiny_runs() {
    check_cli_runs("tiny-t2v");
}

#[test]
fn generate_reproduces_small_runs() {
    check_cli_runs("small-t2v");
}

#[test]
fn generate_without_seed_prints_the_seed() {
    let dir = temp_dir("noseed");
    let out = dir.join("v.npy");
    let model = model_dir("tiny-t2v");
    let o = t2v(&[
        "generate", "a cat", "--model", model.to_str().unwrap(), "--steps", "1", "--num-frames", "1",
        "--height", "8", "--width", "8", "-o", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("seed: "), "{}", stderr(&o));
    assert!(out.exists());
}

/// A checkpoint with configs but no weights: a setting error must be reported from the configs
/// alone, before any weights are needed.
fn configs_only_model() -> PathBuf {
    let dir = temp_dir("configs-only");
    for entry in walk(&model_dir("small-t2v")) {
        let rel = entry.strip_prefix(model_dir("small-t2v")).unwrap();
        let name = rel.to_string_lossy();
        if name.ends_with(".safetensors") {
            continue;
        }
        let dest = dir.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, dest).unwrap();
    }
    dir
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { files.extend(walk(&p)) } else { files.push(p) }
    }
    files
}

#[test]
fn bad_input_fails_before_model_work() {
    let model = configs_only_model();
    let out_dir = temp_dir("bad-input");
    let out = out_dir.join("v.npy");
    let base = |extra: &[&str]| -> Output {
        let mut args = vec!["generate", "a cat", "--model", model.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        t2v(&args)
    };
    let cases: &[(&[&str], &str)] = &[
        (&["--height", "60"], "multiple of 8"),
        (&["--width", "100"], "multiple of 8"),
        (&["--num-frames", "0"], "frames must be at least 1"),
        (&["--steps", "0"], "steps must be at least 1"),
        (&["--guidance-scale", "-1"], "guidance scale must be 0 or more"),
        (&["--scheduler", "euler"], "invalid value 'euler'"),
    ];
    for (extra, expected) in cases {
        let o = base(extra);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(stderr(&o).contains(expected), "{extra:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("weights"), "{extra:?} reached the weights: {}", stderr(&o));
    }
    let o = t2v(&["generate", "a cat", "--model", model.to_str().unwrap(), "-o", "/nonexistent-folder/v.npy"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("output folder /nonexistent-folder does not exist"), "{}", stderr(&o));
    // With valid settings the same folder fails only at the weights, naming what is missing.
    let o = base(&["--num-frames", "2", "--steps", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no weights file"), "{}", stderr(&o));
    assert!(!out.exists(), "no output file after a failure");
}

#[test]
fn existing_output_is_not_overwritten() {
    let dir = temp_dir("exists");
    let out = dir.join("v.npy");
    std::fs::write(&out, b"keep me").unwrap();
    let model = model_dir("tiny-t2v");
    let args = ["generate", "a cat", "--model", model.to_str().unwrap(), "--steps", "1", "--num-frames", "1",
        "--height", "8", "--width", "8", "--seed", "1", "-o", out.to_str().unwrap()];
    let o = t2v(&args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let mut with = args.to_vec();
    with.push("--overwrite");
    let o = t2v(&with);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_npy(&out).dims(), &[1, 8, 8, 3]);
}

#[test]
fn tokenize_prints_reference_ids_and_warns_on_truncation() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap()).unwrap();
    let model = model_dir("tiny-t2v");
    let mut saw_truncated = false;
    for case in cases["cases"].as_array().unwrap().iter().take(12) {
        let prompt = case["prompt"].as_str().unwrap();
        let o = t2v(&["tokenize", prompt, "--model", model.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let ids: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(ids, case["input_ids_padded"], "{prompt:?}");
        let truncated = case["input_ids_untruncated"].as_array().unwrap().len() > 77;
        assert_eq!(stderr(&o).contains("reads only the first 77"), truncated, "{prompt:?}: {}", stderr(&o));
        saw_truncated |= truncated;
    }
    if !saw_truncated {
        let long = "a very long prompt ".repeat(30);
        let o = t2v(&["tokenize", &long, "--model", model.to_str().unwrap()]);
        assert!(stderr(&o).contains("reads only the first 77"), "{}", stderr(&o));
    }
}

#[test]
fn non_english_prompt_warns_and_still_runs() {
    let model = model_dir("tiny-t2v");
    let o = t2v(&["tokenize", "一只猫在冲浪", "--model", model.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("English only"), "{}", stderr(&o));
    let o = t2v(&["tokenize", "a café in Zürich", "--model", model.to_str().unwrap()]);
    assert!(!stderr(&o).contains("English only"), "{}", stderr(&o));
}
