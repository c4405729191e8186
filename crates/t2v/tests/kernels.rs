//! The CPU kernels against candle's standard ops (the path every other device takes) and a
//! float64 computation.

use candle_core::{DType, Device, Tensor};
use t2v::kernels::group_norm::group_norm;

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap();
    let d = d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let m = b
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    d / m
}

#[test]
fn group_norm_matches_float64_on_offset_activations() {
    let dev = Device::Cpu;
    for (shape, groups) in [(vec![2usize, 8, 5, 7], 2usize), (vec![3, 32, 4, 6, 6], 8), (vec![1, 12, 1], 3)] {
        let c = shape[1];
        // A large common offset: the variance must not cancel.
        let x = (Tensor::randn(0f32, 1f32, shape.clone(), &dev).unwrap() * 3.0).unwrap().affine(1.0, 20.0).unwrap();
        let gamma = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
        let beta = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
        for silu in [false, true] {
            let fast = group_norm(&x, &gamma, &beta, groups, 1e-5, silu).unwrap();
            // The fallback path, in float64 (not CPU-f32, so the kernel is bypassed).
            let exact = group_norm(
                &x.to_dtype(DType::F64).unwrap(),
                &gamma.to_dtype(DType::F64).unwrap(),
                &beta.to_dtype(DType::F64).unwrap(),
                groups,
                1e-5,
                silu,
            )
            .unwrap();
            let err = max_rel(&fast, &exact);
            assert!(err < 1e-5, "{shape:?} silu={silu}: {err:.2e}");
        }
    }
}

#[test]
fn group_norm_reads_non_contiguous_input() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1f32, (2, 4, 3, 8), &dev).unwrap().permute((0, 2, 1, 3)).unwrap();
    let (g, b) = (Tensor::ones(3, DType::F32, &dev).unwrap(), Tensor::zeros(3, DType::F32, &dev).unwrap());
    let a = group_norm(&x, &g, &b, 3, 1e-6, false).unwrap();
    let c = group_norm(&x.contiguous().unwrap(), &g, &b, 3, 1e-6, false).unwrap();
    // read row by row in place: the statistics' chunks follow the rows (rounding only)
    assert!(max_rel(&a, &c) < 1e-6, "{:.2e}", max_rel(&a, &c));
    // The temporal layers' case: the per-video view (batch, C, frames, H, W) of per-frame
    // activations, offset into its storage; and a view whose last dimension is strided.
    let frames = Tensor::randn(0f32, 1f32, (3 * 5, 8, 6, 7), &dev).unwrap().narrow(0, 5, 10).unwrap();
    let video = frames.reshape((2, 5, 8, 6, 7)).unwrap().permute((0, 2, 1, 3, 4)).unwrap();
    let strided = video.transpose(3, 4).unwrap();
    let (g, b) = (Tensor::randn(0f32, 1f32, 8, &dev).unwrap(), Tensor::randn(0f32, 1f32, 8, &dev).unwrap());
    for view in [video, strided] {
        for silu in [false, true] {
            let a = group_norm(&view, &g, &b, 4, 1e-5, silu).unwrap();
            let c = group_norm(&view.contiguous().unwrap(), &g, &b, 4, 1e-5, silu).unwrap();
            assert_eq!(a.dims(), view.dims());
            assert!(max_rel(&a, &c) < 1e-6, "{:?} {silu}: {:.2e}", view.stride(), max_rel(&a, &c));
        }
    }
}

#[test]
fn attention_in_blocks_equals_one_block() {
    use t2v::kernels::attention::attention_in_blocks;
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1f32, (6, 37, 8), &dev).unwrap();
    let k = Tensor::randn(0f32, 1f32, (6, 29, 8), &dev).unwrap();
    let v = Tensor::randn(0f32, 1f32, (6, 29, 8), &dev).unwrap();
    let whole = attention_in_blocks(&q, &k, &v, 0.35, usize::MAX).unwrap();
    // Blocks of several rows and of a few query tokens, with ragged ends.
    for budget in [29 * 5, 29 * 37 * 4, 1] {
        let blocked = attention_in_blocks(&q, &k, &v, 0.35, budget).unwrap();
        assert!(max_rel(&blocked, &whole) < 1e-6, "budget {budget}");
    }
}

#[test]
fn geglu_matches_the_separate_ops() {
    let dev = Device::Cpu;
    let h = (Tensor::randn(0f32, 1f32, (3, 5, 16), &dev).unwrap() * 3.0).unwrap();
    let fast = t2v::kernels::geglu::geglu(&h).unwrap();
    let value = h.narrow(2, 0, 8).unwrap();
    let gate = h.narrow(2, 8, 8).unwrap().gelu_erf().unwrap();
    let slow = (value * gate).unwrap();
    assert_eq!(fast.dims(), &[3, 5, 8]);
    assert!(max_rel(&fast, &slow) < 1e-6);
}

#[test]
fn fused_linear_matches_matmul_with_float16_weights_too() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1f32, (37, 24), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.2, (13, 24), &dev).unwrap();
    let b = Tensor::randn(0f32, 1f32, 13, &dev).unwrap();
    let expected = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    let got = t2v::kernels::linear::linear(&x, &w, Some(&b)).unwrap();
    assert!(max_rel(&got, &expected) < 1e-6);
    let no_bias = t2v::kernels::linear::linear(&x, &w, None).unwrap();
    assert!(max_rel(&no_bias, &x.matmul(&w.t().unwrap()).unwrap()) < 1e-6);
    let w16 = w.to_dtype(DType::F16).unwrap();
    let expected16 = x.matmul(&w16.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    let got16 = t2v::kernels::linear::linear(&x, &w16, Some(&b)).unwrap();
    assert!(max_rel(&got16, &expected16) < 1e-6);
}

#[test]
fn packed_linear_equals_linear_and_accumulates_in_place() {
    use t2v::kernels::linear::{linear, linear_accumulate, PackedLinear};
    let dev = Device::Cpu;
    // a depth past one packed block (256 or 384), float16 weights as the published ones
    let x = Tensor::randn(0f32, 1f32, (53, 700), &dev).unwrap();
    let w16 = Tensor::randn(0f32, 0.05, (45, 700), &dev).unwrap().to_dtype(DType::F16).unwrap();
    let b = Tensor::randn(0f32, 1f32, 45, &dev).unwrap();
    let once = linear(&x, &w16, Some(&b)).unwrap().to_vec2::<f32>().unwrap();
    let packed = PackedLinear::new(&w16, Some(&b)).unwrap();
    let kernels_run = t2v::kernels::isa() != t2v::kernels::Isa::Generic && t2v::kernels::packed_product();
    assert_eq!(packed.is_some(), kernels_run, "packed wherever the fused product runs");
    if let Some(packed) = packed {
        // packed once, the same numbers as packing per call, call after call
        for _ in 0..2 {
            assert_eq!(packed.forward(&x).unwrap().to_vec2::<f32>().unwrap(), once);
        }
    }
    let start = Tensor::randn(0f32, 1f32, (53, 45), &dev).unwrap();
    let (x_rows, w_rows) = (x.to_vec2::<f32>().unwrap(), w16.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap());
    let start64: Vec<f64> = start.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
    let (expected, magnitude) = reference_gemm(&x_rows.concat(), &w_rows.concat(), 53, 45, 700, &start64);
    let acc = start.copy().unwrap();
    let view = acc.clone();
    let got = linear_accumulate(acc, &x, &w16).unwrap();
    let err = err_in_rounding_bounds(&got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &expected, &magnitude, 702);
    assert!(err <= 1.0, "{err:.2} of the rounding bound");
    if kernels_run {
        // in place: the tensor handed in holds the sums
        assert_eq!(view.to_vec2::<f32>().unwrap(), got.to_vec2::<f32>().unwrap());
    }
    assert!(linear_accumulate(start, &x.narrow(1, 0, 699).unwrap(), &w16).is_err(), "widths checked");
}

#[test]
fn short_attention_matches_matrix_products() {
    let dev = Device::Cpu;
    for (rows, t, s, d) in [(50, 16, 16, 64), (7, 3, 77, 8), (9, 33, 20, 5)] {
        let q = Tensor::randn(0f32, 1f32, (rows, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1f32, (rows, s, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1f32, (rows, s, d), &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let expected = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap();
        let got = t2v::nn::scaled_dot_product_attention(&q, &k, &v, scale).unwrap();
        assert!(max_rel(&got, &expected) < 1e-5, "{rows} {t} {s} {d}");
    }
}

#[test]
fn parallel_contiguous_copies_any_view() {
    use t2v::kernels::copy::contiguous;
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 5.0 * 6.0, &dev).unwrap().reshape((2, 3, 4, 5, 6)).unwrap();
    for view in [
        x.permute((0, 3, 4, 2, 1)).unwrap(),
        x.permute((0, 2, 1, 3, 4)).unwrap(),
        x.narrow(3, 1, 3).unwrap().transpose(1, 4).unwrap(),
        x.narrow(0, 1, 1).unwrap().unsqueeze(1).unwrap().broadcast_as((1, 3, 3, 4, 5, 6)).unwrap(),
    ] {
        let fast = contiguous(&view).unwrap();
        assert!(fast.is_contiguous());
        assert_eq!(max_rel(&fast, &view.contiguous().unwrap()), 0.0);
    }
    // Transpositions in tiles (the temporal transformer's way into and out of sequences of
    // frames), sides that are and are not multiples of the tile, narrowed and offset views.
    let y = Tensor::arange(0f32, (2 * 37 * 19 * 5 * 7) as f32, &dev).unwrap().reshape((2, 37, 19, 5, 7)).unwrap();
    for view in [
        y.permute((0, 3, 4, 2, 1)).unwrap(),
        y.narrow(3, 1, 3).unwrap().permute((0, 3, 4, 2, 1)).unwrap(),
        y.narrow(0, 1, 1).unwrap().permute((0, 2, 3, 4, 1)).unwrap(),
        y.reshape((2, 19, 37, 5, 7)).unwrap().permute((0, 2, 1, 3, 4)).unwrap(),
        y.reshape((2 * 37, 19 * 35)).unwrap().t().unwrap(),
        y.narrow(1, 3, 20).unwrap().transpose(1, 2).unwrap(),
    ] {
        let fast = contiguous(&view).unwrap();
        assert!(fast.is_contiguous());
        assert_eq!(fast.dims(), view.dims());
        assert_eq!(max_rel(&fast, &view.contiguous().unwrap()), 0.0, "{:?} {:?}", view.dims(), view.stride());
    }
}

#[test]
fn parallel_upsampling_picks_candles_pixels() {
    use t2v::kernels::copy::upsample_nearest2d;
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, (2 * 3 * 5 * 7) as f32, &dev).unwrap().reshape((2, 3, 5, 7)).unwrap();
    // 2× (the VAE's and the UNet's usual case), the UNet's odd output sizes, shrinking, and 1×1
    for (oh, ow) in [(10, 14), (11, 15), (9, 13), (3, 4), (5, 7), (1, 1), (20, 21)] {
        let fast = upsample_nearest2d(&x, oh, ow).unwrap();
        assert_eq!(fast.dims(), &[2, 3, oh, ow]);
        assert_eq!(max_rel(&fast, &x.upsample_nearest2d(oh, ow).unwrap()), 0.0, "{oh}×{ow}");
    }
    // a view that is not contiguous goes through candle
    let t = x.transpose(2, 3).unwrap();
    assert_eq!(max_rel(&upsample_nearest2d(&t, 14, 10).unwrap(), &t.upsample_nearest2d(14, 10).unwrap()), 0.0);
}

/// `C = init + A·B` in float64 from row-major A (m×k) and W (n×k), B = Wᵀ, and beside it the
/// sum of the terms' magnitudes, `|init| + |A|·|B|`, that bounds the rounding of any order of
/// float32 sums.
fn reference_gemm(a: &[f32], w: &[f32], m: usize, n: usize, k: usize, init: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut c = init.to_vec();
    let mut magnitude: Vec<f64> = init.iter().map(|v| v.abs()).collect();
    for i in 0..m {
        for j in 0..n {
            let terms = (0..k).map(|kk| a[i * k + kk] as f64 * w[j * k + kk] as f64);
            c[i * n + j] += terms.clone().sum::<f64>();
            magnitude[i * n + j] += terms.map(f64::abs).sum::<f64>();
        }
    }
    (c, magnitude)
}

/// Largest error of float32 sums in units of the bound that any order of `terms` float32
/// additions (fused or not) meets: `γ = terms·u / (1 − terms·u)` times the sum of the magnitudes
/// (Higham, Accuracy and Stability of Numerical Algorithms, §3.1). A correct kernel stays below 1
/// whatever its order and whatever the random data; a lost or doubled term does not.
fn err_in_rounding_bounds(got: &[f32], want: &[f64], magnitude: &[f64], terms: usize) -> f64 {
    let u = f32::EPSILON as f64 / 2.0;
    let gamma = terms as f64 * u / (1.0 - terms as f64 * u);
    got.iter()
        .zip(want)
        .zip(magnitude)
        .map(|((&x, &y), &s)| (x as f64 - y).abs() / (gamma * s + f64::MIN_POSITIVE))
        .fold(0.0, f64::max)
}

#[test]
fn packed_matmul_matches_float64_on_ragged_shapes() {
    use t2v::kernels::packed_matmul::{self, Init, PackedA, PackedB};
    use t2v::kernels::Src;
    use t2v::kernels::{self, set_isa, Isa};
    if !t2v::kernels::packed_product() {
        t2v_testkit::skip("no AVX2/FMA or NEON: the packed matrix product is not used on this CPU");
        return;
    }
    let dev = Device::Cpu;
    // Every vectorised path this CPU runs (the switch is process-wide: the other tests of this
    // binary are right on any path).
    let paths: Vec<Isa> = Isa::available().into_iter().filter(|&i| i != Isa::Generic).collect();
    let asked = t2v::kernels::isa();
    // Rows not a multiple of 6, columns not of 16, depths over one 384-deep block (and none), and a
    // product big enough to be split across threads.
    for (m, n, k) in [
        (1, 1, 1),
        (7, 17, 5),
        (13, 40, 385),
        (200, 33, 800),
        (1001, 64, 96),
        (400, 50, 700),
        (30, 1000, 300),
        (5, 20, 0),
    ] {
        let a = Tensor::randn(0f32, 1f32, (m, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = Tensor::randn(0f32, 1f32, (n, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bias = Tensor::randn(0f32, 1f32, n, &dev).unwrap().to_vec1::<f32>().unwrap();
        let start = Tensor::randn(0f32, 1f32, (m, n), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w16: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        let w_of16: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        // (what, packed weight, the weight as float32, start of the output, that start in f64)
        #[allow(clippy::type_complexity)]
        let cases: [(&str, Src, &[f32], Init, Vec<f64>); 4] = [
            ("overwrite", Src::F32(&w), &w, Init::Overwrite, vec![0.0; m * n]),
            ("bias", Src::F32(&w), &w, Init::Bias(&bias), (0..m * n).map(|i| bias[i % n] as f64).collect()),
            ("accumulate", Src::F32(&w), &w, Init::Accumulate, start.iter().map(|&v| v as f64).collect()),
            ("float16 weights", Src::F16(&w16), &w_of16, Init::Overwrite, vec![0.0; m * n]),
        ];
        for (what, src, w_used, init, init64) in cases {
            let packed = PackedB::from_transposed(src, n, k, true);
            // A packed beforehand too (on all threads, and on the calling one)
            let packed_a = PackedA::from_rows(&a, m, k, k);
            let (expected, magnitude) = reference_gemm(&a, w_used, m, n, k, &init64);
            for &path in &paths {
                set_isa(path).unwrap();
                let mut rows = Vec::new();
                for how in ["rows", "packed A", "packed A, one thread", "streamed weight"] {
                    let mut c = if matches!(init, Init::Accumulate) { start.clone() } else { vec![f32::NAN; m * n] };
                    match how {
                        // the path's own width (set_isa forces it whole)
                        "rows" => unsafe {
                            packed_matmul::matmul(
                                m,
                                a.as_ptr(),
                                k,
                                &packed,
                                c.as_mut_ptr(),
                                n,
                                init,
                                kernels::avx512(),
                                None,
                            )
                        },
                        // the weight never packed whole: the same sums in the same order
                        "streamed weight" => unsafe {
                            packed_matmul::matmul_streamed(
                                m,
                                a.as_ptr(),
                                k,
                                src,
                                n,
                                k,
                                c.as_mut_ptr(),
                                n,
                                init,
                                kernels::avx512(),
                            )
                        },
                        _ => unsafe {
                            let parallel = how == "packed A";
                            packed_matmul::matmul_packed(
                                &packed_a,
                                &packed,
                                c.as_mut_ptr(),
                                n,
                                init,
                                parallel,
                                kernels::avx512(),
                            )
                        },
                    }
                    // k products and the start: k + 1 additions, and the output's own rounding
                    let err = err_in_rounding_bounds(&c, &expected, &magnitude, k + 2);
                    assert!(err <= 1.0, "{path}: {what} ({how}) {m}x{n}x{k}: {err:.2} of the rounding bound");
                    if how == "rows" {
                        rows = c;
                    } else if how == "streamed weight" {
                        assert!(c == rows, "{path}: {what}: streamed weight's sums differ from the packed weight's");
                    }
                }
            }
        }
    }
    set_isa(asked).unwrap();
}

#[test]
fn instruction_set_names() {
    use t2v::kernels::{Isa, IsaError};
    assert_eq!("AVX2".parse::<Isa>(), Ok(Isa::Avx2));
    assert_eq!(" avx512 ".parse::<Isa>(), Ok(Isa::Avx512));
    assert_eq!("generic".parse::<Isa>(), Ok(Isa::Generic));
    for isa in Isa::ALL {
        assert_eq!(isa.to_string().parse::<Isa>(), Ok(isa));
    }
    let err = "sse2".parse::<Isa>().unwrap_err();
    assert_eq!(err, IsaError::Unknown("sse2".into()));
    assert!(err.to_string().contains("auto, amx, avx512fp16, avx512bf16, avx512, avx2, neon or generic"), "{err}");
    assert_eq!(Isa::parse_available("auto"), Ok(Isa::best()));
    // the best is the widest path, but vdpbf16ps gives way to widened float32 products where the
    // CPU's table says it is slower (AMX, where present, still wins)
    let widest = *Isa::ALL.iter().rev().find(|i| i.is_available()).unwrap();
    let bf16_dot = t2v::__internals::tuning::Tuning::detected().bf16_dot;
    let expected = if widest == Isa::Avx512Bf16 && !bf16_dot { Isa::Avx512 } else { widest };
    assert_eq!(Isa::best(), expected);
    assert!(Isa::best().is_available());
    assert!(Isa::Generic.is_available());
    for isa in Isa::ALL {
        if !isa.is_available() {
            let e = Isa::parse_available(isa.name()).unwrap_err();
            assert!(e.to_string().contains("cannot run"), "{e}");
            assert!(t2v::kernels::set_isa(isa).is_err());
        }
    }
}

#[test]
fn multi_head_attention_in_place_matches_split_heads() {
    use t2v::kernels::attention::attention_in_blocks;
    use t2v::nn::repeat_interleave;
    let dev = Device::Cpu;
    // (batch, tokens, keys, heads, d, repeat): long self-attention, cross-attention shared by
    // frames, and the short temporal kind: the UNet's narrow heads (64 of 5), token counts that
    // leave a partial vector of queries (8 or 16 a vector), widths that are no multiple of 8, short
    // cross-attention with more keys than queries, and the longest short sequence.
    for (batch, tokens, keys, heads, d, repeat) in [
        (2, 150, 150, 3, 20, 1),
        (4, 70, 77, 2, 16, 2),
        (6, 16, 16, 5, 8, 1),
        (1, 9, 130, 1, 64, 1),
        (3, 16, 16, 64, 5, 1),
        (2, 13, 13, 3, 7, 1),
        (4, 5, 5, 2, 10, 2),
        (2, 8, 20, 2, 8, 1),
        (2, 64, 64, 2, 12, 1),
    ] {
        let q = Tensor::randn(0f32, 1f32, (batch, tokens, heads * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1f32, (batch / repeat, keys, heads * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1f32, (batch / repeat, keys, heads * d), &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let got =
            t2v::nn::multi_head_attention(&q, &k, &v, heads, scale, repeat, t2v::nn::ValueProduct::Float32).unwrap();
        let split = |x: &Tensor| {
            let n = x.dim(1).unwrap();
            x.reshape((batch, n, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((batch * heads, n, d))
                .unwrap()
        };
        let (kr, vr) = (repeat_interleave(&k, repeat).unwrap(), repeat_interleave(&v, repeat).unwrap());
        let expected = attention_in_blocks(&split(&q), &split(&kr), &split(&vr), scale, usize::MAX).unwrap();
        let expected = expected
            .reshape((batch, heads, tokens, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((batch, tokens, heads * d))
            .unwrap();
        let err = max_rel(&got, &expected);
        assert!(err < 1e-5, "{batch} {tokens} {keys} {heads} {d} {repeat}: {err:.2e}");
    }
}

#[test]
fn attention_over_windows_equals_attention_over_copies() {
    // FreeNoise's windows: attending within [start, start + length) of the whole sequences in
    // place, several windows stacked into one output, must give what narrowing q, k and v per
    // window and concatenating the outputs gives, bit for bit (the same kernel on the same
    // numbers), short and long windows alike.
    let dev = Device::Cpu;
    for (batch, frames, heads, d, starts, length) in [
        (6, 40, 64, 5, vec![8], 16),
        (3, 25, 3, 7, vec![9, 0, 5], 16),
        (2, 90, 2, 8, vec![10, 20], 70),
        (1, 300, 2, 8, vec![0, 100, 200], 100),
    ] {
        let shape = (batch, frames, heads * d);
        let q = Tensor::randn(0f32, 1f32, shape, &dev).unwrap();
        let k = Tensor::randn(0f32, 1f32, shape, &dev).unwrap();
        let v = Tensor::randn(0f32, 1f32, shape, &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let got = t2v::nn::multi_head_attention_windows(
            &q,
            &k,
            &v,
            heads,
            scale,
            &starts,
            length,
            t2v::nn::ValueProduct::Float32,
        )
        .unwrap();
        let expected: Vec<Tensor> = starts
            .iter()
            .map(|&start| {
                let part = |t: &Tensor| t.narrow(1, start, length).unwrap().contiguous().unwrap();
                t2v::nn::multi_head_attention(
                    &part(&q),
                    &part(&k),
                    &part(&v),
                    heads,
                    scale,
                    1,
                    t2v::nn::ValueProduct::Float32,
                )
                .unwrap()
            })
            .collect();
        let expected = Tensor::cat(&expected, 0).unwrap();
        assert_eq!(got.dims(), expected.dims());
        assert_eq!(max_rel(&got, &expected), 0.0, "{batch} {frames} {heads} {d} {starts:?} {length}");
    }
    let q = Tensor::zeros((2, 10, 8), DType::F32, &dev).unwrap();
    let err = t2v::nn::multi_head_attention_windows(&q, &q, &q, 2, 1.0, &[0, 4], 7, t2v::nn::ValueProduct::Float32)
        .unwrap_err();
    assert!(err.to_string().contains("windows of 7 tokens from [0, 4]"), "{err}");
    assert!(t2v::nn::multi_head_attention_windows(&q, &q, &q, 2, 1.0, &[], 7, t2v::nn::ValueProduct::Float32).is_err());
}

#[test]
fn windows_residual_added_in_place_equals_adding_copies() {
    // parts[i·n + s, j] += xs[s, starts[i] + j]: the CPU kernel against narrowing and adding.
    let dev = Device::Cpu;
    let (n, frames, c, length) = (3, 11, 5, 4);
    let starts = [0, 7, 3];
    let xs = Tensor::randn(0f32, 1f32, (n, frames, c), &dev).unwrap();
    let parts = Tensor::randn(0f32, 1f32, (starts.len() * n, length, c), &dev).unwrap();
    let before = parts.copy().unwrap();
    t2v::kernels::add::add_windows(&parts, &xs, &starts).unwrap();
    for (i, &start) in starts.iter().enumerate() {
        let expected = (before.narrow(0, i * n, n).unwrap() + xs.narrow(1, start, length).unwrap()).unwrap();
        assert_eq!(max_rel(&parts.narrow(0, i * n, n).unwrap(), &expected), 0.0, "window {i}");
    }
    assert!(t2v::kernels::add::add_windows(&parts, &xs, &[0, 8, 3]).is_err());
    assert!(t2v::kernels::add::add_windows(&parts, &xs, &[0, 7]).is_err());
}

#[test]
fn sequences_added_back_in_place_equal_permuting_and_adding() {
    // out[b, f, c, start + p] = seq[b, p, f, c] + xs[b, f, c, start + p]: the CPU kernel against
    // candle's permute, narrow and add, over chunks that cover the pixels (sizes past one 64-float
    // tile in both C and the pixels, and ragged ones).
    let dev = Device::Cpu;
    for &(batch, frames, c, pixels, chunk) in &[(2, 3, 70, 130, 50), (1, 5, 9, 7, 7), (2, 1, 64, 64, 64)] {
        let xs = Tensor::randn(0f32, 1f32, (batch, frames, c, pixels), &dev).unwrap();
        let out = Tensor::zeros((batch, frames, c, pixels), DType::F32, &dev).unwrap();
        let mut expected = Vec::new();
        for start in (0..pixels).step_by(chunk) {
            let len = chunk.min(pixels - start);
            let seq = Tensor::randn(0f32, 1f32, (batch, len, frames, c), &dev).unwrap();
            t2v::kernels::add::add_from_sequences(&out, &seq, &xs, start).unwrap();
            expected.push((seq.permute((0, 2, 3, 1)).unwrap() + xs.narrow(3, start, len).unwrap()).unwrap());
        }
        let expected = Tensor::cat(&expected, 3).unwrap();
        assert_eq!(max_rel(&out, &expected), 0.0, "{batch}x{frames}x{c}x{pixels} in chunks of {chunk}");
    }
    let (out, xs) = (
        Tensor::zeros((1, 2, 3, 8), DType::F32, &dev).unwrap(),
        Tensor::zeros((1, 2, 3, 8), DType::F32, &dev).unwrap(),
    );
    let seq = Tensor::zeros((1, 4, 2, 3), DType::F32, &dev).unwrap();
    assert!(t2v::kernels::add::add_from_sequences(&out, &seq, &xs, 5).is_err(), "pixels past the end");
    assert!(t2v::kernels::add::add_from_sequences(&out, &seq.narrow(3, 0, 2).unwrap(), &xs, 0).is_err(), "channels");
}

#[test]
fn window_accumulation_in_place_matches_the_reference_order() {
    // acc[:, start + j] += part[:, j] · w[j] for j ≥ skip, the product rounded before the sum
    // (diffusers' `accumulated_values[:, a:b] += chunk * weights`): the CPU kernel against the
    // same sums in float32 scalar code, over two windows that overlap.
    let dev = Device::Cpu;
    let (n, frames, c, length) = (5, 12, 7, 6);
    let weights: Vec<f32> = (0..length).map(|j| 0.25 + j as f32 * 0.3).collect();
    let sums = Tensor::zeros((n, frames, c), DType::F32, &dev).unwrap();
    let parts: Vec<Tensor> = (0..2).map(|_| Tensor::randn(0f32, 1f32, (n, length, c), &dev).unwrap()).collect();
    let windows = [(0, 0), (5, 2)];
    let mut expected = vec![0f32; n * frames * c];
    for (part, &(start, skip)) in parts.iter().zip(&windows) {
        t2v::kernels::add::accumulate_window(&sums, part, start, skip, &weights).unwrap();
        let p = part.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for s in 0..n {
            for j in skip..length {
                for ch in 0..c {
                    expected[(s * frames + start + j) * c + ch] += p[(s * length + j) * c + ch] * weights[j];
                }
            }
        }
    }
    assert_eq!(sums.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
    // frames 11 (past every window) stay zero; a part that doesn't fit is refused
    let bad = Tensor::zeros((n, length, c + 1), DType::F32, &dev).unwrap();
    assert!(t2v::kernels::add::accumulate_window(&sums, &bad, 0, 0, &weights).is_err());
    assert!(t2v::kernels::add::accumulate_window(&sums, &parts[0], 7, 0, &weights).is_err());
}

#[test]
fn vectorised_gelu_and_silu_match_float64() {
    let dev = Device::Cpu;
    // GEGLU with value 1 is GELU: check it over [-12, 12] against the float64 erf.
    let gate: Vec<f32> = (0..4001).map(|i| -12.0 + 24.0 * i as f32 / 4000.0).collect();
    let n = gate.len();
    let mut h = vec![1f32; 2 * n];
    h[n..].copy_from_slice(&gate);
    let out = t2v::kernels::geglu::geglu(&Tensor::from_vec(h, (1, 2 * n), &dev).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (&x, &y) in gate.iter().zip(&out) {
        let x = x as f64;
        let exact = 0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2));
        assert!((y as f64 - exact).abs() <= 2e-7 * exact.abs().max(1.0), "gelu({x}) = {y}, exact {exact}");
    }
    // GroupNorm with one channel per group, gamma 1, beta 0 over ±x is ±x/std: SiLU of known values.
    let xs: Vec<f32> = (0..64).map(|i| -20.0 + 40.0 * i as f32 / 63.0).collect();
    let x = Tensor::from_vec(xs.clone(), (1, 1, 64), &dev).unwrap();
    let (g, b) = (Tensor::ones(1, DType::F32, &dev).unwrap(), Tensor::zeros(1, DType::F32, &dev).unwrap());
    let normed = group_norm(&x, &g, &b, 1, 0.0, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let silu = group_norm(&x, &g, &b, 1, 0.0, true).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (&y, &s) in normed.iter().zip(&silu) {
        let y = y as f64;
        let exact = y / (1.0 + (-y).exp());
        assert!((s as f64 - exact).abs() <= 3e-7 * exact.abs().max(1.0), "silu({y}) = {s}, exact {exact}");
    }
}

/// GroupNorm in two halves (statistics over the whole tensor, then the affine on bands of its
/// rows) gives the one-pass kernel's values bit for bit, and candle's form of the halves (other
/// devices) agrees to rounding.
#[test]
fn group_norm_in_bands_equals_the_whole() {
    use t2v::kernels::group_norm::{group_norm_apply, group_norm_statistics};
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1f32, (2, 8, 7, 5), &dev).unwrap().affine(2.0, 5.0).unwrap();
    let g = Tensor::randn(0f32, 1f32, 8, &dev).unwrap();
    let b = Tensor::randn(0f32, 1f32, 8, &dev).unwrap();
    let statistics = group_norm_statistics(&x, &g, &b, 4, 1e-6).unwrap();
    assert_eq!(statistics.dims(), [2, 8, 2]);
    let candle_statistics = group_norm_statistics(&x.to_dtype(DType::F64).unwrap(), &g, &b, 4, 1e-6).unwrap();
    assert!(max_rel(&statistics, &candle_statistics) < 1e-6);
    for silu in [false, true] {
        let whole = group_norm(&x, &g, &b, 4, 1e-6, silu).unwrap();
        for (start, rows) in [(0, 7), (0, 3), (2, 4), (6, 1)] {
            let band = group_norm_apply(&x.narrow(2, start, rows).unwrap(), &statistics, silu).unwrap();
            let expected = whole.narrow(2, start, rows).unwrap();
            let diff = (band.clone() - &expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "rows {start}..{} silu {silu}", start + rows);
            let x64 = x.narrow(2, start, rows).unwrap().to_dtype(DType::F64).unwrap();
            let candle = group_norm_apply(&x64, &candle_statistics, silu).unwrap();
            assert!(max_rel(&candle, &expected) < 1e-5, "candle's form, rows {start}..{}", start + rows);
        }
    }
}

/// `set_rows` writes a band of rows, with or without its residual, where `slice_set` of the sum
/// would, on the CPU kernel and on candle's form alike, and leaves the other rows alone.
#[test]
fn set_rows_writes_one_band_and_its_residual() {
    use t2v::kernels::add::set_rows;
    let dev = Device::Cpu;
    let conv = Tensor::randn(0f32, 1f32, (2, 3, 6, 5), &dev).unwrap();
    // a band of a convolution's output (rows 1..4) and of a residual with its own layout
    let rows = conv.narrow(2, 1, 3).unwrap();
    let residual = Tensor::randn(0f32, 1f32, (2, 3, 9, 5), &dev).unwrap().narrow(2, 4, 3).unwrap();
    for with_residual in [false, true] {
        for dtype in [DType::F32, DType::F64] {
            let dst = Tensor::randn(0f32, 1f32, (2, 3, 8, 5), &dev).unwrap().to_dtype(dtype).unwrap();
            let before = dst.copy().unwrap();
            let (r, x) = (rows.to_dtype(dtype).unwrap(), residual.to_dtype(dtype).unwrap());
            set_rows(&dst, 2, &r, with_residual.then_some(&x)).unwrap();
            let band = if with_residual { (&r + &x).unwrap() } else { r.clone() };
            let expected =
                Tensor::cat(&[before.narrow(2, 0, 2).unwrap(), band, before.narrow(2, 5, 3).unwrap()], 2).unwrap();
            assert_eq!(max_rel(&dst, &expected), 0.0, "{dtype:?} residual {with_residual}");
        }
    }
    let dst = Tensor::zeros((2, 3, 8, 5), DType::F32, &dev).unwrap();
    assert!(set_rows(&dst, 6, &rows, None).is_err(), "rows past the end");
}

/// A ResNet block with a time embedding, a width change and `output_scale_factor` 2 (the
/// combination no fixture has) in bands of two rows and of six against its whole form.
#[test]
fn resnet_block_in_bands_equals_the_whole() {
    use std::collections::HashMap;
    let dev = Device::Cpu;
    let (cin, cout, temb) = (8usize, 16usize, 12usize);
    let mut tensors = HashMap::new();
    let mut put = |name: &str, shape: &[usize], scale: f64| {
        let t = (Tensor::randn(0f32, 1f32, shape, &dev).unwrap() * scale).unwrap();
        tensors.insert(name.to_string(), t);
    };
    for (norm, c) in [("norm1", cin), ("norm2", cout)] {
        put(&format!("{norm}.weight"), &[c], 1.0);
        put(&format!("{norm}.bias"), &[c], 0.5);
    }
    put("conv1.weight", &[cout, cin, 3, 3], 0.2);
    put("conv1.bias", &[cout], 0.1);
    put("conv2.weight", &[cout, cout, 3, 3], 0.1);
    put("conv2.bias", &[cout], 0.1);
    put("conv_shortcut.weight", &[cout, cin, 1, 1], 0.3);
    put("conv_shortcut.bias", &[cout], 0.1);
    put("time_emb_proj.weight", &[cout, temb], 0.3);
    put("time_emb_proj.bias", &[cout], 0.1);
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let cfg = t2v::nn::ResnetConfig { groups: 4, eps: 1e-6, temb_channels: Some(temb), output_scale_factor: 2.0 };
    let block = t2v::nn::ResnetBlock2D::new(vb, cin, cout, cfg).unwrap();
    let x = Tensor::randn(0f32, 1f32, (2, cin, 13, 9), &dev).unwrap();
    let t = Tensor::randn(0f32, 1f32, (2, temb), &dev).unwrap();
    let whole = block.forward(&x, Some(&t)).unwrap();
    for band_bytes in [0, 2 * cin * 9 * 4 * 8] {
        let banded = t2v::nn::with_bands(0, band_bytes, || block.forward(&x, Some(&t))).unwrap();
        assert!(max_rel(&banded, &whole) < 1e-5, "bands of {band_bytes} bytes: {:.2e}", max_rel(&banded, &whole));
    }
}
