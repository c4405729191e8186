//! Hostile inputs the library must refuse with a typed error before any work (issue 11): configs
//! no model can use, files that are not regular or too large, sizes that overflow or cannot fit in
//! memory, scales outside what the model can use, and weights that are NaN or not floating point.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{copy_dir, full_config_dir, model_dir};
use t2v::pipeline::{check_params, Control, GenerationParams, LoadOptions, TextToVideo};
use t2v::schedulers::SchedulerKind;
use t2v::sizing::{self, RunShape};
use t2v::{unet3d, vae, Error};

/// A copy of tiny-t2v to break.
fn tiny_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&model_dir("tiny-t2v"), tmp.path());
    let root = tmp.path().to_path_buf();
    (tmp, root)
}

/// Sets `key` of the JSON file `rel` under `root` to `value`.
fn set_key(root: &Path, rel: &str, key: &str, value: serde_json::Value) {
    let path = root.join(rel);
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json[key] = value;
    std::fs::write(&path, json.to_string()).unwrap();
}

fn small_params() -> GenerationParams {
    let mut p = GenerationParams::new("a cat", 1);
    p.num_inference_steps = 2;
    p.num_frames = 2;
    p.height = Some(16);
    p.width = Some(16);
    p
}

#[test]
fn configs_no_model_can_use_are_refused_naming_file_and_key() {
    use serde_json::json;
    let cases: &[(&str, &str, serde_json::Value, &str)] = &[
        ("unet/config.json", "norm_num_groups", json!(0), "`norm_num_groups` is 0"),
        ("unet/config.json", "layers_per_block", json!(0), "`layers_per_block` is 0"),
        ("unet/config.json", "sample_size", json!(1_000_000_000_000u64), "`sample_size` is 1000000000000"),
        ("unet/config.json", "block_out_channels", json!(vec![8; 70]), "`block_out_channels` has 70 levels"),
        ("unet/config.json", "norm_eps", json!(-1), "`norm_eps` is -1"),
        ("vae/config.json", "norm_num_groups", json!(0), "`norm_num_groups` is 0"),
        ("vae/config.json", "scaling_factor", json!(0), "`scaling_factor` is 0"),
        ("vae/config.json", "latent_channels", json!(0), "`latent_channels` is 0"),
        ("text_encoder/config.json", "num_attention_heads", json!(0), "`num_attention_heads` is 0"),
        ("text_encoder/config.json", "hidden_size", json!(7), "`hidden_size` 7 is not a multiple"),
        ("scheduler/scheduler_config.json", "num_train_timesteps", json!(10_000_000_000_000u64), "at most 1000000"),
        ("scheduler/scheduler_config.json", "num_train_timesteps", json!(1e13), "expected usize"),
        ("scheduler/scheduler_config.json", "beta_end", json!(2), "beta_end is 2"),
        ("scheduler/scheduler_config.json", "beta_start", json!(-0.5), "beta_start is -0.5"),
    ];
    for (rel, key, value, expected) in cases {
        let (_tmp, root) = tiny_copy();
        set_key(&root, rel, key, value.clone());
        let err = check_params(&root, &small_params()).expect_err(&format!("{rel} {key}={value} accepted"));
        let msg = err.to_string();
        assert!(msg.contains(expected), "{rel} {key}={value}: {msg}");
        assert!(msg.contains(rel.split('/').next().unwrap()), "{rel} {key}={value}: names the file: {msg}");
    }
}

#[test]
fn more_steps_than_training_timesteps_are_refused_before_work() {
    for scheduler in [SchedulerKind::DpmSolverMultistep, SchedulerKind::Ddim] {
        let mut p = small_params();
        p.scheduler = scheduler;
        p.num_inference_steps = 1001;
        let err = check_params(model_dir("tiny-t2v"), &p).unwrap_err();
        assert!(err.to_string().contains("1001 inference steps is more than the 1000 timesteps"), "{err}");
    }
    // DDIM reads alphas_cumprod at each timestep: a steps_offset past the training range is refused.
    let (_tmp, root) = tiny_copy();
    set_key(&root, "scheduler/scheduler_config.json", "steps_offset", serde_json::json!(5000));
    let mut p = small_params();
    p.scheduler = SchedulerKind::Ddim;
    let err = check_params(&root, &p).unwrap_err();
    assert!(err.to_string().contains("past the 1000 the model was trained with"), "{err}");
    // DPM-Solver with the checkpoint's leading spacing: 1000 steps repeat timestep 1 (the loop
    // would run out of sigmas at its last step); 999 start at 1000, clamped to the noise level of
    // 999 (a step of length 0: NaN at step 2); 500 run.
    let mut p = small_params();
    p.num_inference_steps = 1000;
    let err = check_params(model_dir("tiny-t2v"), &p).unwrap_err();
    assert!(err.to_string().contains("repeats its first timestep 1"), "{err}");
    p.num_inference_steps = 999;
    let err = check_params(model_dir("tiny-t2v"), &p).unwrap_err();
    assert!(err.to_string().contains("gives steps 1 and 2 the same noise level"), "{err}");
    p.num_inference_steps = 500;
    check_params(model_dir("tiny-t2v"), &p).unwrap();
}

#[test]
fn scales_outside_what_the_model_can_use_are_refused() {
    type Set = fn(&mut GenerationParams);
    let cases: &[(Set, &str)] = &[
        (|p| p.guidance_scale = 1e300, "guidance scale must be between 0 and 100"),
        (|p| p.guidance_scale = f64::NAN, "guidance scale must be between 0 and 100"),
        (|p| p.guidance_scale = -1.0, "guidance scale must be between 0 and 100"),
        (|p| p.eta = 2.0, "eta must be between 0 (deterministic) and 1"),
        (|p| p.eta = f64::INFINITY, "eta must be between 0 (deterministic) and 1"),
    ];
    for (set, expected) in cases {
        let mut p = small_params();
        set(&mut p);
        let err = check_params(model_dir("tiny-t2v"), &p).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
    }
}

#[test]
fn sizes_that_overflow_are_refused_not_wrapped() {
    let cases: &[(usize, usize, usize)] = &[
        (usize::MAX, 32, 32),
        (4, 1 << 40, 1 << 40),
        (4, usize::MAX - 7, 8),
        (usize::MAX, usize::MAX - 7, usize::MAX - 7),
    ];
    let unet: unet3d::Config = serde_json::from_str(t2v::bench::UNET_CONFIG).unwrap();
    let vae: vae::Config = serde_json::from_str(t2v::bench::VAE_CONFIG).unwrap();
    for &(frames, height, width) in cases {
        let mut p = small_params();
        (p.num_frames, p.height, p.width) = (frames, Some(height), Some(width));
        let err = check_params(model_dir("tiny-t2v"), &p).expect_err(&format!("{frames} {height} {width}"));
        assert!(matches!(err, Error::TooLarge(_)), "{frames}×{height}×{width}: {err:?}");
        assert!(err.to_string().contains("lower the number of frames or the frame size"), "{err}");
        assert!(sizing::run_shape(&unet, &vae, &p).is_err());
    }
}

/// The estimate is an upper bound within 2× of what `t2v bench` measures for the published 1.7B
/// model (fp16 weights kept narrow, float32 compute, 256×256): 3.8 GiB peak at 4 frames, 4.4 GiB at 16.
#[test]
fn memory_estimate_bounds_the_measured_peak() {
    let unet: unet3d::Config = serde_json::from_str(t2v::bench::UNET_CONFIG).unwrap();
    let vae: vae::Config = serde_json::from_str(t2v::bench::VAE_CONFIG).unwrap();
    // The published fp16 safetensors: text encoder 681 MB, UNet 2823 MB, VAE 167 MB.
    let weights = (681 + 2823 + 167) * 1_000_000u64;
    for (frames, measured_gib) in [(4, 3.8), (16, 4.4)] {
        let mut p = GenerationParams::new("", 0);
        p.num_frames = frames;
        let shape = sizing::run_shape(&unet, &vae, &p).unwrap();
        assert_eq!((shape.height, shape.width, shape.batch), (256, 256, 2));
        let estimate = sizing::estimate(&unet, &vae, &shape, DType::F32, weights).unwrap();
        let ratio = estimate.total() as f64 / (measured_gib * (1u64 << 30) as f64);
        assert!((1.0..2.0).contains(&ratio), "{frames} frames: estimate {estimate:?}, {ratio:.2}× the measured peak");
        // It fits a 24 GiB machine with room to spare, and is refused in 2 GiB, naming what to lower.
        sizing::check_fits(&estimate, &shape, Some(24 << 30), false).unwrap();
        let err = sizing::check_fits(&estimate, &shape, Some(2 << 30), false).unwrap_err();
        assert!(err.to_string().contains("the weights alone do not fit"), "{err}");
    }
    let mut p = GenerationParams::new("", 0);
    p.num_frames = 300;
    (p.height, p.width) = (Some(2048), Some(2048));
    let shape = sizing::run_shape(&unet, &vae, &p).unwrap();
    let estimate = sizing::estimate(&unet, &vae, &shape, DType::F32, weights).unwrap();
    let err = sizing::check_fits(&estimate, &shape, Some(8 << 30), false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InsufficientMemory { .. }));
    assert!(msg.contains("this run needs about") && msg.contains("only 8.0 GiB is available"), "{msg}");
    assert!(msg.contains("lower the frame size"), "{msg}");
    // 16 frames of 512×512 in 5 GiB: fewer frames fit, and the message says about how many.
    let mut p = GenerationParams::new("", 0);
    (p.num_frames, p.height, p.width) = (64, Some(512), Some(512));
    let shape = sizing::run_shape(&unet, &vae, &p).unwrap();
    let estimate = sizing::estimate(&unet, &vae, &shape, DType::F32, weights).unwrap();
    let err = sizing::check_fits(&estimate, &shape, Some(6 << 30), false).unwrap_err();
    assert!(err.to_string().contains("lower the number of frames (about"), "{err}");
}

#[test]
fn a_run_that_cannot_fit_is_refused_before_loading() {
    // 100000×100000 pixels, or 99999999999 frames: representable, but terabytes of activations.
    let mut p = small_params();
    p.num_frames = 99_999_999_999;
    let err = t2v::pipeline::plan_run(model_dir("tiny-t2v"), &p, &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("lower the number of frames (about"), "{err}");
    let mut p = small_params();
    (p.height, p.width) = (Some(100_000), Some(100_000));
    let err = t2v::pipeline::plan_run(model_dir("tiny-t2v"), &p, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::InsufficientMemory { .. }), "{err:?}");
    let shape = RunShape {
        frames: 2,
        height: 100_000,
        width: 100_000,
        latent_channels: 4,
        latent_height: 50_000,
        latent_width: 50_000,
        batch: 2,
    };
    assert_eq!(shape.latent_dims(), [1, 4, 2, 50_000, 50_000]);
    // The loaded pipeline refuses it too (its activations alone), before the first step.
    let pipe = TextToVideo::load(model_dir("tiny-t2v"), &LoadOptions::default()).unwrap();
    let mut steps = 0;
    let err = pipe
        .generate(&p, &mut |_| {
            steps += 1;
            Control::Continue
        })
        .unwrap_err();
    assert!(matches!(err, Error::InsufficientMemory { .. }), "{err:?}");
    assert_eq!(steps, 0);
}

#[cfg(unix)]
#[test]
fn only_regular_files_of_bounded_size_are_read() {
    use t2v::files::{read_bounded, FileKind};
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    for (path, found) in [(fifo.as_path(), "a FIFO"), (Path::new("/dev/zero"), "a device"), (tmp.path(), "a folder")] {
        let err = read_bounded(path, FileKind::Config).unwrap_err();
        assert!(matches!(err, Error::NotAFile { .. }), "{err:?}");
        assert!(err.to_string().contains(found), "{err}");
    }
    let big = tmp.path().join("big.json");
    std::fs::write(&big, vec![b' '; (4 << 20) + 1]).unwrap();
    let err = read_bounded(&big, FileKind::Config).unwrap_err();
    assert!(err.to_string().contains("more than the 4194304 bytes a config can be"), "{err}");
    assert_eq!(read_bounded(&big, FileKind::Tokenizer).unwrap().len(), (4 << 20) + 1);

    // In a model folder: a FIFO as a config or a weights file, /dev/zero as a config, a folder
    // as weights; each fails at once, naming the path.
    let setups: &[(&str, &str)] = &[
        ("unet/config.json", "fifo"),
        ("unet/config.json", "zero"),
        ("scheduler/scheduler_config.json", "zero"),
        ("tokenizer/vocab.json", "zero"),
        ("unet/diffusion_pytorch_model.safetensors", "fifo"),
        ("unet/diffusion_pytorch_model.safetensors", "dir"),
    ];
    for (rel, kind) in setups {
        let (_tmp, root) = tiny_copy();
        let path = root.join(rel);
        std::fs::remove_file(&path).unwrap();
        match *kind {
            "fifo" => assert!(std::process::Command::new("mkfifo").arg(&path).status().unwrap().success()),
            "zero" => std::os::unix::fs::symlink("/dev/zero", &path).unwrap(),
            _ => std::fs::create_dir(&path).unwrap(),
        }
        let err = match TextToVideo::load(&root, &LoadOptions::default()) {
            Ok(_) => panic!("{rel} as {kind} loaded"),
            Err(e) => e,
        };
        assert!(matches!(err, Error::NotAFile { .. }), "{rel} as {kind}: {err:?}");
        assert!(err.to_string().contains(rel), "{err}");
    }
}

/// Rewrites the weights of `component` with `edit` applied to its tensors.
fn edit_weights(root: &Path, component: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = root.join(component).join(match component {
        "text_encoder" => "model.safetensors",
        _ => "diffusion_pytorch_model.safetensors",
    });
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn nan_weights_fail_at_the_step_that_turns_the_latents_non_finite() {
    let (_tmp, root) = tiny_copy();
    edit_weights(&root, "unet", |t| {
        let bias = t.get_mut("conv_out.bias").unwrap();
        *bias = Tensor::full(f32::NAN, bias.dims(), &Device::Cpu).unwrap();
    });
    let pipe = TextToVideo::load(&root, &LoadOptions::default()).unwrap();
    let mut steps = 0;
    let err = pipe
        .generate(&small_params(), &mut |_| {
            steps += 1;
            Control::Continue
        })
        .unwrap_err();
    assert!(matches!(err, Error::NonFiniteLatents { step: 1, total: 2 }), "{err:?}");
    assert!(err.to_string().contains("at denoising step 1 of 2"), "{err}");
    assert_eq!(steps, 0, "the step callback never sees non-finite latents");

    let (_tmp, root) = tiny_copy();
    edit_weights(&root, "vae", |t| {
        let bias = t.get_mut("decoder.conv_out.bias").unwrap();
        *bias = Tensor::full(f32::INFINITY, bias.dims(), &Device::Cpu).unwrap();
    });
    let pipe = TextToVideo::load(&root, &LoadOptions::default()).unwrap();
    let err = pipe.generate(&small_params(), &mut |_| Control::Continue).unwrap_err();
    assert!(matches!(err, Error::NonFiniteFrames), "{err:?}");
}

#[test]
fn integer_weights_are_refused_when_loading() {
    let (_tmp, root) = tiny_copy();
    edit_weights(&root, "unet", |t| {
        let w = t.get_mut("conv_in.weight").unwrap();
        *w = w.to_dtype(DType::I64).unwrap();
    });
    let err = match TextToVideo::load(&root, &LoadOptions::default()) {
        Ok(_) => panic!("integer weights loaded"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err:?}");
    assert!(err.to_string().contains("tensor `conv_in.weight` holds I64 values"), "{err}");
}

#[test]
fn a_full_size_config_is_not_refused_at_its_defaults() {
    // The published 1.7B configs pass validation and their default run is representable.
    let root = full_config_dir();
    let unet: unet3d::Config =
        serde_json::from_str(&std::fs::read_to_string(root.join("unet/config.json")).unwrap()).unwrap();
    let vae: vae::Config =
        serde_json::from_str(&std::fs::read_to_string(root.join("vae/config.json")).unwrap()).unwrap();
    unet.validate().unwrap();
    vae.validate().unwrap();
    let shape = sizing::run_shape(&unet, &vae, &GenerationParams::new("", 0)).unwrap();
    assert_eq!(shape.latent_dims(), [1, 4, 16, 32, 32]);
}
