//! Noise schedulers of the denoising loop: DDIM, multistep DPM-Solver(++), LCM, UniPC, Euler and
//! Euler ancestral, matching diffusers 0.42.1 `DDIMScheduler`, `DPMSolverMultistepScheduler`,
//! `LCMScheduler`, `UniPCMultistepScheduler`, `EulerDiscreteScheduler` and
//! `EulerAncestralDiscreteScheduler`.
//!
//! Both read the checkpoint's `scheduler/scheduler_config.json`. Like diffusers'
//! `from_config`, a scheduler takes the keys of the file that it knows and its *own* defaults for
//! the keys the file lacks: a DPM-Solver built from a DDIM file without `timestep_spacing` uses
//! `linspace` (DPM's default), while the DDIM built from that same file uses `leading`.
//!
//! Scalar coefficients are computed in `f32`, in the order the reference computes them (its
//! schedules are float32 torch tensors); the tensor arithmetic uses candle ops only, so a step
//! runs on any device.
//!
//! One file: what every scheduler shares (reading configs with diffusers' defaulted-key rule, timestep
//! spacing, the trait, `from_config`); each scheduler has a file of its own.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod lcm;
pub mod unipc;

pub use ddim::{DdimConfig, DdimScheduler};
pub use dpm_solver::{DpmSolverConfig, DpmSolverMultistepScheduler};
pub use euler::{EulerConfig, EulerScheduler};
pub use lcm::{LcmConfig, LcmScheduler};
pub use unipc::{UniPcConfig, UniPcMultistepScheduler};

/// Which scheduler drives the denoising loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler` (the published text-to-video checkpoints ship this one).
    Ddim,
    /// `DPMSolverMultistepScheduler` (DPM-Solver++ 2M by default).
    DpmSolverMultistep,
    /// `LCMScheduler`: latent consistency sampling (distilled checkpoints, few steps, no guidance).
    Lcm,
    /// `UniPCMultistepScheduler` (UniPC, bh2 predictor-corrector by default).
    UniPcMultistep,
    /// `EulerDiscreteScheduler`.
    EulerDiscrete,
    /// `EulerAncestralDiscreteScheduler` (fresh noise every step, from the run's generator).
    EulerAncestralDiscrete,
    /// T2V-Turbo's `T2VTurboScheduler` (its own consistency sampler, not a diffusers class):
    /// LCM's step with timesteps taken every `50 / n` of the distillation schedule, a UNet with
    /// a guidance embedding (`time_cond_proj_dim`) and no unconditional pass.
    T2vTurbo,
}

impl SchedulerKind {
    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::UniPcMultistep => "UniPCMultistepScheduler",
            SchedulerKind::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            SchedulerKind::T2vTurbo => "T2VTurboScheduler",
        }
    }

    /// The kind for a diffusers `_class_name`, if it is one of the supported classes.
    pub fn from_class_name(name: &str) -> Option<Self> {
        match name {
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "DPMSolverMultistepScheduler" => Some(SchedulerKind::DpmSolverMultistep),
            "LCMScheduler" => Some(SchedulerKind::Lcm),
            "UniPCMultistepScheduler" => Some(SchedulerKind::UniPcMultistep),
            "EulerDiscreteScheduler" => Some(SchedulerKind::EulerDiscrete),
            "EulerAncestralDiscreteScheduler" => Some(SchedulerKind::EulerAncestralDiscrete),
            "T2VTurboScheduler" => Some(SchedulerKind::T2vTurbo),
            _ => None,
        }
    }

    /// Parses a user-facing name: `ddim`, or `dpm` / `dpm++` / `dpmsolver` / `dpm-solver` /
    /// `dpmsolver++` / `dpmsolvermultistep`, `lcm`, `unipc`, `euler`, `euler_a` (also `euler-a`,
    /// `euler_ancestral`), or a diffusers class name (case-insensitive).
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        match lower.as_str() {
            "ddim" | "ddimscheduler" => Ok(SchedulerKind::Ddim),
            "dpm"
            | "dpm++"
            | "dpmsolver"
            | "dpmsolver++"
            | "dpm-solver"
            | "dpm-solver++"
            | "dpmsolvermultistep"
            | "dpmsolvermultistepscheduler" => Ok(SchedulerKind::DpmSolverMultistep),
            "lcm" | "lcmscheduler" => Ok(SchedulerKind::Lcm),
            "unipc" | "unipcmultistep" | "unipcmultistepscheduler" => Ok(SchedulerKind::UniPcMultistep),
            "euler" | "eulerdiscrete" | "eulerdiscretescheduler" => Ok(SchedulerKind::EulerDiscrete),
            "euler_a"
            | "euler-a"
            | "eulera"
            | "euler_ancestral"
            | "euler-ancestral"
            | "eulerancestraldiscrete"
            | "eulerancestraldiscretescheduler" => Ok(SchedulerKind::EulerAncestralDiscrete),
            "t2v-turbo" | "t2v_turbo" | "t2vturbo" | "t2vturboscheduler" => Ok(SchedulerKind::T2vTurbo),
            _ => Err(Error::InvalidArgument(format!(
                "unknown scheduler `{name}`: choose `dpm` (DPM-Solver++ multistep), `ddim`, `lcm`, `unipc`, \
                 `euler`, `euler_a` (Euler ancestral) or `t2v-turbo`"
            ))),
        }
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SchedulerKind::parse(s)
    }
}

impl SchedulerKind {
    /// The short name that [`SchedulerKind::parse`] reads back: `ddim`, `dpm`, `lcm`, `unipc`,
    /// `euler` or `euler_a`.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::DpmSolverMultistep => "dpm",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::UniPcMultistep => "unipc",
            SchedulerKind::EulerDiscrete => "euler",
            SchedulerKind::EulerAncestralDiscrete => "euler_a",
            SchedulerKind::T2vTurbo => "t2v-turbo",
        }
    }

    /// Every kind, in the order the command line lists them.
    pub const ALL: [SchedulerKind; 7] = [
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Ddim,
        SchedulerKind::Lcm,
        SchedulerKind::UniPcMultistep,
        SchedulerKind::EulerDiscrete,
        SchedulerKind::EulerAncestralDiscrete,
        SchedulerKind::T2vTurbo,
    ];

    /// Whether runs of this scheduler use classifier-free guidance when the guidance scale is
    /// above 1: all but T2V-Turbo's, whose UNet takes the scale as an embedding instead.
    pub fn guides_with_negative(self) -> bool {
        self != SchedulerKind::T2vTurbo
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The index of the step the loop is at, as diffusers' `_init_step_index`: the running index
/// once stepping began, else the begin index set for video-to-video, else the timestep's place.
pub(crate) fn step_index(step: Option<usize>, begin: Option<usize>, for_timestep: impl FnOnce() -> usize) -> usize {
    step.or(begin).unwrap_or_else(for_timestep)
}

/// A noise source: given a shape, returns standard normal noise of that shape (f32).
/// The pipeline passes a closure drawing from its seeded generator.
pub type NoiseSource<'a> = dyn FnMut(&[usize]) -> Result<Tensor> + 'a;

/// A noise source for configurations that never draw noise (DDIM with `eta == 0`, the ODE
/// variants of DPM-Solver). Errors if it is called.
pub fn no_noise(shape: &[usize]) -> Result<Tensor> {
    Err(Error::InvalidArgument(format!(
        "the scheduler needs random noise of shape {shape:?} (DDIM with eta > 0, or an SDE \
         variant of DPM-Solver), but no noise source was given"
    )))
}

/// The interface of the denoising loop:
/// ```text
/// latents = latents * init_noise_sigma
/// for t in timesteps: x = scale_model_input(latents, t); eps = unet(x, t); latents = step(eps, t, latents, noise)
/// ```
pub trait Scheduler: Send {
    fn kind(&self) -> SchedulerKind;
    /// The timesteps of the current schedule, in the order the loop visits them (descending).
    fn timesteps(&self) -> &[usize];
    /// The standard deviation the initial noise is scaled by.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the UNet input for this timestep (identity for DDIM, DPM-Solver, LCM and UniPC;
    /// `1/sqrt(σ² + 1)` for the Euler schedulers).
    fn scale_model_input(&self, sample: Tensor, _timestep: usize) -> Result<Tensor> {
        Ok(sample)
    }
    /// The timestep the UNet is given at the step of `timestep` (one of [`Scheduler::timesteps`]):
    /// the same number, except for the Euler schedulers whose `linspace` timesteps are fractional
    /// (diffusers hands the UNet the float32 value; `timesteps()` holds them rounded).
    fn model_timestep(&self, timestep: usize) -> f64 {
        timestep as f64
    }
    /// One denoising step: the sample at the previous (lower-noise) timestep.
    /// `noise` is called only when the step is stochastic, with `model_output`'s shape.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Result<Tensor>;
    /// Recomputes the schedule for `num_inference_steps` and clears any multistep state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// diffusers' `set_begin_index`: the loop will start at `timesteps()[index]` rather than at
    /// the first timestep (video-to-video skips the noisiest steps). Schedulers that find their
    /// place from the timestep alone (DDIM) ignore it.
    fn set_begin_index(&mut self, _index: usize) {}
    /// diffusers' `add_noise`: `original` noised to the level of `timestep` with `noise`, where
    /// the loop will start (see [`Scheduler::set_begin_index`]).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor>;
}

/// The timesteps that run for `num_inference_steps` at `strength`, as diffusers' img2img
/// `get_timesteps`: `init = min(int(n · strength), n)` and the last `init` of the n-step
/// schedule. Returns the index of the first one (`n − init`, the begin index); refuses a
/// strength outside [0, 1] or one that runs no step, naming the smallest that runs one.
pub fn strength_begin_index(num_inference_steps: usize, strength: f64) -> Result<usize> {
    let n = num_inference_steps;
    if n == 0 {
        return Err(Error::InvalidArgument("the number of inference steps must be at least 1".into()));
    }
    if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
        return Err(Error::InvalidArgument(format!(
            "the strength must be between 0 and 1 (how much of the input video is replaced), got {strength}"
        )));
    }
    let init = ((n as f64 * strength) as usize).min(n);
    if init == 0 {
        let more_steps = match fewest_steps(strength) {
            Some(m) => format!(", or use at least {m} steps"),
            None => String::new(),
        };
        return Err(Error::InvalidArgument(format!(
            "a strength of {strength} runs no denoising step of {n} (int({n} × {strength}) = 0): the smallest \
             strength that runs one is {}{more_steps}",
            smallest_strength(n)
        )));
    }
    Ok(n - init)
}

/// The smallest strength s with `int(n · s) ≥ 1`.
fn smallest_strength(n: usize) -> f64 {
    let mut s = 1.0 / n as f64;
    while ((n as f64) * s) < 1.0 {
        s = s.next_up();
    }
    s
}

/// The fewest steps n with `int(n · strength) ≥ 1`; none for strength 0.
fn fewest_steps(strength: f64) -> Option<usize> {
    if strength <= 0.0 {
        return None;
    }
    let mut n = (1.0 / strength).floor().max(1.0) as usize;
    while ((n as f64) * strength) < 1.0 {
        n += 1;
    }
    Some(n)
}

/// Builds a scheduler of `kind` from a scheduler config (the parsed `scheduler_config.json`,
/// whatever its `_class_name`), with its timesteps set for `num_inference_steps`.
/// `config_path` is only used in error messages. `eta` is DDIM's noise weight (0 =
/// deterministic); DPM-Solver has no such parameter, so it ignores it, as diffusers does.
pub fn build_scheduler(
    kind: SchedulerKind,
    config_json: &serde_json::Value,
    config_path: &Path,
    num_inference_steps: usize,
    eta: f64,
) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddim => {
            let config = DdimConfig::from_json(config_json, config_path)?;
            Box::new(DdimScheduler::new(config, config_path, num_inference_steps, eta)?)
        }
        SchedulerKind::DpmSolverMultistep => {
            let config = DpmSolverConfig::from_json(config_json, config_path)?;
            Box::new(DpmSolverMultistepScheduler::new(config, config_path, num_inference_steps)?)
        }
        SchedulerKind::Lcm => {
            let config = LcmConfig::from_json(config_json, config_path)?;
            Box::new(LcmScheduler::new(config, config_path, num_inference_steps)?)
        }
        SchedulerKind::T2vTurbo => {
            let config = LcmConfig::from_json(config_json, config_path)?;
            Box::new(LcmScheduler::new_t2v_turbo(config, config_path, num_inference_steps)?)
        }
        SchedulerKind::UniPcMultistep => {
            let config = UniPcConfig::from_json(config_json, config_path)?;
            Box::new(UniPcMultistepScheduler::new(config, config_path, num_inference_steps)?)
        }
        SchedulerKind::EulerDiscrete | SchedulerKind::EulerAncestralDiscrete => {
            let config = EulerConfig::from_json(kind, config_json, config_path)?;
            Box::new(EulerScheduler::new(kind, config, config_path, num_inference_steps)?)
        }
    })
}

/// Reads and parses a `scheduler_config.json` (see [`parse_scheduler_config`]).
pub fn load_scheduler_config(path: &Path) -> Result<serde_json::Value> {
    let text = crate::files::read_text(path, crate::files::FileKind::Config)?;
    parse_scheduler_config(&text, path)
}

/// Parses the text of a scheduler config. Python's `json` writes non-finite floats as bare
/// `Infinity` / `-Infinity` / `NaN` (diffusers saves DPM-Solver's default `lambda_min_clipped`
/// as `-Infinity`), which strict JSON rejects: such tokens are read as strings, which the
/// float fields accept.
pub fn parse_scheduler_config(text: &str, path: &Path) -> Result<serde_json::Value> {
    let cleaned = quote_non_finite_tokens(text);
    serde_json::from_str(&cleaned)
        .map_err(|e| Error::Config { path: path.to_path_buf(), reason: format!("invalid JSON: {e}") })
}

fn quote_non_finite_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        } else {
            let token = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t));
            if let Some(token) = token {
                out.push('"');
                out.push_str(token);
                out.push('"');
                rest = &rest[token.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Prepares a config object for deserialising into one scheduler's config struct: keys listed
/// in `_use_default_values` (present in the config of an in-memory diffusers scheduler, never
/// in a saved file) and `null` values are dropped so that the scheduler's own defaults apply;
/// unknown keys are ignored by the structs.
pub(crate) fn parse_config<T: DeserializeOwned>(value: &serde_json::Value, path: &Path) -> Result<T> {
    let config_err = |reason: String| Error::Config { path: path.to_path_buf(), reason };
    let object = value.as_object().ok_or_else(|| config_err("a scheduler config must be a JSON object".to_string()))?;
    let used_defaults: Vec<&str> = object
        .get("_use_default_values")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let filtered: serde_json::Map<String, serde_json::Value> = object
        .iter()
        .filter(|(k, v)| !v.is_null() && !used_defaults.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::from_value(serde_json::Value::Object(filtered)).map_err(|e| config_err(e.to_string()))
}

/// Writes a float config value as [`de_float`] reads it: non-finite values as `"-Infinity"`,
/// `"Infinity"` or `"NaN"` (JSON has no such numbers; Python's `float()` reads these strings).
pub(crate) fn ser_float<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    match *v {
        v if v.is_nan() => s.serialize_str("NaN"),
        v if v == f64::INFINITY => s.serialize_str("Infinity"),
        v if v == f64::NEG_INFINITY => s.serialize_str("-Infinity"),
        v => s.serialize_f64(v),
    }
}

/// The configuration a scheduler of `kind` runs with when built from `config_json` (a config of
/// any class): the keys that class knows, from the config or its defaults, under diffusers'
/// names, with `_class_name` set to the class (what diffusers' `Scheduler.from_config(config)
/// .config` holds). `path` is only used in error messages.
pub fn effective_config(
    kind: SchedulerKind,
    config_json: &serde_json::Value,
    path: &Path,
) -> Result<serde_json::Value> {
    let value = match kind {
        SchedulerKind::Ddim => serde_json::to_value(DdimConfig::from_json(config_json, path)?),
        SchedulerKind::DpmSolverMultistep => serde_json::to_value(DpmSolverConfig::from_json(config_json, path)?),
        SchedulerKind::Lcm | SchedulerKind::T2vTurbo => serde_json::to_value(LcmConfig::from_json(config_json, path)?),
        SchedulerKind::UniPcMultistep => serde_json::to_value(UniPcConfig::from_json(config_json, path)?),
        SchedulerKind::EulerDiscrete | SchedulerKind::EulerAncestralDiscrete => {
            EulerConfig::from_json(kind, config_json, path)?.to_json(kind)
        }
    }
    .map_err(|e| Error::Config { path: path.to_path_buf(), reason: e.to_string() })?;
    let mut object = match value {
        serde_json::Value::Object(object) => object,
        _ => unreachable!("scheduler configs are structs"),
    };
    object.insert("_class_name".into(), kind.class_name().into());
    Ok(serde_json::Value::Object(object))
}

/// A scheduler's configuration as diffusers keeps it: what [`from_config`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// diffusers' `Scheduler.from_config(config, **overrides).config`: the class's keys (given or
    /// defaulted), the keys of other classes carried over from the source config (kept so that
    /// converting back restores them, as diffusers' "hidden" config does), `_class_name`, and
    /// `_use_default_values` (the class's keys that took the class's default).
    pub config: serde_json::Value,
    /// Override keys the class does not know (diffusers ignores them; a caller may refuse them).
    pub ignored_overrides: Vec<String>,
}

/// diffusers' `SchedulerClass.from_config(config, **overrides)` for the scheduler `kind`: the one
/// rule for building any scheduler from another's config, which the command line, the service and
/// the Python package all go through.
///
/// As diffusers' `ConfigMixin.extract_init_dict` and `register_to_config`:
/// - keys that `config` lists in `_use_default_values` were defaults of the class that wrote it,
///   not settings: they are dropped, so that this class's own defaults apply (a DDIM config read
///   from a file without `timestep_spacing` says `"leading"` but lists it there; a DPM-Solver
///   built from it takes DPM's `"linspace"`);
/// - each key of this class comes from `overrides`, else from `config`, else from its default,
///   and is listed in `_use_default_values` when defaulted;
/// - the other keys of `config` (another class's, `_diffusers_version`) are kept as they are.
///
/// A saved `scheduler_config.json` never holds `_use_default_values`: every key it has is a
/// setting. `path` is only used in error messages.
pub fn from_config(
    kind: SchedulerKind,
    config: &serde_json::Value,
    overrides: &serde_json::Map<String, serde_json::Value>,
    path: &Path,
) -> Result<SchedulerConfig> {
    let object = config.as_object().ok_or_else(|| config_error(path, "a scheduler config must be a JSON object"))?;
    let used_defaults: Vec<&str> = object
        .get("_use_default_values")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let given: serde_json::Map<String, serde_json::Value> = object
        .iter()
        .filter(|(k, _)| k.as_str() != "_use_default_values" && !used_defaults.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The class's keys: those of its configuration with every default.
    let class_keys: Vec<String> = match effective_config(kind, &serde_json::json!({}), path)? {
        serde_json::Value::Object(o) => o.keys().filter(|k| !k.starts_with('_')).cloned().collect(),
        _ => unreachable!("scheduler configs are objects"),
    };
    let mut init = serde_json::Map::new();
    for key in &class_keys {
        if let Some(v) = overrides.get(key).or_else(|| given.get(key)) {
            init.insert(key.clone(), v.clone());
        }
    }
    let ignored_overrides: Vec<String> = overrides.keys().filter(|k| !class_keys.contains(k)).cloned().collect();
    let effective = effective_config(kind, &serde_json::Value::Object(init.clone()), path)?;
    let mut out: serde_json::Map<String, serde_json::Value> =
        given.into_iter().filter(|(k, _)| !init.contains_key(k)).collect();
    if let serde_json::Value::Object(effective) = effective {
        out.extend(effective);
    }
    let mut defaulted: Vec<&String> = class_keys.iter().filter(|k| !init.contains_key(*k)).collect();
    defaulted.sort();
    out.insert("_class_name".into(), kind.class_name().into());
    if !defaulted.is_empty() {
        out.insert("_use_default_values".into(), defaulted.into_iter().cloned().collect::<Vec<_>>().into());
    }
    Ok(SchedulerConfig { config: serde_json::Value::Object(out), ignored_overrides })
}

/// diffusers' `Scheduler.from_config(config, **overrides)`: `config_json` with each `KEY=VALUE`
/// of `overrides` set (the value read as JSON when it parses, `4` a number, `true` a boolean,
/// `null` the class default; else as a string, `trailing`). A key that the scheduler of `kind`
/// does not have is refused, naming the keys it has (diffusers would ignore it with a warning,
/// which hides a typo). The config is built by [`from_config`], diffusers' rule.
pub fn apply_overrides(
    kind: SchedulerKind,
    config_json: &serde_json::Value,
    overrides: &[(String, String)],
    path: &Path,
) -> Result<serde_json::Value> {
    let mut values = serde_json::Map::new();
    for (key, value) in overrides {
        let parsed = serde_json::from_str::<serde_json::Value>(value.trim())
            .unwrap_or_else(|_| serde_json::Value::String(value.trim().to_string()));
        values.insert(key.trim().to_string(), parsed);
    }
    let built = from_config(kind, config_json, &values, path)?;
    if let Some(key) = built.ignored_overrides.first() {
        let mut names: Vec<String> = match effective_config(kind, &serde_json::json!({}), path)? {
            serde_json::Value::Object(o) => o.keys().filter(|k| !k.starts_with('_')).cloned().collect(),
            _ => Vec::new(),
        };
        names.sort_unstable();
        return Err(Error::InvalidArgument(format!(
            "{} has no setting `{key}`; its settings are: {}",
            kind.class_name(),
            names.join(", ")
        )));
    }
    Ok(built.config)
}

/// Parses `KEY=VALUE` (a `--scheduler-config` argument).
pub fn parse_override(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(Error::InvalidArgument(format!(
            "a scheduler setting is written KEY=VALUE (as timestep_scaling=4), got `{text}`"
        ))),
    }
}

/// `np.interp(x, arange(len(fp)), fp)`: linear interpolation between the float32 values `fp` at
/// integer points, in float64, clamped to the ends.
pub(crate) fn interp_at(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// Float32 `sqrt((1 − ᾱ) / ᾱ)` per training timestep: the sigmas of the Euler-type schedulers.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0f32 - a) / a).sqrt()).collect()
}

/// A float config value that may be non-finite (written by Python as `-Infinity` etc).
pub(crate) fn de_float<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum F {
        Num(f64),
        Str(String),
    }
    match F::deserialize(d)? {
        F::Num(v) => Ok(v),
        F::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
            "-infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            "infinity" | "inf" | "+inf" | "+infinity" => Ok(f64::INFINITY),
            "nan" => Ok(f64::NAN),
            other => {
                other.parse::<f64>().map_err(|_| serde::de::Error::custom(format!("expected a number, found \"{s}\"")))
            }
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum PredictionType {
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "sample")]
    Sample,
    #[serde(rename = "v_prediction")]
    VPrediction,
    #[serde(rename = "flow_prediction")]
    FlowPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum TimestepSpacing {
    #[serde(rename = "leading")]
    Leading,
    #[serde(rename = "linspace")]
    Linspace,
    #[serde(rename = "trailing")]
    Trailing,
}

/// The noise schedule settings shared by both schedulers.
#[derive(Debug, Clone, PartialEq)]
pub struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
}

/// `alphas_cumprod` (float32) as the reference computes it.
pub fn alphas_cumprod(cfg: &BetaConfig, path: &Path) -> Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    if n == 0 {
        return Err(config_error(path, "num_train_timesteps must be at least 1"));
    }
    if n > MAX_TRAIN_TIMESTEPS {
        return Err(config_error(
            path,
            format!(
                "num_train_timesteps is {n}: at most {MAX_TRAIN_TIMESTEPS} is supported (diffusers' models use 1000)"
            ),
        ));
    }
    // Betas are variances of the noise added each step: in [0, 1), else alphas (1 - beta) reach
    // zero or go negative and every sample becomes NaN.
    let beta_ok = |b: f64| b.is_finite() && (0.0..1.0).contains(&b);
    let mut betas: Vec<f32> = if let Some(trained) = &cfg.trained_betas {
        if trained.len() != n {
            return Err(config_error(
                path,
                format!("trained_betas has {} values but num_train_timesteps is {n}", trained.len()),
            ));
        }
        if let Some((i, b)) = trained.iter().enumerate().find(|(_, &b)| !beta_ok(b)) {
            return Err(config_error(path, format!("trained_betas[{i}] is {b}: betas must be in [0, 1)")));
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        if cfg.beta_schedule != BetaSchedule::SquaredcosCapV2 {
            for (key, b) in [("beta_start", cfg.beta_start), ("beta_end", cfg.beta_end)] {
                if !beta_ok(b) {
                    return Err(config_error(path, format!("{key} is {b}: betas must be in [0, 1)")));
                }
            }
        }
        match cfg.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => torch_linspace_f32(cfg.beta_start.powf(0.5), cfg.beta_end.powf(0.5), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar_cosine(n, 0.999),
        }
    };
    if cfg.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0f32 - b).collect();
    let cumprod = cumprod_f32(&alphas);
    // Zero-terminal-SNR rescaling ends at 0 by design; otherwise a product that underflows to 0
    // makes sigmas infinite.
    let checked = if cfg.rescale_betas_zero_snr { &cumprod[..n - 1] } else { &cumprod[..] };
    if let Some(t) = checked.iter().position(|&a| !(a.is_finite() && a > 0.0)) {
        return Err(config_error(
            path,
            format!("the noise schedule leaves no signal at timestep {t} (alphas_cumprod reaches 0): lower beta_end or num_train_timesteps"),
        ));
    }
    Ok(cumprod)
}

/// The most training timesteps a scheduler config may name.
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

pub(crate) fn config_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Config { path: PathBuf::from(path), reason: reason.into() }
}

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU (its scalar formula: the first
/// half counts up from `start`, the second half down from `end`).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on CPU: accumulates in f64, stores each partial product
/// as f32.
pub(crate) fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

fn betas_for_alpha_bar_cosine(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0f32 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).into_iter().map(f32::sqrt).collect();
    let first = sqrt_bar[0];
    let last = *sqrt_bar.last().unwrap();
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0f32 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0f32 - bar[i] / bar[i - 1]);
    }
    out
}

/// `np.linspace(start, stop, num)` (float64, endpoint included).
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return vec![];
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = if step == 0.0 {
        (0..num).map(|i| i as f64 / div * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` for float64 arguments: the length is
/// `ceil((stop - start) / step)` and element i is `start + i * ((start + step) - start)`.
pub fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let second = start + step;
        out.push(second);
        let delta = second - start;
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// Converts schedule values (already integral) to timesteps, refusing negative ones (the
/// reference's `trailing` spacing yields -1 for some step counts, e.g. 61 of 1000, through a
/// float rounding quirk of `np.arange`; it then silently indexes the last training timestep).
/// Timesteps as indices; with `train`, each must be below it (DDIM indexes `alphas_cumprod` by
/// timestep; DPM-Solver interpolates its sigmas, clamping, as diffusers' `np.interp`).
pub(crate) fn to_timesteps(values: &[i64], num_inference_steps: usize, train: Option<usize>) -> Result<Vec<usize>> {
    values
        .iter()
        .map(|&t| {
            let t = usize::try_from(t).map_err(|_| {
                Error::InvalidArgument(format!(
                    "the timestep schedule for {num_inference_steps} steps contains the negative \
                     timestep {t}: choose another number of steps or another timestep_spacing"
                ))
            })?;
            if let Some(train) = train.filter(|&train| t >= train) {
                return Err(Error::InvalidArgument(format!(
                    "the timestep schedule for {num_inference_steps} steps contains the timestep {t}, past the \
                     {train} the model was trained with: choose fewer steps, or lower the scheduler's steps_offset"
                )));
            }
            Ok(t)
        })
        .collect()
}

/// `sum_i c_i * x_i`, evaluated left to right with one rounding per product and per sum, as the
/// reference's tensor expressions are (`a*x - b*y` equals `a*x + (-b)*y` exactly).
pub(crate) fn linear_combination(terms: &[(f32, &Tensor)]) -> Result<Tensor> {
    let mut iter = terms.iter();
    let (c0, x0) = iter.next().ok_or_else(|| Error::InvalidArgument("empty linear combination".into()))?;
    let mut acc = x0.affine(*c0 as f64, 0.0)?;
    for (c, x) in iter {
        acc = (acc + x.affine(*c as f64, 0.0)?)?;
    }
    Ok(acc)
}

/// Dynamic thresholding (Imagen): per batch item, `s` = the `ratio` quantile of |x| (linear
/// interpolation, as `torch.quantile`), clamped to `[1, max_value]`; x is clamped to `[-s, s]`
/// and divided by `s`. Uses a sort along the flattened item, which candle's CUDA/Metal kernels
/// only support for moderately sized rows.
pub fn threshold_sample(x: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    if dims.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "dynamic thresholding needs a (batch, channels, ...) sample, got shape {dims:?}"
        )));
    }
    let batch = dims[0];
    let rest: usize = dims[1..].iter().product();
    let xf = match dtype {
        DType::F32 | DType::F64 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    };
    let flat = xf.reshape((batch, rest))?;
    let (sorted, _) = flat.abs()?.contiguous()?.sort_last_dim(true)?;
    let rank = (ratio as f32) * (rest - 1) as f32;
    let below = rank as usize;
    let above = rank.ceil() as usize;
    let weight = rank - below as f32;
    let low = sorted.narrow(1, below.min(rest - 1), 1)?;
    let high = sorted.narrow(1, above.min(rest - 1), 1)?;
    let s = if weight < 0.5 {
        (&low + (&high - &low)?.affine(weight as f64, 0.0)?)?
    } else {
        (&high - (&high - &low)?.affine((1.0 - weight) as f64, 0.0)?)?
    };
    let s = s.maximum(1.0)?.minimum(max_value)?;
    let out = flat.broadcast_maximum(&s.neg()?)?.broadcast_minimum(&s)?.broadcast_div(&s)?;
    Ok(out.reshape(dims)?.to_dtype(dtype)?)
}
