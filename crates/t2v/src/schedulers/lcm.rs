//! Latent consistency sampling (Luo et al. 2023), as diffusers' `LCMScheduler`: each step maps
//! the sample to the consistency function's estimate of the clean latents, then (except at the
//! last step) noises it again to the next timestep with fresh noise from the run's generator.

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{
    alphas_cumprod, config_error, linear_combination, parse_config, step_index, threshold_sample, BetaConfig,
    BetaSchedule, NoiseSource, PredictionType, Scheduler, SchedulerKind, TimestepSpacing,
};
use crate::error::{Error, Result};

/// The keys of `LCMScheduler`'s config, with its defaults for missing keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct LcmConfig {
    pub num_train_timesteps: usize,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub beta_start: f64,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    /// The length of the distillation schedule the timesteps are taken from.
    pub original_inference_steps: usize,
    pub clip_sample: bool,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub sample_max_value: f64,
    /// Unused by LCM's schedule (kept as diffusers keeps it in the config).
    pub timestep_spacing: TimestepSpacing,
    /// Multiplies the timestep in the boundary-condition scalings (MCM's adapters use 4).
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub timestep_scaling: f64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for LcmConfig {
    fn default() -> Self {
        LcmConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl LcmConfig {
    /// Reads the keys LCM knows from a scheduler config of any class; LCM's defaults fill the rest.
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

/// LCM timesteps for `n` steps, as `LCMScheduler.set_timesteps(n)` (strength 1): the
/// distillation schedule `[k·i − 1 for i in 1..=original_steps]` (k = train / original_steps),
/// reversed, taken at `floor(linspace(0, len, n, endpoint=False))`.
pub fn lcm_timesteps(config: &LcmConfig, n: usize, path: &Path) -> Result<Vec<usize>> {
    let train = config.num_train_timesteps;
    let original = config.original_inference_steps;
    if original == 0 || original > train {
        return Err(config_error(
            path,
            format!("original_inference_steps is {original}: it must be between 1 and num_train_timesteps ({train})"),
        ));
    }
    if n == 0 {
        return Err(Error::InvalidArgument("the number of inference steps must be at least 1".into()));
    }
    if n > original {
        return Err(Error::InvalidArgument(format!(
            "LCM takes its {n} timesteps from a distillation schedule of {original} \
             (original_inference_steps): choose at most {original} steps"
        )));
    }
    let k = train / original;
    let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
    // np.linspace(0, len, n, endpoint=False): i · (len / n) in float64, floored.
    let step = origin.len() as f64 / n as f64;
    Ok((0..n).map(|i| origin[(i as f64 * step).floor() as usize]).collect())
}

/// T2V-Turbo's timesteps for `n` steps (its `T2VTurboScheduler.set_timesteps(n, 50)`): the same
/// distillation schedule `[k·i − 1 for i in 1..=original_steps]`, taken from the end every
/// `original_steps // n` (`origin[::-skip][:n]`): 4 steps of 50 give 999, 759, 519, 279 where
/// LCM gives 999, 759, 499, 259.
pub fn t2v_turbo_timesteps(config: &LcmConfig, n: usize, path: &Path) -> Result<Vec<usize>> {
    // The same checks as LCM's (n ≤ original_steps keeps the skip at least 1).
    lcm_timesteps(config, n, path)?;
    let k = config.num_train_timesteps / config.original_inference_steps;
    let origin: Vec<usize> = (1..=config.original_inference_steps).rev().map(|i| i * k - 1).collect();
    let skip = config.original_inference_steps / n;
    Ok(origin.iter().step_by(skip).take(n).copied().collect())
}

pub struct LcmScheduler {
    /// T2V-Turbo's schedule ([`t2v_turbo_timesteps`]) instead of LCM's.
    t2v_turbo: bool,
    config: LcmConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    config_path: std::path::PathBuf,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl LcmScheduler {
    /// Builds the scheduler and sets its timesteps. `config_path` names the config in errors.
    pub fn new(config: LcmConfig, config_path: &Path, num_inference_steps: usize) -> Result<Self> {
        Self::build(config, config_path, num_inference_steps, false)
    }

    /// T2V-Turbo's consistency sampler (`T2VTurboScheduler`): LCM's step (σ_data 0.5,
    /// `c_skip = 0.25/((10t)² + 0.25)`, `c_out = 10t/√((10t)² + 0.25)` with the default
    /// `timestep_scaling` 10, fresh noise between steps, the last step's denoised latents as the
    /// result, which its pipeline decodes) over [`t2v_turbo_timesteps`].
    pub fn new_t2v_turbo(config: LcmConfig, config_path: &Path, num_inference_steps: usize) -> Result<Self> {
        Self::build(config, config_path, num_inference_steps, true)
    }

    fn build(config: LcmConfig, config_path: &Path, num_inference_steps: usize, t2v_turbo: bool) -> Result<Self> {
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(config_error(
                config_path,
                "LCMScheduler supports prediction_type `epsilon`, `sample` or `v_prediction`, not `flow_prediction`",
            ));
        }
        if !config.timestep_scaling.is_finite() {
            return Err(config_error(config_path, "timestep_scaling must be a finite number"));
        }
        let alphas_cumprod = alphas_cumprod(&config.betas(), config_path)?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let mut scheduler = LcmScheduler {
            t2v_turbo,
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: vec![],
            config_path: config_path.to_path_buf(),
            step_index: None,
            begin_index: None,
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    pub fn config(&self) -> &LcmConfig {
        &self.config
    }

    /// The float32 cumulative products of the alphas, indexed by training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `(c_skip, c_out)` of the consistency boundary condition at `timestep`, in float32 as the
    /// reference computes them from the integer timestep tensor (σ_data = 0.5).
    pub fn boundary_scalings(&self, timestep: usize) -> (f32, f32) {
        let scaled = timestep as f32 * self.config.timestep_scaling as f32;
        let denom = scaled * scaled + 0.25f32;
        (0.25f32 / denom, scaled / denom.sqrt())
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
}

impl Scheduler for LcmScheduler {
    fn kind(&self) -> SchedulerKind {
        if self.t2v_turbo {
            SchedulerKind::T2vTurbo
        } else {
            SchedulerKind::Lcm
        }
    }

    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.timesteps = if self.t2v_turbo {
            t2v_turbo_timesteps(&self.config, n, &self.config_path)?
        } else {
            lcm_timesteps(&self.config, n, &self.config_path)?
        };
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }

    fn set_begin_index(&mut self, index: usize) {
        self.begin_index = Some(index);
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor> {
        let alpha = *self.alphas_cumprod.get(timestep).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "timestep {timestep} is outside the {} training timesteps",
                self.alphas_cumprod.len()
            ))
        })?;
        linear_combination(&[(alpha.sqrt(), original), ((1.0f32 - alpha).sqrt(), noise)])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Result<Tensor> {
        let i = step_index(self.step_index, self.begin_index, || self.index_for_timestep(timestep));
        let n = self.timesteps.len();
        if i >= n {
            return Err(Error::InvalidArgument(format!(
                "LCM was stepped more times than its {n} timesteps: call set_timesteps again"
            )));
        }
        let prev_timestep = if i + 1 < n { self.timesteps[i + 1] } else { timestep };
        let alpha_t = *self.alphas_cumprod.get(timestep).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "timestep {timestep} is outside the {} training timesteps",
                self.alphas_cumprod.len()
            ))
        })?;
        let alpha_prev = self.alphas_cumprod.get(prev_timestep).copied().unwrap_or(self.final_alpha_cumprod);
        let beta_t = 1.0f32 - alpha_t;
        let beta_prev = 1.0f32 - alpha_prev;
        let (c_skip, c_out) = self.boundary_scalings(timestep);
        let cfg = &self.config;
        let mut x0 = match cfg.prediction_type {
            PredictionType::Epsilon => linear_combination(&[(1.0, sample), (-beta_t.sqrt(), model_output)])?
                .affine((1.0f32 / alpha_t.sqrt()) as f64, 0.0)?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                linear_combination(&[(alpha_t.sqrt(), sample), (-beta_t.sqrt(), model_output)])?
            }
            PredictionType::FlowPrediction => unreachable!("rejected when built"),
        };
        if cfg.thresholding {
            x0 = threshold_sample(&x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)?;
        } else if cfg.clip_sample {
            let r = cfg.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let denoised = linear_combination(&[(c_out, &x0), (c_skip, sample)])?;
        let prev = if i != n - 1 {
            let z = noise(model_output.dims())?;
            if z.dims() != model_output.dims() {
                return Err(Error::InvalidArgument(format!(
                    "the noise source returned shape {:?}, expected {:?}",
                    z.dims(),
                    model_output.dims()
                )));
            }
            let z = z.to_device(model_output.device())?.to_dtype(denoised.dtype())?;
            linear_combination(&[(alpha_prev.sqrt(), &denoised), (beta_prev.sqrt(), &z)])?
        } else {
            denoised
        };
        self.step_index = Some(i + 1);
        Ok(prev)
    }
}
