//! Long videos through the command line: the fixtures' FreeNoise and prompt-travel runs
//! (`long/`) reproduced through `.npy` files, the settings repeating them with `--from`, and bad
//! long-video settings refused before any model work.

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::*;
use support::*;

fn long_reference(model: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let dir = fixtures().join(model).join("long");
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("long_reference.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("long_reference.safetensors"), &Device::Cpu).unwrap();
    (json, tensors)
}

/// A `long_reference.json` run as `t2v generate` arguments: a `prompts` map becomes the
/// positional prompt (frame 0) and `--prompt-at` for the other keyframes.
fn run_args(run: &serde_json::Value) -> Vec<String> {
    let mut args = vec!["generate".to_string()];
    let mut keyframes = Vec::new();
    match run.get("prompts").and_then(|p| p.as_object()) {
        Some(map) => {
            args.push(map["0"].as_str().unwrap().to_string());
            for (frame, text) in map.iter().filter(|(k, _)| k.as_str() != "0") {
                keyframes.extend(["--prompt-at".to_string(), format!("{frame}:{}", text.as_str().unwrap())]);
            }
        }
        None => args.push(run["prompt"].as_str().unwrap().to_string()),
    }
    for (flag, key) in [
        ("--seed", "seed"),
        ("--steps", "steps"),
        ("--guidance-scale", "guidance_scale"),
        ("--num-frames", "num_frames"),
        ("--height", "height"),
        ("--width", "width"),
        ("--context-length", "context_length"),
        ("--context-stride", "context_stride"),
    ] {
        args.extend([flag.to_string(), run[key].to_string()]);
    }
    args.extend(["--scheduler".into(), run["scheduler"].as_str().unwrap().to_string()]);
    if let Some(eta) = run.get("eta") {
        args.extend(["--eta".into(), eta.to_string()]);
    }
    if let Some(w) = run.get("weighting_scheme").and_then(|v| v.as_str()) {
        args.extend(["--context-weighting".into(), w.to_string()]);
    }
    if let Some(neg) = run.get("negative_prompt").and_then(|v| v.as_str()) {
        args.extend(["--negative-prompt".to_string(), neg.to_string()]);
    }
    args.extend(keyframes);
    args.extend(["--dtype".into(), "f32".into()]);
    args
}

fn check_cli_runs(model: &str) {
    let (_tmp_dir, dir) = temp_dir();
    let (json, refs) = long_reference(model);
    for (i, run) in json["runs"].as_array().unwrap().iter().enumerate() {
        let out = dir.join(format!("long{i}.npy"));
        let (frames, o) = fixture_run(&model_dir(model), run_args(run), &out, &format!("{model} long run {i}"));
        assert!(stderr(&o).contains("FreeNoise:"), "progress names the windows: {}", stderr(&o));
        let err = max_abs_diff(&frames, &refs[run["frames_key"].as_str().unwrap()]);
        println!("cli {model} long run {i}: frames max abs err {err:.2e}");
        assert!(err <= 1e-3, "{model} long run {i}: {err:.2e}");

        // The settings beside the output repeat the run.
        if i == 2 {
            let settings: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(format!("long{i}.npy.json"))).unwrap()).unwrap();
            assert_eq!(settings["context_length"], run["context_length"]);
            assert_eq!(settings["context_stride"], run["context_stride"]);
            assert_eq!(settings["context_weighting"], "pyramid");
            assert_eq!(settings["prompts"]["9"], "a blue cube");
            let again = dir.join("again.npy");
            let from = dir.join(format!("long{i}.npy.json"));
            let o = t2v(&["generate", "--from", from.to_str().unwrap(), "-o", again.to_str().unwrap(), "-q"]);
            assert!(o.status.success(), "{}", stderr(&o));
            assert_eq!(max_abs_diff(&read_npy(&again), &frames), 0.0);
        }
    }
}

#[test]
fn generate_reproduces_tiny_long_runs() {
    check_cli_runs("tiny-t2v");
}

#[test]
fn generate_reproduces_small_long_runs() {
    check_cli_runs("small-t2v");
}

#[test]
fn bad_long_settings_fail_before_loading() {
    let (_tmp_dir, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let out = dir.join("v.npy");
    let base = |extra: &[&str]| {
        let mut args = vec!["generate", "a cat", "--model", model.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        t2v(&args)
    };
    for (extra, message) in [
        (&["--num-frames", "8", "--context-length", "12"][..], "at most 8"),
        (&["--num-frames", "8", "--context-length", "4", "--context-stride", "0"], "stride must be at least 1"),
        (&["--num-frames", "8", "--context-length", "4", "--context-stride", "5"], "use a stride of 1 to 4"),
        (&["--num-frames", "8", "--prompt-at", "8:a dog"], "past the last frame (7)"),
        (&["--num-frames", "8", "--negative-prompt-at", "9:blur"], "past the last frame (7)"),
        (&["--num-frames", "8", "--prompt-at", "a dog"], "FRAME:TEXT"),
        (&["--num-frames", "8", "--context-stride", "2"], "--context-length"),
        (&["--num-frames", "8", "--context-length", "4", "--context-weighting", "ramp"], "pyramid, flat"),
    ] {
        let o = base(extra);
        assert!(!o.status.success(), "{extra:?} was accepted");
        let err = stderr(&o);
        assert!(err.contains(message), "{extra:?}: {err}");
        assert!(!err.contains("loaded"), "{extra:?}: refused only after loading: {err}");
    }
    assert!(!out.exists());
}

#[test]
fn freenoise_turns_on_above_24_frames() {
    let (_tmp_dir, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let out = dir.join("v.npy");
    let common = ["--steps", "1", "--height", "8", "--width", "8", "--num-frames", "26", "--seed", "1", "-o"];
    let mut args = vec!["generate", "a cat", "--model", model.to_str().unwrap()];
    args.extend(common);
    args.push(out.to_str().unwrap());
    let o = t2v(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("FreeNoise is on, windows of 16 frames every 4"), "{}", stderr(&o));
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("v.npy.json")).unwrap()).unwrap();
    assert_eq!((settings["context_length"].as_u64(), settings["context_stride"].as_u64()), (Some(16), Some(4)));

    // --context-length 0 keeps it off: another video, and no note.
    let off = dir.join("off.npy");
    let mut args = vec!["generate", "a cat", "--model", model.to_str().unwrap(), "--context-length", "0"];
    args.extend(common);
    args.push(off.to_str().unwrap());
    let o = t2v(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("FreeNoise"), "{}", stderr(&o));
    assert!(max_abs_diff(&read_npy(&off), &read_npy(&out)) > 1e-4);
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("off.npy.json")).unwrap()).unwrap();
    assert!(settings.get("context_length").is_none());
}

/// Video-to-video on a clip longer than the window: FreeNoise's windows run over the clip's
/// frames (the noise drawn as video-to-video draws it); a window as long as the clip is plain
/// video-to-video, bit for bit; `--from` repeats the windowed run.
#[test]
fn video_to_video_runs_in_windows() {
    let (_tmp_dir, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let m = model.to_str().unwrap().to_string();
    let clip = dir.join("clip.npy");
    let size = ["--height", "8", "--width", "8", "--seed", "3", "-q"];
    let mut args = vec!["generate", "a cat", "--model", &m, "--steps", "1", "--num-frames", "12", "-o"];
    args.push(clip.to_str().unwrap());
    args.extend(size);
    let o = t2v(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v2v = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["generate", "a dog", "--model", &m, "--video", clip.to_str().unwrap(), "--steps", "4"];
        args.extend(["--strength", "0.5", "-o", out.to_str().unwrap()]);
        args.extend(size);
        args.extend_from_slice(extra);
        let o = t2v(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        read_npy(out)
    };
    let plain = v2v(&dir.join("plain.npy"), &[]);
    let whole = v2v(&dir.join("whole.npy"), &["--context-length", "12"]);
    assert_eq!(max_abs_diff(&plain, &whole), 0.0, "a window as long as the clip is plain video-to-video");
    let windowed_path = dir.join("windowed.npy");
    let windowed = v2v(&windowed_path, &["--context-length", "8", "--context-stride", "2"]);
    assert_eq!(windowed.dims(), plain.dims());
    let moved = max_abs_diff(&plain, &windowed);
    assert!(moved > 1e-5, "windows of 8 over 12 frames change the frames (max abs diff {moved:.2e})");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("windowed.npy.json")).unwrap()).unwrap();
    assert_eq!((settings["context_length"].as_u64(), settings["context_stride"].as_u64()), (Some(8), Some(2)));
    // --from repeats it, windows included.
    let again = dir.join("again.npy");
    let o = t2v(&[
        "generate",
        "--from",
        windowed_path.with_extension("npy.json").to_str().unwrap(),
        "-o",
        again.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(max_abs_diff(&read_npy(&again), &windowed), 0.0);
}
