//! Scheduler tests against the diffusers reference fixtures (`sched.{ddim,dpm}.{n}.*`) and
//! against schedules derived by hand from the diffusers/numpy formulas.
//!
//! One file: each file under tests/ is a binary of its own to link; one for every scheduler keeps CI's
//! build short.

#![allow(clippy::result_large_err)] // the closures return the crate's `Result`

mod common;

use std::collections::HashMap;

use common::{fixtures, reference};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use t2v::error::{Error, Result};
use t2v::schedulers::{
    build_scheduler, ddim::ddim_timesteps, effective_config, from_config, load_scheduler_config, no_noise,
    parse_scheduler_config, DdimConfig, DdimScheduler, DpmSolverConfig, DpmSolverMultistepScheduler, Scheduler,
    SchedulerKind, TimestepSpacing,
};

const MODELS: [&str; 2] = ["tiny-t2v", "small-t2v"];
const TOLERANCE: f32 = 1e-4;

fn scheduler_config(dir: &str) -> (serde_json::Value, PathBuf) {
    let path = fixtures().join(dir).join("scheduler").join("scheduler_config.json");
    (load_scheduler_config(&path).unwrap(), path)
}

fn build(kind: SchedulerKind, model: &str, n: usize) -> Box<dyn Scheduler> {
    let (json, path) = scheduler_config(model);
    build_scheduler(kind, &json, &path, n, 0.0).unwrap()
}

fn kind_key(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Ddim => "ddim",
        SchedulerKind::DpmSolverMultistep => "dpm",
        other => other.name(),
    }
}

/// The step counts the reference holds for a scheduler kind, ascending.
fn step_counts(reference: &HashMap<String, Tensor>, kind: &str) -> Vec<usize> {
    let prefix = format!("sched.{kind}.");
    let mut counts: Vec<usize> =
        reference.keys().filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".timesteps")?.parse().ok()).collect();
    counts.sort();
    assert!(!counts.is_empty(), "no sched.{kind}.*.timesteps in the reference");
    counts
}

fn timesteps_of(reference: &HashMap<String, Tensor>, kind: &str, n: usize) -> Vec<usize> {
    reference[&format!("sched.{kind}.{n}.timesteps")]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as usize)
        .collect()
}

fn trajectory(reference: &HashMap<String, Tensor>, kind: &str, n: usize) -> Vec<Tensor> {
    let traj = &reference[&format!("sched.{kind}.{n}.trajectory")];
    (0..n).map(|k| traj.get(k).unwrap()).collect()
}

/// The fixture's fake model: `eps = sin(latents*1.3 + t/100)*0.7 + 0.1*step_index`
/// (float32 throughout, as torch computes it).
fn fake_eps(latents: &Tensor, t: usize, step_index: usize) -> Tensor {
    let shift = (t as f32 / 100.0) as f64;
    let bias = (0.1f64 * step_index as f64) as f32 as f64;
    latents.affine(1.3, shift).unwrap().sin().unwrap().affine(0.7, bias).unwrap()
}

/// max |a - b| / max |b|, as the fixtures' README measures it.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    common::rel_err(a, b) as f32
}

/// The trajectories' start latents: `torch.randn((2,4,3,3), generator seed 9)`, from the
/// torch-identical generator.
fn start_latents(_reference: &HashMap<String, Tensor>, _model: &str) -> Tensor {
    t2v::noise::TorchGenerator::new(9).randn_tensor(&[2, 4, 3, 3], &Device::Cpu).unwrap()
}

fn ddim_scheduler(model: &str, n: usize) -> DdimScheduler {
    let (json, path) = scheduler_config(model);
    DdimScheduler::new(DdimConfig::from_json(&json, &path).unwrap(), &path, n, 0.0).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Against the reference fixtures

#[test]
fn timesteps_match_reference_exactly() {
    for model in MODELS {
        let reference = reference(model);
        for kind in [SchedulerKind::Ddim, SchedulerKind::DpmSolverMultistep] {
            for n in step_counts(&reference, kind_key(kind)) {
                let expected = timesteps_of(&reference, kind_key(kind), n);
                let scheduler = build(kind, model, n);
                assert_eq!(scheduler.timesteps(), &expected[..], "{model} {kind:?} n={n}");
            }
        }
    }
}

#[test]
fn ddim_recurrence_matches_reference() {
    // DDIM is stateless: feed the reference latents of step k-1, expect those of step k.
    let mut worst = 0f32;
    for model in MODELS {
        let reference = reference(model);
        for n in step_counts(&reference, "ddim") {
            let ts = timesteps_of(&reference, "ddim", n);
            let traj = trajectory(&reference, "ddim", n);
            let mut scheduler = build(SchedulerKind::Ddim, model, n);
            for k in 1..n {
                let eps = fake_eps(&traj[k - 1], ts[k], k);
                let out = scheduler.step(&eps, ts[k], &traj[k - 1], &mut no_noise).unwrap();
                let err = rel_err(&out, &traj[k]);
                assert!(err < TOLERANCE, "{model} ddim n={n} step {k}: rel err {err}");
                worst = worst.max(err);
            }
        }
    }
    println!("ddim recurrence: max rel err {worst:e}");
}

#[test]
fn dpm_recurrence_matches_reference() {
    // A fresh scheduler entered at step 1 records the model output of step 1 (its own update is
    // first order, unlike the reference's, so it is only compared when step 1 is the last one,
    // which is first order in the reference too). From step 2 on the multistep history is the
    // reference's: feed the reference latents of step k-1, expect those of step k.
    let mut worst = 0f32;
    for model in MODELS {
        let reference = reference(model);
        for n in step_counts(&reference, "dpm") {
            let ts = timesteps_of(&reference, "dpm", n);
            let traj = trajectory(&reference, "dpm", n);
            let mut scheduler = build(SchedulerKind::DpmSolverMultistep, model, n);
            for k in 1..n {
                let eps = fake_eps(&traj[k - 1], ts[k], k);
                let out = scheduler.step(&eps, ts[k], &traj[k - 1], &mut no_noise).unwrap();
                if k >= 2 || n == 2 {
                    let err = rel_err(&out, &traj[k]);
                    assert!(err < TOLERANCE, "{model} dpm n={n} step {k}: rel err {err}");
                    worst = worst.max(err);
                }
            }
        }
    }
    println!("dpm recurrence: max rel err {worst:e}");
}

#[test]
fn full_trajectories_match_reference() {
    // Free-running from the start latents, every step compared. For DDIM the start latents are
    // recovered from the 50-step run only, so the first step of the other runs is a real check.
    for model in MODELS {
        let reference = reference(model);
        let start = start_latents(&reference, model);
        for kind in [SchedulerKind::Ddim, SchedulerKind::DpmSolverMultistep] {
            let mut worst = 0f32;
            for n in step_counts(&reference, kind_key(kind)) {
                let traj = trajectory(&reference, kind_key(kind), n);
                let mut scheduler = build(kind, model, n);
                let ts = scheduler.timesteps().to_vec();
                let mut latents = start.affine(scheduler.init_noise_sigma(), 0.0).unwrap();
                for (k, &t) in ts.iter().enumerate() {
                    let input = scheduler.scale_model_input(latents.clone(), t).unwrap();
                    let eps = fake_eps(&input, t, k);
                    latents = scheduler.step(&eps, t, &latents, &mut no_noise).unwrap();
                    let err = rel_err(&latents, &traj[k]);
                    assert!(err < TOLERANCE, "{model} {kind:?} n={n} step {k}: rel err {err}");
                    worst = worst.max(err);
                }
            }
            println!("{model} {kind:?} full trajectories: max rel err {worst:e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Config loading

#[test]
fn published_config_defaults_differ_per_scheduler() {
    // The published 1.7B config has no `timestep_spacing`: DDIM takes its default `leading`,
    // DPM-Solver its default `linspace` (as diffusers' `from_config(ddim.config)`).
    let path = common::full_config_dir().join("scheduler").join("scheduler_config.json");
    let json = load_scheduler_config(&path).unwrap();
    let ddim = DdimConfig::from_json(&json, &path).unwrap();
    let dpm = DpmSolverConfig::from_json(&json, &path).unwrap();
    assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
    assert_eq!(dpm.timestep_spacing, TimestepSpacing::Linspace);
    // keys present in the file are taken by both
    assert_eq!(ddim.steps_offset, 1);
    assert_eq!(dpm.steps_offset, 1);
    assert!(!ddim.clip_sample && !ddim.set_alpha_to_one);
    assert_eq!((dpm.beta_start, dpm.beta_end), (0.00085, 0.012));
    // DPM defaults for keys DDIM does not have
    assert_eq!(dpm.solver_order, 2);
    assert!(dpm.lower_order_final);

    let s = build_scheduler(SchedulerKind::DpmSolverMultistep, &json, &path, 25, 0.0).unwrap();
    let expected_dpm: Vec<usize> = vec![
        999, 959, 919, 879, 839, 799, 759, 719, 679, 639, 599, 559, 519, 480, 440, 400, 360, 320, 280, 240, 200, 160,
        120, 80, 40,
    ];
    assert_eq!(s.timesteps(), &expected_dpm[..]);
    let s = build_scheduler(SchedulerKind::Ddim, &json, &path, 25, 0.0).unwrap();
    let expected_ddim: Vec<usize> = (0..25).rev().map(|i| i * 40 + 1).collect();
    assert_eq!(s.timesteps(), &expected_ddim[..]);
}

#[test]
fn fixture_config_with_explicit_leading_gives_dpm_leading() {
    // The fixtures' configs (written by diffusers 0.42.1) state `timestep_spacing: leading`;
    // a key present in the file wins over the DPM default.
    let (json, path) = scheduler_config("tiny-t2v");
    let dpm = DpmSolverConfig::from_json(&json, &path).unwrap();
    assert_eq!(dpm.timestep_spacing, TimestepSpacing::Leading);
}

#[test]
fn use_default_values_and_nulls_fall_back_to_the_schedulers_defaults() {
    let json = serde_json::json!({
        "_class_name": "DDIMScheduler",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "clip_sample": null,
        "unknown_key": [1, 2, 3],
        "_use_default_values": ["timestep_spacing"]
    });
    let path = Path::new("mem.json");
    let dpm = DpmSolverConfig::from_json(&json, path).unwrap();
    assert_eq!(dpm.timestep_spacing, TimestepSpacing::Linspace);
    assert_eq!(dpm.steps_offset, 1);
    let ddim = DdimConfig::from_json(&json, path).unwrap();
    assert!(ddim.clip_sample);
}

#[test]
fn python_non_finite_floats_parse() {
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                   "algorithm_type": "dpmsolver++", "beta_schedule": "scaled_linear"}"#;
    let path = Path::new("scheduler_config.json");
    let json = parse_scheduler_config(text, path).unwrap();
    let dpm = DpmSolverConfig::from_json(&json, path).unwrap();
    assert_eq!(dpm.lambda_min_clipped, f64::NEG_INFINITY);
    let s = build_scheduler(SchedulerKind::DpmSolverMultistep, &json, path, 10, 0.0).unwrap();
    assert_eq!(s.timesteps(), &[999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
}

/// diffusers' `DPMSolverMultistepScheduler.from_config(ddim.config).config`: DPM-Solver's keys,
/// from the file or DPM-Solver's defaults, and nothing of DDIM's; it reads back to the same config.
#[test]
fn effective_configs_hold_the_schedulers_own_keys() {
    let path = common::full_config_dir().join("scheduler").join("scheduler_config.json");
    let json = load_scheduler_config(&path).unwrap();
    let dpm = effective_config(SchedulerKind::DpmSolverMultistep, &json, &path).unwrap();
    assert_eq!(dpm["_class_name"], "DPMSolverMultistepScheduler");
    assert_eq!(dpm["solver_order"], 2);
    assert_eq!(dpm["timestep_spacing"], "linspace");
    assert_eq!(dpm["beta_schedule"], "scaled_linear");
    assert_eq!(dpm["algorithm_type"], "dpmsolver++");
    assert_eq!(dpm["lambda_min_clipped"], "-Infinity");
    assert!(dpm.get("clip_sample").is_none());
    assert_eq!(DpmSolverConfig::from_json(&dpm, &path).unwrap(), DpmSolverConfig::from_json(&json, &path).unwrap());
    let ddim = effective_config(SchedulerKind::Ddim, &dpm, &path).unwrap();
    assert_eq!(ddim["_class_name"], "DDIMScheduler");
    assert_eq!(ddim["clip_sample"], true, "DDIM's default: the DPM config has no clip_sample");
    assert!(ddim.get("solver_order").is_none());
    assert_eq!(DdimConfig::from_json(&ddim, &path).unwrap(), DdimConfig::from_json(&dpm, &path).unwrap());
}

/// The published 1.7B's `scheduler_config.json` (written by diffusers 0.15: no `timestep_spacing`,
/// `trained_betas: null`, PNDM's `skip_prk_steps`), as the model card's script meets it.
fn published_config() -> (serde_json::Value, PathBuf) {
    let path = common::full_config_dir().join("scheduler").join("scheduler_config.json");
    let json = load_scheduler_config(&path).unwrap();
    assert!(json.get("timestep_spacing").is_none(), "the published form leaves timestep_spacing out");
    (json, path)
}

fn schedule_of(kind: SchedulerKind, config: &serde_json::Value, path: &Path, n: usize) -> Vec<usize> {
    build_scheduler(kind, config, path, n, 0.0).unwrap().timesteps().to_vec()
}

fn no_overrides() -> serde_json::Map<String, serde_json::Value> {
    serde_json::Map::new()
}

/// The model card's `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` on the
/// published config. diffusers: the DDIM loaded from the file lists `timestep_spacing` in
/// `_use_default_values`, so the DPM-Solver takes its own default `linspace`:
/// `np.linspace(0, 999, 5).round()[::-1][:-1]` = 999, 749, 500, 250, not DDIM's `leading`
/// (`arange(4) · 250 + steps_offset` reversed = 751, 501, 251, 1).
#[test]
fn from_config_drops_the_keys_a_config_defaulted() {
    let (file, path) = published_config();
    let ddim = from_config(SchedulerKind::Ddim, &file, &no_overrides(), &path).unwrap();
    assert!(ddim.ignored_overrides.is_empty());
    let ddim = ddim.config;
    assert_eq!(ddim["_class_name"], "DDIMScheduler");
    assert_eq!(ddim["timestep_spacing"], "leading");
    assert_eq!(ddim["clip_sample"], false);
    assert_eq!(ddim["_diffusers_version"], "0.15.0.dev0", "keys of no class are kept");
    assert_eq!(ddim["skip_prk_steps"], true, "another class's keys are kept");
    let defaulted: Vec<&str> =
        ddim["_use_default_values"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(defaulted.contains(&"timestep_spacing") && defaulted.contains(&"rescale_betas_zero_snr"), "{defaulted:?}");
    assert!(!defaulted.contains(&"clip_sample") && !defaulted.contains(&"trained_betas"), "{defaulted:?}");
    assert_eq!(schedule_of(SchedulerKind::Ddim, &ddim, &path, 4), [751, 501, 251, 1]);
    assert_eq!(schedule_of(SchedulerKind::Ddim, &file, &path, 4), [751, 501, 251, 1]);

    let dpm = from_config(SchedulerKind::DpmSolverMultistep, &ddim, &no_overrides(), &path).unwrap().config;
    assert_eq!(dpm["_class_name"], "DPMSolverMultistepScheduler");
    assert_eq!(dpm["timestep_spacing"], "linspace");
    assert_eq!(dpm["beta_schedule"], "scaled_linear");
    assert_eq!(dpm["steps_offset"], 1);
    assert_eq!(schedule_of(SchedulerKind::DpmSolverMultistep, &dpm, &path, 4), [999, 749, 500, 250]);
    // What the command line's `--scheduler dpm` builds from the file directly: the same schedule.
    assert_eq!(schedule_of(SchedulerKind::DpmSolverMultistep, &file, &path, 4), [999, 749, 500, 250]);
    // DDIM's keys ride along (diffusers' hidden config), so the way back restores them.
    assert_eq!(dpm["clip_sample"], false);
    assert_eq!(dpm["set_alpha_to_one"], false);

    // DPM-Solver → DDIM: `linspace` was DPM's default, so DDIM's own `leading` returns, and
    // `clip_sample: false` comes back from the carried keys (DDIM's default would be true).
    let back = from_config(SchedulerKind::Ddim, &dpm, &no_overrides(), &path).unwrap().config;
    assert_eq!(back["timestep_spacing"], "leading");
    assert_eq!(back["clip_sample"], false);
    assert_eq!(back["set_alpha_to_one"], false);
    assert_eq!(DdimConfig::from_json(&back, &path).unwrap(), DdimConfig::from_json(&ddim, &path).unwrap());
    assert_eq!(schedule_of(SchedulerKind::Ddim, &back, &path, 4), [751, 501, 251, 1]);
    // And again to DPM-Solver: the same config.
    let again = from_config(SchedulerKind::DpmSolverMultistep, &back, &no_overrides(), &path).unwrap().config;
    assert_eq!(DpmSolverConfig::from_json(&again, &path).unwrap(), DpmSolverConfig::from_json(&dpm, &path).unwrap());
}

/// `from_config(config, **overrides)`: overrides win over the config and count as given;
/// keys the class does not know are reported (diffusers ignores them).
#[test]
fn from_config_overrides() {
    let (file, path) = published_config();
    let ddim = from_config(SchedulerKind::Ddim, &file, &no_overrides(), &path).unwrap().config;
    let mut overrides = serde_json::Map::new();
    overrides.insert("timestep_spacing".into(), "trailing".into());
    overrides.insert("solver_order".into(), 3.into());
    overrides.insert("no_such_key".into(), 3.into());
    let dpm = from_config(SchedulerKind::DpmSolverMultistep, &ddim, &overrides, &path).unwrap();
    assert_eq!(dpm.ignored_overrides, ["no_such_key"]);
    let config = dpm.config;
    assert!(config.get("no_such_key").is_none());
    assert_eq!(config["solver_order"], 3);
    assert_eq!(config["timestep_spacing"], "trailing");
    let defaulted: Vec<&str> =
        config["_use_default_values"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(!defaulted.contains(&"timestep_spacing") && defaulted.contains(&"algorithm_type"), "{defaulted:?}");
    // diffusers' trailing spacing: `np.arange(1000, 0, -1000 / 4).round() - 1`.
    assert_eq!(schedule_of(SchedulerKind::DpmSolverMultistep, &config, &path, 4), [999, 749, 499, 249]);
    // An override on a DDIM built from the file directly.
    let mut overrides = serde_json::Map::new();
    overrides.insert("steps_offset".into(), 0.into());
    let ddim0 = from_config(SchedulerKind::Ddim, &file, &overrides, &path).unwrap().config;
    assert_eq!(schedule_of(SchedulerKind::Ddim, &ddim0, &path, 4), [750, 500, 250, 0]);
    // A bad override is the config's error, as a bad file value would be.
    let mut overrides = serde_json::Map::new();
    overrides.insert("timestep_spacing".into(), "sideways".into());
    assert!(matches!(from_config(SchedulerKind::Ddim, &file, &overrides, &path), Err(Error::Config { .. })));
}

/// A fully written config (the fixtures') gives no `_use_default_values` and reads back unchanged.
#[test]
fn from_config_of_a_full_config_is_that_config() {
    for model in MODELS {
        let (file, path) = scheduler_config(model);
        let ddim = from_config(SchedulerKind::Ddim, &file, &no_overrides(), &path).unwrap().config;
        assert!(ddim.get("_use_default_values").is_none(), "{model}: {ddim}");
        assert_eq!(ddim, file, "{model}");
    }
}

#[test]
fn bad_configs_are_config_errors() {
    let path = Path::new("bad/scheduler_config.json");
    for json in [
        serde_json::json!({"beta_schedule": "cubic"}),
        serde_json::json!({"timestep_spacing": "sideways"}),
        serde_json::json!({"num_train_timesteps": "many"}),
        serde_json::json!([1, 2]),
    ] {
        for kind in [SchedulerKind::Ddim, SchedulerKind::DpmSolverMultistep] {
            match build_scheduler(kind, &json, path, 10, 0.0) {
                Err(Error::Config { path: p, reason }) => {
                    assert_eq!(p, path);
                    assert!(!reason.is_empty());
                }
                Err(e) => panic!("{json}: expected a config error, got {e}"),
                Ok(_) => panic!("{json}: accepted"),
            }
        }
    }
    let json = serde_json::json!({"use_lu_lambdas": true});
    assert!(matches!(
        build_scheduler(SchedulerKind::DpmSolverMultistep, &json, path, 10, 0.0),
        Err(Error::Config { .. })
    ));
    let json = serde_json::json!({"algorithm_type": "dpmsolver"});
    assert!(matches!(
        build_scheduler(SchedulerKind::DpmSolverMultistep, &json, path, 10, 0.0),
        Err(Error::Config { .. })
    ));
    assert!(matches!(parse_scheduler_config("{\"a\": ", path), Err(Error::Config { .. })));
}

#[test]
fn scheduler_kind_names() {
    assert_eq!("ddim".parse::<SchedulerKind>().unwrap(), SchedulerKind::Ddim);
    assert_eq!("DPM++".parse::<SchedulerKind>().unwrap(), SchedulerKind::DpmSolverMultistep);
    assert_eq!(SchedulerKind::from_class_name("DDIMScheduler"), Some(SchedulerKind::Ddim));
    assert!(matches!("heun".parse::<SchedulerKind>(), Err(Error::InvalidArgument(_))));
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
        assert_eq!(SchedulerKind::from_class_name(kind.class_name()), Some(kind));
    }
    assert_eq!("euler-a".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestralDiscrete);
}

/// `from_config(config, KEY=VALUE)`: values read as JSON, an overridden key not among the
/// `_use_default_values`, unknown keys refused naming the class's keys.
#[test]
fn scheduler_overrides() {
    let (json, path) = scheduler_config("tiny-t2v");
    let mut with_defaults = json.clone();
    with_defaults["_use_default_values"] = serde_json::json!(["timestep_scaling", "beta_end"]);
    let o = |k: &str, v: &str| (k.to_string(), v.to_string());
    let lcm =
        t2v::schedulers::apply_overrides(SchedulerKind::Lcm, &with_defaults, &[o("timestep_scaling", "4")], &path)
            .unwrap();
    assert_eq!(lcm["timestep_scaling"], 4.0);
    // By from_config's rule: the defaulted beta_end is LCM's own again, and listed; the override is not.
    let defaulted = lcm["_use_default_values"].as_array().unwrap();
    assert!(defaulted.contains(&"beta_end".into()) && !defaulted.contains(&"timestep_scaling".into()), "{lcm}");
    let effective = t2v::schedulers::effective_config(SchedulerKind::Lcm, &lcm, &path).unwrap();
    assert_eq!(effective["timestep_scaling"], 4.0);
    let unipc = t2v::schedulers::apply_overrides(
        SchedulerKind::UniPcMultistep,
        &json,
        &[o("timestep_spacing", "trailing"), o("solver_order", "3")],
        &path,
    )
    .unwrap();
    assert_eq!(unipc["timestep_spacing"], "trailing");
    let err = t2v::schedulers::apply_overrides(SchedulerKind::Lcm, &json, &[o("timestep_scalin", "4")], &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("LCMScheduler has no setting `timestep_scalin`") && err.contains("timestep_scaling"), "{err}");
    // Euler ancestral has no Euler-only keys.
    assert!(t2v::schedulers::apply_overrides(
        SchedulerKind::EulerAncestralDiscrete,
        &json,
        &[o("use_karras_sigmas", "true")],
        &path
    )
    .is_err());
    assert!(t2v::schedulers::parse_override("timestep_scaling").is_err());
}

/// Euler from the checkpoint's config with `linspace` spacing: float timesteps handed to the
/// UNet (499.5), and the initial sigma the largest, sqrt((1 − ᾱ_999)/ᾱ_999) = 14.6146 for this
/// schedule (Stable Diffusion's well-known value).
#[test]
fn euler_linspace_timesteps_are_fractional() {
    let (json, path) = scheduler_config("tiny-t2v");
    let config = t2v::schedulers::apply_overrides(
        SchedulerKind::EulerDiscrete,
        &json,
        &[("timestep_spacing".into(), "linspace".into())],
        &path,
    )
    .unwrap();
    let s = build_scheduler(SchedulerKind::EulerDiscrete, &config, &path, 3, 0.0).unwrap();
    let ts: Vec<f64> = s.timesteps().iter().map(|&t| s.model_timestep(t)).collect();
    assert_eq!(ts, vec![999.0, 499.5, 0.0]);
    assert!((s.init_noise_sigma() - 14.6146).abs() < 1e-3, "{}", s.init_noise_sigma());
    // `leading` (the checkpoint's): sqrt(σ_max² + 1).
    let s = build_scheduler(SchedulerKind::EulerAncestralDiscrete, &json, &path, 5, 0.0).unwrap();
    assert_eq!(s.timesteps(), &[801, 601, 401, 201, 1]);
    let sigma_max = ((1.0 - 0.0046600951f64) / 0.0046600951).sqrt();
    let sigma_801_bound = s.init_noise_sigma();
    assert!(sigma_801_bound > 1.0 && sigma_801_bound < (sigma_max * sigma_max + 1.0).sqrt());
}

// ---------------------------------------------------------------------------------------------
// Spacings: expected values computed with numpy from the diffusers formulas

fn with_spacing(spacing: &str) -> serde_json::Value {
    serde_json::json!({
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "steps_offset": 1, "timestep_spacing": spacing
    })
}

fn timesteps_for(kind: SchedulerKind, spacing: &str, n: usize) -> Vec<usize> {
    let json = with_spacing(spacing);
    build_scheduler(kind, &json, Path::new("x.json"), n, 0.0).unwrap().timesteps().to_vec()
}

#[test]
fn ddim_linspace_and_trailing_spacings() {
    use SchedulerKind::Ddim;
    assert_eq!(timesteps_for(Ddim, "linspace", 1), [0]);
    assert_eq!(timesteps_for(Ddim, "linspace", 2), [999, 0]);
    assert_eq!(timesteps_for(Ddim, "linspace", 3), [999, 500, 0]);
    assert_eq!(timesteps_for(Ddim, "linspace", 7), [999, 832, 666, 500, 333, 166, 0]);
    assert_eq!(
        timesteps_for(Ddim, "linspace", 25),
        [
            999, 957, 916, 874, 832, 791, 749, 708, 666, 624, 583, 541, 500, 458, 416, 375, 333, 291, 250, 208, 166,
            125, 83, 42, 0
        ]
    );
    assert_eq!(
        timesteps_for(Ddim, "linspace", 50),
        [
            999, 979, 958, 938, 917, 897, 877, 856, 836, 816, 795, 775, 754, 734, 714, 693, 673, 652, 632, 612, 591,
            571, 550, 530, 510, 489, 469, 449, 428, 408, 387, 367, 347, 326, 306, 285, 265, 245, 224, 204, 183, 163,
            143, 122, 102, 82, 61, 41, 20, 0
        ]
    );
    assert_eq!(timesteps_for(Ddim, "trailing", 1), [999]);
    assert_eq!(timesteps_for(Ddim, "trailing", 2), [999, 499]);
    assert_eq!(timesteps_for(Ddim, "trailing", 3), [999, 666, 332]);
    assert_eq!(timesteps_for(Ddim, "trailing", 7), [999, 856, 713, 570, 428, 285, 142]);
    assert_eq!(timesteps_for(Ddim, "trailing", 10), [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
    let t50 = timesteps_for(Ddim, "trailing", 50);
    assert_eq!(t50, (0..50).rev().map(|i| i * 20 + 19).collect::<Vec<_>>());
    // np.arange's float length makes 61 trailing steps 62 timesteps, the last one -1: refused.
    let json = with_spacing("trailing");
    let cfg = DdimConfig::from_json(&json, Path::new("x.json")).unwrap();
    let raw = ddim_timesteps(&cfg, 61);
    assert_eq!((raw.len(), &raw[..3], &raw[59..]), (62, &[999i64, 983, 966][..], &[32i64, 15, -1][..]));
    assert!(matches!(build_scheduler(Ddim, &json, Path::new("x.json"), 61, 0.0), Err(Error::InvalidArgument(_))));
    // more steps than training timesteps
    assert!(matches!(build_scheduler(Ddim, &json, Path::new("x.json"), 1001, 0.0), Err(Error::InvalidArgument(_))));
}

#[test]
fn dpm_linspace_trailing_and_leading_spacings() {
    use SchedulerKind::DpmSolverMultistep as Dpm;
    assert_eq!(timesteps_for(Dpm, "linspace", 1), [999]);
    assert_eq!(timesteps_for(Dpm, "linspace", 2), [999, 500]);
    assert_eq!(timesteps_for(Dpm, "linspace", 3), [999, 666, 333]);
    assert_eq!(timesteps_for(Dpm, "linspace", 7), [999, 856, 714, 571, 428, 285, 143]);
    assert_eq!(timesteps_for(Dpm, "linspace", 10), [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
    assert_eq!(timesteps_for(Dpm, "trailing", 3), [999, 666, 332]);
    assert_eq!(timesteps_for(Dpm, "trailing", 7), [999, 856, 713, 570, 428, 285, 142]);
    assert_eq!(timesteps_for(Dpm, "leading", 1), [501]);
    assert_eq!(timesteps_for(Dpm, "leading", 3), [751, 501, 251]);
    assert_eq!(timesteps_for(Dpm, "leading", 7), [876, 751, 626, 501, 376, 251, 126]);
    assert_eq!(timesteps_for(Dpm, "leading", 10), [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]);
}

#[test]
fn dpm_karras_timesteps() {
    let json = serde_json::json!({
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": true
    });
    let path = Path::new("x.json");
    let s = DpmSolverMultistepScheduler::new(DpmSolverConfig::from_json(&json, path).unwrap(), path, 10).unwrap();
    assert_eq!(s.timesteps(), &[999, 916, 815, 687, 523, 327, 146, 41, 7, 0]);
    assert!((s.sigmas()[0] - 14.614_647).abs() < 1e-4 && (s.sigmas()[1] - 9.102_937).abs() < 1e-4);
    assert_eq!(*s.sigmas().last().unwrap(), 0.0);
    let s = DpmSolverMultistepScheduler::new(DpmSolverConfig::from_json(&json, path).unwrap(), path, 25).unwrap();
    assert_eq!(
        s.timesteps(),
        &[
            999, 970, 938, 905, 868, 829, 786, 739, 687, 630, 568, 500, 427, 352, 278, 207, 146, 96, 59, 34, 18, 9, 4,
            1, 0
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Noise, eta, other prediction types

#[test]
fn ddim_eta_draws_noise_once_per_step_and_matches_the_formula() {
    let (json, path) = scheduler_config("tiny-t2v");
    let eta = 0.7;
    let n = 5;
    let mut s = DdimScheduler::new(DdimConfig::from_json(&json, &path).unwrap(), &path, n, eta).unwrap();
    let ac: Vec<f64> = s.alphas_cumprod().iter().map(|&a| a as f64).collect();
    let x = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().affine(0.1, -1.0).unwrap().reshape((1, 2, 3, 4)).unwrap();
    let eps = x.sin().unwrap();
    let z = x.cos().unwrap();
    let mut calls = vec![];
    let mut source = |shape: &[usize]| -> Result<Tensor> {
        calls.push(shape.to_vec());
        Ok(z.clone())
    };
    let t = s.timesteps()[1];
    let out = s.step(&eps, t, &x, &mut source).unwrap();
    assert_eq!(calls, vec![vec![1, 2, 3, 4]]);

    let (a, ap) = (ac[t], ac[t - 1000 / n]);
    let x0 = ((&x - eps.affine((1.0 - a).sqrt(), 0.0).unwrap()).unwrap()).affine(1.0 / a.sqrt(), 0.0).unwrap();
    let var = (1.0 - ap) / (1.0 - a) * (1.0 - a / ap);
    let std = eta * var.sqrt();
    let expected = (x0.affine(ap.sqrt(), 0.0).unwrap()
        + eps.affine((1.0 - ap - std * std).sqrt(), 0.0).unwrap()
        + z.affine(std, 0.0).unwrap())
    .unwrap();
    assert!(rel_err(&out, &expected) < 1e-5, "{}", rel_err(&out, &expected));

    // eta = 0: the noise source is never called
    let mut s = build_scheduler(SchedulerKind::Ddim, &json, &path, n, 0.0).unwrap();
    s.step(&eps, t, &x, &mut no_noise).unwrap();
    // negative eta is refused
    assert!(matches!(build_scheduler(SchedulerKind::Ddim, &json, &path, n, -1.0), Err(Error::InvalidArgument(_))));
}

#[test]
fn dpm_ode_never_draws_noise_and_sde_does() {
    let (json, path) = scheduler_config("tiny-t2v");
    let x = Tensor::arange(0f32, 18.0, &Device::Cpu).unwrap().affine(0.1, -1.0).unwrap().reshape((2, 9)).unwrap();
    let mut s = build_scheduler(SchedulerKind::DpmSolverMultistep, &json, &path, 4, 0.0).unwrap();
    for t in s.timesteps().to_vec() {
        s.step(&x.sin().unwrap(), t, &x, &mut no_noise).unwrap();
    }
    // stepping past the end is an error, not a panic
    assert!(s.step(&x, 1, &x, &mut no_noise).is_err());

    let mut json = json.clone();
    json["algorithm_type"] = "sde-dpmsolver++".into();
    let mut s = build_scheduler(SchedulerKind::DpmSolverMultistep, &json, &path, 4, 0.0).unwrap();
    let mut calls = 0;
    let mut source = |shape: &[usize]| -> Result<Tensor> {
        calls += 1;
        Ok(Tensor::zeros(shape, DType::F32, &Device::Cpu)?)
    };
    for t in s.timesteps().to_vec() {
        s.step(&x.sin().unwrap(), t, &x, &mut source).unwrap();
    }
    assert_eq!(calls, 4);
}

#[test]
fn v_prediction_matches_epsilon_with_converted_output() {
    // v = sqrt(a)*eps - sqrt(1-a)*x0 describes the same step as eps: both schedulers must agree.
    let (json, path) = scheduler_config("tiny-t2v");
    let mut vjson = json.clone();
    vjson["prediction_type"] = "v_prediction".into();
    let x =
        Tensor::arange(0f32, 36.0, &Device::Cpu).unwrap().affine(0.07, -1.2).unwrap().reshape((1, 4, 3, 3)).unwrap();
    for kind in [SchedulerKind::Ddim, SchedulerKind::DpmSolverMultistep] {
        let mut se = build_scheduler(kind, &json, &path, 5, 0.0).unwrap();
        let mut sv = build_scheduler(kind, &vjson, &path, 5, 0.0).unwrap();
        let ddim = ddim_scheduler("tiny-t2v", 5);
        let (mut xe, mut xv) = (x.clone(), x.clone());
        for (k, t) in se.timesteps().to_vec().into_iter().enumerate() {
            let a = ddim.alphas_cumprod()[t] as f64;
            let eps = fake_eps(&xv, t, k);
            let x0 = (&xv - eps.affine((1.0 - a).sqrt(), 0.0).unwrap()).unwrap().affine(1.0 / a.sqrt(), 0.0).unwrap();
            let v = (eps.affine(a.sqrt(), 0.0).unwrap() - x0.affine((1.0 - a).sqrt(), 0.0).unwrap()).unwrap();
            xe = se.step(&fake_eps(&xe, t, k), t, &xe, &mut no_noise).unwrap();
            xv = sv.step(&v, t, &xv, &mut no_noise).unwrap();
        }
        let err = rel_err(&xv, &xe);
        assert!(err < 1e-4, "{kind:?}: {err}");
    }
}
