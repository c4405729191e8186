//! The per-stage checks against the Python reference's outputs (text encoder, UNet3D at the
//! fixture's timesteps, VAE decoder), shared by `tests/stages.rs` (CPU kernels) and
//! `tests/fallback.rs` (candle's standard ops, the path of other devices).

use candle_core::{DType, Device};
use t2v::checkpoint::{ModelFolder, WeightsVariant};
use t2v::text_encoder::{self, TextEncoder};
use t2v::unet3d::{self, UNet3DConditionModel};
use t2v::vae::{self, Vae};

use super::*;

pub fn check_text_encoder(model: &str, reference_of: &str, keep_narrow: bool) {
    let folder = ModelFolder::open(model_dir(model)).unwrap();
    let cfg: text_encoder::Config = folder.config("text_encoder", "config.json").unwrap();
    let weights =
        folder.weights_with("text_encoder", WeightsVariant::Auto, DType::F32, &Device::Cpu, keep_narrow).unwrap();
    let encoder = weights.build(|vb| TextEncoder::new(vb, &cfg)).unwrap();
    let refs = reference(reference_of);
    let count = reference_json(reference_of)["text"].as_array().unwrap().len();
    for i in 0..count {
        let ids = &refs[&format!("text.{i}.input_ids")];
        let out = encoder.forward(ids).unwrap();
        let err = rel_err(&out, &refs[&format!("text.{i}.embeds")]);
        println!("{model} text.{i}: rel err {err:.2e}");
        assert!(err < MODULE_TOL, "{model} text.{i}: rel err {err:.2e}");
    }
}

/// `keep_narrow`: float16-stored matrices stay float16 and are widened as each layer runs.
pub fn check_unet(model: &str, reference_of: &str, keep_narrow: bool) {
    let folder = ModelFolder::open(model_dir(model)).unwrap();
    let cfg: unet3d::Config = folder.config("unet", "config.json").unwrap();
    let weights = folder.weights_with("unet", WeightsVariant::Auto, DType::F32, &Device::Cpu, keep_narrow).unwrap();
    let unet = weights.build(|vb| UNet3DConditionModel::new(vb, &cfg)).unwrap();
    let refs = reference(reference_of);
    let sample = &refs["unet.sample"];
    let context = &refs["unet.context"];
    for t in reference_json(reference_of)["unet_timesteps"].as_array().unwrap() {
        let t = t.as_u64().unwrap();
        let out = unet.forward(sample, t as f64, context).unwrap();
        let err = rel_err(&out, &refs[&format!("unet.t{t}.out")]);
        println!("{model} unet t={t}: rel err {err:.2e}");
        assert!(err < MODULE_TOL, "{model} unet t={t}: rel err {err:.2e}");
    }
}

pub fn check_vae(model: &str, reference_of: &str, keep_narrow: bool) {
    let folder = ModelFolder::open(model_dir(model)).unwrap();
    let cfg: vae::Config = folder.config("vae", "config.json").unwrap();
    let weights = folder.weights_with("vae", WeightsVariant::Auto, DType::F32, &Device::Cpu, keep_narrow).unwrap();
    let vae = weights.build(|vb| Vae::new(vb, &cfg)).unwrap();
    let refs = reference(reference_of);
    let out = vae.decode(&refs["vae.latents"]).unwrap();
    let err = rel_err(&out, &refs["vae.decoded"]);
    println!("{model} vae: rel err {err:.2e}");
    assert!(err < MODULE_TOL, "{model} vae: rel err {err:.2e}");
}
