//! The fixtures through candle's standard ops alone (`t2v::kernels::set_isa(Isa::Generic)`): the
//! path that CUDA and Metal devices take, which must meet the same tolerances as the CPU
//! kernels. A test binary of its own, as the switch is process-wide.

mod common;

use common::stages::*;

fn without_kernels(f: impl FnOnce()) {
    t2v::kernels::set_isa(t2v::kernels::Isa::Generic).unwrap();
    f();
}

#[test]
fn text_encoder_small_narrow_without_kernels() {
    without_kernels(|| check_text_encoder("small-t2v", "small-t2v", true))
}

#[test]
fn unet_small_narrow_without_kernels() {
    without_kernels(|| check_unet("small-t2v", "small-t2v", true))
}

#[test]
fn unet_tiny_without_kernels() {
    without_kernels(|| check_unet("tiny-t2v", "tiny-t2v", false))
}

#[test]
fn vae_small_narrow_without_kernels() {
    without_kernels(|| check_vae("small-t2v", "small-t2v", true))
}

#[test]
fn vae_and_unet_in_bands_without_kernels() {
    // the bands' candle form: statistics, affine and row writes by candle's ops
    without_kernels(|| {
        t2v::nn::with_bands(0, 0, || {
            check_vae("small-t2v", "small-t2v", true);
            check_unet("tiny-t2v", "tiny-t2v", false);
        })
    })
}
