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
    let pipe = TextToVideo::load(model_dir(model), &LoadOptions::default()).unwrap();
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
            assert!(err <= MODULE_TOL, "{model} run {i}: prompt embeddings differ by {err:.2e} (relative)");
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
        assert!(err <= 1e-3, "{model} run {i}: frames differ by {err:.2e}");
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
