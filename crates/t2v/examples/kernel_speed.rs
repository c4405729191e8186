//! GFLOP/s of the packed matrix product and of the convolutions on each instruction-set path this
//! CPU can run, on the UNet's shapes (the best of several repetitions, so that a busy machine still
//! gives a fair comparison between paths; convolutions count the direct form's multiplications):
//! `cargo run --release --example kernel_speed [all|vae] [all|avx2|avx512|...] [LABEL-PART]`:
//! `vae` runs only the VAE's and the 16-frame temporal convolutions, a path name that path only,
//! and a third argument only the shapes whose label contains it. At the UNet's levels each
//! convolution runs both ways: the automatic choice (or candle's, for stride 2) against the
//! unfolded product. Last, the temporal attention's shapes.

use std::time::Instant;

use candle_core::{Device, Tensor};
use t2v::kernels::bf16::Half;
use t2v::kernels::conv::{conv2d_with, temporal_conv3_with, ConvAlgo, TemporalAlgo};
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

/// Whether the shape labelled `label` is to be timed (the third argument, when given, is part of
/// the labels to time).
fn wanted(label: &str) -> bool {
    std::env::args().nth(3).is_none_or(|only| label.contains(&only))
}

/// The convolutions' weight type: float16 (the published weights, widened as a float32 run
/// widens them), bfloat16 with `KERNEL_SPEED_WEIGHTS=bf16` (`--dtype bf16`: products in bfloat16
/// where the path multiplies in it), or float16 multiplied in float16 on `avx512fp16` with
/// `KERNEL_SPEED_WEIGHTS=f16` (`--dtype f16`).
fn weight_dtype() -> candle_core::DType {
    match std::env::var("KERNEL_SPEED_WEIGHTS").as_deref() {
        Ok("bf16") => candle_core::DType::BF16,
        _ => candle_core::DType::F16,
    }
}

fn convolutions(paths: &[Isa], vae_only: bool) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (channels, latent side): 4 frames at 256×256 under guidance (batch 2) at the UNet's levels
    let unet_levels: &[(usize, usize)] = if vae_only { &[] } else { &[(320, 32), (640, 16), (1280, 8), (1280, 4)] };
    // (4 frames at every level; 16 at the two smallest, where the unfolded product may pay)
    let runs = unet_levels
        .iter()
        .map(|&(c, side)| (c, side, 4))
        .chain(unet_levels.iter().filter(|&&(_, side)| side <= 8).map(|&(c, side)| (c, side, 16)));
    for (c, side, f) in runs {
        let b = 2;
        if !wanted(&format!("{c}ch {}×{side}²", b * f)) && !wanted(&format!("{c}ch {b}×{f}×{side}²")) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (b, c, f, side, side), &dev)?;
        // float16, as the published weights are kept in memory (or bfloat16, `--dtype bf16`)
        let f16 = |t: Tensor| t.to_dtype(weight_dtype());
        let wt = f16(Tensor::randn(0f32, 0.05, (c, c, 3, 1, 1), &dev)?)?;
        let bias = Tensor::randn(0f32, 0.1, c, &dev)?;
        let flop = 2.0 * (b * f * side * side * c * c * 3) as f64;
        for algo in [TemporalAlgo::Auto, TemporalAlgo::Unfolded, TemporalAlgo::Winograd, TemporalAlgo::Tiles] {
            let label = format!("temporal {c}ch {b}×{f}×{side}² {algo:?}");
            if wanted(&label) {
                if temporal_conv3_with(&x, &wt, Some(&bias), algo).is_err() {
                    continue;
                }
                let best = best_of(paths, || {
                    temporal_conv3_with(&x, &wt, Some(&bias), algo).expect("temporal convolution");
                });
                report(&label, flop, paths, &best);
            }
        }

        let frames = x.permute((0, 2, 1, 3, 4))?.reshape((b * f, c, side, side))?.contiguous()?;
        let flop = 2.0 * (b * f * side * side * c * c) as f64;
        // (kernel, stride, padding, output side)
        for (k, stride, pad, out) in [(1usize, 1usize, 0usize, side), (3, 1, 1, side), (3, 2, 1, side / 2)] {
            let wk = f16(Tensor::randn(0f32, 0.05, (c, c, k, k), &dev)?)?;
            let flop = flop * (k * k * out * out) as f64 / (side * side) as f64;
            // 3×3: float32 Winograd against the automatic choice (AMX tiles for bfloat16
            // weights where they fit) and the unfolded product
            let algos = match (k, stride) {
                (3, 1) => vec![ConvAlgo::Winograd, ConvAlgo::Auto, ConvAlgo::Unfolded],
                (_, 1) => vec![ConvAlgo::Auto, ConvAlgo::Unfolded],
                _ => vec![ConvAlgo::Candle, ConvAlgo::Unfolded],
            };
            for algo in algos {
                let label = format!("{k}×{k}/{stride} {c}ch {}×{side}² {algo:?}", b * f);
                if wanted(&label) && conv2d_with(&frames, &wk, Some(&bias), stride, pad, algo).is_ok() {
                    let best = best_of(paths, || {
                        conv2d_with(&frames, &wk, Some(&bias), stride, pad, algo).expect("convolution");
                    });
                    report(&label, flop, paths, &best);
                }
            }
        }
    }
    // The temporal convolutions of 16 frames, with guidance (batch 2) and without (batch 1).
    for (c, side) in [(320usize, 32usize), (640, 16), (1280, 8), (1280, 4)] {
        for b in [2usize, 1] {
            let f = 16;
            let label = format!("temporal {c}ch {b}×{f}×{side}² {:?}", weight_dtype());
            if !wanted(&label) {
                continue;
            }
            let x = Tensor::randn(0f32, 1.0, (b, c, f, side, side), &dev)?;
            let wt = Tensor::randn(0f32, 0.05, (c, c, 3, 1, 1), &dev)?.to_dtype(weight_dtype())?;
            let bias = Tensor::randn(0f32, 0.1, c, &dev)?;
            let flop = 2.0 * (b * f * side * side * c * c * 3) as f64;
            for algo in [TemporalAlgo::Direct, TemporalAlgo::Winograd] {
                let best = best_of(paths, || {
                    temporal_conv3_with(&x, &wt, Some(&bias), algo).expect("temporal convolution");
                });
                report(&format!("{label} {algo:?}"), flop, paths, &best);
            }
        }
    }
    // The VAE decoder's convolutions for 256×256 frames, one frame a call as it decodes: its
    // 1×1 shortcuts and its 3×3 convolutions.
    let vae_shapes = [
        (1usize, 512usize, 256usize, 128usize),
        (1, 256, 128, 256),
        (3, 512, 512, 32),
        (3, 512, 512, 64),
        (3, 512, 512, 128),
        (3, 512, 256, 128),
        (3, 256, 256, 128),
        (3, 256, 256, 256),
        (3, 256, 128, 256),
        (3, 128, 128, 256),
    ];
    for (k, cin, cout, side) in vae_shapes {
        let label = format!("VAE {k}×{k} {cin}→{cout}ch {side}²");
        if !wanted(&label) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (1, cin, side, side), &dev)?;
        // float16, as the published weights are kept in memory (or bfloat16, `--dtype bf16`)
        let w = Tensor::randn(0f32, 0.05, (cout, cin, k, k), &dev)?.to_dtype(weight_dtype())?;
        let bias = Tensor::randn(0f32, 0.1, cout, &dev)?;
        let flop = 2.0 * (k * k * side * side * cin * cout) as f64;
        let algos =
            if k == 3 { vec![ConvAlgo::Winograd, ConvAlgo::Auto, ConvAlgo::Unfolded] } else { vec![ConvAlgo::Auto] };
        for algo in algos {
            if conv2d_with(&x, &w, Some(&bias), 1, k / 2, algo).is_err() {
                continue;
            }
            let best = best_of(paths, || {
                conv2d_with(&x, &w, Some(&bias), 1, k / 2, algo).expect("convolution");
            });
            report(&format!("{label} {algo:?}"), flop, paths, &best);
        }
    }
    // The VAE encoder's stride-2 downsamplers (video-to-video), on its input padded by one at the
    // right and bottom as diffusers pads it: candle's convolution against the unfolded product.
    for (c, side) in [(128usize, 256usize), (256, 128), (512, 64)] {
        let label = format!("VAE 3×3/2 {c}ch {side}²");
        if !wanted(&label) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (1, c, side + 1, side + 1), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (c, c, 3, 3), &dev)?.to_dtype(weight_dtype())?;
        let bias = Tensor::randn(0f32, 0.1, c, &dev)?;
        let flop = 2.0 * (9 * (side / 2) * (side / 2) * c * c) as f64;
        for algo in [ConvAlgo::Candle, ConvAlgo::Unfolded] {
            let best = best_of(paths, || {
                conv2d_with(&x, &w, Some(&bias), 2, 0, algo).expect("convolution");
            });
            report(&format!("{label} {algo:?}"), flop, paths, &best);
        }
    }
    Ok(())
}

fn main() {
    // as the command line does: freed activation buffers reused, not returned to the kernel
    t2v::kernels::tune_allocator();
    // `kernel_speed vae`: only the VAE decoder's convolutions.
    let vae_only = std::env::args().nth(1).as_deref() == Some("vae");
    // (rows, in, out): 4 frames at 256×256 under guidance, the UNet's three widths
    let shapes = [(8192, 320, 320), (8192, 320, 2560), (2048, 640, 640), (2048, 2560, 640), (512, 1280, 5120)];
    // `kernel_speed vae avx512`: one path only.
    let only =
        std::env::args().nth(2).filter(|s| s != "all").map(|s| Isa::parse_available(&s).expect("a path this CPU runs"));
    let paths: Vec<Isa> =
        Isa::available().into_iter().filter(|&i| i != Isa::Generic && only.is_none_or(|o| o == i)).collect();
    if paths.is_empty() {
        println!("no vectorised path on this CPU");
        return;
    }
    for (m, k, n) in shapes.into_iter().filter(|_| !vae_only) {
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
                unsafe {
                    packed_matmul::matmul(m, a.as_ptr(), k, &packed, c.as_mut_ptr(), n, Init::Bias(&bias), wide, None)
                };
                best[p] = best[p].min(t.elapsed().as_secs_f64());
            }
        }
        let flop = 2.0 * (m * n * k) as f64;
        let line: Vec<String> =
            paths.iter().zip(&best).map(|(i, s)| format!("{i} {:6.1} GFLOP/s", flop / s / 1e9)).collect();
        println!("{m:5}×{k:4}·{k:4}×{n:4}  {}", line.join("   "));
    }
    if let Err(e) = linear_per_call(&paths, vae_only) {
        eprintln!("linear per call: {e}");
    }
    for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
        if let Err(e) = half_linear(&paths, vae_only, dtype) {
            eprintln!("{} linear: {e}", dtype.as_str());
        }
    }
    let f16_products = std::env::var("KERNEL_SPEED_WEIGHTS").as_deref() == Ok("f16");
    if let Err(e) = t2v::kernels::with_f16_products(f16_products, || convolutions(&paths, vae_only)) {
        eprintln!("convolutions: {e}");
    }
    if let Err(e) = temporal_attention(&paths) {
        eprintln!("temporal attention: {e}");
    }
    if let Err(e) = layout_copies() {
        eprintln!("layout copies: {e}");
    }
}

/// Linear layers as a step calls them: float16 weights widened and packed by the call itself,
/// at the deep levels' few rows (4 and 16 frames under guidance: 128 and 512 tokens at 4×4
/// latents, 512 and 2048 at 8×8) where packing the weight is a large part of the product.
fn linear_per_call(paths: &[Isa], vae_only: bool) -> candle_core::Result<()> {
    if vae_only {
        return Ok(());
    }
    // (rows, in, out): the feed-forward's GEGLU projection and output, and a q/k/v projection
    let shapes = [
        (128, 1280, 10240),
        (512, 1280, 10240),
        (2048, 1280, 10240),
        (128, 5120, 1280),
        (512, 5120, 1280),
        (2048, 5120, 1280),
        (128, 1280, 1280),
        (512, 1280, 1280),
        (2048, 1280, 1280),
        (2048, 640, 640),
        (2048, 640, 5120),
        (2048, 2560, 640),
        (8192, 640, 640),
        (8192, 320, 2560),
        (8192, 1280, 320),
        (154, 1024, 320),
        (154, 1024, 1280),
    ];
    for (m, k, n) in shapes {
        let label = format!("linear per call {m}×{k}·{k}×{n} f16");
        if !wanted(&label) {
            continue;
        }
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<half::f16> =
            (0..n * k).map(|i| half::f16::from_f32(((i * 104729) % 1000) as f32 / 1000.0 - 0.5)).collect();
        let bias = vec![0.1f32; n];
        let mut c = vec![0f32; m * n];
        let wide = || t2v::kernels::avx512();
        // SAFETY (both): a holds m×k, c m×n floats, w n×k; the path was checked available.
        let whole = best_of(paths, || unsafe {
            let packed = PackedB::from_transposed(Src::F16(&w), n, k, true);
            packed_matmul::matmul(m, a.as_ptr(), k, &packed, c.as_mut_ptr(), n, Init::Bias(&bias), wide(), None)
        });
        report(&format!("{label} packed whole"), 2.0 * (m * k * n) as f64, paths, &whole);
        let streamed = best_of(paths, || unsafe {
            packed_matmul::matmul_streamed(
                m,
                a.as_ptr(),
                k,
                Src::F16(&w),
                n,
                k,
                c.as_mut_ptr(),
                n,
                Init::Bias(&bias),
                wide(),
            )
        });
        report(&format!("{label} streamed"), 2.0 * (m * k * n) as f64, paths, &streamed);
    }
    // The feed-forward's first projection with GEGLU, as a step calls it (float16 weights
    // widened): fused into the product where the path does, against the product, then GEGLU.
    for (m, k, n) in [(8192, 320, 2560), (2048, 640, 5120), (512, 1280, 10240), (1024, 640, 5120), (256, 1280, 10240)] {
        let label = format!("geglu per call {m}×{k}·{k}×{n} f16");
        if !wanted(&label) {
            continue;
        }
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?.to_dtype(candle_core::DType::F16)?;
        let b = Tensor::randn(0f32, 0.1, n, &dev)?;
        let flop = 2.0 * (m * k * n) as f64;
        let fused = best_of(paths, || {
            t2v::kernels::linear::linear_geglu(&x, &w, Some(&b)).expect("GEGLU");
        });
        report(&format!("{label} fused"), flop, paths, &fused);
        let apart = best_of(paths, || {
            let h = t2v::kernels::linear::linear(&x, &w, Some(&b)).expect("projection");
            t2v::kernels::geglu::geglu(&h).expect("GEGLU");
        });
        report(&format!("{label} apart"), flop, paths, &apart);
    }
    Ok(())
}

/// Linear layers with 16-bit weights (`--dtype bf16` or `f16`) as a step calls them, through the
/// layer's own op (weight packed per call): widened to float32 on the paths that do not multiply
/// in that type, multiplied in bfloat16 on `vdpbf16ps` or AMX tiles, in float16 on `vfmadd231ph`.
fn half_linear(paths: &[Isa], vae_only: bool, dtype: candle_core::DType) -> candle_core::Result<()> {
    if vae_only {
        return Ok(());
    }
    let dev = Device::Cpu;
    // (rows, in, out): 4 frames under guidance at the UNet's levels (8192, 2048, 512, 128 tokens
    // of frames), the feed-forward's and the projections' shapes
    let shapes = [
        (8192, 320, 320),
        (8192, 320, 2560),
        (8192, 1280, 320),
        (2048, 640, 640),
        (2048, 640, 5120),
        (2048, 2560, 640),
        (512, 1280, 1280),
        (512, 1280, 10240),
        (512, 5120, 1280),
        (128, 1280, 10240),
    ];
    for (m, k, n) in shapes {
        let label = format!("{} linear {m}×{k}·{k}×{n}", dtype.as_str());
        if !wanted(&label) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?.to_dtype(dtype)?;
        let b = Tensor::randn(0f32, 1.0, n, &dev)?;
        let best = best_of(paths, || {
            t2v::kernels::linear::linear(&x, &w, Some(&b)).expect("linear");
        });
        report(&label, 2.0 * (m * k * n) as f64, paths, &best);
        // the product alone, the weight packed once (on the paths that multiply in this type)
        let half_paths: Vec<Isa> = paths
            .iter()
            .copied()
            .filter(|&i| {
                set_isa(i).expect("available path");
                match dtype {
                    candle_core::DType::BF16 => t2v::kernels::avx512bf16(),
                    _ => t2v::kernels::avx512fp16(),
                }
            })
            .collect();
        if let Some(&first) = half_paths.first() {
            set_isa(first).expect("available path");
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let (wb, wh): (Vec<half::bf16>, Vec<half::f16>) = match dtype {
                candle_core::DType::BF16 => (w.flatten_all()?.to_vec1()?, Vec::new()),
                _ => (Vec::new(), w.flatten_all()?.to_vec1()?),
            };
            let (src, half) = if wh.is_empty() { (Src::Bf16(&wb), Half::Bf16) } else { (Src::F16(&wh), Half::F16) };
            let bias = b.to_vec1::<f32>()?;
            let mut c = vec![0f32; m * n];
            let residual = Tensor::randn(0f32, 1.0, m * n, &dev)?.to_vec1::<f32>()?;
            let packed = PackedB::from_transposed_half(src, half, n, k, true);
            let cases = [
                ("bias", Init::Bias(&bias), None),
                ("overwrite", Init::Overwrite, None),
                ("bias, residual", Init::Bias(&bias), Some(residual.as_ptr())),
            ];
            for (what, init, residual) in cases {
                // SAFETY: xs holds m×k, c and residual m×n floats; the paths were checked available.
                let best = best_of(&half_paths, || unsafe {
                    packed_matmul::matmul(m, xs.as_ptr(), k, &packed, c.as_mut_ptr(), n, init, true, residual)
                });
                report(&format!("{label} product ({what})"), 2.0 * (m * k * n) as f64, &half_paths, &best);
            }
        }
    }
    Ok(())
}

/// A 128-frame video's moves between layouts at level 0 (320 channels, 32×32 latents): into the
/// per-video layout before a temporal GroupNorm, into sequences of frames for the temporal
/// transformer (a chunk of 8 rows of pixels) and back; GB/s of floats read and written.
fn layout_copies() -> candle_core::Result<()> {
    use t2v::kernels::copy::contiguous;
    let dev = Device::Cpu;
    let (frames, c, side, rows) = (128usize, 320usize, 32usize, 8usize);
    let x = Tensor::randn(0f32, 1.0, (frames, c, side, side), &dev)?;
    let video = contiguous(&x.reshape((1, frames, c, side, side))?.permute((0, 2, 1, 3, 4))?)?;
    let seq = contiguous(&video.narrow(3, 0, rows)?.permute((0, 3, 4, 2, 1))?)?;
    type Copy<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;
    let cases: [(&str, Copy); 3] = [
        (
            "to the video layout",
            Box::new(|| contiguous(&x.reshape((1, frames, c, side, side))?.permute((0, 2, 1, 3, 4))?)),
        ),
        ("into sequences", Box::new(|| contiguous(&video.narrow(3, 0, rows)?.permute((0, 3, 4, 2, 1))?))),
        ("back from sequences", Box::new(|| contiguous(&seq.permute((0, 3, 4, 1, 2))?))),
    ];
    for (label, run) in cases {
        let label = format!("layout copy {label}");
        if !wanted(&label) {
            continue;
        }
        let mut best = f64::INFINITY;
        let mut bytes = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let out = run()?;
            best = best.min(t.elapsed().as_secs_f64());
            bytes = 2 * out.elem_count() * 4;
        }
        println!("{label:40} {:7.2} ms  {:6.2} GB/s", best * 1e3, bytes as f64 / best / 1e9);
    }
    Ok(())
}

/// The temporal transformers' attention over 16 frames under guidance (64 heads of width/64
/// channels, one sequence per pixel), at the UNet's four levels for 256×256 frames.
fn temporal_attention(paths: &[Isa]) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (width, side) in [(320usize, 32usize), (640, 16), (1280, 8), (1280, 4)] {
        let label = format!("temporal attention {width}ch {side}²");
        if !wanted(&label) {
            continue;
        }
        let batch = 2 * side * side;
        let q = Tensor::randn(0f32, 1.0, (batch, 16, width), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (batch, 16, width), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (batch, 16, width), &dev)?;
        let scale = 1.0 / ((width / 64) as f64).sqrt();
        let best = best_of(paths, || {
            t2v::nn::multi_head_attention(&q, &k, &v, 64, scale, 1, t2v::nn::ValueProduct::Float32).expect("attention");
        });
        report(&label, 4.0 * (batch * 16 * 16 * width) as f64, paths, &best);
    }
    Ok(())
}
