//! Live previews: the predicted clean latents of a step mapped to RGB by a fixed linear map, as
//! A1111's "Approx cheap" preview (`sd_samplers_common.samples_to_images_tensor` with
//! `approximation == 1`). ModelScope's VAE is Stable Diffusion's, so Stable Diffusion's factors apply.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use base64::Engine;
use candle_core::{DType, Tensor};
use t2v::pipeline::StepProgress;
use t2v::schedulers::{DdimConfig, DdimScheduler, PredictionType};

/// RGB from the 4 latent channels (rows: channels; columns: R, G, B), A1111's
/// `sd_vae_approx.cheap_approximation` for SD 1.x/2.x latents.
const LATENT_RGB: [[f32; 3]; 4] =
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]];

/// At most this many frames, side by side, in one preview.
pub const PREVIEW_FRAMES: usize = 4;

/// Turns a step's sample and model output into the predicted clean latents:
/// diffusers' `pred_original_sample` for the checkpoint's prediction type.
pub struct Previewer {
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
}

/// One preview image.
pub struct Preview {
    /// `data:image/png;base64,...`
    pub data_url: String,
    pub width: usize,
    pub height: usize,
    /// What making it cost.
    pub cost: Duration,
}

impl Previewer {
    pub fn new(scheduler_config: &serde_json::Value, config_path: &std::path::Path) -> Result<Self> {
        let config = DdimConfig::from_json(scheduler_config, config_path)?;
        let prediction_type = config.prediction_type;
        let scheduler = DdimScheduler::new(config, config_path, 1, 0.0)?;
        Ok(Self { alphas_cumprod: scheduler.alphas_cumprod().to_vec(), prediction_type })
    }

    /// The predicted clean latents (1, C, F, h, w) of this step.
    pub fn predicted_original(&self, step: &StepProgress) -> Result<Tensor> {
        let Some(&alpha) = self.alphas_cumprod.get(step.timestep) else {
            bail!("timestep {} is outside the schedule", step.timestep);
        };
        let (a, s) = ((alpha as f64).sqrt(), ((1.0 - alpha) as f64).sqrt());
        let (x, out) = (&step.sample, &step.model_output);
        Ok(match self.prediction_type {
            // x0 = (x_t − √(1−ᾱ)·ε) / √ᾱ
            PredictionType::Epsilon => ((x - (out * s)?)? / a)?,
            PredictionType::VPrediction => ((x * a)? - (out * s)?)?,
            PredictionType::Sample | PredictionType::FlowPrediction => out.clone(),
        })
    }

    /// The preview of one step: up to [`PREVIEW_FRAMES`] frames side by side at latent resolution.
    pub fn render(&self, step: &StepProgress) -> Result<Preview> {
        let started = Instant::now();
        let x0 = self.predicted_original(step)?;
        let (rgb, width, height) = latents_to_rgb(&x0)?;
        let png = encode_png(&rgb, width, height)?;
        let data_url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
        Ok(Preview { data_url, width, height, cost: started.elapsed() })
    }
}

/// (1, 4, F, h, w) latents → an RGB8 strip of up to [`PREVIEW_FRAMES`] evenly spaced frames,
/// (width, height) = (n·w, h).
pub fn latents_to_rgb(latents: &Tensor) -> Result<(Vec<u8>, usize, usize)> {
    let (_, c, f, h, w) = latents.dims5()?;
    if c != LATENT_RGB.len() {
        bail!("the preview maps 4 latent channels, this model has {c}");
    }
    let n = f.min(PREVIEW_FRAMES);
    let picks: Vec<usize> = (0..n).map(|i| if n == 1 { 0 } else { i * (f - 1) / (n - 1) }).collect();
    let data = latents.get(0)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (width, plane) = (n * w, f * h * w);
    let mut rgb = vec![0u8; width * h * 3];
    for (slot, &frame) in picks.iter().enumerate() {
        for y in 0..h {
            for x in 0..w {
                let at = frame * h * w + y * w + x;
                let out = (y * width + slot * w + x) * 3;
                for (k, px) in rgb[out..out + 3].iter_mut().enumerate() {
                    let v: f32 = (0..c).map(|ch| data[ch * plane + at] * LATENT_RGB[ch][k]).sum();
                    // The map gives roughly [-1, 1], as the VAE's output.
                    *px = (((v + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
    }
    Ok((rgb, width, h))
}

pub fn encode_png(rgb: &[u8], width: usize, height: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(rgb)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scheduler_config() -> serde_json::Value {
        serde_json::json!({"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"})
    }

    #[test]
    fn predicted_original_inverts_the_forward_process() -> Result<()> {
        let previewer = Previewer::new(&scheduler_config(), std::path::Path::new("scheduler_config.json"))?;
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (1, 4, 3, 4, 4), &dev)?;
        let eps = Tensor::randn(0f32, 1.0, (1, 4, 3, 4, 4), &dev)?;
        let t = 600;
        let alpha = previewer.alphas_cumprod[t] as f64;
        let xt = ((&x0 * alpha.sqrt())? + (&eps * (1.0 - alpha).sqrt())?)?;
        let step = StepProgress {
            step: 1,
            total_steps: 1,
            timestep: t,
            elapsed: Duration::ZERO,
            latents: xt.clone(),
            sample: xt,
            model_output: eps,
        };
        let back = previewer.predicted_original(&step)?;
        let err = (back - &x0)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err < 1e-4, "max error {err}");
        Ok(())
    }

    #[test]
    fn strip_of_evenly_spaced_frames() -> Result<()> {
        // Frame i holds the value i in channel 0 only: R = 0.298·i, mapped from [-1, 1].
        let (f, h, w) = (7, 2, 3);
        let mut data = vec![0f32; 4 * f * h * w];
        for i in 0..f {
            for p in 0..h * w {
                data[i * h * w + p] = i as f32 / 6.0;
            }
        }
        let latents = Tensor::from_vec(data, (1, 4, f, h, w), &Device::Cpu)?;
        let (rgb, width, height) = latents_to_rgb(&latents)?;
        assert_eq!((width, height), (PREVIEW_FRAMES * w, h));
        // Frames 0, 2, 4, 6 are shown.
        for (slot, frame) in [0usize, 2, 4, 6].into_iter().enumerate() {
            let r = rgb[(slot * w) * 3] as f32;
            let expect = ((0.298 * frame as f32 / 6.0 + 1.0) * 0.5 * 255.0).round();
            assert_eq!(r, expect, "slot {slot}");
        }
        assert!(encode_png(&rgb, width, height)?.starts_with(b"\x89PNG"));
        Ok(())
    }

    /// The preview of the full model's latents (16 frames of 256×256 → 4×16×32×32) costs well
    /// under 2% of one of its steps (about 40 s on a 2-core CPU, about 2 s on a GPU).
    #[test]
    fn full_size_preview_is_cheap() -> Result<()> {
        let previewer = Previewer::new(&scheduler_config(), std::path::Path::new("scheduler_config.json"))?;
        let dev = Device::Cpu;
        let shape = (1, 4, 16, 32, 32);
        let step = StepProgress {
            step: 1,
            total_steps: 25,
            timestep: 500,
            elapsed: Duration::ZERO,
            sample: Tensor::randn(0f32, 1.0, shape, &dev)?,
            model_output: Tensor::randn(0f32, 1.0, shape, &dev)?,
            latents: Tensor::zeros(shape, candle_core::DType::F32, &dev)?,
        };
        let mut best = Duration::MAX;
        for _ in 0..5 {
            best = best.min(previewer.render(&step)?.cost);
        }
        eprintln!("full-size preview: {:.3} ms", best.as_secs_f64() * 1e3);
        assert!(best < Duration::from_millis(40), "a full-size preview took {best:?}: 2% of a 2 s GPU step is 40 ms");
        Ok(())
    }
}
