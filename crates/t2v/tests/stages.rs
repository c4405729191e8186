//! Every network against the Python reference's outputs on the fixture models: text encoder,
//! UNet3D at three timesteps, VAE decoder; `tiny-t2v-bin` (weights as PyTorch .bin) against
//! `tiny-t2v`'s references, which share its weights.

mod common;

use candle_core::{DType, Device};
use common::stages::*;
use common::*;
use t2v::checkpoint::{ModelFolder, WeightsVariant};
use t2v::unet3d::{self, UNet3DConditionModel};

#[test]
fn text_encoder_tiny() {
    check_text_encoder("tiny-t2v", "tiny-t2v", false)
}
#[test]
fn text_encoder_small() {
    check_text_encoder("small-t2v", "small-t2v", false)
}
#[test]
fn text_encoder_small_narrow() {
    check_text_encoder("small-t2v", "small-t2v", true)
}
#[test]
fn text_encoder_tiny_bin() {
    check_text_encoder("tiny-t2v-bin", "tiny-t2v", true)
}
#[test]
fn unet_tiny() {
    check_unet("tiny-t2v", "tiny-t2v", false)
}
#[test]
fn unet_small() {
    check_unet("small-t2v", "small-t2v", false)
}
#[test]
fn unet_small_narrow() {
    check_unet("small-t2v", "small-t2v", true)
}
#[test]
fn unet_tiny_bin() {
    check_unet("tiny-t2v-bin", "tiny-t2v", true)
}
#[test]
fn vae_tiny() {
    check_vae("tiny-t2v", "tiny-t2v", false)
}
#[test]
fn vae_small() {
    check_vae("small-t2v", "small-t2v", false)
}
#[test]
fn vae_small_narrow() {
    check_vae("small-t2v", "small-t2v", true)
}
#[test]
fn vae_tiny_bin() {
    check_vae("tiny-t2v-bin", "tiny-t2v", true)
}

#[test]
fn guided_step_shares_the_latents_prefix_exactly() {
    let folder = ModelFolder::open(model_dir("small-t2v")).unwrap();
    let cfg: unet3d::Config = folder.config("unet", "config.json").unwrap();
    let weights = folder.weights("unet", WeightsVariant::Auto, DType::F32, &Device::Cpu).unwrap();
    let unet = weights.build(|vb| UNet3DConditionModel::new(vb, &cfg)).unwrap();
    let refs = reference("small-t2v");
    let one = refs["unet.sample"].narrow(0, 0, 1).unwrap();
    let both = candle_core::Tensor::cat(&[&one, &one], 0).unwrap();
    let context = &refs["unet.context"];
    let batched = unet.forward(&both, 500.0, context).unwrap();
    let shared = unet.forward_shared_latents(&one, 500.0, context).unwrap();
    let err = rel_err(&shared, &batched);
    assert!(err < 1e-6, "{err:.2e}");
}

/// The suite runs once per instruction-set path (`T2V_ISA=avx2 cargo test ...` in CI on an
/// AVX-512 machine): the path asked for must be the one taken, or the run would test another.
#[test]
fn the_path_asked_for_is_the_path_taken() {
    use t2v::kernels::{isa, Isa};
    match Isa::from_env() {
        Ok(Some(asked)) => assert_eq!(isa(), asked, "T2V_ISA asked for {asked}"),
        Ok(None) => assert_eq!(isa(), Isa::best()),
        Err(e) => panic!("T2V_ISA: {e}"),
    }
    eprintln!("kernels on the {} path", isa());
}
