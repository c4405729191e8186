//! Video-to-video against the reference `VideoToVideoSDPipeline` (`fixtures/*/v2v/`): the VAE
//! encoder, the strength → timesteps rule, the starting latents and the frames of each run; and
//! the reading of input videos (MP4/H.264, GIF, PNG/JPEG folders, .npy), including bad ones.
//!
//! One file: each file under tests/ is a binary of its own to link; video-to-video's model and input
//! tests share one.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use common::*;
use t2v::checkpoint::{ModelFolder, WeightsVariant};
use t2v::noise::TorchGenerator;
use t2v::pipeline::{Control, GenerationParams, LoadOptions, TextToVideo};
use t2v::schedulers::{build_scheduler, load_scheduler_config, strength_begin_index, SchedulerKind};
use t2v::vae::{self, VaeEncoder};
use t2v::video::input::{read_video, Fit, FrameData, InputVideo, ReadOptions, ResizeFilter, DEFAULT_MAX_FRAMES};
use t2v::video::{write_video, EncodeOptions, Frames, VideoFormat};

fn v2v_dir(model: &str) -> PathBuf {
    model_dir(model).join("v2v")
}

fn v2v_reference(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(v2v_dir(model).join("v2v_reference.safetensors"), &Device::Cpu).unwrap()
}

fn v2v_json(model: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(v2v_dir(model).join("v2v_reference.json")).unwrap()).unwrap()
}

fn params_of(run: &serde_json::Value) -> GenerationParams {
    let mut p = GenerationParams::new(run["prompt"].as_str().unwrap(), run["seed"].as_u64().unwrap());
    p.negative_prompt = run.get("negative_prompt").and_then(|v| v.as_str()).map(String::from);
    p.num_inference_steps = run["steps"].as_u64().unwrap() as usize;
    p.guidance_scale = run["guidance_scale"].as_f64().unwrap();
    p.scheduler = SchedulerKind::from_str(run["scheduler"].as_str().unwrap()).unwrap();
    p.eta = run.get("eta").and_then(|v| v.as_f64()).unwrap_or(0.0);
    p.num_frames = run["num_frames"].as_u64().unwrap() as usize;
    p.height = Some(run["height"].as_u64().unwrap() as usize);
    p.width = Some(run["width"].as_u64().unwrap() as usize);
    p
}

fn u8_tensor(video: &InputVideo) -> Tensor {
    Tensor::from_vec(video.to_rgb8(), (video.frames, video.height, video.width, 3), &Device::Cpu).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The model side

fn check_encoder(model: &str) {
    let folder = ModelFolder::open(model_dir(model)).unwrap();
    let cfg: vae::Config = folder.config("vae", "config.json").unwrap();
    let refs = v2v_reference(model);
    for keep_narrow in [true, false] {
        let weights = folder.weights_with("vae", WeightsVariant::Auto, DType::F32, &Device::Cpu, keep_narrow).unwrap();
        let encoder = weights.build(|vb| VaeEncoder::new(vb, &cfg)).unwrap();
        let posterior = encoder.encode(&refs["vae.encoder.input"]).unwrap();
        let mean_err = rel_err(&posterior.mean, &refs["vae.encoder.mean"]);
        let logvar_err = rel_err(&posterior.logvar, &refs["vae.encoder.logvar"]);
        println!("{model} vae encoder (narrow weights {keep_narrow}): mean rel err {mean_err:.2e}, logvar rel err {logvar_err:.2e}");
        assert!(mean_err < MODULE_TOL && logvar_err < MODULE_TOL, "{model}: encoder {mean_err:.2e} / {logvar_err:.2e}");
    }
}

#[test]
fn tiny_encoder_matches_reference() {
    check_encoder("tiny-t2v");
}

#[test]
fn small_encoder_matches_reference() {
    check_encoder("small-t2v");
}

/// The encoder's ResNet blocks and padded down-samplings in bands of rows (at full size only
/// 1024×576's first levels are): bands of 1 to 11 output rows, the reference's posterior still.
#[test]
fn encoder_in_bands_matches_reference() {
    for band_bytes in [0, 40 << 10, 100 << 10] {
        t2v::nn::with_bands(0, band_bytes, || check_encoder("small-t2v"));
    }
    t2v::nn::with_bands(0, 0, || check_encoder("tiny-t2v"));
}

#[test]
fn strength_timesteps_match_reference() {
    for model in ["tiny-t2v", "small-t2v"] {
        let refs = v2v_reference(model);
        let config_path = model_dir(model).join("scheduler/scheduler_config.json");
        let config = load_scheduler_config(&config_path).unwrap();
        let cases = v2v_json(model)["strength_timesteps"].as_array().unwrap().clone();
        assert!(cases.len() >= 40, "{model}: the grid has {} cases", cases.len());
        for case in &cases {
            let kind = SchedulerKind::from_str(case["scheduler"].as_str().unwrap()).unwrap();
            let n = case["steps"].as_u64().unwrap() as usize;
            let strength = case["strength"].as_f64().unwrap();
            let count = case["count"].as_u64().unwrap() as usize;
            let key = case["key"].as_str().unwrap();
            match strength_begin_index(n, strength) {
                Err(e) => {
                    assert_eq!(count, 0, "{model} {key}: refused but {count} steps run: {e}");
                    assert!(!refs.contains_key(key));
                    let msg = e.to_string();
                    assert!(msg.contains("smallest strength that runs one"), "{msg}");
                }
                Ok(begin) => {
                    let scheduler = build_scheduler(kind, &config, &config_path, n, 0.0).unwrap();
                    let ours: Vec<i64> = scheduler.timesteps()[begin..].iter().map(|&t| t as i64).collect();
                    let expected = refs[key].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap();
                    assert_eq!(ours.len(), count, "{model} {key}");
                    assert_eq!(ours, expected, "{model} {key}");
                }
            }
        }
        println!("{model}: {} strength/step cases exact", cases.len());
    }
}

#[test]
fn strengths_that_run_no_step_are_refused_with_the_smallest_that_does() {
    let err = strength_begin_index(10, 0.05).unwrap_err().to_string();
    assert!(err.contains("smallest strength that runs one is 0.1"), "{err}");
    assert!(err.contains("at least 20 steps"), "{err}");
    let err = strength_begin_index(100, 0.0).unwrap_err().to_string();
    assert!(err.contains("is 0.01"), "{err}");
    // int(3 × (1/3)) is 1: a third runs one of three steps.
    assert_eq!(strength_begin_index(3, 1.0 / 3.0).unwrap(), 2);
    assert_eq!(strength_begin_index(100, 0.29).unwrap(), 72);
    for bad in [-0.1, 1.5, f64::NAN] {
        let err = strength_begin_index(10, bad).unwrap_err().to_string();
        assert!(err.contains("between 0 and 1"), "{err}");
    }
}

fn check_runs(model: &str) {
    let pipe = TextToVideo::load(model_dir(model), &LoadOptions::default()).unwrap();
    let refs = v2v_reference(model);
    let config_path = model_dir(model).join("scheduler/scheduler_config.json");
    let config = load_scheduler_config(&config_path).unwrap();
    for (i, run) in v2v_json(model)["runs"].as_array().unwrap().iter().enumerate() {
        let params = params_of(run);
        let strength = run["strength"].as_f64().unwrap();
        let input =
            read_video(model_dir(model).join(run["input_png"].as_str().unwrap()), &ReadOptions::default()).unwrap();
        assert!(input.warnings.is_empty(), "{:?}", input.warnings);
        assert_eq!(max_abs_diff(&u8_tensor(&input), &refs[&format!("v2v.{i}.input")]), 0.0, "{model} run {i}: input");
        let video = input.to_model_input(&Device::Cpu, DType::F32).unwrap();

        // The starting latents, as the pipeline computes them.
        let begin = pipe.validate_video_to_video(&params, video.dims(), strength).unwrap();
        let mut scheduler =
            build_scheduler(params.scheduler, &config, &config_path, params.num_inference_steps, params.eta).unwrap();
        scheduler.set_begin_index(begin);
        let start_t = scheduler.timesteps()[begin];
        assert_eq!(start_t as u64, run["start_timestep"].as_u64().unwrap(), "{model} run {i}: start timestep");
        let mut generator = TorchGenerator::new(params.seed);
        let start = pipe.video_latents(&video, scheduler.as_ref(), start_t, &mut generator).unwrap();
        let latents_err = rel_err(&start.image_latents, &refs[&format!("v2v.{i}.image_latents")]);
        let noise_err = max_abs_diff(&start.noise, &refs[&format!("v2v.{i}.noise")]);
        let noisy_err = rel_err(&start.noisy_latents, &refs[&format!("v2v.{i}.noisy_latents")]);
        println!(
            "{model} run {i}: image latents rel err {latents_err:.2e}, noise max abs err {noise_err:.2e}, noisy latents rel err {noisy_err:.2e}"
        );
        assert!(latents_err < MODULE_TOL, "{model} run {i}: image latents {latents_err:.2e}");
        assert!(noise_err <= 1e-6, "{model} run {i}: noise {noise_err:.2e}");
        assert!(noisy_err < MODULE_TOL, "{model} run {i}: noisy latents {noisy_err:.2e}");

        let mut steps = Vec::new();
        let out = pipe
            .video_to_video(&params, &video, strength, &mut |p| {
                steps.push((p.step, p.total_steps, p.timestep));
                Control::Continue
            })
            .unwrap();
        let expected_steps = params.num_inference_steps - begin;
        assert_eq!(steps.len(), expected_steps, "{model} run {i}: steps");
        assert_eq!(steps[0], (1, expected_steps, start_t));
        let err = max_abs_diff(&out.frames, &refs[&format!("v2v.{i}.frames")]);
        println!("{model} run {i} ({}, strength {strength}): frames max abs err {err:.2e}", run["scheduler"]);
        assert!(err <= 1e-3, "{model} run {i}: frames differ by {err:.2e}");
        // The output is not the input: the runs change the clip.
        let input01 = (refs[&format!("v2v.{i}.input")].to_dtype(DType::F32).unwrap() / 255.0).unwrap();
        assert!(max_abs_diff(&out.frames, &input01) > 0.05, "{model} run {i}: the frames are the input");
    }
}

#[test]
fn tiny_runs_match_reference() {
    check_runs("tiny-t2v");
}

#[test]
fn small_runs_match_reference() {
    check_runs("small-t2v");
}

#[test]
fn bad_requests_are_refused_before_any_work() {
    let pipe = TextToVideo::load(model_dir("tiny-t2v"), &LoadOptions::default()).unwrap();
    let video = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let mut params = GenerationParams::new("a cat", 1);
    params.num_inference_steps = 10;
    let mut ran = false;
    let err = pipe.video_to_video(&params, &video, 0.05, &mut |_| {
        ran = true;
        Control::Continue
    });
    let err = err.unwrap_err().to_string();
    assert!(err.contains("smallest strength that runs one is 0.1"), "{err}");
    assert!(!ran);
    // A video of another size than asked.
    params.height = Some(64);
    let err = pipe.validate_video_to_video(&params, video.dims(), 0.5).unwrap_err().to_string();
    assert!(err.contains("height is 32 but a height of 64 is asked"), "{err}");
    params.height = None;
    // Sides that the VAE cannot halve.
    let odd = Tensor::zeros((2, 3, 30, 32), DType::F32, &Device::Cpu).unwrap();
    let tiny_scale = pipe.vae().config().scale_factor();
    if tiny_scale > 1 {
        assert!(pipe.validate_video_to_video(&params, odd.dims(), 0.5).is_err());
    }
    let err = pipe.validate_video_to_video(&params, &[2, 4, 32, 32], 0.5).unwrap_err().to_string();
    assert!(err.contains("3 channels"), "{err}");
    // Cancelling stops after the step.
    let mut seen = 0;
    let result = pipe.video_to_video(&params, &video, 0.5, &mut |p| {
        seen = p.step;
        if p.step == 2 {
            Control::Cancel
        } else {
            Control::Continue
        }
    });
    assert!(matches!(result, Err(t2v::Error::Cancelled)), "{result:?}");
    assert_eq!(seen, 2);
}

#[test]
fn small_odd_sides_are_refused_with_a_size_to_use() {
    let pipe = TextToVideo::load(model_dir("small-t2v"), &LoadOptions::default()).unwrap();
    let params = GenerationParams::new("a cat", 1);
    let err = pipe.validate_video_to_video(&params, &[2, 3, 60, 64], 0.5).unwrap_err().to_string();
    assert!(err.contains("multiple of 8") && err.contains("try 56"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Reading videos

/// BT.601 luma PSNR (dB) of two 8-bit RGB buffers of the same layout.
fn luma_psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let luma = |p: &[u8]| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64;
    let (mut sum, mut n) = (0.0, 0usize);
    for (p, q) in a.chunks_exact(3).zip(b.chunks_exact(3)) {
        let d = luma(p) - luma(q);
        sum += d * d;
        n += 1;
    }
    10.0 * (255.0f64 * 255.0 / (sum / n as f64).max(1e-12)).log10()
}

/// ffmpeg's own decode of `mp4` to RGB (frames · H · W · 3 bytes), if a system ffmpeg is present.
fn ffmpeg_decode(mp4: &Path) -> Option<Vec<u8>> {
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(mp4)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// Our decoder's luma PSNR against the lossless PNGs may be at most this far below ffmpeg's.
const PSNR_MARGIN_DB: f64 = 0.5;
/// Without a system ffmpeg: ffmpeg reaches about 42 dB on these clips (CRF 12); ours must
/// reach at least this.
const PSNR_FLOOR_DB: f64 = 41.5;

#[test]
fn mp4_inputs_decode_like_ffmpeg() {
    let mut ffmpeg_seen = false;
    for model in ["tiny-t2v", "small-t2v"] {
        for (i, run) in v2v_json(model)["runs"].as_array().unwrap().iter().enumerate() {
            let png =
                read_video(model_dir(model).join(run["input_png"].as_str().unwrap()), &ReadOptions::default()).unwrap();
            let mp4_path = model_dir(model).join(run["input_mp4"].as_str().unwrap());
            let mp4 = read_video(&mp4_path, &ReadOptions::default()).unwrap();
            assert_eq!((mp4.frames, mp4.height, mp4.width), (png.frames, png.height, png.width), "{model} run {i}");
            assert!(mp4.warnings.is_empty(), "{:?}", mp4.warnings);
            let (ours, reference) = (mp4.to_rgb8(), png.to_rgb8());
            let psnr = luma_psnr(&ours, &reference);
            // Display order: each frame is closest to the PNG of the same number.
            let frame = png.height * png.width * 3;
            for f in 0..png.frames {
                let own = luma_psnr(&ours[f * frame..(f + 1) * frame], &reference[f * frame..(f + 1) * frame]);
                for g in (0..png.frames).filter(|&g| g != f) {
                    let other = luma_psnr(&ours[f * frame..(f + 1) * frame], &reference[g * frame..(g + 1) * frame]);
                    assert!(
                        own > other,
                        "{model} run {i}: frame {f} looks more like PNG {g} ({other:.1} dB) than its own ({own:.1} dB)"
                    );
                }
            }
            match ffmpeg_decode(&mp4_path) {
                Some(theirs) if theirs.len() == reference.len() => {
                    ffmpeg_seen = true;
                    let ffmpeg_psnr = luma_psnr(&theirs, &reference);
                    println!("{model} input.{i}.mp4: luma PSNR {psnr:.2} dB (ffmpeg {ffmpeg_psnr:.2} dB)");
                    assert!(
                        psnr >= ffmpeg_psnr - PSNR_MARGIN_DB,
                        "{model} run {i}: {psnr:.2} dB vs ffmpeg's {ffmpeg_psnr:.2} dB"
                    );
                }
                _ => {
                    println!("{model} input.{i}.mp4: luma PSNR {psnr:.2} dB (floor {PSNR_FLOOR_DB} dB)");
                    assert!(psnr >= PSNR_FLOOR_DB, "{model} run {i}: {psnr:.2} dB");
                }
            }
        }
    }
    if !ffmpeg_seen {
        t2v_testkit::skip(format!(
            "the comparison with ffmpeg's decoder: no system ffmpeg; compared against the {PSNR_FLOOR_DB} dB floor instead"
        ));
    }
}

/// The offset of the 3×3 matrix in the (first) `tkhd` box of an MP4.
fn tkhd_matrix_offset(bytes: &[u8]) -> usize {
    let at = bytes.windows(4).position(|w| w == b"tkhd").expect("a tkhd box");
    let version = bytes[at + 4];
    // version/flags, then times, track id, reserved, duration, reserved, layer, group, volume, reserved
    let times = if version == 1 { 8 + 8 + 4 + 4 + 8 } else { 4 + 4 + 4 + 4 + 4 };
    at + 4 + 4 + times + 8 + 2 + 2 + 2 + 2
}

fn with_matrix(src: &Path, dst: &Path, [a, b, c, d]: [i32; 4]) {
    let mut bytes = std::fs::read(src).unwrap();
    let at = tkhd_matrix_offset(&bytes);
    for (k, v) in [(0, a), (1, b), (3, c), (4, d)] {
        bytes[at + 4 * k..at + 4 * k + 4].copy_from_slice(&v.to_be_bytes());
    }
    std::fs::write(dst, bytes).unwrap();
}

/// Rotates packed RGB clockwise by quarter turns, the plain way.
fn rotate_cw(rgb: &[u8], w: usize, h: usize, turns: usize) -> (Vec<u8>, usize, usize) {
    let (mut img, mut w, mut h) = (rgb.to_vec(), w, h);
    for _ in 0..turns {
        let mut out = vec![0u8; img.len()];
        // (x, y) → (h − 1 − y, x) in an h-wide image
        for y in 0..h {
            for x in 0..w {
                let (nx, ny) = (h - 1 - y, x);
                out[(ny * h + nx) * 3..(ny * h + nx) * 3 + 3]
                    .copy_from_slice(&img[(y * w + x) * 3..(y * w + x) * 3 + 3]);
            }
        }
        img = out;
        std::mem::swap(&mut w, &mut h);
    }
    (img, w, h)
}

#[test]
fn rotated_mp4s_are_turned_upright() {
    let dir = tempfile::TempDir::new().unwrap();
    let src = v2v_dir("small-t2v").join("input.1.mp4");
    let plain = read_video(&src, &ReadOptions::default()).unwrap();
    let one = 1 << 16;
    // A non-square clip shows the turn in its size: crop the decode to check the pixels.
    for (matrix, turns) in [([0, one, -one, 0], 1), ([-one, 0, 0, -one], 2), ([0, -one, one, 0], 3)] {
        let path = dir.path().join(format!("rot{turns}.mp4"));
        with_matrix(&src, &path, matrix);
        let turned = read_video(&path, &ReadOptions::default()).unwrap();
        let frame = plain.width * plain.height * 3;
        let (expected, w, h) = rotate_cw(&plain.to_rgb8()[..frame], plain.width, plain.height, turns);
        assert_eq!((turned.width, turned.height), (w, h));
        assert_eq!(&turned.to_rgb8()[..frame], &expected[..], "{} degrees", 90 * turns);
        assert!(turned.warnings.iter().any(|w| w.contains(&format!("{}°", 90 * turns))), "{:?}", turned.warnings);
    }
    let mirrored = dir.path().join("mirror.mp4");
    with_matrix(&src, &mirrored, [-one, 0, 0, one]);
    let err = read_video(&mirrored, &ReadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("not a rotation") && err.contains("re-encode"), "{err}");
}

/// The MP4 with its one `stts` run of equal durations split into two runs, the second twice as
/// long: a variable frame rate. The boxes above `stts` grow by 8 bytes and the chunk offsets of
/// the media data after them move by as much.
fn with_variable_frame_rate(src: &[u8]) -> Vec<u8> {
    let be = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let tag = |b: &[u8], name: &[u8]| b.windows(4).position(|w| w == name).unwrap();
    let stts = tag(src, b"stts");
    assert_eq!(be(src, stts + 8), 1, "one stts run");
    let (count, delta) = (be(src, stts + 12), be(src, stts + 16));
    let mut out = src[..stts - 4].to_vec();
    out.extend_from_slice(&32u32.to_be_bytes());
    out.extend_from_slice(b"stts\0\0\0\0");
    out.extend_from_slice(&2u32.to_be_bytes());
    for (n, d) in [(count / 2, delta), (count - count / 2, 2 * delta)] {
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(&src[stts + 20..]);
    for name in [&b"moov"[..], b"trak", b"mdia", b"minf", b"stbl"] {
        let at = tag(&out, name) - 4;
        let size = be(&out, at) + 8;
        out[at..at + 4].copy_from_slice(&size.to_be_bytes());
    }
    // The media duration grows by the longer run.
    let mdhd = tag(&out, b"mdhd");
    assert_eq!(out[mdhd + 4], 0, "mdhd version 0");
    let duration = be(&out, mdhd + 20) + (count - count / 2) * delta;
    out[mdhd + 20..mdhd + 24].copy_from_slice(&duration.to_be_bytes());
    let stco = tag(&out, b"stco");
    assert!(tag(&out, b"moov") < tag(&out, b"mdat"));
    for k in 0..be(&out, stco + 8) as usize {
        let at = stco + 12 + 4 * k;
        let offset = be(&out, at) + 8;
        out[at..at + 4].copy_from_slice(&offset.to_be_bytes());
    }
    out
}

#[test]
fn variable_frame_rates_are_read_with_a_note() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("vfr.mp4");
    std::fs::write(&path, with_variable_frame_rate(&std::fs::read(v2v_dir("small-t2v").join("input.0.mp4")).unwrap()))
        .unwrap();
    let v = read_video(&path, &ReadOptions::default()).unwrap();
    assert_eq!(v.frames, 6);
    let note = v.warnings.join(" ");
    assert!(note.contains("variable frame rate") && note.contains("by their number"), "{note}");
}

#[test]
fn inconsistent_sample_tables_give_an_error_not_a_panic() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut bytes = std::fs::read(v2v_dir("small-t2v").join("input.0.mp4")).unwrap();
    // An stsc table with no entries: the demuxer indexes past its end.
    let stsc = bytes.windows(4).position(|w| w == b"stsc").unwrap();
    bytes[stsc + 8..stsc + 12].copy_from_slice(&0u32.to_be_bytes());
    let path = dir.path().join("bad_stsc.mp4");
    std::fs::write(&path, bytes).unwrap();
    let err = read_video(&path, &ReadOptions::default()).unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("corrupt") && err.contains("export it again"), "{err}");
}

#[test]
fn odd_sizes_are_read_and_can_be_resized() {
    let dir = tempfile::TempDir::new().unwrap();
    let (f, w, h) = (3, 33, 31);
    let data = synthetic(f, w, h);
    let frames = Frames::new(&data, f, h, w).unwrap();
    let folder = dir.path().join("odd");
    write_video(&frames, VideoFormat::PngFrames, &folder, &EncodeOptions::default()).unwrap();
    let v = read_video(&folder, &ReadOptions::default()).unwrap();
    assert_eq!((v.width, v.height), (33, 31));
    let v = read_video(&folder, &ReadOptions { size: Some((32, 32)), ..ReadOptions::default() }).unwrap();
    assert_eq!((v.width, v.height, v.frames), (32, 32, 3));
    // H.264 holds 4:2:0 pictures of even sides: the MP4 writer pads by one row and column.
    let mp4 = dir.path().join("odd.mp4");
    write_video(&frames, VideoFormat::Mp4, &mp4, &EncodeOptions::default()).unwrap();
    let v = read_video(&mp4, &ReadOptions::default()).unwrap();
    assert_eq!((v.width, v.height, v.frames), (34, 32, 3));
    let rgb = v.to_rgb8();
    let own: Vec<u8> =
        (0..f * h).flat_map(|r| rgb[r / h * 32 * 34 * 3 + (r % h) * 34 * 3..][..w * 3].to_vec()).collect();
    let psnr = luma_psnr(&own, &frames_rgb8(&frames));
    assert!(psnr > 35.0, "{psnr:.1} dB");
}

fn frames_rgb8(frames: &Frames) -> Vec<u8> {
    (0..frames.frames).flat_map(|i| frames.frame_rgb8(i)).collect()
}

#[test]
fn frames_are_chosen_by_start_step_and_count() {
    let folder = v2v_dir("small-t2v").join("input.0");
    let all = read_video(&folder, &ReadOptions::default()).unwrap();
    let frame = all.width * all.height * 3;
    let all_rgb = all.to_rgb8();
    let pick = |start: usize, every: usize, n: Option<usize>| {
        read_video(&folder, &ReadOptions { start_frame: start, every, num_frames: n, ..ReadOptions::default() })
            .map_err(|e| e.to_string())
    };
    let v = pick(1, 2, None).unwrap();
    assert_eq!(v.frames, (all.frames - 1).div_ceil(2));
    for (k, src) in (1..all.frames).step_by(2).enumerate() {
        assert_eq!(&v.to_rgb8()[k * frame..(k + 1) * frame], &all_rgb[src * frame..(src + 1) * frame]);
    }
    let v = pick(2, 1, Some(2)).unwrap();
    assert_eq!(v.to_rgb8(), all_rgb[2 * frame..4 * frame].to_vec());
    // A clip shorter than asked, and a start past the end: refused with what to ask instead.
    let err = pick(0, 2, Some(all.frames)).unwrap_err();
    assert!(err.contains(&format!("gives only {}", all.frames.div_ceil(2))) && err.contains("or fewer"), "{err}");
    let err = pick(all.frames, 1, None).unwrap_err();
    assert!(err.contains(&format!("choose a start frame below {}", all.frames)), "{err}");
    assert!(pick(0, 0, None).is_err());
    assert!(pick(0, 1, Some(0)).is_err());
    // The same choice from the MP4 of that clip.
    let mp4 = read_video(
        v2v_dir("small-t2v").join("input.0.mp4"),
        &ReadOptions { start_frame: 1, every: 2, ..ReadOptions::default() },
    )
    .unwrap();
    assert_eq!(mp4.frames, (all.frames - 1).div_ceil(2));
    let mp4_rgb = mp4.to_rgb8();
    for (k, src) in (1..all.frames).step_by(2).enumerate() {
        let psnr = luma_psnr(&mp4_rgb[k * frame..(k + 1) * frame], &all_rgb[src * frame..(src + 1) * frame]);
        assert!(psnr > 35.0, "mp4 frame {k}: {psnr:.1} dB");
    }
}

/// Writes `frames` frames of a w×h gradient that changes with the frame number.
fn synthetic(frames: usize, w: usize, h: usize) -> Vec<f32> {
    let mut data = Vec::with_capacity(frames * w * h * 3);
    for f in 0..frames {
        for y in 0..h {
            for x in 0..w {
                data.push(x as f32 / w as f32);
                data.push(y as f32 / h as f32);
                data.push((f % 7) as f32 / 7.0);
            }
        }
    }
    data
}

#[test]
fn long_clips_stop_at_the_default_limit_with_a_warning() {
    let dir = tempfile::TempDir::new().unwrap();
    let n = DEFAULT_MAX_FRAMES + 3;
    let data = synthetic(n, 8, 8);
    let path = dir.path().join("long.npy");
    write_video(&Frames::new(&data, n, 8, 8).unwrap(), VideoFormat::Npy, &path, &EncodeOptions::default()).unwrap();
    let v = read_video(&path, &ReadOptions::default()).unwrap();
    assert_eq!(v.frames, DEFAULT_MAX_FRAMES);
    assert!(v.warnings.iter().any(|w| w.contains(&format!("only the first {DEFAULT_MAX_FRAMES}"))), "{:?}", v.warnings);
    let v = read_video(&path, &ReadOptions { num_frames: Some(n), ..ReadOptions::default() }).unwrap();
    assert_eq!(v.frames, n);
    assert!(v.warnings.is_empty());
    // Exactly the limit: no warning.
    let v = read_video(&path, &ReadOptions { start_frame: 3, ..ReadOptions::default() }).unwrap();
    assert_eq!(v.frames, DEFAULT_MAX_FRAMES);
    assert!(v.warnings.is_empty(), "{:?}", v.warnings);
}

#[test]
fn other_sizes_are_resized_cropped_or_padded_with_a_note() {
    let folder = v2v_dir("tiny-t2v").join("input.0");
    let plain = read_video(&folder, &ReadOptions::default()).unwrap();
    assert_eq!((plain.width, plain.height), (32, 32));
    let read =
        |size, fit| read_video(&folder, &ReadOptions { size: Some(size), fit, ..ReadOptions::default() }).unwrap();
    let v = read((64, 48), Fit::Resize);
    assert_eq!((v.width, v.height, v.frames), (64, 48, plain.frames));
    assert_eq!(v.source_size, (32, 32));
    let note = v.warnings.join(" ");
    assert!(note.contains("resized to 64x48 with the Lanczos3 filter") && note.contains("stretched"), "{note}");
    // Same aspect ratio: a plain upscale, close to the source when brought back down.
    let up = read((64, 64), Fit::Resize);
    assert!(!up.warnings.join(" ").contains("stretched"));
    let v = read((64, 32), Fit::Pad);
    let rgb = v.to_rgb8();
    // 16 black columns each side, the picture in the middle.
    assert!(rgb[..16 * 3].iter().all(|&b| b == 0) && rgb[(64 - 16) * 3..64 * 3].iter().all(|&b| b == 0));
    assert!(rgb[16 * 3..48 * 3].iter().any(|&b| b > 0));
    assert!(v.warnings.join(" ").contains("filling the rest with black"));
    let v = read((16, 32), Fit::Crop);
    assert_eq!((v.width, v.height), (16, 32));
    assert!(v.warnings.join(" ").contains("cutting the overflow"));
    // Cropping a 32x32 frame to 16x32 keeps its middle columns at full scale.
    let (src, out) = (plain.to_rgb8(), v.to_rgb8());
    for y in 0..32 {
        assert_eq!(&out[y * 16 * 3..(y + 1) * 16 * 3], &src[(y * 32 + 8) * 3..(y * 32 + 24) * 3]);
    }
    let v = read_video(
        &folder,
        &ReadOptions { size: Some((48, 48)), filter: ResizeFilter::Bicubic, ..ReadOptions::default() },
    )
    .unwrap();
    assert!(v.warnings.join(" ").contains("bicubic"));
    assert_eq!(Fit::parse("stretch").unwrap(), Fit::Resize);
    assert!(Fit::parse("zoom").unwrap_err().to_string().contains("crop"));
    assert_eq!(ResizeFilter::parse("Lanczos").unwrap(), ResizeFilter::Lanczos3);
}

#[test]
fn gif_npy_and_jpeg_inputs_read_back() {
    let dir = tempfile::TempDir::new().unwrap();
    let png = read_video(v2v_dir("small-t2v").join("input.2"), &ReadOptions::default()).unwrap();
    let (f, h, w) = (png.frames, png.height, png.width);
    let floats: Vec<f32> = png.to_rgb8().iter().map(|&v| v as f32 / 255.0).collect();
    let frames = Frames::new(&floats, f, h, w).unwrap();

    // .npy, float: the exact values.
    let npy = dir.path().join("clip.npy");
    write_video(&frames, VideoFormat::Npy, &npy, &EncodeOptions::default()).unwrap();
    let v = read_video(&npy, &ReadOptions::default()).unwrap();
    assert_eq!(v.data, FrameData::F32(floats.clone()));
    assert_eq!(v.to_rgb8(), png.to_rgb8());
    // Its model input equals the PNG's up to the float rounding of v / 255.
    let a = v.to_model_input(&Device::Cpu, DType::F32).unwrap();
    let b = png.to_model_input(&Device::Cpu, DType::F32).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);

    // .npy, uint8.
    let u8_path = dir.path().join("clip_u8.npy");
    write_npy(&u8_path, "|u1", &[f, h, w, 3], &png.to_rgb8());
    let v = read_video(&u8_path, &ReadOptions::default()).unwrap();
    assert_eq!(v.data, FrameData::U8(png.to_rgb8()));

    // GIF: a 256-colour palette a frame, so close rather than equal.
    let gif = dir.path().join("clip.gif");
    write_video(&frames, VideoFormat::Gif, &gif, &EncodeOptions::default()).unwrap();
    let v = read_video(&gif, &ReadOptions::default()).unwrap();
    assert_eq!((v.frames, v.height, v.width), (f, h, w));
    let psnr = luma_psnr(&v.to_rgb8(), &png.to_rgb8());
    println!("GIF round trip: luma PSNR {psnr:.1} dB, {:?} fps", v.fps);
    assert!(psnr > 30.0, "{psnr:.1} dB");
    // GIF delays are whole centiseconds: 8 fps alternates 12 and 13.
    assert!((v.fps.unwrap() - 8.0).abs() < 0.2, "{:?}", v.fps);
    assert!(v.warnings.is_empty(), "{:?}", v.warnings);

    // Our own (Constrained Baseline) MP4.
    let mp4 = dir.path().join("clip.mp4");
    write_video(&frames, VideoFormat::Mp4, &mp4, &EncodeOptions::default()).unwrap();
    let v = read_video(&mp4, &ReadOptions::default()).unwrap();
    assert_eq!((v.frames, v.height, v.width), (f, h, w));
    let psnr = luma_psnr(&v.to_rgb8(), &png.to_rgb8());
    println!("baseline MP4 round trip: luma PSNR {psnr:.1} dB");
    assert!(psnr > 35.0, "{psnr:.1} dB");
    assert!((v.fps.unwrap() - 8.0).abs() < 0.1, "{:?}", v.fps);

    // A JPEG folder (frames in natural name order: 2 before 10).
    let jpegs = dir.path().join("jpegs");
    std::fs::create_dir(&jpegs).unwrap();
    let frame = h * w * 3;
    let names = ["a_10.jpg", "a_2.jpeg", "a_1.JPG"];
    let order = [2usize, 1, 0];
    for (k, name) in names.iter().enumerate() {
        let src = &png.to_rgb8()[order[k] * frame..(order[k] + 1) * frame];
        std::fs::write(jpegs.join(name), encode_jpeg(src, w, h)).unwrap();
    }
    std::fs::write(jpegs.join("notes.txt"), "not a frame").unwrap();
    let v = read_video(&jpegs, &ReadOptions::default()).unwrap();
    assert_eq!(v.frames, 3);
    for k in 0..3 {
        let psnr = luma_psnr(&v.to_rgb8()[k * frame..(k + 1) * frame], &png.to_rgb8()[k * frame..(k + 1) * frame]);
        assert!(psnr > 30.0, "jpeg frame {k}: {psnr:.1} dB");
    }
}

fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let mut bytes = t2v::video::npy_header_of(descr, shape);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// A JPEG of an RGB image at quality 95.
fn encode_jpeg(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let encoder = jpeg_encoder::Encoder::new(&mut out, 95);
    encoder.encode(rgb, w as u16, h as u16, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

#[test]
fn bad_inputs_give_errors_that_say_what_to_do() {
    let dir = tempfile::TempDir::new().unwrap();
    let d = dir.path();
    let opts = ReadOptions::default();
    let err_of = |path: &Path| -> String {
        match read_video(path, &opts) {
            Ok(v) => panic!("{} was read: {} frames", path.display(), v.frames),
            Err(e) => e.to_string(),
        }
    };
    let mp4 = std::fs::read(v2v_dir("small-t2v").join("input.0.mp4")).unwrap();

    // MP4: empty, garbage, cut in half (moov first: the frames run past the end), a frame's
    // bytes garbled, moov missing.
    std::fs::write(d.join("empty.mp4"), b"").unwrap();
    let e = err_of(&d.join("empty.mp4"));
    assert!(e.contains("export it again") || e.contains("no frames"), "{e}");
    std::fs::write(d.join("garbage.mp4"), vec![0x5au8; 5000]).unwrap();
    let e = err_of(&d.join("garbage.mp4"));
    assert!(e.contains("not an MP4"), "{e}");
    std::fs::write(d.join("half.mp4"), &mp4[..mp4.len() / 2]).unwrap();
    let e = err_of(&d.join("half.mp4"));
    assert!(e.contains("truncated"), "{e}");
    // The first frames of a truncated file are still there to read.
    let v = read_video(d.join("half.mp4"), &ReadOptions { num_frames: Some(1), ..ReadOptions::default() }).unwrap();
    assert_eq!(v.frames, 1);
    let mdat = mp4.windows(4).position(|w| w == b"mdat").unwrap();
    let mut garbled = mp4.clone();
    for b in &mut garbled[mdat + 8..mdat + 8 + 600] {
        *b = 0xff;
    }
    std::fs::write(d.join("garbled.mp4"), &garbled).unwrap();
    let e = err_of(&d.join("garbled.mp4"));
    assert!(e.contains("corrupt"), "{e}");
    let moov = mp4.windows(4).position(|w| w == b"moov").unwrap();
    let mut no_moov = mp4.clone();
    no_moov[moov..moov + 4].copy_from_slice(b"free");
    std::fs::write(d.join("no_moov.mp4"), &no_moov).unwrap();
    assert!(err_of(&d.join("no_moov.mp4")).contains("no `moov` box"));

    // Folders: empty, a corrupt PNG, frames of two sizes.
    let empty = d.join("empty_dir");
    std::fs::create_dir(&empty).unwrap();
    assert!(err_of(&empty).contains("holds no .png, .jpg or .jpeg files"));
    let bad_png = d.join("bad_png");
    std::fs::create_dir(&bad_png).unwrap();
    let good = std::fs::read(v2v_dir("small-t2v").join("input.0/frame_0000.png")).unwrap();
    std::fs::write(bad_png.join("frame_0000.png"), &good).unwrap();
    std::fs::write(bad_png.join("frame_0001.png"), &good[..good.len() / 2]).unwrap();
    let e = err_of(&bad_png);
    assert!(e.contains("frame_0001.png") && e.contains("corrupt or truncated"), "{e}");
    let mixed = d.join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::write(mixed.join("frame_0000.png"), &good).unwrap();
    std::fs::copy(v2v_dir("tiny-t2v").join("input.0/frame_0000.png"), mixed.join("frame_0001.png")).unwrap();
    assert!(err_of(&mixed).contains("all frames must have one size"));
    let bad_jpeg = d.join("bad_jpeg");
    std::fs::create_dir(&bad_jpeg).unwrap();
    std::fs::write(bad_jpeg.join("x.jpg"), b"\xff\xd8\xff\xe0 not really").unwrap();
    assert!(err_of(&bad_jpeg).contains("not a readable JPEG"));

    // GIF: garbage and truncated.
    std::fs::write(d.join("garbage.gif"), b"GIF89a\x00").unwrap();
    assert!(err_of(&d.join("garbage.gif")).contains("GIF"));
    let floats = synthetic(3, 16, 16);
    let gif = d.join("ok.gif");
    write_video(&Frames::new(&floats, 3, 16, 16).unwrap(), VideoFormat::Gif, &gif, &EncodeOptions::default()).unwrap();
    let bytes = std::fs::read(&gif).unwrap();
    std::fs::write(d.join("cut.gif"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = err_of(&d.join("cut.gif"));
    assert!(e.contains("corrupt or truncated"), "{e}");

    // .npy: wrong dtype, wrong shape, out-of-range floats, truncated, Fortran order, not npy.
    write_npy(&d.join("int.npy"), "<i4", &[1, 2, 2, 3], &[0u8; 48]);
    let e = err_of(&d.join("int.npy"));
    assert!(e.contains("dtype is `<i4`") && e.contains("uint8"), "{e}");
    write_npy(&d.join("shape.npy"), "|u1", &[2, 2, 3], &[0u8; 12]);
    assert!(err_of(&d.join("shape.npy")).contains("(frames, height, width, 3)"));
    write_npy(&d.join("rgba.npy"), "|u1", &[1, 2, 2, 4], &[0u8; 16]);
    assert!(err_of(&d.join("rgba.npy")).contains("must be 3"));
    let wide: Vec<u8> = [255.0f32; 12].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&d.join("range.npy"), "<f4", &[1, 2, 2, 3], &wide);
    let e = err_of(&d.join("range.npy"));
    assert!(e.contains("divide 0-255 values by 255"), "{e}");
    write_npy(&d.join("short.npy"), "|u1", &[2, 2, 2, 3], &[0u8; 20]);
    assert!(err_of(&d.join("short.npy")).contains("truncated"));
    let mut fortran = std::fs::read(d.join("short.npy")).unwrap();
    let at = fortran.windows(5).position(|w| w == b"False").unwrap();
    fortran[at..at + 5].copy_from_slice(b"True ");
    std::fs::write(d.join("fortran.npy"), fortran).unwrap();
    assert!(err_of(&d.join("fortran.npy")).contains("Fortran order"));
    std::fs::write(d.join("text.npy"), b"hello").unwrap();
    assert!(err_of(&d.join("text.npy")).contains("not a .npy file"));
    write_npy(&d.join("zero.npy"), "|u1", &[0, 2, 2, 3], &[]);
    assert!(err_of(&d.join("zero.npy")).contains("no frames"));

    // Unknown formats and missing files.
    std::fs::write(d.join("clip.avi"), b"RIFF").unwrap();
    assert!(err_of(&d.join("clip.avi")).contains("format is unknown"));
    assert!(read_video(d.join("missing.mp4"), &opts).is_err());
    // An HEVC track is named, with what to do.
    let mut hevc = mp4.clone();
    // The sample entry (the last `avc1` before `avcC`; `ftyp` may name the brand too).
    let avcc = hevc.windows(4).position(|w| w == b"avcC").unwrap();
    let avc1 = hevc[..avcc].windows(4).rposition(|w| w == b"avc1").unwrap();
    hevc[avc1..avc1 + 4].copy_from_slice(b"hvc1");
    std::fs::write(d.join("hevc.mp4"), &hevc).unwrap();
    let e = err_of(&d.join("hevc.mp4"));
    assert!(e.contains("HEVC (H.265)") && e.contains("convert it to H.264"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// zeroscope's two passes as one call

#[test]
fn upscale_in_one_call_is_the_two_passes_by_hand() {
    use t2v::pipeline::upscale::{self, PassModel, UpscaleEvent, UpscaleParams};
    let (tiny, small) = (model_dir("tiny-t2v"), model_dir("small-t2v"));
    let mut params = GenerationParams::new("a cat", 3);
    params.num_inference_steps = 2;
    params.num_frames = 2;
    params.scheduler = SchedulerKind::Ddim;
    params.negative_prompt = Some("blurry".into());
    params.height = Some(16);
    params.width = Some(16);
    let up = UpscaleParams { height: 32, width: 48, strength: 0.5, num_inference_steps: 2 };

    // By hand: the first pass written as PNG frames, read back at the second size, video-to-video.
    let first = TextToVideo::load(&tiny, &LoadOptions::default()).unwrap();
    let pass1 = first.generate(&params, &mut |_| Control::Continue).unwrap();
    drop(first);
    let data = pass1.frames.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pngs = tmp.path().join("pass1");
    write_video(&Frames::new(&data, 2, 16, 16).unwrap(), VideoFormat::PngFrames, &pngs, &EncodeOptions::default())
        .unwrap();
    let read = read_video(&pngs, &ReadOptions { size: Some((48, 32)), ..ReadOptions::default() }).unwrap();
    // Handing the frames on in memory gives the same 8-bit pixels as the PNG round trip.
    let in_memory = upscale::first_pass_frames(&pass1.frames, 32, 48).unwrap();
    assert_eq!((in_memory.frames, in_memory.height, in_memory.width), (2, 32, 48));
    assert_eq!(in_memory.to_rgb8(), read.to_rgb8());
    let second = TextToVideo::load(&small, &LoadOptions::default()).unwrap();
    let input = read.to_model_input(&Device::Cpu, DType::F32).unwrap();
    let by_hand = second.video_to_video(&up.second_pass(&params), &input, 0.5, &mut |_| Control::Continue).unwrap();
    drop(second);

    let none: [(String, String); 0] = [];
    let model = |folder| PassModel { folder, options: LoadOptions::default(), scheduler_overrides: &none };
    let mut events = Vec::new();
    let video = upscale::generate_upscaled(&model(&tiny), &model(&small), &params, None, &up, &mut |e| {
        events.push(match e {
            UpscaleEvent::Loading(pass) => format!("load {}", pass.number()),
            UpscaleEvent::Step(pass, p) => format!("step {}.{}", pass.number(), p.step),
        });
        Control::Continue
    })
    .unwrap();
    assert_eq!(events, ["load 1", "step 1.1", "step 1.2", "load 2", "step 2.1"]);
    assert_eq!(video.frames.dims(), &[2, 32, 48, 3]);
    let diff = video.frames.sub(&by_hand.frames).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "one call and the passes by hand differ by {diff}");
    assert!(video.timings.video_encoding > std::time::Duration::ZERO);

    // A cancel while the first model loads stops before any step; a bad second size before any load.
    let mut steps = 0;
    let cancelled = upscale::generate_upscaled(&model(&tiny), &model(&small), &params, None, &up, &mut |e| {
        if let UpscaleEvent::Step(..) = e {
            steps += 1;
        }
        Control::Cancel
    });
    assert!(matches!(cancelled, Err(t2v::Error::Cancelled)), "{cancelled:?}");
    assert_eq!(steps, 0);
    let odd = UpscaleParams { height: 33, ..up.clone() };
    let mut loads = 0;
    let refused = upscale::generate_upscaled(&model(&tiny), &model(&small), &params, None, &odd, &mut |_| {
        loads += 1;
        Control::Continue
    });
    assert!(refused.is_err() && loads == 0, "{refused:?}");
}
