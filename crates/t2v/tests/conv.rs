//! Correctness of `t2v_conv::conv` against a float64 direct convolution (and candle's conv2d).

use candle_core::{DType, Device, Tensor};
use half::f16;
use t2v::kernels::conv;

/// Deterministic normal-ish numbers (xorshift + Box–Muller).
struct Rng(u64);
impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (a, b) = (self.next_f64(), self.next_f64());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
}

#[allow(clippy::too_many_arguments)]
fn reference(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    wd: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> (Vec<f64>, usize, usize) {
    let ho = (h + 2 * pad - k) / stride + 1;
    let wo = (wd + 2 * pad - k) / stride + 1;
    let mut out = vec![0f64; n * cout * ho * wo];
    for ni in 0..n {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = b.map_or(0.0, |b| b[co] as f64);
                    for ci in 0..cin {
                        for ky in 0..k {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            if iy < 0 || iy as usize >= h {
                                continue;
                            }
                            for kx in 0..k {
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if ix < 0 || ix as usize >= wd {
                                    continue;
                                }
                                acc += x[((ni * cin + ci) * h + iy as usize) * wd + ix as usize] as f64
                                    * w[((co * cin + ci) * k + ky) * k + kx] as f64;
                            }
                        }
                    }
                    out[((ni * cout + co) * ho + oy) * wo + ox] = acc;
                }
            }
        }
    }
    (out, ho, wo)
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let max_err = got.iter().zip(want).fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
    max_err / max_ref.max(1e-30)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Checks conv2d for f32 and f16 weights, with and without bias; returns the worst relative error.
#[allow(clippy::too_many_arguments)]
fn check(
    seed: u64,
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    wd: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> f64 {
    let dev = Device::Cpu;
    let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let x = rng.vec(n * cin * h * wd, 1.0);
    let w32 = rng.vec(cout * cin * k * k, 1.0 / ((cin * k * k) as f64).sqrt());
    // f16-representable weights, so that the f16 and f32 runs share one reference
    let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
    let w = w16.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
    let b = rng.vec(cout, 0.5);
    let xt = Tensor::from_vec(x.clone(), (n, cin, h, wd), &dev).unwrap();
    let wt = Tensor::from_vec(w.clone(), (cout, cin, k, k), &dev).unwrap();
    let wt16 = Tensor::from_vec(w16, (cout, cin, k, k), &dev).unwrap();
    let bt = Tensor::from_vec(b.clone(), cout, &dev).unwrap();
    let mut worst = 0f64;
    for with_bias in [false, true] {
        let (want, ho, wo) = reference(&x, &w, with_bias.then_some(&b[..]), n, cin, cout, h, wd, k, stride, pad);
        let bias = with_bias.then_some(&bt);
        let ec = rel_err(&flat(&conv::conv2d_fallback(&xt, &wt, bias, stride, pad).unwrap()), &want);
        for algo in conv_algos() {
            let y32 = conv::conv2d_with(&xt, &wt, bias, stride, pad, algo).unwrap();
            assert_eq!(y32.dims(), [n, cout, ho, wo]);
            assert_eq!(y32.dtype(), DType::F32);
            let y16 = conv::conv2d_with(&xt, &wt16, bias, stride, pad, algo).unwrap();
            let (g32, g16) = (flat(&y32), flat(&y16));
            assert!(g32 == g16, "{algo:?}: f16 weights must give exactly the f32-weight result");
            let e = rel_err(&g32, &want);
            eprintln!(
                "conv {algo:?} k{k} s{stride} p{pad} n{n} {cin}->{cout} {h}x{wd} bias={with_bias}: rel err {e:.2e} (candle {ec:.2e})"
            );
            assert!(e <= 1e-5, "{algo:?}: relative error {e:.3e} > 1e-5");
            worst = worst.max(e);
        }
    }
    worst
}

/// The algorithms to check on this path: the automatic choice, and the unfolded product wherever
/// the packed product runs.
fn conv_algos() -> Vec<conv::ConvAlgo> {
    let mut algos = vec![conv::ConvAlgo::Auto];
    if t2v::kernels::packed_product() {
        algos.push(conv::ConvAlgo::Unfolded);
    }
    algos
}

#[test]
fn conv3x3_odd_sizes() {
    let cases = [
        (1, 1, 1, 1, 1),
        (1, 3, 5, 5, 7),
        (2, 5, 7, 1, 1),
        (1, 4, 3, 2, 9),
        (3, 20, 13, 9, 17),
        (2, 16, 8, 33, 31),
        (1, 7, 11, 4, 4),
        (1, 9, 6, 37, 70),
        (2, 8, 19, 6, 40),
        // rows of 16 tiles and more (the 512-bit transforms), ending past the image's edge
        (1, 5, 7, 9, 62),
        (2, 3, 4, 13, 130),
        // small planes with channels past a whole 8 and a ragged block of output channels
        (2, 13, 7, 3, 4),
        (5, 130, 20, 4, 4),
        (15, 9, 8, 4, 4),
        // groups of at most 8 tiles (one tile an image) with an odd count of channel panels
        (3, 24, 15, 4, 8),
        (8, 64, 40, 4, 4),
    ];
    for (i, &(n, cin, cout, h, w)) in cases.iter().enumerate() {
        check(i as u64 + 1, n, cin, cout, h, w, 3, 1, 1);
    }
}

#[test]
fn conv3x3_model_like() {
    let cases = [
        (32, 16, 16, 4, 4),
        (4, 64, 64, 32, 32),
        (2, 300, 70, 8, 8),
        (1, 1280, 24, 4, 4),
        (3, 640, 26, 8, 8),
        (1, 128, 128, 64, 64),
        (1, 2560, 8, 3, 5),
        (2, 320, 320, 32, 32),
        (1, 1280, 64, 8, 8),
    ];
    let mut worst = 0f64;
    for (i, &(n, cin, cout, h, w)) in cases.iter().enumerate() {
        worst = worst.max(check(100 + i as u64, n, cin, cout, h, w, 3, 1, 1));
    }
    eprintln!("worst 3x3 relative error: {worst:.2e}");
}

/// Inputs like the model's (SiLU of normal: positive-biased) with a biased, wide-range kernel.
#[test]
fn conv3x3_biased_inputs() {
    let dev = Device::Cpu;
    let mut rng = Rng(4242);
    let (n, cin, cout, h, w) = (2, 640, 40, 16, 16);
    let x: Vec<f32> = rng.vec(n * cin * h * w, 2.0).into_iter().map(|v| v / (1.0 + (-v).exp())).collect();
    let wv: Vec<f32> = rng.vec(cout * cin * 9, 0.02).into_iter().map(|v| v + 0.01).collect();
    let (want, _, _) = reference(&x, &wv, None, n, cin, cout, h, w, 3, 1, 1);
    let xt = Tensor::from_vec(x, (n, cin, h, w), &dev).unwrap();
    let wt = Tensor::from_vec(wv, (cout, cin, 3, 3), &dev).unwrap();
    let e = rel_err(&flat(&conv::conv2d(&xt, &wt, None, 1, 1).unwrap()), &want);
    eprintln!("biased inputs: rel err {e:.2e}");
    assert!(e <= 1e-5, "relative error {e:.3e}");
}

#[test]
fn conv1x1_and_fallbacks() {
    check(7, 2, 40, 24, 9, 7, 1, 1, 0);
    check(8, 1, 3, 5, 1, 1, 1, 1, 0);
    check(9, 5, 17, 33, 4, 4, 1, 1, 0);
    // images split into several blocks of columns, the last one partial
    check(13, 2, 300, 20, 40, 40, 1, 1, 0);
    // other kernels, strides and paddings: the unfolded product (candle's conv2d on the
    // generic path)
    check(10, 2, 6, 5, 9, 8, 3, 2, 1);
    check(11, 1, 4, 6, 7, 7, 3, 1, 0);
    check(12, 1, 4, 6, 7, 7, 1, 2, 0);
    check(14, 3, 20, 9, 8, 8, 3, 2, 0);
    check(15, 1, 5, 7, 11, 6, 5, 3, 2);
    check(16, 2, 1, 3, 2, 2, 3, 2, 1);
    // the UNet's downsampler at its 4×4 level (rows few beside the channels)
    check(17, 2, 64, 96, 4, 4, 3, 2, 1);
    check(18, 2, 48, 64, 2, 3, 3, 1, 1);
    // a 1×1 of few pixels against many output channels: the automatic choice takes the unfolded
    // product
    check(19, 3, 24, 64, 1, 1, 1, 1, 0);
    check(21, 2, 16, 256, 2, 2, 1, 1, 0);
}

#[test]
fn unfolded_product_works_in_blocks_of_rows() {
    // more unfolded rows than one block holds (8M floats / (cin·9) rows): the product repeats per
    // block against the weight packed once
    check(20, 1, 1000, 8, 40, 30, 3, 1, 1);
}

#[test]
fn non_contiguous_input() {
    let dev = Device::Cpu;
    let mut rng = Rng(77);
    let (n, cin, cout, h, w) = (2, 6, 5, 7, 9);
    let x = rng.vec(n * cin * h * w, 1.0);
    let wv = rng.vec(cout * cin * 9, 0.2);
    // (n, h, cin, w) storage, permuted to (n, cin, h, w)
    let xt = Tensor::from_vec(x, (n, cin, h, w), &dev).unwrap();
    let xp = xt.permute((0, 2, 1, 3)).unwrap().contiguous().unwrap().permute((0, 2, 1, 3)).unwrap();
    assert!(!xp.is_contiguous());
    let wt = Tensor::from_vec(wv, (cout, cin, 3, 3), &dev).unwrap();
    let a = flat(&conv::conv2d(&xt, &wt, None, 1, 1).unwrap());
    let b = flat(&conv::conv2d(&xp, &wt, None, 1, 1).unwrap());
    assert_eq!(a, b);
}

#[allow(clippy::too_many_arguments)]
fn temporal_reference(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    bsz: usize,
    cin: usize,
    cout: usize,
    f: usize,
    hw: usize,
) -> Vec<f64> {
    let mut out = vec![0f64; bsz * cout * f * hw];
    for bi in 0..bsz {
        for co in 0..cout {
            for fi in 0..f {
                for p in 0..hw {
                    let mut acc = b.map_or(0.0, |b| b[co] as f64);
                    for k in 0..3 {
                        let src = fi as isize + k as isize - 1;
                        if src < 0 || src as usize >= f {
                            continue;
                        }
                        for ci in 0..cin {
                            acc += w[(co * cin + ci) * 3 + k] as f64
                                * x[((bi * cin + ci) * f + src as usize) * hw + p] as f64;
                        }
                    }
                    out[((bi * cout + co) * f + fi) * hw + p] = acc;
                }
            }
        }
    }
    out
}

#[test]
fn temporal_conv() {
    let dev = Device::Cpu;
    let cases = [
        (2, 24, 16, 5, 3, 4),
        (1, 7, 9, 1, 2, 2),
        (2, 40, 40, 16, 4, 4),
        (1, 130, 20, 3, 1, 5),
        (1, 5, 6, 2, 3, 3),
        (2, 640, 48, 16, 4, 4),
        (1, 64, 8, 7, 33, 65),
        (1, 1280, 24, 16, 2, 3),
        // few pixels against many output channels: the automatic choice takes the unfolded product
        (2, 40, 96, 3, 2, 2),
    ];
    for (seed, &(bsz, cin, cout, f, h, w)) in cases.iter().enumerate() {
        let mut rng = Rng(1000 + seed as u64);
        let x = rng.vec(bsz * cin * f * h * w, 1.0);
        let w32 = rng.vec(cout * cin * 3, 1.0 / ((3 * cin) as f64).sqrt());
        let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let wv: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let b = rng.vec(cout, 0.5);
        let xt = Tensor::from_vec(x.clone(), (bsz, cin, f, h, w), &dev).unwrap();
        let wt = Tensor::from_vec(wv.clone(), (cout, cin, 3, 1, 1), &dev).unwrap();
        let wt16 = Tensor::from_vec(w16, (cout, cin, 3, 1, 1), &dev).unwrap();
        let bt = Tensor::from_vec(b.clone(), cout, &dev).unwrap();
        for with_bias in [false, true] {
            let want = temporal_reference(&x, &wv, with_bias.then_some(&b[..]), bsz, cin, cout, f, h * w);
            let bias = with_bias.then_some(&bt);
            let ec = rel_err(&flat(&conv::temporal_conv3_fallback(&xt, &wt, bias).unwrap()), &want);
            let mut algos = vec![
                conv::TemporalAlgo::Auto,
                conv::TemporalAlgo::Direct,
                conv::TemporalAlgo::Winograd,
                conv::TemporalAlgo::Stacked,
            ];
            if t2v::kernels::packed_product() {
                algos.push(conv::TemporalAlgo::Unfolded);
            }
            for algo in algos {
                let y = conv::temporal_conv3_with(&xt, &wt, bias, algo).unwrap();
                assert_eq!(y.dims(), [bsz, cout, f, h, w]);
                let y16 = conv::temporal_conv3_with(&xt, &wt16, bias, algo).unwrap();
                assert_eq!(flat(&y), flat(&y16));
                let e = rel_err(&flat(&y), &want);
                eprintln!("temporal {algo:?} b{bsz} {cin}->{cout} f{f} {h}x{w} bias={with_bias}: rel err {e:.2e} (candle {ec:.2e})");
                assert!(e <= 1e-5, "relative error {e:.3e}");
            }
        }
    }
}
