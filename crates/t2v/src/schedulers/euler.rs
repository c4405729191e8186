//! Euler sampling in the sigma (variance-exploding) parameterisation (Karras et al. 2022), as
//! diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`: the latents start
//! at `init_noise_sigma`, the UNet sees them divided by `sqrt(σ² + 1)`, and each step moves along
//! the derivative `(x − x̂₀)/σ`; the ancestral variant steps to `σ_down` and adds fresh noise of
//! `σ_up` from the run's generator.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    alphas_cumprod, config_error, interp_at, np_arange_f64, np_linspace, parse_config, train_sigmas, BetaConfig,
    BetaSchedule, NoiseSource, PredictionType, Scheduler, SchedulerKind, TimestepSpacing,
};
use crate::error::{Error, Result};

/// The keys of `EulerDiscreteScheduler`'s config (`EulerAncestralDiscreteScheduler` has the first
/// nine of them), with diffusers' defaults for missing keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct EulerConfig {
    pub num_train_timesteps: usize,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub beta_start: f64,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
    // EulerDiscreteScheduler only.
    pub interpolation_type: String,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_type: String,
    pub final_sigmas_type: String,
}

impl Default for EulerConfig {
    fn default() -> Self {
        EulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            interpolation_type: "linear".into(),
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            sigma_min: None,
            sigma_max: None,
            timestep_type: "discrete".into(),
            final_sigmas_type: "zero".into(),
        }
    }
}

/// The keys `EulerAncestralDiscreteScheduler` has.
const ANCESTRAL_KEYS: [&str; 9] = [
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
];

impl EulerConfig {
    /// Reads the keys the scheduler of `kind` knows from a config of any class; its defaults fill
    /// the rest (the ancestral scheduler has none of the Euler-only keys, so it ignores them).
    pub fn from_json(kind: SchedulerKind, value: &serde_json::Value, path: &Path) -> Result<Self> {
        if kind == SchedulerKind::EulerAncestralDiscrete {
            let filtered: serde_json::Map<String, serde_json::Value> = value
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| ANCESTRAL_KEYS.contains(&k.as_str()) || k.as_str() == "_use_default_values")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .ok_or_else(|| config_error(path, "a scheduler config must be a JSON object"))?;
            return parse_config(&serde_json::Value::Object(filtered), path);
        }
        parse_config(value, path)
    }

    /// The config as diffusers' `from_config(...).config` holds it for `kind` (the ancestral
    /// scheduler's keys only for it).
    pub fn to_json(&self, kind: SchedulerKind) -> std::result::Result<serde_json::Value, serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        if kind == SchedulerKind::EulerAncestralDiscrete {
            if let Some(object) = value.as_object_mut() {
                object.retain(|k, _| ANCESTRAL_KEYS.contains(&k.as_str()));
            }
        }
        Ok(value)
    }

    fn betas(&self) -> BetaConfig {
        BetaConfig {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule: self.beta_schedule,
            trained_betas: self.trained_betas.clone(),
            rescale_betas_zero_snr: self.rescale_betas_zero_snr,
        }
    }

    fn validate(&self, kind: SchedulerKind, path: &Path) -> Result<()> {
        let unsupported = |what: &str| {
            config_error(path, format!("{} with {what} is not supported by t2v; remove the option", kind.class_name()))
        };
        if matches!(self.prediction_type, PredictionType::FlowPrediction)
            || (kind == SchedulerKind::EulerAncestralDiscrete && self.prediction_type == PredictionType::Sample)
        {
            return Err(config_error(
                path,
                format!("{} does not support prediction_type {:?}", kind.class_name(), self.prediction_type),
            ));
        }
        if kind == SchedulerKind::EulerDiscrete {
            if self.use_karras_sigmas == Some(true) {
                return Err(unsupported("use_karras_sigmas"));
            }
            if self.use_exponential_sigmas == Some(true) {
                return Err(unsupported("use_exponential_sigmas"));
            }
            if self.use_beta_sigmas == Some(true) {
                return Err(unsupported("use_beta_sigmas"));
            }
            if self.interpolation_type != "linear" {
                return Err(unsupported(&format!("interpolation_type `{}`", self.interpolation_type)));
            }
            if self.timestep_type != "discrete" && self.prediction_type == PredictionType::VPrediction {
                return Err(unsupported("continuous timesteps (timestep_type `continuous`)"));
            }
            if !matches!(self.final_sigmas_type.as_str(), "zero" | "sigma_min") {
                return Err(config_error(
                    path,
                    format!("final_sigmas_type must be `zero` or `sigma_min`, got `{}`", self.final_sigmas_type),
                ));
            }
        }
        Ok(())
    }
}

/// The float32 timesteps of `set_timesteps(n)` for the Euler schedulers.
fn euler_timesteps(config: &EulerConfig, n: usize) -> Vec<f32> {
    let train = config.num_train_timesteps;
    match config.timestep_spacing {
        // np.linspace(..., dtype=float32): computed in float64, then cast.
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (train - 1) as f64, n).into_iter().rev().map(|t| t as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|i| (i * ratio) as f32 + config.steps_offset as f32).collect()
        }
        TimestepSpacing::Trailing => np_arange_f64(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
    }
}

pub struct EulerScheduler {
    kind: SchedulerKind,
    config: EulerConfig,
    config_path: PathBuf,
    alphas_cumprod: Vec<f32>,
    /// The float32 timesteps, as the reference hands them to the UNet.
    timesteps_f32: Vec<f32>,
    /// The same, rounded (what [`Scheduler::timesteps`] shows).
    timesteps: Vec<usize>,
    /// One more than the timesteps: the last is the final sigma.
    sigmas: Vec<f32>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl EulerScheduler {
    /// `kind` is [`SchedulerKind::EulerDiscrete`] or [`SchedulerKind::EulerAncestralDiscrete`].
    pub fn new(
        kind: SchedulerKind,
        config: EulerConfig,
        config_path: &Path,
        num_inference_steps: usize,
    ) -> Result<Self> {
        if !matches!(kind, SchedulerKind::EulerDiscrete | SchedulerKind::EulerAncestralDiscrete) {
            return Err(Error::InvalidArgument(format!("{} is not an Euler scheduler", kind.class_name())));
        }
        config.validate(kind, config_path)?;
        let mut alphas_cumprod = alphas_cumprod(&config.betas(), config_path)?;
        if config.rescale_betas_zero_snr {
            // keeps the first sigma finite, as the reference
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        let mut scheduler = EulerScheduler {
            kind,
            config,
            config_path: config_path.to_path_buf(),
            alphas_cumprod,
            timesteps_f32: vec![],
            timesteps: vec![],
            sigmas: vec![],
            step_index: None,
            begin_index: None,
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    pub fn config(&self) -> &EulerConfig {
        &self.config
    }

    /// The sigmas of the schedule, one more than the timesteps (float32).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The timesteps as the UNet receives them (float32; fractional for `linspace` spacing).
    pub fn float_timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn index_for_timestep(&self, timestep: usize) -> usize {
        let matches: Vec<usize> =
            self.timesteps.iter().enumerate().filter(|(_, &t)| t == timestep).map(|(i, _)| i).collect();
        match matches.len() {
            0 => 0,
            1 => matches[0],
            _ => matches[1],
        }
    }

    fn current_index(&self, timestep: usize) -> usize {
        match (self.step_index, self.begin_index) {
            (Some(i), _) => i,
            (None, Some(begin)) => begin,
            (None, None) => self.index_for_timestep(timestep),
        }
    }
}

impl Scheduler for EulerScheduler {
    fn kind(&self) -> SchedulerKind {
        self.kind
    }

    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The largest sigma (`linspace`/`trailing`), or `sqrt(σ_max² + 1)` (`leading`), in float32.
    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match self.config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            TimestepSpacing::Leading => (max * max + 1.0f32).sqrt() as f64,
        }
    }

    fn scale_model_input(&self, sample: Tensor, timestep: usize) -> Result<Tensor> {
        let sigma = self.sigmas[self.current_index(timestep).min(self.sigmas.len() - 1)];
        let scale = (sigma * sigma + 1.0f32).sqrt();
        Ok(sample.affine((1.0f32 / scale) as f64, 0.0)?)
    }

    fn model_timestep(&self, timestep: usize) -> f64 {
        let i = self.current_index(timestep);
        self.timesteps_f32.get(i).map_or(timestep as f64, |&t| t as f64)
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        if n == 0 {
            return Err(Error::InvalidArgument("the number of inference steps must be at least 1".into()));
        }
        if n > train {
            return Err(Error::InvalidArgument(format!(
                "{n} inference steps is more than the {train} timesteps the model was trained with"
            )));
        }
        let timesteps = euler_timesteps(&self.config, n);
        if let Some(t) = timesteps.iter().find(|&&t| !(0.0..train as f32).contains(&t)) {
            return Err(Error::InvalidArgument(format!(
                "the {} schedule for {n} steps contains the timestep {t}, outside the {train} the model was \
                 trained with: choose another number of steps, timestep_spacing or steps_offset",
                self.kind.class_name()
            )));
        }
        let train_sigmas = train_sigmas(&self.alphas_cumprod);
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp_at(t as f64, &train_sigmas) as f32).collect();
        let last = if self.kind == SchedulerKind::EulerDiscrete && self.config.final_sigmas_type == "sigma_min" {
            train_sigmas[0]
        } else {
            0.0
        };
        sigmas.push(last);
        if sigmas[..n].iter().any(|&s| !(s.is_finite() && s > 0.0)) {
            return Err(config_error(&self.config_path, "the noise schedule gives a sigma that is not positive"));
        }
        self.timesteps = timesteps.iter().map(|&t| t.round_ties_even() as usize).collect();
        self.timesteps_f32 = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }

    fn set_begin_index(&mut self, index: usize) {
        self.begin_index = Some(index);
    }

    /// `original + σ · noise` at the sigma of the step the loop is at.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor> {
        let i = match (self.begin_index, self.step_index) {
            (None, _) => self.index_for_timestep(timestep),
            (Some(_), Some(step)) => step,
            (Some(begin), None) => begin,
        };
        let sigma = self.sigmas[i.min(self.sigmas.len() - 1)];
        Ok((original + noise.affine(sigma as f64, 0.0)?)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Result<Tensor> {
        let i = self.current_index(timestep);
        if i + 1 >= self.sigmas.len() {
            return Err(Error::InvalidArgument(format!(
                "{} was stepped more times than its {} timesteps: call set_timesteps again",
                self.kind.class_name(),
                self.timesteps.len()
            )));
        }
        let out_dtype = model_output.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output_f32 = model_output.to_dtype(DType::F32)?;
        let sigma = self.sigmas[i];
        let sigma_next = self.sigmas[i + 1];
        // EulerDiscrete's churn (s_churn) is 0 in the pipeline: sigma_hat = sigma, no noise.
        let pred_x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (&sample - model_output_f32.affine(sigma as f64, 0.0)?)?,
            PredictionType::VPrediction => {
                let a = -sigma / (sigma * sigma + 1.0f32).sqrt();
                let b = 1.0f32 / (sigma * sigma + 1.0f32);
                (model_output_f32.affine(a as f64, 0.0)? + sample.affine(b as f64, 0.0)?)?
            }
            PredictionType::Sample => model_output_f32.clone(),
            PredictionType::FlowPrediction => unreachable!("rejected when built"),
        };
        let derivative = (&sample - &pred_x0)?.affine((1.0f32 / sigma) as f64, 0.0)?;
        let prev = if self.kind == SchedulerKind::EulerAncestralDiscrete {
            let (from2, to2) = (sigma * sigma, sigma_next * sigma_next);
            let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
            let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
            let dt = sigma_down - sigma;
            let prev = (&sample + derivative.affine(dt as f64, 0.0)?)?;
            // Drawn at every step, the last included (its σ_up is 0), as the reference.
            let z = noise(model_output.dims())?;
            if z.dims() != model_output.dims() {
                return Err(Error::InvalidArgument(format!(
                    "the noise source returned shape {:?}, expected {:?}",
                    z.dims(),
                    model_output.dims()
                )));
            }
            let z = z.to_device(model_output.device())?.to_dtype(DType::F32)?;
            (prev + z.affine(sigma_up as f64, 0.0)?)?
        } else {
            let dt = sigma_next - sigma;
            (&sample + derivative.affine(dt as f64, 0.0)?)?
        };
        self.step_index = Some(i + 1);
        Ok(prev.to_dtype(out_dtype)?)
    }
}
