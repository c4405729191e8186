//! DDIM (Song et al. 2020), as diffusers' `DDIMScheduler`.

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{
    alphas_cumprod, config_error, linear_combination, np_arange_f64, np_linspace, parse_config, threshold_sample,
    to_timesteps, BetaConfig, BetaSchedule, NoiseSource, PredictionType, Scheduler, SchedulerKind, TimestepSpacing,
};
use crate::error::{Error, Result};

/// The keys of `DDIMScheduler`'s config, with its defaults for missing keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub beta_start: f64,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub clip_sample_range: f64,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        DdimConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimConfig {
    /// Reads the keys DDIM knows from a scheduler config of any class; DDIM's defaults fill the rest.
    pub fn from_json(value: &serde_json::Value, path: &Path) -> Result<Self> {
        parse_config(value, path)
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
}

/// DDIM timesteps for `n` inference steps, as `DDIMScheduler.set_timesteps` (before any
/// conversion to unsigned).
pub fn ddim_timesteps(config: &DdimConfig, n: usize) -> Vec<i64> {
    let train = config.num_train_timesteps;
    match config.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, train.saturating_sub(1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (train / n) as i64;
            (0..n as i64).rev().map(|i| (i * ratio).saturating_add(config.steps_offset)).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train as f64 / n as f64;
            np_arange_f64(train as f64, 0.0, -ratio).into_iter().map(|v| v.round_ties_even() as i64 - 1).collect()
        }
    }
}

pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<usize>,
    eta: f64,
}

impl DdimScheduler {
    /// Builds the scheduler and sets its timesteps. `config_path` names the config in errors.
    pub fn new(config: DdimConfig, config_path: &Path, num_inference_steps: usize, eta: f64) -> Result<Self> {
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(config_error(
                config_path,
                "DDIMScheduler supports prediction_type `epsilon`, `sample` or `v_prediction`, not \
                 `flow_prediction`",
            ));
        }
        if !eta.is_finite() || eta < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "eta must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}"
            )));
        }
        let alphas_cumprod = alphas_cumprod(&config.betas(), config_path)?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let mut scheduler = DdimScheduler {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: vec![],
            eta,
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// The float32 cumulative products of the alphas, indexed by training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn alpha_prod(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod.get(t as usize).copied().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "timestep {t} is outside the scheduler's {} training timesteps",
                self.alphas_cumprod.len()
            ))
        })
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::InvalidArgument("the number of inference steps must be at least 1".into()));
        }
        if n > self.config.num_train_timesteps {
            return Err(Error::InvalidArgument(format!(
                "{n} inference steps is more than the {} timesteps the model was trained with",
                self.config.num_train_timesteps
            )));
        }
        self.timesteps = to_timesteps(&ddim_timesteps(&self.config, n), n, Some(self.config.num_train_timesteps))?;
        self.num_inference_steps = n;
        Ok(())
    }

    /// `sqrt(ᾱ_t) · original + sqrt(1 − ᾱ_t) · noise`, the coefficients in float32 as the reference.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor> {
        let alpha = self.alpha_prod(timestep as i64)?;
        linear_combination(&[(alpha.sqrt(), original), ((1.0f32 - alpha).sqrt(), noise)])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        // The previous timestep is always `t - train/n`, whatever the spacing (as the reference).
        let t = timestep as i64;
        let prev_t = t - (cfg.num_train_timesteps / self.num_inference_steps) as i64;
        let alpha_t = self.alpha_prod(t)?;
        let alpha_prev = self.alpha_prod(prev_t)?;
        let beta_t = 1.0f32 - alpha_t;
        let (sqrt_alpha_t, sqrt_beta_t) = (alpha_t.sqrt(), beta_t.sqrt());

        let (mut pred_x0, pred_eps) = match cfg.prediction_type {
            PredictionType::Epsilon => {
                let x0 = linear_combination(&[(1.0, sample), (-sqrt_beta_t, model_output)])?
                    .affine((1.0f32 / sqrt_alpha_t) as f64, 0.0)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = linear_combination(&[(1.0, sample), (-sqrt_alpha_t, model_output)])?
                    .affine((1.0f32 / sqrt_beta_t) as f64, 0.0)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => (
                linear_combination(&[(sqrt_alpha_t, sample), (-sqrt_beta_t, model_output)])?,
                linear_combination(&[(sqrt_alpha_t, model_output), (sqrt_beta_t, sample)])?,
            ),
            PredictionType::FlowPrediction => unreachable!("rejected when built"),
        };

        if cfg.thresholding {
            pred_x0 = threshold_sample(&pred_x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)?;
        } else if cfg.clip_sample {
            let r = cfg.clip_sample_range;
            pred_x0 = pred_x0.clamp(-r, r)?;
        }

        // sigma_t(eta) of the DDIM paper, eq. (16).
        let beta_prev = 1.0f32 - alpha_prev;
        let variance = (beta_prev / beta_t) * (1.0f32 - alpha_t / alpha_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction_coef = (1.0f32 - alpha_prev - std_dev * std_dev).sqrt();

        let mut prev = linear_combination(&[(alpha_prev.sqrt(), &pred_x0), (direction_coef, &pred_eps)])?;
        if self.eta > 0.0 {
            let z = noise(model_output.dims())?;
            if z.dims() != model_output.dims() {
                return Err(Error::InvalidArgument(format!(
                    "the noise source returned shape {:?}, expected {:?}",
                    z.dims(),
                    model_output.dims()
                )));
            }
            let z = z.to_device(model_output.device())?.to_dtype(model_output.dtype())?;
            prev = (prev + z.affine(std_dev as f64, 0.0)?)?;
        }
        Ok(prev)
    }
}
