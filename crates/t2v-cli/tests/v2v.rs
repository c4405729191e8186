//! Video-to-video through the command line: the reference runs from the fixtures' PNG folders,
//! `--from` repeating a run only on the very same input, strengths that run no step refused
//! before any model work, and `--upscale` as the two passes of zeroscope's recipe.

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::*;
use sha2::{Digest, Sha256};
use support::*;

fn settings_of(path: &Path) -> serde_json::Value {
    let mut name = path.file_name().unwrap().to_os_string();
    name.push(".json");
    serde_json::from_slice(&std::fs::read(path.with_file_name(name)).unwrap()).unwrap()
}

fn v2v_dir(model: &str) -> PathBuf {
    model_dir(model).join("v2v")
}

fn v2v_reference(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(v2v_dir(model).join("v2v_reference.safetensors"), &Device::Cpu).unwrap()
}

fn v2v_runs(model: &str) -> Vec<serde_json::Value> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v2v_dir(model).join("v2v_reference.json")).unwrap()).unwrap();
    json["runs"].as_array().unwrap().clone()
}

/// The command line of a reference run, on `input`, written to `out`.
fn run_args(model: &str, run: &serde_json::Value, input: &Path, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "generate".into(),
        run["prompt"].as_str().unwrap().into(),
        "--model".into(),
        model_dir(model).display().to_string(),
        "--video".into(),
        input.display().to_string(),
        "--strength".into(),
        run["strength"].to_string(),
        "--seed".into(),
        run["seed"].to_string(),
        "--steps".into(),
        run["steps"].to_string(),
        "--guidance-scale".into(),
        run["guidance_scale"].to_string(),
        "--scheduler".into(),
        run["scheduler"].as_str().unwrap().into(),
        "--height".into(),
        run["height"].to_string(),
        "--width".into(),
        run["width"].to_string(),
        "--dtype".into(),
        "f32".into(),
        "-o".into(),
        out.display().to_string(),
    ];
    if let Some(neg) = run.get("negative_prompt").and_then(|v| v.as_str()) {
        args.extend(["--negative-prompt".into(), neg.into()]);
    }
    if let Some(eta) = run.get("eta") {
        args.extend(["--eta".into(), eta.to_string()]);
    }
    args
}

fn check_cli_runs(model: &str) {
    let (_tmp, dir) = temp_dir();
    let refs = v2v_reference(model);
    for (i, run) in v2v_runs(model).iter().enumerate() {
        let out = dir.join(format!("run{i}.npy"));
        let input = model_dir(model).join(run["input_png"].as_str().unwrap());
        let o = run_ok(&run_args(model, run, &input, &out), &format!("{model} run {i}"));
        // The bar counts the steps that run: int(steps × strength) of them.
        let steps = run["steps"].as_u64().unwrap();
        let runs = (steps as f64 * run["strength"].as_f64().unwrap()) as u64;
        assert!(stderr(&o).contains(&format!("({runs} of {steps} steps run)")), "{}", stderr(&o));
        let frames = read_npy(&out);
        let err = max_abs_diff(&frames, &refs[run["frames_key"].as_str().unwrap()]);
        println!("cli {model} v2v run {i}: frames max abs err {err:.2e}");
        assert!(err <= 1e-3, "{model} run {i}: {err:.2e}");
        let settings = settings_of(&out);
        assert_eq!(settings["num_frames"], run["num_frames"]);
        assert_eq!(settings["input"]["strength"], run["strength"]);
        assert_eq!(
            settings["input"]["path"].as_str().unwrap(),
            std::fs::canonicalize(&input).unwrap().to_str().unwrap()
        );
    }
}

#[test]
fn v2v_reproduces_tiny_runs_from_png_folders() {
    check_cli_runs("tiny-t2v");
}

#[test]
fn v2v_reproduces_small_runs_from_png_folders() {
    check_cli_runs("small-t2v");
}

/// The documented hash of a frame folder: its frame files sorted by name, each as its name, a
/// NUL, its length (8 bytes, little-endian) and its bytes.
fn folder_sha256(dir: &Path) -> String {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let mut h = Sha256::new();
    for name in names {
        let bytes = std::fs::read(dir.join(&name)).unwrap();
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sha256(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn from_repeats_a_v2v_run_only_on_the_same_input() {
    let (_tmp, dir) = temp_dir();
    let model = "tiny-t2v";
    let run = &v2v_runs(model)[1];
    let input = dir.join("clip");
    copy_dir(&model_dir(model).join(run["input_png"].as_str().unwrap()), &input);
    let first = dir.join("first.npy");
    let mut args = run_args(model, run, &input, &first);
    args.extend(["--video-start".into(), "1".into(), "--video-every".into(), "1".into(), "-q".into()]);
    args.extend(["--num-frames".into(), "3".into()]);
    let o = t2v(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let settings = settings_of(&first);
    assert_eq!(settings["input"]["sha256"].as_str().unwrap(), folder_sha256(&input));
    assert_eq!((settings["input"]["start_frame"].as_u64(), settings["num_frames"].as_u64()), (Some(1), Some(3)));
    assert_eq!(settings["input"]["fit"], "resize");
    assert_eq!(read_npy(&first).dims(), &[3, 32, 32, 3]);

    // --from repeats it bit for bit, from another working folder.
    let again = dir.join("again.npy");
    let from = dir.join("first.npy.json");
    let o = Command::new(env!("CARGO_BIN_EXE_t2v"))
        .current_dir(std::env::temp_dir())
        .args(["generate", "--from", from.to_str().unwrap(), "-q", "-o", again.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&first).unwrap());
    assert_eq!(settings_of(&again), settings);

    // A changed frame: refused, saying what to do.
    let frame = input.join("frame_0002.png");
    let mut bytes = std::fs::read(&frame).unwrap();
    bytes.push(0);
    std::fs::write(&frame, bytes).unwrap();
    let third = dir.join("third.npy");
    let o = t2v(&["generate", "--from", from.to_str().unwrap(), "-o", third.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("has changed since the run") && stderr(&o).contains("restore the original"),
        "{}",
        stderr(&o)
    );
    assert!(!third.exists());
    // A missing input: refused too.
    std::fs::remove_dir_all(&input).unwrap();
    let o = t2v(&["generate", "--from", from.to_str().unwrap(), "-o", third.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is missing: put it back"), "{}", stderr(&o));

    // An MP4 input is recorded by the SHA-256 of its bytes.
    let mp4 = model_dir(model).join(run["input_mp4"].as_str().unwrap());
    let out = dir.join("mp4.npy");
    let o = t2v(&[
        "generate",
        "a ball",
        "--model",
        model_dir(model).to_str().unwrap(),
        "--video",
        mp4.to_str().unwrap(),
        "--steps",
        "2",
        "--strength",
        "0.5",
        "--seed",
        "1",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = settings_of(&out);
    assert_eq!(s["input"]["sha256"].as_str().unwrap(), file_sha256(&mp4));
    assert_eq!(s["num_frames"].as_u64(), Some(run["num_frames"].as_u64().unwrap()), "all the clip's frames by default");
}

/// The configs of the tiny model without its weights: whatever is refused here is refused
/// before any weights are read.
fn configs_only_model() -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = temp_dir();
    copy_model_folder(&model_dir("tiny-t2v"), &dir, false);
    (tmp, dir)
}

#[test]
fn bad_video_requests_fail_before_model_work() {
    let (_tmp_model, model) = configs_only_model();
    let (_tmp, dir) = temp_dir();
    let out = dir.join("v.npy");
    let input = v2v_dir("tiny-t2v").join("input.0");
    let base = |extra: &[&str]| -> Output {
        let mut args = vec!["generate", "a cat", "--model", model.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        t2v(&args)
    };
    let video = input.to_str().unwrap();
    let not_a_video = model.join("model_index.json");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--video", video, "--strength", "0.05", "--steps", "10"],
            "smallest strength that runs one is 0.1, or use at least 20 steps",
        ),
        (&["--video", video, "--strength", "1.5"], "the strength must be between 0 and 1"),
        (
            &["--upscale", video, "--upscale-strength", "0.05", "--upscale-steps", "10"],
            "smallest strength that runs one is 0.1",
        ),
        (&["--video", "/nonexistent/clip.mp4"], "the input video /nonexistent/clip.mp4 does not exist"),
        (&["--video", not_a_video.to_str().unwrap()], "its format is unknown"),
        (&["--strength", "0.5"], "--strength applies to an input video: give it with --video IN"),
        (&["--video-every", "2"], "--video-every applies to an input video"),
        (&["--upscale-size", "64x64"], "--upscale-size applies to a second pass"),
        (&["--upscale", "x", "--upscale-size", "64"], "invalid size `64`: give WIDTHxHEIGHT"),
        (&["--video", video, "--video-fit", "zoom"], "unknown way to fit frames `zoom`"),
        (&["--video", video, "--video-every", "0"], "the frame step must be at least 1"),
        (&["--video", video, "--num-frames", "7"], "7 frames were asked"),
        (&["--video", video, "--video-start", "6"], "choose a start frame below 6"),
        (
            &["--video", video, "--upscale", video, "--strength", "0.5"],
            "is the same as `--model M --width W --height H --strength S`: give one form",
        ),
    ];
    for (extra, expected) in cases {
        let o = base(extra);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(stderr(&o).contains(expected), "{extra:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("weights"), "{extra:?} reached the weights: {}", stderr(&o));
    }
    // A valid request on the same folder fails only at the weights, after a note on the resize.
    let o = base(&["--video", video, "--height", "16", "--width", "24", "--steps", "2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("note: the video is 32x32: its frames were resized to 24x16"), "{}", stderr(&o));
    assert!(stderr(&o).contains("no weights file"), "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn upscale_runs_two_passes_with_one_model_at_a_time() {
    let (_tmp, dir) = temp_dir();
    let (tiny, small) = (model_dir("tiny-t2v"), model_dir("small-t2v"));
    let common = ["--seed", "3", "--steps", "2", "-f", "2", "--scheduler", "ddim", "-n", "blurry"];
    let two_pass = dir.join("up.npy");
    let mut args = vec![
        "generate",
        "a cat",
        "--model",
        tiny.to_str().unwrap(),
        "--height",
        "16",
        "--width",
        "16",
        "--upscale",
        small.to_str().unwrap(),
        "--upscale-size",
        "48x32",
        "--upscale-strength",
        "0.5",
        "-o",
        two_pass.to_str().unwrap(),
        "--json",
    ];
    args.extend(common);
    let o = t2v(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("pass 1/2 loaded") && err.contains("pass 2/2 loaded"), "{err}");
    assert!(err.find("pass 1/2 \"a cat\": 2 frames of 16×16").unwrap() < err.find("pass 2/2 loaded").unwrap(), "{err}");
    assert!(
        err.contains(
            "pass 2/2 \"a cat\": 2 frames of 48×32, ddim 2 steps, guidance 9, seed 3, strength 0.5 (1 of 2 steps run)"
        ),
        "{err}"
    );
    let frames = read_npy(&two_pass);
    assert_eq!(frames.dims(), &[2, 32, 48, 3]);
    let settings = settings_of(&two_pass);
    assert_eq!((settings["height"].as_u64(), settings["width"].as_u64()), (Some(16), Some(16)));
    assert_eq!(settings["model"].as_str().unwrap(), tiny.canonicalize().unwrap().to_str().unwrap());
    let up = &settings["upscale"];
    assert_eq!(up["model"].as_str().unwrap(), small.canonicalize().unwrap().to_str().unwrap());
    assert_eq!(
        (up["width"].as_u64(), up["height"].as_u64(), up["strength"].as_f64(), up["steps"].as_u64()),
        (Some(48), Some(32), Some(0.5), Some(2))
    );
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["videos"][0]["settings"], settings);
    assert!(summary["videos"][0]["video_encoding_s"].as_f64().unwrap() > 0.0);

    // The same by hand: the first pass to PNG frames, then video-to-video with the second model.
    let pass1 = dir.join("pass1");
    let mut args = vec![
        "generate",
        "a cat",
        "--model",
        tiny.to_str().unwrap(),
        "--height",
        "16",
        "--width",
        "16",
        "-q",
        "-o",
        pass1.to_str().unwrap(),
    ];
    args.extend(common);
    assert!(t2v(&args).status.success());
    let by_hand = dir.join("by-hand.npy");
    let mut args = vec![
        "generate",
        "a cat",
        "--video",
        pass1.to_str().unwrap(),
        "--model",
        small.to_str().unwrap(),
        "--strength",
        "0.5",
        "--height",
        "32",
        "--width",
        "48",
        "-q",
        "-o",
        by_hand.to_str().unwrap(),
    ];
    args.extend(common);
    let o = t2v(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(max_abs_diff(&read_npy(&by_hand), &frames), 0.0);
    // --upscale on an existing video is that same second pass.
    let on_video = dir.join("on-video.npy");
    let mut args = vec![
        "generate",
        "a cat",
        "--video",
        pass1.to_str().unwrap(),
        "--upscale",
        small.to_str().unwrap(),
        "--upscale-size",
        "48x32",
        "--upscale-strength",
        "0.5",
        "-o",
        on_video.to_str().unwrap(),
    ];
    args.extend(common);
    let o = t2v(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("pass 1/2"), "{}", stderr(&o));
    assert_eq!(max_abs_diff(&read_npy(&on_video), &frames), 0.0);
    // --from repeats both passes.
    let again = dir.join("again.npy");
    let o =
        t2v(&["generate", "--from", dir.join("up.npy.json").to_str().unwrap(), "-q", "-o", again.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&two_pass).unwrap());
}
