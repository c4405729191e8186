//! The command line against hostile input (issue 11): every case exits 1 or 2 (never a panic's
//! 101 or an abort's 134), says what is wrong, writes no file, and does it before any model work;
//! and runs killed while they write leave either the old file or the complete new one.

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{copy_dir, model_dir};
use support::*;

/// Runs t2v with `args`, killing it (and failing) if it runs past `limit`: no case may hang.
fn t2v_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_t2v"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("t2v runs");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("t2v {args:?} still runs after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Asserts a clean refusal: exit 1 or 2, `expected` in the message, nothing written in `dir`
/// but what was there, and no model loaded.
fn assert_refused(o: &Output, what: &str, expected: &str, dir: &Path, before: &[String]) {
    let err = stderr(o);
    let code = o.status.code();
    assert!(matches!(code, Some(1 | 2)), "{what}: exit {code:?} (not 1 or 2): {err}");
    assert!(err.contains(expected), "{what}: expected {expected:?} in: {err}");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{what}: {err}");
    assert!(!err.contains("loaded "), "{what}: the model was loaded before the refusal: {err}");
    assert_eq!(names(dir), before, "{what}: the folder changed");
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn numeric_options_out_of_range_are_refused_before_work() {
    let (_tmp, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let out = dir.join("v.mp4");
    // The memory plan, where no encoder's limit comes first (an .npy has none).
    let npy = dir.join("v.npy");
    let npy = npy.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--num-frames", "18446744073709551615"], "too large to compute"),
        (&["--height", "1099511627776", "--width", "1099511627776"], "too large to compute"),
        (&["--height", "18446744073709551608", "--width", "8"], "too large to compute"),
        (&["--num-frames", "99999999999"], "this run needs about"),
        (&["--num-frames", "99999999999"], "lower the number of frames"),
        (&["--height", "100000", "--width", "100000", "-o", npy], "lower the frame size"),
        // An MP4's frame size is a hard limit of the format: said before the memory plan.
        (&["--height", "100000", "--width", "100000"], "too large for the H.264 encoder"),
        (&["--steps", "4294967295"], "4294967295 inference steps is more than the 1000 timesteps"),
        (&["--scheduler", "dpm", "--steps", "1001"], "1001 inference steps is more than the 1000 timesteps"),
        (&["--scheduler", "ddim", "--steps", "1001"], "1001 inference steps is more than the 1000 timesteps"),
        (&["--num-videos", "18446744073709551615"], "more than the 10000 videos one run makes"),
        (&["-g", "1e300"], "guidance scale must be between 0 and 100 (the model card uses 9), got 1e300"),
        (&["-g", "NaN"], "guidance scale must be between 0 and 100"),
        (&["--scheduler", "ddim", "--eta", "5"], "eta must be between 0 (deterministic) and 1"),
        (&["--fps", "100000"], "an MP4 takes 1 to 240 frames per second, not 100000"),
        (&["--fps", "4294967295"], "an MP4 takes 1 to 240 frames per second"),
        (&["--height", "8", "--width", "8"], "too small for the H.264 encoder"),
        (&["--height", "4096", "--width", "4096", "--num-frames", "1"], "too large for the H.264 encoder"),
        (&["--num-frames", "-1"], "invalid value '-1' for '--num-frames"),
        (&["--seed", "18446744073709551615", "--num-videos", "2"], "past the largest seed"),
    ];
    let before = names(&dir);
    for (extra, expected) in cases {
        let mut args = vec!["generate", "a cat", "--model", model.to_str().unwrap(), "--seed", "1"];
        args.extend(["--steps", "2", "--num-frames", "2", "--height", "32", "--width", "32"]);
        args.extend(["-o", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        // Later options win; clap refuses repeats, so drop the defaults that `extra` overrides.
        let args = dedup_options(&args);
        let o = t2v_within(&args, LIMIT);
        assert_refused(&o, &format!("{extra:?}"), expected, &dir, &before);
    }
    for (extra, expected) in [
        (&["--frames", "18446744073709551615"][..], "too large to compute"),
        (&["--steps", "18446744073709551615"][..], "at most 1000 steps"),
        (&["--height", "60"][..], "a multiple of 8"),
    ] {
        let mut args = vec!["bench", "--device", "cpu"];
        args.extend_from_slice(extra);
        let o = t2v_within(&args, LIMIT);
        assert_refused(&o, &format!("bench {extra:?}"), expected, &dir, &before);
    }
}

/// `args` with only the last occurrence of each `--option value` pair.
fn dedup_options<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut pairs: Vec<(&str, Option<&str>)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        let takes_value = a.starts_with('-') && a.len() > 1 && i + 1 < args.len() && !args[i + 1].starts_with("--");
        if a.starts_with('-') && !a.starts_with("-1") && takes_value {
            pairs.retain(|(k, _)| *k != a);
            pairs.push((a, Some(args[i + 1])));
            i += 2;
        } else {
            pairs.push((a, None));
            i += 1;
        }
    }
    pairs.into_iter().flat_map(|(k, v)| std::iter::once(k).chain(v)).collect()
}

/// A copy of tiny-t2v with `edit` applied.
fn broken_model(edit: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = temp_dir();
    copy_dir(&model_dir("tiny-t2v"), &dir);
    edit(&dir);
    (tmp, dir)
}

fn set_key(file: &Path, key: &str, value: serde_json::Value) {
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    json[key] = value;
    std::fs::write(file, json.to_string()).unwrap();
}

fn edit_tensor(root: &Path, rel: &str, name: &str, f: impl FnOnce(&candle_core::Tensor) -> candle_core::Tensor) {
    let path = root.join(rel);
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let t = tensors.get_mut(name).unwrap();
    *t = f(t);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn broken_models_are_refused_with_the_file_and_key() {
    use serde_json::json;
    let (_tmp, dir) = temp_dir();
    let out = dir.join("v.mp4");
    type Edit = Box<dyn FnOnce(&Path)>;
    let key = |rel: &'static str, k: &'static str, v: serde_json::Value| -> Edit {
        Box::new(move |root: &Path| set_key(&root.join(rel), k, v))
    };
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("unet norm_num_groups 0", key("unet/config.json", "norm_num_groups", json!(0)), "`norm_num_groups` is 0"),
        ("unet layers_per_block 0", key("unet/config.json", "layers_per_block", json!(0)), "`layers_per_block` is 0"),
        (
            "unet sample_size 1e12",
            key("unet/config.json", "sample_size", json!(1_000_000_000_000u64)),
            "`sample_size` is 1000000000000",
        ),
        ("vae norm_num_groups 0", key("vae/config.json", "norm_num_groups", json!(0)), "`norm_num_groups` is 0"),
        ("vae scaling_factor 0", key("vae/config.json", "scaling_factor", json!(0)), "`scaling_factor` is 0"),
        (
            "scheduler num_train_timesteps 1e13",
            key("scheduler/scheduler_config.json", "num_train_timesteps", json!(10_000_000_000_000u64)),
            "num_train_timesteps is 10000000000000: at most 1000000",
        ),
        (
            "scheduler beta_end 2",
            key("scheduler/scheduler_config.json", "beta_end", json!(2)),
            "beta_end is 2: betas must be in [0, 1)",
        ),
        (
            "integer weights",
            Box::new(|root: &Path| {
                edit_tensor(root, "unet/diffusion_pytorch_model.safetensors", "conv_in.weight", |t| {
                    t.to_dtype(candle_core::DType::I64).unwrap()
                })
            }),
            "tensor `conv_in.weight` holds I64 values",
        ),
        (
            "a folder as weights",
            Box::new(|root: &Path| {
                let w = root.join("unet/diffusion_pytorch_model.safetensors");
                std::fs::remove_file(&w).unwrap();
                std::fs::create_dir(&w).unwrap();
            }),
            "is a folder, not a regular file: a weights file must be a file",
        ),
        (
            "a FIFO as a config",
            Box::new(|root: &Path| mkfifo(&root.join("unet/config.json"))),
            "is a FIFO (named pipe), not a regular file",
        ),
        (
            "a FIFO as weights",
            Box::new(|root: &Path| mkfifo(&root.join("unet/diffusion_pytorch_model.safetensors"))),
            "is a FIFO (named pipe), not a regular file",
        ),
        (
            "/dev/zero as a config",
            Box::new(|root: &Path| symlink_zero(&root.join("vae/config.json"))),
            "is a device, not a regular file",
        ),
    ];
    let before = names(&dir);
    for (what, edit, expected) in cases {
        let (_m, model) = broken_model(edit);
        let args = ["generate", "a cat", "--model", model.to_str().unwrap(), "--steps", "2", "--num-frames", "2"];
        let mut args = args.to_vec();
        args.extend(["--height", "32", "--width", "32", "-o", out.to_str().unwrap()]);
        let o = t2v_within(&args, LIMIT);
        let err = stderr(&o);
        assert!(matches!(o.status.code(), Some(1 | 2)), "{what}: exit {:?}: {err}", o.status.code());
        assert!(err.contains(expected), "{what}: expected {expected:?} in: {err}");
        assert_eq!(names(&dir), before, "{what}: the folder changed");
    }
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

fn symlink_zero(path: &Path) {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink("/dev/zero", path).unwrap();
}

#[test]
fn special_files_and_hostile_settings_are_refused_at_once() {
    let (_tmp, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let out = dir.join("v.mp4");
    let fifo = dir.join("fifo.json");
    mkfifo(&fifo);
    // Settings that ask for 10^12 frames.
    let settings = dir.join("huge.json");
    let text = format!(
        r#"{{"t2v_version":"0.1.0","model":"{}","prompt":"a cat","seed":1,"steps":2,"scheduler":"ddim",
        "guidance_scale":9.0,"num_frames":1000000000000,"height":32,"width":32}}"#,
        model.display()
    );
    std::fs::write(&settings, text).unwrap();
    let before = names(&dir);
    let cases: &[(&[&str], &str)] = &[
        (&["--from", fifo.to_str().unwrap()], "is a FIFO (named pipe), not a regular file"),
        (&["--from", "/dev/zero"], "is a device, not a regular file: a settings file must be a file"),
        (&["--from", dir.to_str().unwrap()], "is a folder, not a regular file"),
        (&["--prompts", "/dev/zero"], "is a device, not a regular file: a prompts file must be a file"),
        (&["--prompts", fifo.to_str().unwrap()], "is a FIFO (named pipe), not a regular file"),
        (&["--from", settings.to_str().unwrap()], "this run needs about"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["generate"];
        args.extend_from_slice(extra);
        if !extra.contains(&"--from") {
            args.extend(["--model", model.to_str().unwrap()]);
        }
        args.extend(["-o", out.to_str().unwrap()]);
        let o = t2v_within(&args, LIMIT);
        assert_refused(&o, &format!("{extra:?}"), expected, &dir, &before);
    }
}

/// small-t2v at 64 frames of 1024×1024 needs several GiB: under a 4 GiB address-space limit the
/// run is refused before the model loads instead of aborting mid-step.
#[test]
fn a_run_larger_than_the_memory_limit_is_refused_before_loading() {
    use std::os::unix::process::CommandExt;
    let (_tmp, dir) = temp_dir();
    let model = model_dir("small-t2v");
    let out = dir.join("v.npy");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_t2v"));
    cmd.args(["generate", "a cat", "--model", model.to_str().unwrap(), "--num-frames", "64", "--height", "1024"])
        .args(["--width", "1024", "--steps", "2", "-o", out.to_str().unwrap()]);
    // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 4 << 30, rlim_max: 4 << 30 };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    assert_refused(&o, "64 frames of 1024² in 4 GiB", "this run needs about", &dir, &[]);
    assert!(stderr(&o).contains("lower the number of frames (about"), "{}", stderr(&o));
}

#[test]
fn io_errors_are_told_once() {
    let model = model_dir("tiny-t2v");
    let o = t2v_within(&["generate", "--prompts", "/nonexistent/p.txt", "--model", model.to_str().unwrap()], LIMIT);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("reading the prompts: /nonexistent/p.txt: No such file or directory"), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn outputs_that_cannot_be_written_are_refused_before_the_first_step() {
    let (_tmp, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "a cat", "--model", model.to_str().unwrap(), "--steps", "1"];
        args.extend(["--num-frames", "2", "--height", "16", "--width", "16", "-o", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        t2v_within(&args, LIMIT)
    };
    // A PNG folder holding other files, with --overwrite.
    let frames = dir.join("frames");
    std::fs::create_dir(&frames).unwrap();
    std::fs::write(frames.join("notes.txt"), b"mine").unwrap();
    // A folder where a file goes.
    let folder_mp4 = dir.join("d.npy");
    std::fs::create_dir(&folder_mp4).unwrap();
    let before = names(&dir);
    let o = run(&frames, &["--format", "png", "--overwrite"]);
    assert_refused(&o, "PNG folder with other files", "holds files other than frame_NNNN.png", &dir, &before);
    assert!(frames.join("notes.txt").exists());
    let o = run(&folder_mp4, &["--overwrite"]);
    assert_refused(&o, "a folder as the output file", "d.npy is a folder: give a file name", &dir, &before);
    // A format that contradicts the extension.
    let o = run(&dir.join("x.mp4"), &["--format", "gif"]);
    assert_refused(&o, "--format gif -o x.mp4", "x.mp4 names a .mp4 file, but --format asks for gif", &dir, &before);
    // A read-only folder (where permissions apply: not for root).
    let ro = dir.join("ro");
    std::fs::create_dir(&ro).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), b"").is_err() {
        let o = run(&ro.join("v.npy"), &[]);
        assert_refused(&o, "read-only folder", "cannot be written to", &ro, &[]);
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A folder no one can create files in, root included.
    let before = names(&dir);
    let o = run(Path::new("/proc/v.npy"), &[]);
    assert_refused(&o, "/proc", "the output folder /proc cannot be written to", &dir, &before);
}

#[test]
fn non_finite_latents_fail_naming_the_step_and_write_nothing() {
    let (_m, model) = broken_model(|root| {
        edit_tensor(root, "unet/diffusion_pytorch_model.safetensors", "conv_out.bias", |t| {
            candle_core::Tensor::full(f32::NAN, t.dims(), &candle_core::Device::Cpu).unwrap()
        })
    });
    let (_tmp, dir) = temp_dir();
    let out = dir.join("v.mp4");
    let args = ["generate", "a cat", "--model", model.to_str().unwrap(), "--steps", "2", "--num-frames", "2"];
    let mut args = args.to_vec();
    args.extend(["--height", "16", "--width", "16", "-q", "-o", out.to_str().unwrap()]);
    let o = t2v_within(&args, LIMIT);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the latents stopped being finite (NaN or infinity) at denoising step 1 of 2"),
        "{}",
        stderr(&o)
    );
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));
}

/// Runs killed by SIGTERM or SIGKILL at delays spread over a run's whole lifetime leave either
/// the old file or the complete new one, and the next run removes their temporaries.
/// A short run of the tiny model that replaces `out` (and its settings) with `--overwrite`.
fn overwriting_run(model: &Path, out: &Path) -> Vec<String> {
    ["generate", "a cat", "--model", model.to_str().unwrap(), "--steps", "1", "--num-frames", "4"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--height", "32", "--width", "32", "--seed", "3", "-q", "--overwrite", "-o"].map(String::from))
        .chain([out.to_str().unwrap().to_string()])
        .collect()
}

#[test]
fn runs_killed_while_writing_leave_the_old_or_the_new_file() {
    let (_tmp, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let out = dir.join("v.mp4");
    let args = |out: &Path| overwriting_run(&model, out);
    // The complete new file, and how long a run takes.
    let reference = dir.join("reference.mp4");
    let started = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_t2v")).args(args(&reference)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lifetime = started.elapsed();
    let new = std::fs::read(&reference).unwrap();
    let new_settings = std::fs::read(dir.join("reference.mp4.json")).unwrap();
    let old = b"the old video".to_vec();
    let old_settings = b"the old settings".to_vec();
    let points = 24;
    let mut outcomes = [0usize; 2];
    for i in 0..points {
        for signal in [libc::SIGTERM, libc::SIGKILL] {
            std::fs::write(&out, &old).unwrap();
            std::fs::write(dir.join("v.mp4.json"), &old_settings).unwrap();
            let mut child =
                Command::new(env!("CARGO_BIN_EXE_t2v")).args(args(&out)).stderr(Stdio::null()).spawn().unwrap();
            // From the middle of a run (loading and denoising come first) to twice its length, in
            // steps of a few milliseconds: some land while the output is written and published, and
            // the last ones after it even when this machine runs slower than for the timed run
            // (up to 1.2× its length had left 1 of 48 runs past publishing, or none).
            std::thread::sleep(lifetime.mul_f64(0.5 + 1.5 * i as f64 / points as f64));
            // SAFETY: kill(2) on the child's pid, which has not been reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            if signal == libc::SIGTERM {
                // A second signal quits at once, as a second Ctrl-C.
                std::thread::sleep(Duration::from_millis(i as u64 % 4));
                unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            }
            child.wait().unwrap();
            let now = std::fs::read(&out).unwrap();
            assert!(now == old || now == new, "point {i}, signal {signal}: {} bytes, neither old nor new", now.len());
            outcomes[(now == new) as usize] += 1;
            // The settings beside the video are its own, or (killed between the renames) none.
            match std::fs::read(dir.join("v.mp4.json")) {
                Ok(settings) => {
                    let own = if now == new { &new_settings } else { &old_settings };
                    assert!(&settings == own, "point {i}, signal {signal}: the settings are not the video's own");
                }
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "point {i}"),
            }
        }
    }
    eprintln!("killed runs that left the old file, the new one: {outcomes:?} (a run takes {lifetime:?})");
    assert!(outcomes[0] > 0, "no kill landed before the publishing: {outcomes:?}");
    assert!(outcomes[1] > 0, "no run published before its kill: {outcomes:?}");
    // The next run removes what the killed runs left, and leaves a complete file.
    let o = Command::new(env!("CARGO_BIN_EXE_t2v")).args(args(&out)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), new);
    let left: Vec<String> = names(&dir).into_iter().filter(|n| n.starts_with('.')).collect();
    assert!(left.is_empty(), "stale temporaries after the next run: {left:?}");
}

/// A run that dies between publishing the video and its settings (a test build's fault point,
/// an abort: no destructors run, as under SIGKILL) leaves the new video without a settings file,
/// never beside the replaced video's settings; the next run clears the old settings' remains.
#[test]
fn a_run_dying_between_the_renames_never_pairs_the_new_video_with_old_settings() {
    let (_tmp, dir) = temp_dir();
    let model = model_dir("tiny-t2v");
    let out = dir.join("v.mp4");
    let settings = dir.join("v.mp4.json");
    let args = overwriting_run(&model, &out);
    std::fs::write(&out, b"the old video").unwrap();
    std::fs::write(&settings, b"the old settings").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_t2v"))
        .args(&args)
        .env("T2V_TEST_DIE_BETWEEN_RENAMES", "1")
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "the fault point did not stop the run");
    let video = std::fs::read(&out).unwrap();
    assert!(video.len() > 100 && &video[4..8] == b"ftyp", "the new video is in place");
    assert!(!settings.exists(), "the old settings stayed beside the new video");
    assert!(names(&dir).iter().any(|n| n.starts_with(".v.mp4.json.old-")), "{:?}", names(&dir));

    let o = Command::new(env!("CARGO_BIN_EXE_t2v")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&settings).unwrap()).unwrap();
    assert_eq!(json["seed"], 3, "{json}");
    assert_eq!(names(&dir), ["v.mp4", "v.mp4.json"], "remains of the dead run");
}
