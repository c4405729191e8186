//! Multistep DPM-Solver / DPM-Solver++ (Lu et al. 2022), as diffusers'
//! `DPMSolverMultistepScheduler`.
//!
//! One file: diffusers' `DPMSolverMultistepScheduler` is one class; its orders, variants and timestep
//! rules stay together to be read against it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    alphas_cumprod, config_error, linear_combination, np_arange_f64, np_linspace, parse_config, step_index,
    threshold_sample, to_timesteps, BetaConfig, BetaSchedule, NoiseSource, PredictionType, Scheduler, SchedulerKind,
    TimestepSpacing,
};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AlgorithmType {
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// `deis` is accepted and mapped to `dpmsolver++`, as the reference does.
    #[serde(rename = "dpmsolver++", alias = "deis")]
    DpmSolverPlusPlus,
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
}

impl AlgorithmType {
    fn is_sde(self) -> bool {
        matches!(self, AlgorithmType::SdeDpmSolver | AlgorithmType::SdeDpmSolverPlusPlus)
    }
    /// Whether the solver integrates the data (x0) prediction (the `++` variants).
    fn is_data_prediction(self) -> bool {
        matches!(self, AlgorithmType::DpmSolverPlusPlus | AlgorithmType::SdeDpmSolverPlusPlus)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SolverType {
    /// `logrho`, `bh1` and `bh2` (other schedulers' solver types) map to `midpoint`, as in the reference.
    #[serde(rename = "midpoint", alias = "logrho", alias = "bh1", alias = "bh2")]
    Midpoint,
    #[serde(rename = "heun")]
    Heun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum FinalSigmasType {
    #[serde(rename = "zero")]
    Zero,
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

/// The keys of `DPMSolverMultistepScheduler`'s config, with its defaults for missing keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct DpmSolverConfig {
    pub num_train_timesteps: usize,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub beta_start: f64,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub sample_max_value: f64,
    pub algorithm_type: AlgorithmType,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub flow_shift: f64,
    pub final_sigmas_type: FinalSigmasType,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub lambda_min_clipped: f64,
    pub variance_type: Option<String>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        DpmSolverConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".to_string(),
        }
    }
}

impl DpmSolverConfig {
    /// Reads the keys DPM-Solver knows from a scheduler config of any class (typically the
    /// checkpoint's DDIM config); DPM-Solver's defaults fill the rest.
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

    fn validate(&self, path: &Path) -> Result<()> {
        let unsupported = |what: &str| {
            config_error(
                path,
                format!("DPMSolverMultistepScheduler with {what} is not supported by t2v; use the DDIM scheduler or remove the option"),
            )
        };
        let sigma_kinds =
            [self.use_beta_sigmas, self.use_exponential_sigmas, self.use_karras_sigmas].iter().filter(|&&b| b).count();
        if sigma_kinds > 1 {
            return Err(config_error(
                path,
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be true",
            ));
        }
        if !(1..=3).contains(&self.solver_order) {
            return Err(config_error(path, format!("solver_order must be 1, 2 or 3, got {}", self.solver_order)));
        }
        if !self.algorithm_type.is_data_prediction() && self.final_sigmas_type == FinalSigmasType::Zero {
            return Err(config_error(
                path,
                "final_sigmas_type `zero` needs algorithm_type `dpmsolver++` or `sde-dpmsolver++`; \
                 choose final_sigmas_type `sigma_min` for the other algorithms",
            ));
        }
        if self.use_exponential_sigmas {
            return Err(unsupported("use_exponential_sigmas"));
        }
        if self.use_beta_sigmas {
            return Err(unsupported("use_beta_sigmas"));
        }
        if self.use_lu_lambdas {
            return Err(unsupported("use_lu_lambdas"));
        }
        if self.use_flow_sigmas || self.prediction_type == PredictionType::FlowPrediction {
            return Err(unsupported("flow matching (use_flow_sigmas / flow_prediction)"));
        }
        if self.variance_type.is_some() {
            return Err(unsupported("a learned variance (variance_type)"));
        }
        Ok(())
    }
}

pub struct DpmSolverMultistepScheduler {
    config: DpmSolverConfig,
    config_path: PathBuf,
    alphas_cumprod: Vec<f32>,
    /// `lambda_t = log(alpha_t) - log(sigma_t)` per training timestep (f32).
    lambdas: Vec<f32>,
    timesteps: Vec<usize>,
    /// One more than the timesteps: the last is the final sigma.
    sigmas: Vec<f32>,
    /// Converted model outputs of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    step_index: Option<usize>,
    /// Where the loop starts when it skips the first timesteps (`set_begin_index`).
    begin_index: Option<usize>,
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler and sets its timesteps. `config_path` names the config in errors.
    pub fn new(config: DpmSolverConfig, config_path: &Path, num_inference_steps: usize) -> Result<Self> {
        config.validate(config_path)?;
        let mut alphas_cumprod = alphas_cumprod(&config.betas(), config_path)?;
        if config.rescale_betas_zero_snr {
            // keeps the first sigma finite
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        let lambdas = alphas_cumprod
            .iter()
            .map(|&a| {
                let alpha = a.sqrt();
                let sigma = (1.0f32 - a).sqrt();
                alpha.ln() - sigma.ln()
            })
            .collect();
        let mut scheduler = DpmSolverMultistepScheduler {
            model_outputs: vec![None; config.solver_order],
            config,
            config_path: config_path.to_path_buf(),
            alphas_cumprod,
            lambdas,
            timesteps: vec![],
            sigmas: vec![],
            lower_order_nums: 0,
            step_index: None,
            begin_index: None,
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    pub fn config(&self) -> &DpmSolverConfig {
        &self.config
    }

    /// The sigmas (`sqrt((1 - alpha_bar) / alpha_bar)`) of the schedule, one more than the timesteps.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The index of the next step in the schedule (`None` before the first step).
    pub fn step_index(&self) -> Option<usize> {
        self.step_index
    }

    /// The float32 cumulative products of the alphas, indexed by training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// Timesteps (before rounding to integers for Karras) and sigmas for `n` steps.
    fn compute_schedule(&self, n: usize) -> Result<(Vec<i64>, Vec<f32>)> {
        let cfg = &self.config;
        let train = cfg.num_train_timesteps;
        // Clip lambda(t) from below (matters for the cosine schedule): `searchsorted` of the
        // ascending (flipped) lambdas.
        let clipped_idx = self.lambdas.iter().rev().take_while(|&&l| (l as f64) < cfg.lambda_min_clipped).count();
        let last_timestep = train as i64 - clipped_idx as i64;
        let mut timesteps: Vec<i64> = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<i64> = np_linspace(0.0, (last_timestep - 1) as f64, n + 1)
                    .into_iter()
                    .rev()
                    .map(|x| x.round_ties_even() as i64)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep.div_euclid(n as i64 + 1);
                let mut v: Vec<i64> = (0..=n as i64).rev().map(|i| i * ratio).collect();
                v.pop();
                v.iter().map(|t| t.saturating_add(cfg.steps_offset)).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / n as f64;
                np_arange_f64(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|x| x.round_ties_even() as i64 - 1)
                    .collect()
            }
        };

        // sqrt((1 - a) / a) per training timestep, float32 as in the reference.
        let train_sigmas: Vec<f32> = self.alphas_cumprod.iter().map(|&a| ((1.0f32 - a) / a).sqrt()).collect();
        let mut sigmas: Vec<f32> = if cfg.use_karras_sigmas {
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = train_sigmas[0] as f64;
            let sigma_max = *train_sigmas.last().unwrap() as f64;
            let karras = karras_sigmas(sigma_min, sigma_max, n);
            timesteps = karras
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    let t = if cfg.beta_schedule != BetaSchedule::SquaredcosCapV2 { t.round_ties_even() } else { t };
                    t as i64
                })
                .collect();
            karras.iter().map(|&s| s as f32).collect()
        } else {
            // `np.interp` at integer points: the training sigma, clamped at both ends.
            timesteps.iter().map(|&t| train_sigmas[t.clamp(0, train_sigmas.len() as i64 - 1) as usize]).collect()
        };
        let sigma_last = match cfg.final_sigmas_type {
            FinalSigmasType::Zero => 0.0f32,
            FinalSigmasType::SigmaMin => {
                let a = self.alphas_cumprod[0];
                ((1.0f32 - a) / a).sqrt()
            }
        };
        sigmas.push(sigma_last);
        Ok((timesteps, sigmas))
    }

    fn index_for_timestep(&self, timestep: usize) -> usize {
        let matches: Vec<usize> =
            self.timesteps.iter().enumerate().filter(|(_, &t)| t == timestep).map(|(i, _)| i).collect();
        match matches.len() {
            0 => self.timesteps.len() - 1,
            // On a repeated timestep start at its second occurrence, so that no sigma is skipped.
            1 => matches[0],
            _ => matches[1],
        }
    }

    /// The model output turned into what the solver integrates: x0 for the `++` variants,
    /// epsilon otherwise.
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let cfg = &self.config;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        if cfg.algorithm_type.is_data_prediction() {
            let x0 = match cfg.prediction_type {
                PredictionType::Epsilon => linear_combination(&[(1.0, sample), (-sigma_t, model_output)])?
                    .affine((1.0f32 / alpha_t) as f64, 0.0)?,
                PredictionType::Sample => model_output.clone(),
                PredictionType::VPrediction => linear_combination(&[(alpha_t, sample), (-sigma_t, model_output)])?,
                PredictionType::FlowPrediction => unreachable!("rejected when built"),
            };
            if cfg.thresholding {
                return threshold_sample(&x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value);
            }
            Ok(x0)
        } else {
            let eps = match cfg.prediction_type {
                PredictionType::Epsilon => model_output.clone(),
                PredictionType::Sample => linear_combination(&[(1.0, sample), (-alpha_t, model_output)])?
                    .affine((1.0f32 / sigma_t) as f64, 0.0)?,
                PredictionType::VPrediction => linear_combination(&[(alpha_t, model_output), (sigma_t, sample)])?,
                PredictionType::FlowPrediction => unreachable!("rejected when built"),
            };
            if cfg.thresholding {
                let x0 =
                    linear_combination(&[(1.0, sample), (-sigma_t, &eps)])?.affine((1.0f32 / alpha_t) as f64, 0.0)?;
                let x0 = threshold_sample(&x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)?;
                return Ok(
                    linear_combination(&[(1.0, sample), (-alpha_t, &x0)])?.affine((1.0f32 / sigma_t) as f64, 0.0)?
                );
            }
            Ok(eps)
        }
    }

    fn first_order_update(&self, m0: &Tensor, sample: &Tensor, noise: Option<&Tensor>, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match self.config.algorithm_type {
            AlgorithmType::DpmSolverPlusPlus => {
                linear_combination(&[(sigma_t / sigma_s, sample), (-(alpha_t * ((-h).exp() - 1.0)), m0)])
            }
            AlgorithmType::DpmSolver => {
                linear_combination(&[(alpha_t / alpha_s, sample), (-(sigma_t * (h.exp() - 1.0)), m0)])
            }
            AlgorithmType::SdeDpmSolverPlusPlus => {
                let noise = noise.expect("sde variants draw noise");
                let e2 = (-2.0f32 * h).exp();
                linear_combination(&[
                    (sigma_t / sigma_s * (-h).exp(), sample),
                    (alpha_t * (1.0 - e2), m0),
                    (sigma_t * (1.0f32 - e2).sqrt(), noise),
                ])
            }
            AlgorithmType::SdeDpmSolver => {
                let noise = noise.expect("sde variants draw noise");
                linear_combination(&[
                    (alpha_t / alpha_s, sample),
                    (-(2.0f32 * (sigma_t * (h.exp() - 1.0))), m0),
                    (sigma_t * ((2.0f32 * h).exp() - 1.0).sqrt(), noise),
                ])
            }
        }
    }

    fn second_order_update(&self, sample: &Tensor, noise: Option<&Tensor>, i: usize) -> Result<Tensor> {
        let n = self.model_outputs.len();
        let (m0, m1) = match (&self.model_outputs[n - 1], &self.model_outputs[n - 2]) {
            (Some(m0), Some(m1)) => (m0, m1),
            _ => return Err(Error::InvalidArgument("DPM-Solver second-order step without history".into())),
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = (m0 - m1)?.affine((1.0f32 / r0) as f64, 0.0)?;
        let midpoint = self.config.solver_type == SolverType::Midpoint;
        match self.config.algorithm_type {
            AlgorithmType::DpmSolverPlusPlus => {
                let c = alpha_t * ((-h).exp() - 1.0);
                let c1 = if midpoint { -(0.5f32 * c) } else { alpha_t * (((-h).exp() - 1.0) / h + 1.0) };
                linear_combination(&[(sigma_t / sigma_s0, sample), (-c, d0), (c1, &d1)])
            }
            AlgorithmType::DpmSolver => {
                let c = sigma_t * (h.exp() - 1.0);
                let c1 = if midpoint { 0.5f32 * c } else { sigma_t * ((h.exp() - 1.0) / h - 1.0) };
                linear_combination(&[(alpha_t / alpha_s0, sample), (-c, d0), (-c1, &d1)])
            }
            AlgorithmType::SdeDpmSolverPlusPlus => {
                let noise = noise.expect("sde variants draw noise");
                let e2 = (-2.0f32 * h).exp();
                let c = alpha_t * (1.0 - e2);
                let c1 = if midpoint { 0.5f32 * c } else { alpha_t * ((1.0 - e2) / (-2.0f32 * h) + 1.0) };
                linear_combination(&[
                    (sigma_t / sigma_s0 * (-h).exp(), sample),
                    (c, d0),
                    (c1, &d1),
                    (sigma_t * (1.0f32 - e2).sqrt(), noise),
                ])
            }
            AlgorithmType::SdeDpmSolver => {
                let noise = noise.expect("sde variants draw noise");
                let c = sigma_t * (h.exp() - 1.0);
                let c1 = if midpoint { c } else { 2.0f32 * (sigma_t * ((h.exp() - 1.0) / h - 1.0)) };
                linear_combination(&[
                    (alpha_t / alpha_s0, sample),
                    (-(2.0f32 * c), d0),
                    (-c1, &d1),
                    (sigma_t * ((2.0f32 * h).exp() - 1.0).sqrt(), noise),
                ])
            }
        }
    }

    fn third_order_update(&self, sample: &Tensor, noise: Option<&Tensor>, i: usize) -> Result<Tensor> {
        let n = self.model_outputs.len();
        let (m0, m1, m2) = match (&self.model_outputs[n - 1], &self.model_outputs[n - 2], &self.model_outputs[n - 3]) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(Error::InvalidArgument("DPM-Solver third-order step without history".into())),
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let h_1 = lambda_s1 - lambda_s2;
        let r0 = h_0 / h;
        let r1 = h_1 / h;
        let d0 = m0;
        let d1_0 = (m0 - m1)?.affine((1.0f32 / r0) as f64, 0.0)?;
        let d1_1 = (m1 - m2)?.affine((1.0f32 / r1) as f64, 0.0)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + diff.affine((r0 / (r0 + r1)) as f64, 0.0)?)?;
        let d2 = diff.affine((1.0f32 / (r0 + r1)) as f64, 0.0)?;
        match self.config.algorithm_type {
            AlgorithmType::DpmSolverPlusPlus => {
                let e = (-h).exp();
                linear_combination(&[
                    (sigma_t / sigma_s0, sample),
                    (-(alpha_t * (e - 1.0)), d0),
                    (alpha_t * ((e - 1.0) / h + 1.0), &d1),
                    (-(alpha_t * ((e - 1.0 + h) / (h * h) - 0.5)), &d2),
                ])
            }
            AlgorithmType::DpmSolver => {
                let e = h.exp();
                linear_combination(&[
                    (alpha_t / alpha_s0, sample),
                    (-(sigma_t * (e - 1.0)), d0),
                    (-(sigma_t * ((e - 1.0) / h - 1.0)), &d1),
                    (-(sigma_t * ((e - 1.0 - h) / (h * h) - 0.5)), &d2),
                ])
            }
            AlgorithmType::SdeDpmSolverPlusPlus => {
                let noise = noise.expect("sde variants draw noise");
                let e2 = (-2.0f32 * h).exp();
                let two_h = 2.0f32 * h;
                linear_combination(&[
                    (sigma_t / sigma_s0 * (-h).exp(), sample),
                    (alpha_t * (1.0 - e2), d0),
                    (alpha_t * ((1.0 - e2) / (-2.0f32 * h) + 1.0), &d1),
                    (alpha_t * ((1.0 - e2 - 2.0f32 * h) / (two_h * two_h) - 0.5), &d2),
                    (sigma_t * (1.0f32 - e2).sqrt(), noise),
                ])
            }
            AlgorithmType::SdeDpmSolver => Err(Error::InvalidArgument(
                "DPM-Solver third order is not defined for algorithm_type `sde-dpmsolver`: use \
                 solver_order 2 or another algorithm_type"
                    .into(),
            )),
        }
    }
}

/// `(alpha_t, sigma_t)` of a sigma (variance-preserving), in float32.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0f32 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// The Karras et al. (2022) sigma ramp (rho = 7), from sigma_max down to sigma_min, in f64.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// The (fractional) training timestep of a sigma, interpolating log-sigma linearly.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last_nonneg = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0);
    let low_idx = last_nonneg.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
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
        let (timesteps, sigmas) = self.compute_schedule(n)?;
        if timesteps.is_empty() {
            return Err(config_error(&self.config_path, format!("the schedule for {n} steps is empty")));
        }
        self.timesteps = to_timesteps(&timesteps, n, None)?;
        // The loop starts at a repeated first timestep's second occurrence (diffusers'
        // `index_for_timestep`), so it would run out of sigmas before the last step.
        if self.timesteps.iter().filter(|&&t| t == self.timesteps[0]).count() > 1 {
            return Err(Error::InvalidArgument(format!(
                "the DPM-Solver schedule for {n} steps repeats its first timestep {}: choose fewer steps",
                self.timesteps[0]
            )));
        }
        // Two equal noise levels make a step of length 0, which the multistep updates divide by.
        if let Some(i) = sigmas.windows(2).position(|w| w[0] == w[1]) {
            return Err(Error::InvalidArgument(format!(
                "the DPM-Solver schedule for {n} steps gives steps {} and {} the same noise level: choose fewer steps",
                i + 1,
                i + 2
            )));
        }
        self.sigmas = sigmas;
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }

    fn set_begin_index(&mut self, index: usize) {
        self.begin_index = Some(index);
    }

    /// `alpha_t · original + sigma_t · noise` at the sigma of the step the loop is at: the begin
    /// index before the first step, the current step after it, else the timestep's index.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor> {
        let i = match (self.begin_index, self.step_index) {
            (None, _) => self.index_for_timestep(timestep),
            (Some(_), Some(step)) => step,
            (Some(begin), None) => begin,
        };
        let sigma = *self.sigmas.get(i).ok_or_else(|| {
            Error::InvalidArgument(format!("step index {i} is outside the schedule's {} sigmas", self.sigmas.len()))
        })?;
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        linear_combination(&[(alpha_t, original), (sigma_t, noise)])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Result<Tensor> {
        let i = step_index(self.step_index, self.begin_index, || self.index_for_timestep(timestep));
        let len = self.timesteps.len();
        if i >= len {
            return Err(Error::InvalidArgument(format!(
                "DPM-Solver was stepped more times than its {len} timesteps: call set_timesteps again"
            )));
        }
        let cfg = &self.config;
        let few_steps = cfg.lower_order_final && len < 15;
        let lower_order_final =
            i == len - 1 && (cfg.euler_at_final || few_steps || cfg.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = len >= 2 && i == len - 2 && few_steps;

        let out_dtype = model_output.dtype();
        let m = self.convert_model_output(model_output, sample, i)?.to_dtype(DType::F32)?;
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().unwrap() = Some(m.clone());

        let sample = sample.to_dtype(DType::F32)?;
        let noise = if cfg.algorithm_type.is_sde() {
            let z = noise(model_output.dims())?;
            if z.dims() != model_output.dims() {
                return Err(Error::InvalidArgument(format!(
                    "the noise source returned shape {:?}, expected {:?}",
                    z.dims(),
                    model_output.dims()
                )));
            }
            Some(z.to_device(model_output.device())?.to_dtype(DType::F32)?)
        } else {
            None
        };

        let order = cfg.solver_order;
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(&m, &sample, noise.as_ref(), i)?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order_update(&sample, noise.as_ref(), i)?
        } else {
            self.third_order_update(&sample, noise.as_ref(), i)?
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(prev.to_dtype(out_dtype)?)
    }
}
