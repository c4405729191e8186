//! `t2v generate --lora PATH:WEIGHT --scheduler lcm --scheduler-config KEY=VALUE` reproduces the
//! LoRA fixture runs through `.npy` files; the settings record the LoRA (path, weight, SHA-256)
//! and the scheduler settings, so `--from` repeats the run and refuses a changed LoRA file.

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;
use support::*;

fn lora_refs(model: &str) -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    let dir = model_dir(model).join("lora");
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("lora_reference.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("lora_reference.safetensors"), &Device::Cpu).unwrap();
    (json, tensors)
}

fn run_args(model: &str, run: &serde_json::Value, lora: &Path, out: &Path) -> Vec<String> {
    let mut args = vec![
        "generate".to_string(),
        run["prompt"].as_str().unwrap().to_string(),
        "--model".into(),
        model_dir(model).display().to_string(),
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
        "-q".into(),
        "--output".into(),
        out.display().to_string(),
    ];
    if let Some(neg) = run.get("negative_prompt").and_then(|v| v.as_str()) {
        args.extend(["--negative-prompt".to_string(), neg.to_string()]);
    }
    if let Some(w) = run.get("lora_weight").and_then(|v| v.as_f64()) {
        args.extend(["--lora".to_string(), format!("{}:{w}", lora.display())]);
    }
    for (k, v) in run.get("scheduler_overrides").and_then(|o| o.as_object()).into_iter().flatten() {
        args.extend(["--scheduler-config".to_string(), format!("{k}={v}")]);
    }
    args
}

fn generate(args: &[String]) {
    let o = t2v(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn lora_runs_through_the_command_line_and_repeat_from_their_settings() {
    let model = "tiny-t2v";
    let (_tmp, dir) = temp_dir();
    // A copy of the LoRA, to change it afterwards.
    let lora: PathBuf = dir.join("my-lora.safetensors");
    std::fs::copy(model_dir(model).join("lora/pytorch_lora_weights.safetensors"), &lora).unwrap();
    let (json, refs) = lora_refs(model);
    for i in [1usize, 2, 4] {
        let run = &json["runs"][i];
        let out = dir.join(format!("run{i}.npy"));
        generate(&run_args(model, run, &lora, &out));
        let err = max_abs_diff(&read_npy(&out), &refs[run["frames_key"].as_str().unwrap()]);
        println!("cli {model} lora run {i} ({}): frames max abs err {err:.2e}", run["scheduler"]);
        assert!(err <= 1e-3, "run {i}: {err:.2e}");
    }

    // The LCM run's settings: the LoRA with its weight and hash, the scheduler override.
    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("run2.npy.json")).unwrap()).unwrap();
    assert_eq!(settings["scheduler"], "lcm");
    assert_eq!(settings["scheduler_config"]["timestep_scaling"], "4.0");
    let recorded = &settings["loras"][0];
    assert_eq!(recorded["weight"], 1.0);
    assert_eq!(recorded["sha256"].as_str().unwrap().len(), 64);
    assert!(recorded["path"].as_str().unwrap().ends_with("my-lora.safetensors"));

    // --from repeats it exactly.
    let again = dir.join("again.npy");
    let from = dir.join("run2.npy.json").display().to_string();
    generate(&[
        "generate".into(),
        "--from".into(),
        from.clone(),
        "-q".into(),
        "-o".into(),
        again.display().to_string(),
    ]);
    assert_eq!(max_abs_diff(&read_npy(&again), &read_npy(&dir.join("run2.npy"))), 0.0);

    // A changed LoRA file is refused before any work.
    let mut bytes = std::fs::read(&lora).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&lora, bytes).unwrap();
    let refused = dir.join("refused.npy");
    let o = t2v(&["generate", "--from", &from, "-q", "-o", refused.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has changed since the run"), "{}", stderr(&o));
    assert!(!refused.exists());
}

#[test]
fn bad_lora_and_scheduler_settings_are_refused_before_model_work() {
    let model = model_dir("tiny-t2v").display().to_string();
    let (_tmp, dir) = temp_dir();
    let out = dir.join("v.npy");
    let base = ["generate", "a cat", "--model", &model, "-f", "2", "--height", "16", "--width", "16", "-q", "-o"];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        t2v(&args)
    };
    let o = run(&["--scheduler", "lcm", "--scheduler-config", "timestep_scalin=4"]);
    assert!(!o.status.success() && stderr(&o).contains("no setting `timestep_scalin`"), "{}", stderr(&o));
    let o = run(&["--scheduler", "lcm", "--scheduler-config", "timestep_scaling"]);
    assert!(!o.status.success() && stderr(&o).contains("KEY=VALUE"), "{}", stderr(&o));
    let o = run(&["--lora", "/nonexistent/lora.safetensors:0.5"]);
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent/lora.safetensors"), "{}", stderr(&o));
    let small = model_dir("small-t2v").join("lora/pytorch_lora_weights.safetensors");
    let o = run(&["--lora", small.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("lora_A.weight"), "{}", stderr(&o));
    assert!(!out.exists());
}
