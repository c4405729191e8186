//! Long videos against the reference (`long/` in the fixtures): diffusers' FreeNoise parts and
//! prompt travel applied to the text-to-video UNet. The shuffled latents within 1e-6, the
//! per-frame prompt embeddings within 1e-4 relative, the frames within 1e-3 max abs.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use candle_core::{Device, IndexOp, Tensor};
use common::*;
use t2v::long_video::{ContextWeighting, ContextWindows, LongVideo};
use t2v::noise::TorchGenerator;
use t2v::pipeline::{Control, GenerationParams, LoadOptions, TextToVideo};
use t2v::schedulers::SchedulerKind;

fn long_reference(model: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let dir = fixtures().join(model).join("long");
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("long_reference.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("long_reference.safetensors"), &Device::Cpu).unwrap();
    (json, tensors)
}

fn keyframes(v: Option<&serde_json::Value>) -> BTreeMap<usize, String> {
    v.and_then(|v| v.as_object())
        .map(|m| m.iter().map(|(k, t)| (k.parse().unwrap(), t.as_str().unwrap().to_string())).collect())
        .unwrap_or_default()
}

/// A run of `long_reference.json` as the library's parameters: a `prompts` map's frame 0 is the
/// prompt, its other keyframes travel.
fn params_of(run: &serde_json::Value) -> GenerationParams {
    let mut prompts = keyframes(run.get("prompts"));
    let mut negatives = keyframes(run.get("negative_prompts"));
    let prompt = prompts.remove(&0).unwrap_or_else(|| run["prompt"].as_str().unwrap().to_string());
    let mut p = GenerationParams::new(prompt, run["seed"].as_u64().unwrap());
    p.negative_prompt =
        negatives.remove(&0).or_else(|| run.get("negative_prompt").and_then(|v| v.as_str()).map(String::from));
    p.num_inference_steps = run["steps"].as_u64().unwrap() as usize;
    p.guidance_scale = run["guidance_scale"].as_f64().unwrap();
    p.scheduler = SchedulerKind::from_str(run["scheduler"].as_str().unwrap()).unwrap();
    p.eta = run.get("eta").and_then(|v| v.as_f64()).unwrap_or(0.0);
    p.num_frames = run["num_frames"].as_u64().unwrap() as usize;
    p.height = Some(run["height"].as_u64().unwrap() as usize);
    p.width = Some(run["width"].as_u64().unwrap() as usize);
    let weighting = run.get("weighting_scheme").and_then(|v| v.as_str()).unwrap_or("pyramid");
    p.long = LongVideo {
        context: Some(ContextWindows::new(
            run["context_length"].as_u64().unwrap() as usize,
            run["context_stride"].as_u64().unwrap() as usize,
            ContextWeighting::from_str(weighting).unwrap(),
        )),
        prompts,
        negative_prompts: negatives,
    };
    p
}

fn check_runs(model: &str) {
    check_runs_with(model, &LoadOptions::default(), MODULE_TOL, 1e-3)
}

/// The long runs of `model` loaded with `options`: travelling prompt embeddings within
/// `embeds_tol` (relative), frames within `frames_tol` (max abs) of the reference.
fn check_runs_with(model: &str, options: &LoadOptions, embeds_tol: f64, frames_tol: f64) {
    let pipe = TextToVideo::load(model_dir(model), options).unwrap();
    let (json, refs) = long_reference(model);
    for (i, run) in json["runs"].as_array().unwrap().iter().enumerate() {
        let params = params_of(run);
        let (h, w) = pipe.validate(&params).unwrap();
        let mut generator = TorchGenerator::new(params.seed);
        let latents = pipe.initial_latents_for(&mut generator, &params, h, w).unwrap();
        let latents_err = max_abs_diff(&latents, &refs[run["latents_key"].as_str().unwrap()]);
        assert!(latents_err <= 1e-6, "{model} run {i}: shuffled latents differ by {latents_err:.2e}");

        let mut embeds_err = None;
        if let Some(key) = run.get("prompt_embeds_key").and_then(|v| v.as_str()) {
            let embeds = pipe.travelling_context(&params).unwrap();
            let err = rel_err(&embeds, &refs[key]);
            assert!(err <= embeds_tol, "{model} run {i}: prompt embeddings differ by {err:.2e} (relative)");
            embeds_err = Some(err);
        }

        let mut steps = 0;
        let video = pipe
            .generate(&params, &mut |p| {
                steps = p.step;
                Control::Continue
            })
            .unwrap();
        assert_eq!(steps, params.num_inference_steps);
        let err = max_abs_diff(&video.frames, &refs[run["frames_key"].as_str().unwrap()]);
        println!(
            "{model} long run {i} ({} frames, W={} S={}, {}): latents {latents_err:.2e}, prompt embeds {}, frames max abs {err:.2e}",
            params.num_frames,
            run["context_length"],
            run["context_stride"],
            run["scheduler"],
            embeds_err.map_or("-".to_string(), |e| format!("{e:.2e}"))
        );
        assert!(err <= frames_tol, "{model} run {i}: frames differ by {err:.2e}");
        let first = video.frames.i(0).unwrap();
        let range = (first.max_all().unwrap().to_scalar::<f32>().unwrap()
            - first.min_all().unwrap().to_scalar::<f32>().unwrap()) as f64;
        assert!(range > 0.05, "{model} run {i}: flat frame");
    }
}

#[test]
fn tiny_long_runs_match_reference() {
    check_runs("tiny-t2v");
}

#[test]
fn small_long_runs_match_reference() {
    check_runs("small-t2v");
}

/// `--dtype bf16`'s FreeNoise windows (on AMX, the LayerNorms' rows and the feed-forwards' gated
/// rows in tiles, per window group) stay within the bfloat16 bound of the float32 reference
/// that plain text-to-video keeps on this fixture (`tests/pipeline.rs`); the text encoder's
/// bfloat16 products move the travelling embeddings by a few percent (measured 4.1e-2).
#[test]
fn tiny_long_runs_in_bf16_stay_near_reference() {
    let options = LoadOptions { dtype: candle_core::DType::BF16, ..LoadOptions::default() };
    check_runs_with("tiny-t2v", &options, 8e-2, 2e-2);
}

/// `torch.randperm` on a CPU generator continues the stream `torch.randn` left: the
/// permutations below are the ones the reference's shuffled latents show (which source frame
/// each shuffled frame copies), after the `randn` of the run's latents.
#[test]
fn randperm_follows_randn_as_torch() {
    // tiny run 0: seed 3, latents (1, 4, 20, 32, 32), windows 8 / 4.
    let mut g = TorchGenerator::new(3);
    g.randn(&[1, 4, 20, 32, 32]);
    assert_eq!(g.randperm(4), vec![1, 2, 0, 3]);
    assert_eq!(g.randperm(4), vec![1, 2, 0, 3]);
    assert_eq!(g.randperm(4), vec![0, 2, 1, 3]);
    // small run 1: seed 11, latents (1, 4, 19, 8, 8), windows 8 / 3.
    let mut g = TorchGenerator::new(11);
    g.randn(&[1, 4, 19, 8, 8]);
    assert_eq!(g.randperm(3), vec![0, 1, 2]);
    assert_eq!(g.randperm(3), vec![2, 0, 1]);
    assert_eq!(g.randperm(3), vec![1, 2, 0]);
    assert_eq!(&g.randperm(3)[..2], &[0, 2]);
    // randperm(1) and randperm(0) draw nothing.
    let (mut a, mut b) = (TorchGenerator::new(5), TorchGenerator::new(5));
    assert_eq!(a.randperm(1), vec![0]);
    assert!(a.randperm(0).is_empty());
    assert_eq!(a.randn(&[20]), b.randn(&[20]));
}

/// The windows' weights fused as diffusers does: with a window as long as the video the fused
/// output is the plain one (the weights cancel), whatever the scheme.
#[test]
fn one_window_is_plain_text_to_video() {
    let pipe = TextToVideo::load(model_dir("tiny-t2v"), &LoadOptions::default()).unwrap();
    let mut params = GenerationParams::new("waves", 1);
    (params.num_inference_steps, params.num_frames, params.height, params.width) = (2, 6, Some(32), Some(32));
    let plain = pipe.generate(&params, &mut |_| Control::Continue).unwrap();
    for weighting in ContextWeighting::ALL {
        params.long.context = Some(ContextWindows::new(6, 2, weighting));
        let windowed = pipe.generate(&params, &mut |_| Control::Continue).unwrap();
        let err = max_abs_diff(&windowed.frames, &plain.frames);
        assert!(err <= 1e-5, "{weighting}: {err:.2e}");
    }
    // Shorter windows change the video.
    params.long.context = Some(ContextWindows::new(4, 2, ContextWeighting::Pyramid));
    let windowed = pipe.generate(&params, &mut |_| Control::Continue).unwrap();
    assert!(max_abs_diff(&windowed.frames, &plain.frames) > 1e-3);
}

#[test]
fn bad_long_settings_are_refused_before_any_work() {
    let pipe = TextToVideo::load(model_dir("tiny-t2v"), &LoadOptions::default()).unwrap();
    let mut params = GenerationParams::new("waves", 1);
    params.num_frames = 10;
    params.long.context = Some(ContextWindows::new(12, 4, ContextWeighting::Pyramid));
    let err = pipe.validate(&params).unwrap_err().to_string();
    assert!(err.contains("longer than the video") && err.contains("at most 10"), "{err}");
    params.long.context = Some(ContextWindows::new(8, 0, ContextWeighting::Pyramid));
    let err = pipe.validate(&params).unwrap_err().to_string();
    assert!(err.contains("stride must be at least 1"), "{err}");
    params.long.context = None;
    params.long.prompts.insert(10, "late".into());
    let err = pipe.generate(&params, &mut |_| Control::Continue).unwrap_err().to_string();
    assert!(err.contains("past the last frame (9)"), "{err}");
}

/// The UNet's frame-chunked layers (ResNets, spatial attention, sampling convolutions per chunk
/// of frames; temporal transformers per chunk of pixel rows) give the same noise prediction for
/// every chunk size as in one piece: guided, with FreeNoise windows, and with per-frame prompts.
#[test]
fn chunked_unet_equals_one_piece() {
    use t2v::checkpoint::{ModelFolder, WeightsVariant};
    use t2v::unet3d::{self, LongVideoForward, UNet3DConditionModel};
    let folder = ModelFolder::open(model_dir("small-t2v")).unwrap();
    let cfg: unet3d::Config = folder.config("unet", "config.json").unwrap();
    let weights =
        folder.weights_with("unet", WeightsVariant::Auto, candle_core::DType::F32, &Device::Cpu, true).unwrap();
    let mut unet = weights.build(|vb| UNet3DConditionModel::new(vb, &cfg)).unwrap();
    let refs = common::reference("small-t2v");
    let context = &refs["unet.context"];
    // 11 frames of 8×8 latents: more frames than one window, an odd count.
    let frames = 11;
    let n = 4 * frames * 64;
    let latents = (Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap() * 0.37).unwrap().sin().unwrap();
    let latents = latents.reshape((1, 4, frames, 8, 8)).unwrap();
    // One embedding per frame of each half: the prompt's, scaled a little per frame.
    let per_frame: Vec<Tensor> = (0..2)
        .flat_map(|b| (0..frames).map(move |f| (b, f)))
        .map(|(b, f)| (context.narrow(0, b, 1).unwrap() * (1.0 + 0.02 * f as f64)).unwrap())
        .collect();
    let per_frame = Tensor::cat(&per_frame, 0).unwrap();
    let plan = ContextWindows::new(4, 2, ContextWeighting::Pyramid).plan(frames).unwrap();
    let cases = [
        ("guided", LongVideoForward::default(), context.clone()),
        ("windows", LongVideoForward { text_per_frame: false, windows: Some(&plan) }, context.clone()),
        ("travel", LongVideoForward { text_per_frame: true, windows: Some(&plan) }, per_frame),
    ];
    let exact = t2v::kernels::isa() != t2v::kernels::Isa::Generic;
    for (name, long, text) in &cases {
        unet.set_chunk_bytes(usize::MAX);
        let whole = unet.forward_long(&latents, 500.0, text, long).unwrap();
        // one row at a time, and chunks that split the frames of a video unevenly
        for bytes in [1, 3 * 64 * 32 * 4, 5 * 64 * 64 * 4] {
            unet.set_chunk_bytes(bytes);
            let chunked = unet.forward_long(&latents, 500.0, text, long).unwrap();
            let diff = max_abs_diff(&chunked, &whole);
            // The CPU kernels compute every row alone: the same bits. candle's ops (other
            // devices' path) may block their sums by the rows they get.
            if exact {
                assert_eq!(diff, 0.0, "{name}, chunks of {bytes} bytes: differs by {diff:.2e}");
            } else {
                assert!(rel_err(&chunked, &whole) < 1e-6, "{name}, chunks of {bytes} bytes: differs by {diff:.2e}");
            }
        }
    }
}

/// Streamed output: the VAE decodes frame by frame into an MP4 encoder that takes each frame as
/// it comes. The frames equal `decode_latents`' rows bit for bit, and the MP4 is byte for byte
/// the one `write_video` makes of the whole clip.
#[test]
fn streamed_decode_and_mp4_equal_whole_video() {
    use t2v::video::{self, EncodeOptions, Frames, Mp4Encoder, VideoFormat};
    let pipe = TextToVideo::load(model_dir("small-t2v"), &LoadOptions::default()).unwrap();
    let refs = common::reference("small-t2v");
    // 4 frames of latents, stretched so that the frames vary
    let latents = (refs["unet.sample"].narrow(0, 0, 1).unwrap() * 3.0).unwrap();
    let whole = pipe.decode_latents(&latents).unwrap();
    let (frames, height, width, _) = whole.dims4().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let opts = EncodeOptions { metadata: Some("{\"seed\": 1}".into()), ..EncodeOptions::default() };
    let mut encoder = Mp4Encoder::new(width, height, &opts, &tmp.path().join("streamed.mp4")).unwrap();
    let mut seen = 0;
    pipe.decode_latents_each(&latents, &mut |i, frame| {
        assert_eq!(i, seen);
        let diff = max_abs_diff(&frame, &whole.i(i).unwrap());
        assert_eq!(diff, 0.0, "frame {i} differs from decode_latents' by {diff:.2e}");
        encoder.push(&frame.flatten_all()?.to_vec1::<f32>()?)?;
        seen += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!((seen, encoder.frames()), (frames, frames));
    let streamed = encoder.finish().unwrap();

    let data = whole.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let path = tmp.path().join("whole.mp4");
    video::write_video(&Frames::new(&data, frames, height, width).unwrap(), VideoFormat::Mp4, &path, &opts).unwrap();
    let written = std::fs::read(&path).unwrap();
    assert!(
        streamed == written,
        "the streamed MP4 ({} bytes) differs from write_video's ({} bytes)",
        streamed.len(),
        written.len()
    );

    // A frame of the wrong size is refused, saying what it needs.
    let mut encoder = Mp4Encoder::new(width, height, &opts, &path).unwrap();
    let err = encoder.push(&[0.5; 12]).unwrap_err().to_string();
    assert!(err.contains("RGB frame needs"), "{err}");
    assert!(encoder.finish().is_err(), "an MP4 of no frames");
}

/// Peak memory and time of one guided step of the full-size UNet (random weights, float16
/// matrices as `t2v bench`) at 256×256: `T2V_STEP_FRAMES=128 cargo test -p t2v --test long
/// full_size_step_memory -- --ignored --nocapture` (one run per process: the peak is the
/// process's). `T2V_STEP_CHUNK_BYTES` sets the chunk size (`max`: one piece, as before chunking).
#[test]
#[ignore = "minutes per frame count; run by hand with T2V_STEP_FRAMES"]
fn full_size_step_memory() {
    use candle_core::{DType, Shape};
    use candle_nn::var_builder::SimpleBackend;
    use t2v::unet3d::{self, LongVideoForward, UNet3DConditionModel};
    struct Random;
    impl SimpleBackend for Random {
        fn get(
            &self,
            s: Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let dims = s.dims();
            if dims.len() >= 2 {
                let bound = 1.0 / (dims[1..].iter().product::<usize>() as f64).sqrt();
                Tensor::rand(-bound as f32, bound as f32, s, dev)?.to_dtype(DType::F16)
            } else if name.ends_with("weight") {
                Tensor::ones(s, dtype, dev)
            } else {
                Tensor::zeros(s, dtype, dev)
            }
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("no shape for {name}")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }
    let Some(frames) = std::env::var("T2V_STEP_FRAMES").ok().and_then(|v| v.parse::<usize>().ok()) else {
        println!("set T2V_STEP_FRAMES");
        return;
    };
    // As the binary runs (`T2V_STEP_ALLOCATOR=default`: glibc's own thresholds).
    if std::env::var("T2V_STEP_ALLOCATOR").as_deref() != Ok("default") {
        t2v::kernels::tune_allocator();
    }
    let cfg: unet3d::Config = serde_json::from_str(t2v::bench::UNET_CONFIG).unwrap();
    let vb = candle_nn::VarBuilder::from_backend(Box::new(Random), DType::F32, Device::Cpu);
    let mut unet = UNet3DConditionModel::new(vb, &cfg).unwrap();
    match std::env::var("T2V_STEP_CHUNK_BYTES").ok().as_deref() {
        Some("max") => unet.set_chunk_bytes(usize::MAX),
        Some(v) => unet.set_chunk_bytes(v.parse().unwrap()),
        None => {}
    }
    let built = t2v::bench::peak_rss_bytes().unwrap_or(0);
    let latents = Tensor::randn(0f32, 1f32, (1, 4, frames, 32, 32), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1f32, (2, 77, 1024), &Device::Cpu).unwrap();
    let windows = (frames > 24).then(|| ContextWindows::new(16, 4, ContextWeighting::Pyramid).plan(frames).unwrap());
    let long = LongVideoForward { text_per_frame: false, windows: windows.as_ref() };
    let started = std::time::Instant::now();
    let out = unet.forward_long(&latents, 981.0, &context, &long).unwrap();
    let step_s = started.elapsed().as_secs_f64();
    assert_eq!(out.dims(), &[2, 4, frames, 32, 32]);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "{{\"frames\": {frames}, \"chunk_bytes\": {}, \"free_noise\": {}, \"step_s\": {step_s:.1}, \"built_gib\": {:.3}, \"peak_rss_gib\": {:.3}}}",
        unet.chunk_bytes(),
        windows.is_some(),
        gib(built),
        gib(t2v::bench::peak_rss_bytes().unwrap_or(0))
    );
}
