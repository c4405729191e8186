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

/// Every 3×3 convolution of the decoder, and of the UNet's ResNet blocks (with their time
/// embedding), in bands of two rows ([`t2v::nn::with_bands`]; at full size only the VAE's
/// largest layers are): the reference's outputs still.
#[test]
fn vae_and_unet_in_bands_of_two_rows() {
    t2v::nn::with_bands(0, 0, || {
        check_vae("small-t2v", "small-t2v", false);
        check_vae("tiny-t2v", "tiny-t2v", false);
        check_unet("small-t2v", "small-t2v", false);
    })
}

/// Bands of 2 to 22 rows against the whole decode of the same latents: equal to float32
/// rounding (each band is its own convolution, so Winograd groups its sums differently).
#[test]
fn decode_in_bands_matches_the_whole_decode() {
    let folder = ModelFolder::open(model_dir("small-t2v")).unwrap();
    let cfg: t2v::vae::Config = folder.config("vae", "config.json").unwrap();
    let weights = folder.weights_with("vae", WeightsVariant::Auto, DType::F32, &Device::Cpu, false).unwrap();
    let vae = weights.build(|vb| t2v::vae::Vae::new(vb, &cfg)).unwrap();
    let latents = &reference("small-t2v")["vae.latents"];
    let whole = vae.decode(latents).unwrap();
    // rows of 64 pixels take 4 KiB (16 channels) or 8 KiB (32): bands of 2, 6, 10 and 22 rows
    for band_bytes in [0, 40 << 10, 100 << 10] {
        let banded = t2v::nn::with_bands(0, band_bytes, || vae.decode(latents)).unwrap();
        let err = rel_err(&banded, &whole);
        println!("bands of {band_bytes} bytes: rel err {err:.2e} from the whole decode");
        assert!(err < 1e-5, "bands of {band_bytes} bytes: rel err {err:.2e} from the whole decode");
    }
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
