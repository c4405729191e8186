//! GFLOP/s of the packed matrix product on each instruction-set path this CPU can run, on the
//! UNet's linear shapes (the best of several repetitions, so that a busy machine still gives a
//! fair comparison between paths): `cargo run --release --example kernel_speed`.

use std::time::Instant;

use t2v::kernels::packed_matmul::{self, Init, PackedB};
use t2v::kernels::{set_isa, Isa, Src};

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
                unsafe { packed_matmul::matmul(m, a.as_ptr(), k, &packed, c.as_mut_ptr(), n, Init::Bias(&bias)) };
                best[p] = best[p].min(t.elapsed().as_secs_f64());
            }
        }
        let flop = 2.0 * (m * n * k) as f64;
        let line: Vec<String> =
            paths.iter().zip(&best).map(|(i, s)| format!("{i} {:6.1} GFLOP/s", flop / s / 1e9)).collect();
        println!("{m:5}×{k:4}·{k:4}×{n:4}  {}", line.join("   "));
    }
}
