//! UniPC (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler`: a multistep predictor
//! (UniP) and, from the second step on, a corrector (UniC) that reuses the new model output to
//! refine the sample before the next prediction. One UNet call a step.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::dpm_solver::{alpha_sigma, lambda, FinalSigmasType};
use super::{
    alphas_cumprod, config_error, linear_combination, np_arange_f64, np_linspace, parse_config, step_index,
    threshold_sample, train_sigmas, BetaConfig, BetaSchedule, NoiseSource, PredictionType, Scheduler, SchedulerKind,
    TimestepSpacing,
};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum UniPcSolverType {
    #[serde(rename = "bh1")]
    Bh1,
    /// `midpoint`, `heun` and `logrho` (other schedulers' solver types) map to `bh2`, as in the
    /// reference.
    #[serde(rename = "bh2", alias = "midpoint", alias = "heun", alias = "logrho")]
    Bh2,
}

/// The keys of `UniPCMultistepScheduler`'s config, with its defaults for missing keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct UniPcConfig {
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
    pub predict_x0: bool,
    pub solver_type: UniPcSolverType,
    pub lower_order_final: bool,
    /// Steps (0-based) whose following corrector is skipped.
    pub disable_corrector: Vec<usize>,
    pub solver_p: Option<serde_json::Value>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_flow_sigmas: bool,
    #[serde(deserialize_with = "super::de_float", serialize_with = "super::ser_float")]
    pub flow_shift: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub final_sigmas_type: FinalSigmasType,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub shift_terminal: Option<f64>,
}

impl Default for UniPcConfig {
    fn default() -> Self {
        UniPcConfig {
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
            predict_x0: true,
            solver_type: UniPcSolverType::Bh2,
            lower_order_final: true,
            disable_corrector: vec![],
            solver_p: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
            sigma_min: None,
            sigma_max: None,
            shift_terminal: None,
        }
    }
}

impl UniPcConfig {
    /// Reads the keys UniPC knows from a scheduler config of any class; UniPC's defaults fill the rest.
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
                format!("UniPCMultistepScheduler with {what} is not supported by t2v; remove the option"),
            )
        };
        if !(1..=3).contains(&self.solver_order) {
            return Err(config_error(path, format!("solver_order must be 1, 2 or 3, got {}", self.solver_order)));
        }
        for (flag, name) in [
            (self.use_karras_sigmas, "use_karras_sigmas"),
            (self.use_exponential_sigmas, "use_exponential_sigmas"),
            (self.use_beta_sigmas, "use_beta_sigmas"),
            (self.use_flow_sigmas || self.prediction_type == PredictionType::FlowPrediction, "flow matching"),
            (self.use_dynamic_shifting, "use_dynamic_shifting"),
            (self.solver_p.is_some(), "a solver_p"),
        ] {
            if flag {
                return Err(unsupported(name));
            }
        }
        Ok(())
    }
}

/// Solves `a x = b` for a small system in float32 by Gaussian elimination with partial pivoting
/// (`torch.linalg.solve`'s LU on the CPU).
fn solve_f32(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Result<Vec<f32>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().partial_cmp(&a[j][col].abs()).unwrap_or(std::cmp::Ordering::Equal))
            .unwrap_or(col);
        if a[pivot][col] == 0.0 || !a[pivot][col].is_finite() {
            return Err(Error::InvalidArgument(
                "UniPC's coefficient system is singular: two steps have the same noise level; choose fewer steps"
                    .into(),
            ));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0f32; n];
    for row in (0..n).rev() {
        let mut acc = b[row];
        for (coef, value) in a[row][row + 1..].iter().zip(&x[row + 1..]) {
            acc -= coef * value;
        }
        x[row] = acc / a[row][row];
    }
    Ok(x)
}

pub struct UniPcMultistepScheduler {
    config: UniPcConfig,
    config_path: PathBuf,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<usize>,
    /// One more than the timesteps: the last is the final sigma.
    sigmas: Vec<f32>,
    /// Converted model outputs of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    /// The order the last predictor ran with (the corrector of the next step uses it).
    this_order: usize,
    last_sample: Option<Tensor>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl UniPcMultistepScheduler {
    /// Builds the scheduler and sets its timesteps. `config_path` names the config in errors.
    pub fn new(config: UniPcConfig, config_path: &Path, num_inference_steps: usize) -> Result<Self> {
        config.validate(config_path)?;
        let mut alphas_cumprod = alphas_cumprod(&config.betas(), config_path)?;
        if config.rescale_betas_zero_snr {
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        let mut scheduler = UniPcMultistepScheduler {
            model_outputs: vec![None; config.solver_order],
            config,
            config_path: config_path.to_path_buf(),
            alphas_cumprod,
            timesteps: vec![],
            sigmas: vec![],
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
            step_index: None,
            begin_index: None,
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    /// The sigmas of the schedule, one more than the timesteps (float32).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn schedule(&self, n: usize) -> Vec<i64> {
        let cfg = &self.config;
        let train = cfg.num_train_timesteps;
        match cfg.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<i64> = np_linspace(0.0, (train - 1) as f64, n + 1)
                    .into_iter()
                    .rev()
                    .map(|x| x.round_ties_even() as i64)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = (train / (n + 1)) as i64;
                (1..=n as i64).rev().map(|i| (i * ratio).saturating_add(cfg.steps_offset)).collect()
            }
            TimestepSpacing::Trailing => np_arange_f64(train as f64, 0.0, -(train as f64 / n as f64))
                .into_iter()
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect(),
        }
    }

    fn index_for_timestep(&self, timestep: usize) -> usize {
        let matches: Vec<usize> =
            self.timesteps.iter().enumerate().filter(|(_, &t)| t == timestep).map(|(i, _)| i).collect();
        match matches.len() {
            0 => self.timesteps.len() - 1,
            1 => matches[0],
            _ => matches[1],
        }
    }

    /// The model output as the solver integrates it: x0 (`predict_x0`) or epsilon.
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let cfg = &self.config;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        if cfg.predict_x0 {
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
            Ok(match cfg.prediction_type {
                PredictionType::Epsilon => model_output.clone(),
                PredictionType::Sample => linear_combination(&[(1.0, sample), (-alpha_t, model_output)])?
                    .affine((1.0f32 / sigma_t) as f64, 0.0)?,
                PredictionType::VPrediction => linear_combination(&[(alpha_t, model_output), (sigma_t, sample)])?,
                PredictionType::FlowPrediction => unreachable!("rejected when built"),
            })
        }
    }

    /// The coefficients shared by UniP and UniC between the sigmas at `s0` and `t`, with the
    /// earlier outputs at sigma indices `earlier` (newest first): `(alpha_t, sigma_t, sigma_s0,
    /// alpha_s0, h_phi_1, B_h, rks, b)`.
    #[allow(clippy::type_complexity)]
    fn coefficients(&self, t: usize, s0: usize, earlier: &[usize], order: usize) -> Coefficients {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let mut rks: Vec<f32> = earlier
            .iter()
            .map(|&si| {
                let (a, s) = alpha_sigma(self.sigmas[si]);
                (lambda(a, s) - lambda_s0) / h
            })
            .collect();
        rks.push(1.0);
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1f32;
        let b_h = match self.config.solver_type {
            UniPcSolverType::Bh1 => hh,
            UniPcSolverType::Bh2 => hh.exp_m1(),
        };
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Coefficients { alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, b_h, rks, b }
    }

    /// `R[i][k] = rks[k]^i` for i < size.
    fn r_matrix(rks: &[f32], size: usize) -> Vec<Vec<f32>> {
        (0..size).map(|i| rks[..size].iter().map(|r| r.powi(i as i32)).collect()).collect()
    }

    /// The base of both updates: `σ_t/σ_s0 · x − α_t·h_φ1 · m0` (x0 form) or
    /// `α_t/α_s0 · x − σ_t·h_φ1 · m0` (epsilon form).
    fn base(&self, c: &Coefficients, x: &Tensor, m0: &Tensor) -> Result<Tensor> {
        if self.config.predict_x0 {
            linear_combination(&[(c.sigma_t / c.sigma_s0, x), (-(c.alpha_t * c.h_phi_1), m0)])
        } else {
            linear_combination(&[(c.alpha_t / c.alpha_s0, x), (-(c.sigma_t * c.h_phi_1), m0)])
        }
    }

    fn scale(&self, c: &Coefficients) -> f32 {
        if self.config.predict_x0 {
            c.alpha_t * c.b_h
        } else {
            c.sigma_t * c.b_h
        }
    }

    fn output(&self, back: usize) -> Result<&Tensor> {
        let n = self.model_outputs.len();
        self.model_outputs
            .get(n.wrapping_sub(back + 1))
            .and_then(|m| m.as_ref())
            .ok_or_else(|| Error::InvalidArgument("UniPC stepped at an order without enough history".into()))
    }

    /// UniP: the sample at step `i + 1` from the sample at step `i`.
    fn predictor(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let m0 = self.output(0)?;
        let earlier: Vec<usize> = (1..order).map(|k| i - k).collect();
        let c = self.coefficients(i + 1, i, &earlier, order);
        let x_t = self.base(&c, x, m0)?;
        if order == 1 {
            return Ok(x_t);
        }
        let rhos: Vec<f32> = if order == 2 {
            vec![0.5]
        } else {
            solve_f32(Self::r_matrix(&c.rks, order - 1), c.b[..order - 1].to_vec())?
        };
        let mut pred_res: Option<Tensor> = None;
        for k in 1..order {
            let d1 = (self.output(k)? - m0)?.affine((1.0f32 / c.rks[k - 1]) as f64, 0.0)?;
            let term = d1.affine(rhos[k - 1] as f64, 0.0)?;
            pred_res = Some(match pred_res {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
        let pred_res = pred_res.expect("order >= 2");
        Ok((x_t - pred_res.affine(self.scale(&c) as f64, 0.0)?)?)
    }

    /// UniC: corrects the sample at step `i` (`this_sample`, predicted from `last_sample` at step
    /// `i − 1`) with the new converted model output `model_t`. The history is not yet shifted.
    fn corrector(&self, model_t: &Tensor, last: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let m0 = self.output(0)?;
        let earlier: Vec<usize> = (1..order).map(|k| i - (k + 1)).collect();
        let c = self.coefficients(i, i - 1, &earlier, order);
        let x_t = self.base(&c, last, m0)?;
        let rhos: Vec<f32> =
            if order == 1 { vec![0.5] } else { solve_f32(Self::r_matrix(&c.rks, order), c.b.clone())? };
        let mut res = (model_t - m0)?.affine(rhos[order - 1] as f64, 0.0)?;
        if order > 1 {
            let mut corr_res: Option<Tensor> = None;
            for k in 1..order {
                let d1 = (self.output(k)? - m0)?.affine((1.0f32 / c.rks[k - 1]) as f64, 0.0)?;
                let term = d1.affine(rhos[k - 1] as f64, 0.0)?;
                corr_res = Some(match corr_res {
                    None => term,
                    Some(acc) => (acc + term)?,
                });
            }
            res = (corr_res.expect("order >= 2") + res)?;
        }
        Ok((x_t - res.affine(self.scale(&c) as f64, 0.0)?)?)
    }
}

struct Coefficients {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    h_phi_1: f32,
    b_h: f32,
    rks: Vec<f32>,
    b: Vec<f32>,
}

impl Scheduler for UniPcMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::UniPcMultistep
    }

    fn timesteps(&self) -> &[usize] {
        &self.timesteps
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
        let schedule = self.schedule(n);
        if schedule.is_empty() {
            return Err(config_error(&self.config_path, format!("the schedule for {n} steps is empty")));
        }
        let timesteps = super::to_timesteps(&schedule, n, None)?;
        let train_sigmas = train_sigmas(&self.alphas_cumprod);
        // np.interp at integer points: the training sigma, clamped at both ends.
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| train_sigmas[t.min(train - 1)]).collect();
        sigmas.push(match self.config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train_sigmas[0],
        });
        if let Some(i) = sigmas.windows(2).position(|w| w[0] == w[1]) {
            return Err(Error::InvalidArgument(format!(
                "the UniPC schedule for {n} steps gives steps {} and {} the same noise level: choose fewer steps",
                i + 1,
                i + 2
            )));
        }
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.this_order = 1;
        self.last_sample = None;
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }

    fn set_begin_index(&mut self, index: usize) {
        self.begin_index = Some(index);
    }

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
        _noise: &mut NoiseSource<'_>,
    ) -> Result<Tensor> {
        let i = step_index(self.step_index, self.begin_index, || self.index_for_timestep(timestep));
        let len = self.timesteps.len();
        if i >= len {
            return Err(Error::InvalidArgument(format!(
                "UniPC was stepped more times than its {len} timesteps: call set_timesteps again"
            )));
        }
        let out_dtype = model_output.dtype();
        let model_output = model_output.to_dtype(DType::F32)?;
        let mut sample = sample.to_dtype(DType::F32)?;
        let converted = self.convert_model_output(&model_output, &sample, i)?;
        let use_corrector = i > 0 && !self.config.disable_corrector.contains(&(i - 1));
        if use_corrector {
            if let Some(last) = self.last_sample.clone() {
                sample = self.corrector(&converted, &last, i, self.this_order)?;
            }
        }
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().unwrap() = Some(converted);
        let order = self.config.solver_order;
        let this_order = if self.config.lower_order_final { order.min(len - i) } else { order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predictor(&sample, i, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(prev.to_dtype(out_dtype)?)
    }
}
