//! GFLOP/s of the packed matrix product and of the convolutions on each instruction-set path this
//! CPU can run, on the UNet's shapes (the best of several repetitions, so that a busy machine still
//! gives a fair comparison between paths; convolutions count the direct form's multiplications):
//! `cargo run --release --example kernel_speed`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use t2v::kernels::conv::{conv2d, temporal_conv3};
use t2v::kernels::packed_matmul::{self, Init, PackedB};
use t2v::kernels::{set_isa, Isa, Src};

/// Best seconds of `run` on each path, interleaved.
fn best_of(paths: &[Isa], mut run: impl FnMut()) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; paths.len()];
    for _ in 0..5 {
        for (p, &isa) in paths.iter().enumerate() {
            set_isa(isa).expect("available path");
            let t = Instant::now();
            run();
            best[p] = best[p].min(t.elapsed().as_secs_f64());
        }
    }
    best
}

fn report(label: &str, flop: f64, paths: &[Isa], best: &[f64]) {
    let line: Vec<String> =
        paths.iter().zip(best).map(|(i, s)| format!("{i} {:6.1} GFLOP/s", flop / s / 1e9)).collect();
    println!("{label:32}  {}", line.join("   "));
}

fn convolutions(paths: &[Isa]) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (channels, latent side): 4 frames at 256×256 under guidance (batch 2) at the UNet's levels
    for (c, side) in [(320usize, 32usize), (640, 16), (1280, 8), (1280, 4)] {
        let (b, f) = (2, 4);
        let x = Tensor::randn(0f32, 1.0, (b, c, f, side, side), &dev)?;
        let wt = Tensor::randn(0f32, 0.05, (c, c, 3, 1, 1), &dev)?;
        let bias = Tensor::randn(0f32, 0.1, c, &dev)?;
        let flop = 2.0 * (b * f * side * side * c * c * 3) as f64;
        let best = best_of(paths, || {
            temporal_conv3(&x, &wt, Some(&bias)).expect("temporal convolution");
        });
        report(&format!("temporal {c}ch {b}×{f}×{side}²"), flop, paths, &best);

        let frames = x.permute((0, 2, 1, 3, 4))?.reshape((b * f, c, side, side))?.contiguous()?;
        let w1 = Tensor::randn(0f32, 0.05, (c, c, 1, 1), &dev)?;
        let flop = 2.0 * (b * f * side * side * c * c) as f64;
        let best = best_of(paths, || {
            conv2d(&frames, &w1, Some(&bias), 1, 0).expect("1×1 convolution");
        });
        report(&format!("1×1 {c}ch {}×{side}²", b * f), flop, paths, &best);

        let w3 = Tensor::randn(0f32, 0.05, (c, c, 3, 3), &dev)?;
        let best = best_of(paths, || {
            conv2d(&frames, &w3, Some(&bias), 1, 1).expect("3×3 convolution");
        });
        report(&format!("3×3 {c}ch {}×{side}²", b * f), 9.0 * flop, paths, &best);
    }
    Ok(())
}

fn main() {
    // (rows, in, out): 4 frames at 256×256 under guidance, the UNet's three widths
    let shapes = [(8192, 320, 320), (8192, 320, 2560), (2048, 640, 640), (2048, 2560, 640), (512, 1280, 5120)];
    let paths: Vec<Isa> = Isa::available().into_iter().filter(|&i| i != Isa::Generic).collect();
    if paths.is_empty() {
        println!("no vectorised path on this CPU");
        return;
    }
    for (m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let bias = vec![0.1f32; n];
        let mut c = vec![0f32; m * n];
        let packed = PackedB::from_transposed(Src::F32(&w), n, k, true);
        let mut best = vec![f64::INFINITY; paths.len()];
        for _ in 0..7 {
            for (p, &isa) in paths.iter().enumerate() {
                set_isa(isa).expect("available path");
                let t = Instant::now();
                // SAFETY: a holds m×k, c m×n floats; the path was checked available.
                // (at the path's own width: set_isa forces it whole)
                let wide = t2v::kernels::avx512();
                unsafe { packed_matmul::matmul(m, a.as_ptr(), k, &packed, c.as_mut_ptr(), n, Init::Bias(&bias), wide) };
                best[p] = best[p].min(t.elapsed().as_secs_f64());
            }
        }
        let flop = 2.0 * (m * n * k) as f64;
        let line: Vec<String> =
            paths.iter().zip(&best).map(|(i, s)| format!("{i} {:6.1} GFLOP/s", flop / s / 1e9)).collect();
        println!("{m:5}×{k:4}·{k:4}×{n:4}  {}", line.join("   "));
    }
    if let Err(e) = convolutions(&paths) {
        eprintln!("convolutions: {e}");
    }
}
