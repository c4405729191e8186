//! The command line as a user runs it: `t2v generate` reproduces the reference runs through
//! `.npy` files, bad input fails before any model work with a message that says what to do,
//! and `t2v tokenize` prints the reference ids.
//!
//! One file: each file under tests/ is a binary of its own to link; the command line's fixture runs
//! share one.

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Tensor;
use common::*;
use support::*;

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
    let (_tmp_dir, dir) = temp_dir();
    let refs = reference(model);
    for (i, run) in reference_json(model)["runs"].as_array().unwrap().iter().enumerate() {
        let out = dir.join(format!("run{i}.npy"));
        let (frames, _) = fixture_run(&model_dir(model), run_args(run), &out, &format!("{model} run {i}"));
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
    let (_tmp_dir, dir) = temp_dir();
    let out = dir.join("v.npy");
    let model = model_dir("tiny-t2v");
    let o = t2v(&[
        "generate",
        "a cat",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "--num-frames",
        "1",
        "--height",
        "8",
        "--width",
        "8",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("seed: "), "{}", stderr(&o));
    assert!(out.exists());
}

/// A checkpoint with configs but no weights: a setting error must be reported from the configs
/// alone, before any weights are needed.
fn configs_only_model() -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = temp_dir();
    copy_model_folder(&model_dir("small-t2v"), &dir, false);
    (tmp, dir)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p))
        } else {
            files.push(p)
        }
    }
    files
}

#[test]
fn bad_input_fails_before_model_work() {
    let (_tmp_model, model) = configs_only_model();
    let (_tmp_out_dir, out_dir) = temp_dir();
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
        (&["--guidance-scale", "-1"], "guidance scale must be between 0 and 100"),
        (&["--scheduler", "heun"], "invalid value 'heun'"),
        (&["--device", "tpu"], "unknown device `tpu`: use cpu, cuda, cuda:N, metal, metal:N or auto"),
        (&["--device", "cuda:x"], "the device number must be a whole number"),
        #[cfg(not(feature = "cuda"))]
        (&["--device", "cuda"], "built without cuda support: rebuild it with `cargo build --release --features cuda`"),
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
    // bfloat16 runs on the CPU (float32 activations, bfloat16 weights): also up to the weights.
    let o = base(&["--num-frames", "2", "--steps", "1", "--device", "cpu", "--dtype", "bf16"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no weights file"), "{}", stderr(&o));
    assert!(!out.exists(), "no output file after a failure");
}

#[test]
fn existing_output_is_not_overwritten() {
    let (_tmp_dir, dir) = temp_dir();
    let out = dir.join("v.npy");
    std::fs::write(&out, b"keep me").unwrap();
    let model = model_dir("tiny-t2v");
    let args = [
        "generate",
        "a cat",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "--num-frames",
        "1",
        "--height",
        "8",
        "--width",
        "8",
        "--seed",
        "1",
        "-o",
        out.to_str().unwrap(),
    ];
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

fn have(tool: &str) -> bool {
    t2v_testkit::ffmpeg_tool(tool).is_some()
}

/// BT.601 luma (0..255) of RGB frames in [0, 1], and of an MP4 decoded by ffmpeg (Y plane,
/// limited range expanded): the luma PSNR between them.
fn mp4_luma_psnr(frames: &Tensor, mp4: &Path) -> f64 {
    let (f, h, w, _) = frames.dims4().unwrap();
    let rgb = frames.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(mp4)
        .args(["-f", "rawvideo", "-pix_fmt", "yuv420p", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let frame_bytes = w * h * 3 / 2;
    assert_eq!(out.stdout.len(), f * frame_bytes, "decoded frame count");
    let mut se = 0.0f64;
    for t in 0..f {
        for p in 0..h * w {
            let i = (t * h * w + p) * 3;
            let y_in = 255.0 * (0.299 * rgb[i] + 0.587 * rgb[i + 1] + 0.114 * rgb[i + 2]) as f64;
            let y_out = (out.stdout[t * frame_bytes + p] as f64 - 16.0) * 255.0 / 219.0;
            se += (y_in - y_out).powi(2);
        }
    }
    10.0 * (255.0f64.powi(2) / (se / (f * h * w) as f64)).log10()
}

#[test]
fn mp4_carries_its_settings_and_repeats_the_run() {
    let (_tmp_dir, dir) = temp_dir();
    let model = model_dir("small-t2v");
    let mp4 = dir.join("corgi.mp4");
    let o = t2v(&[
        "generate",
        "a corgi",
        "--model",
        model.to_str().unwrap(),
        "--seed",
        "5",
        "--steps",
        "2",
        "-f",
        "8",
        "--scheduler",
        "ddim",
        "-n",
        "blurry",
        "-o",
        mp4.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "-q prints nothing: {}", stderr(&o));
    // The settings beside the video and inside it.
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("corgi.mp4.json")).unwrap()).unwrap();
    assert_eq!(settings["prompt"], "a corgi");
    assert_eq!(settings["negative_prompt"], "blurry");
    assert_eq!(
        (settings["seed"].as_u64(), settings["steps"].as_u64(), settings["num_frames"].as_u64()),
        (Some(5), Some(2), Some(8))
    );
    assert_eq!((settings["scheduler"].as_str(), settings["height"].as_u64()), (Some("ddim"), Some(64)));
    assert_eq!(settings["t2v_version"], env!("CARGO_PKG_VERSION"));
    let embedded = t2v::video::read_mp4_metadata(&mp4).unwrap().expect("settings in the MP4");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&embedded).unwrap(), settings);

    // --from the MP4 and --from the JSON repeat the run: the same frames.
    let a = dir.join("again.npy");
    let o = t2v(&["generate", "--from", mp4.to_str().unwrap(), "-o", a.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let b = dir.join("again-json.npy");
    let o = t2v(&["generate", "--from", dir.join("corgi.mp4.json").to_str().unwrap(), "-o", b.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (fa, fb) = (read_npy(&a), read_npy(&b));
    assert_eq!(fa.dims(), &[8, 64, 64, 3]);
    assert_eq!(max_abs_diff(&fa, &fb), 0.0);
    // An option given with --from overrides the stored setting.
    let c = dir.join("other-seed.npy");
    let o = t2v(&["generate", "--from", mp4.to_str().unwrap(), "--seed", "6", "-o", c.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(max_abs_diff(&read_npy(&c), &fa) > 0.01);

    if have("ffprobe") {
        let probe = Command::new("ffprobe")
            .args(["-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json"])
            .arg(&mp4)
            .output()
            .unwrap();
        let probe: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
        let s = &probe["streams"][0];
        assert_eq!(
            (s["codec_name"].as_str(), s["pix_fmt"].as_str(), s["codec_tag_string"].as_str()),
            (Some("h264"), Some("yuv420p"), Some("avc1"))
        );
        assert_eq!((s["nb_read_frames"].as_str(), s["r_frame_rate"].as_str()), (Some("8"), Some("8/1")));
        assert_eq!(probe["format"]["duration"].as_str(), Some("1.000000"));
        assert!(probe["format"]["tags"]["comment"].as_str().unwrap().contains("\"a corgi\""));
    }
    // The fixture model's noise-like frames survive H.264 at the default quality.
    if have("ffmpeg") {
        let psnr = mp4_luma_psnr(&fa, &mp4);
        println!("fixture frames: luma PSNR {psnr:.1} dB");
        assert!(psnr >= 38.0, "luma PSNR {psnr:.1} dB");
    }
}

#[test]
fn several_videos_and_prompt_files_load_the_model_once() {
    let (_tmp_dir, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a cat\n\n# skipped\na dog surfing\n").unwrap();
    let out = dir.join("v.gif");
    let o = t2v(&[
        "generate",
        "--prompts",
        prompts.to_str().unwrap(),
        "--num-videos",
        "2",
        "--seed",
        "10",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "-f",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("loaded ").count(), 1, "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let videos = summary["videos"].as_array().unwrap();
    let got: Vec<(String, u64, String)> = videos
        .iter()
        .map(|v| {
            (
                v["settings"]["prompt"].as_str().unwrap().into(),
                v["settings"]["seed"].as_u64().unwrap(),
                v["outputs"][0]["output"].as_str().unwrap().into(),
            )
        })
        .collect();
    let name = |n: usize| dir.join(format!("v-{n}.gif")).display().to_string();
    assert_eq!(
        got,
        [
            ("a cat".into(), 10, name(1)),
            ("a cat".into(), 11, name(2)),
            ("a dog surfing".into(), 10, name(3)),
            ("a dog surfing".into(), 11, name(4))
        ]
    );
    for v in videos {
        let path = PathBuf::from(v["outputs"][0]["output"].as_str().unwrap());
        assert_eq!(&std::fs::read(&path).unwrap()[..6], b"GIF89a");
        assert!(PathBuf::from(v["outputs"][0]["settings_file"].as_str().unwrap()).exists());
        assert!(v["denoising_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn default_output_goes_to_outputs_with_a_unique_name() {
    let (_tmp_dir, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    for _ in 0..2 {
        let o = Command::new(env!("CARGO_BIN_EXE_t2v"))
            .current_dir(&dir)
            .args([
                "generate",
                "A Cat, surfing!",
                "--model",
                model.to_str().unwrap(),
                "--seed",
                "3",
                "--steps",
                "1",
                "-f",
                "2",
                "-q",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.join("outputs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a-cat-surfing-3-1.mp4", "a-cat-surfing-3-1.mp4.json", "a-cat-surfing-3.mp4", "a-cat-surfing-3.mp4.json"]
    );
}

/// A Hugging Face cache holding the tiny model as `damo-vilab/text-to-video-ms-1.7b`, laid out as
/// the hub client lays it out: blobs, a snapshot of relative links, refs/main.
fn hub_cache_with_tiny_model() -> (tempfile::TempDir, PathBuf) {
    let (tmp, cache) = temp_dir();
    let cache = cache.join("hub");
    let repo = cache.join("models--damo-vilab--text-to-video-ms-1.7b");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    let root = model_dir("tiny-t2v");
    for (i, file) in walk(&root).into_iter().enumerate() {
        let rel = file.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
        if rel.starts_with("reference.") {
            continue;
        }
        let blob = repo.join("blobs").join(format!("{i:040x}"));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::copy(&file, &blob).unwrap();
        let link = snapshot.join(&rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let up = "../".repeat(rel.split('/').count() + 1);
        std::os::unix::fs::symlink(format!("{up}blobs/{i:040x}"), &link).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    (tmp, cache)
}

#[test]
fn model_by_repo_id_from_the_hub_cache_offline() {
    let (_tmp_cache, cache) = hub_cache_with_tiny_model();
    let (_tmp_dir, dir) = temp_dir();
    let out = dir.join("v.npy");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "a cat",
            "--seed",
            "3",
            "--steps",
            "1",
            "-f",
            "2",
            "-q",
            "--overwrite",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_t2v"))
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .args(&args)
            .output()
            .unwrap()
    };
    // The default model, by name, from the cache.
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let by_name = read_npy(&out);
    let o = run(&["--model", "damo-vilab/text-to-video-ms-1.7b@main"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(max_abs_diff(&read_npy(&out), &by_name), 0.0);
    let o = run(&["--model", model_dir("tiny-t2v").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(max_abs_diff(&read_npy(&out), &by_name), 0.0);
    // Another repo is not in the cache: offline, that is a clear error.
    let o = run(&["--model", "cerspense/zeroscope_v2_576w"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not in the Hugging Face cache") && stderr(&o).contains("HF_HUB_OFFLINE"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn several_formats_from_one_run_and_no_settings_collide() {
    let (_tmp, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "a cat",
            "--model",
            model.to_str().unwrap(),
            "--steps",
            "1",
            "--num-frames",
            "2",
            "--height",
            "16",
            "--width",
            "16",
            "--seed",
            "3",
            "-q",
        ];
        args.extend_from_slice(extra);
        t2v(&args)
    };
    // One run, two formats from --format: v.mp4 and v.gif, each with its own settings.
    let v = dir.join("v.mp4");
    let o = run(&["-o", v.to_str().unwrap(), "--format", "mp4,gif"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["v.mp4", "v.mp4.json", "v.gif", "v.gif.json"] {
        assert!(dir.join(name).is_file(), "{name} written");
    }
    // --output given twice: an npy and a PNG folder of the same frames.
    let (npy, png) = (dir.join("w.npy"), dir.join("w-frames"));
    let o = run(&["-o", npy.to_str().unwrap(), "-o", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_npy(&npy).dims(), &[2, 16, 16, 3]);
    assert!(png.join("frame_0001.png").is_file() && dir.join("w-frames.json").is_file());
    // A second run to another format of the same name does not touch the first run's settings.
    let first = std::fs::read(dir.join("v.mp4.json")).unwrap();
    let x = dir.join("x.mp4");
    let o = run(&["-o", x.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // An MP4 alone is decoded and encoded frame by frame (streamed); beside a GIF it is encoded
    // from the decoded clip. The same run gives the same file either way.
    assert!(
        std::fs::read(&x).unwrap() == std::fs::read(&v).unwrap(),
        "the streamed MP4 differs from the one encoded from the whole clip"
    );
    let o = t2v(&[
        "generate",
        "a dog",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "--num-frames",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--seed",
        "4",
        "-q",
        "-o",
        dir.join("x.gif").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let x_settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("x.mp4.json")).unwrap()).unwrap();
    assert_eq!(x_settings["prompt"], "a cat", "the MP4's settings still describe the MP4");
    assert_eq!(std::fs::read(dir.join("v.mp4.json")).unwrap(), first);
    // A format that contradicts the extension is refused before any work.
    let o = run(&["-o", dir.join("y.mp4").to_str().unwrap(), "--format", "gif"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--format"), "{}", stderr(&o));
    assert!(!dir.join("y.mp4").exists());
}

#[test]
fn numbers_seeds_and_printed_text_are_handled() {
    let (_tmp, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let out = dir.join("v.npy");
    let base = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "--num-frames",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "-o",
        out.to_str().unwrap(),
    ];
    // A negative count is named as an invalid value of its option, not as an unknown argument.
    let mut args = base.to_vec();
    args[6] = "-1";
    args.push("a cat");
    let o = t2v(&args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid value '-1' for '--num-frames"), "{}", stderr(&o));
    // Consecutive seeds past the largest one are refused, not wrapped to 0.
    let mut args = base.to_vec();
    args.extend(["a cat", "--seed", "18446744073709551615", "--num-videos", "2"]);
    let o = t2v(&args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("past the largest seed"), "{}", stderr(&o));
    assert!(!dir.join("v-1.npy").exists());
    // A prompt with an escape sequence is printed escaped, and the settings record the model's
    // absolute path, so that --from works from another folder.
    let mut args = base.to_vec();
    args.extend(["a \u{1b}[31mred\u{1b}[0m cat", "--seed", "1"]);
    let o = t2v(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains('\u{1b}'), "raw escape printed: {:?}", stderr(&o));
    assert!(stderr(&o).contains("\\u{1b}[31mred"), "{}", stderr(&o));
    let settings: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("v.npy.json")).unwrap()).unwrap();
    assert!(Path::new(settings["model"].as_str().unwrap()).is_absolute(), "{settings}");
    let again = dir.join("again.npy");
    let o = Command::new(env!("CARGO_BIN_EXE_t2v"))
        .current_dir(std::env::temp_dir())
        .args(["generate", "--from", dir.join("v.npy.json").to_str().unwrap(), "-q", "-o", again.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(max_abs_diff(&read_npy(&again), &read_npy(&out)), 0.0);
}

#[test]
fn stale_temporaries_of_dead_runs_are_removed() {
    let (_tmp, dir) = temp_dir();
    // The temporaries a killed run leaves: named after a process that no longer exists.
    let mut done = Command::new("true").spawn().unwrap();
    let dead = done.id();
    done.wait().unwrap();
    let stale_file = dir.join(format!(".v.npy.partial-{dead}-Ab12Cd"));
    let stale_dir = dir.join(format!(".frames.partial-{dead}-Xy34Zw"));
    std::fs::write(&stale_file, b"half a video").unwrap();
    std::fs::create_dir(&stale_dir).unwrap();
    // One of a run in progress (this test's own process) stays.
    let live = dir.join(format!(".w.npy.partial-{}-Qq11Rr", std::process::id()));
    std::fs::write(&live, b"being written").unwrap();
    let model = model_dir("tiny-t2v");
    let out = dir.join("v.npy");
    let o = t2v(&[
        "generate",
        "a cat",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "--num-frames",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--seed",
        "1",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stale_file.exists() && !stale_dir.exists(), "stale temporaries removed");
    assert!(live.exists(), "a running process's temporary is left alone");
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, [format!(".w.npy.partial-{}-Qq11Rr", std::process::id()), "v.npy".into(), "v.npy.json".into()]);
}
