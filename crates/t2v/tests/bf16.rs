//! The 16-bit matrix products of `--dtype bf16` and `--dtype f16` on the CPU
//! (`t2v::kernels::bf16`, `t2v::kernels::fp16`): on the `avx512bf16` and `amx` paths (bfloat16)
//! and the `avx512fp16` one (float16) against a float64 product of the same rounded operands
//! (tight: only the sums differ) and against the unrounded float32 operands (loose: the
//! rounding's own error); on the other paths 16-bit weights are widened and the activations are
//! not rounded. Every test here sets the kernels' path, so they take turns.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use t2v::kernels::conv::{
    conv2d, conv2d_fallback, conv2d_with, temporal_conv3_fallback, temporal_conv3_with, ConvAlgo, TemporalAlgo,
};
use t2v::kernels::linear::linear;
use t2v::kernels::{isa, set_isa, Isa};

static PATH: Mutex<()> = Mutex::new(());

/// The paths that multiply in bfloat16: `vdpbf16ps`, and AMX tiles (each test skips a path this
/// CPU lacks and says so).
const BF16_PATHS: [Isa; 2] = [Isa::Avx512Bf16, Isa::Amx];

/// Runs `f` on the kernels' path `want` (restoring the path after), or says why not.
fn on_path(want: Isa, f: impl FnOnce()) {
    let _turn = PATH.lock().unwrap_or_else(|e| e.into_inner());
    on_path_inner(want, f)
}

/// [`on_path`] inside another's turn.
fn on_path_inner(want: Isa, f: impl FnOnce()) {
    if !want.is_available() {
        println!("skipped: this CPU has no {want} path (available: {:?})", Isa::available());
        return;
    }
    let before = isa();
    set_isa(want).unwrap();
    f();
    set_isa(before).unwrap();
}

fn f64_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

/// `t` rounded to bfloat16 (round to nearest even), in float64.
fn rounded(t: &Tensor) -> Tensor {
    rounded_to(t, DType::BF16)
}

/// `t` rounded to `dtype` (round to nearest even), in float64.
fn rounded_to(t: &Tensor, dtype: DType) -> Tensor {
    f64_of(&t.to_dtype(dtype).unwrap())
}

/// Largest |got − want| / scale over the elements, where `scale` is the same computation on the
/// operands' magnitudes (Σ|a|·|b| per element: what a rounding error is relative to).
fn err_in_scale(got: &Tensor, want: &Tensor, scale: &Tensor) -> f64 {
    let d = (f64_of(got) - want).unwrap().abs().unwrap();
    let r = d.div(&(scale + 1e-30).unwrap()).unwrap();
    r.flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// `got`'s error against `conv` (a float64 convolution of input, weight and bias) of the rounded
/// input (tight: only the float32 sums differ) and of float32's (loose: the rounding's own error),
/// each in the scale of the same convolution of the magnitudes.
fn tight_and_loose(
    got: &Tensor,
    x: &Tensor,
    wt: &Tensor,
    bias: Option<&Tensor>,
    conv: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
) -> (f64, f64) {
    let abs = |t: &Tensor| t.abs().unwrap();
    let (wf, bf) = (f64_of(wt), bias.map(f64_of));
    let babs = bf.as_ref().map(abs);
    let err_from = |x: &Tensor| err_in_scale(got, &conv(x, &wf, bf.as_ref()), &conv(&abs(x), &abs(&wf), babs.as_ref()));
    // the input rounded as the weight's type rounds it
    (err_from(&rounded_to(x, wt.dtype())), err_from(&f64_of(x)))
}

/// Normal values drawn from a fixed seed (each call the next draws), so that every run checks the
/// same numbers: the bounds below hold for them, not only for what a run happens to draw.
fn randn(shape: &[usize], std: f32) -> Tensor {
    // One generator a thread: each test runs on its own thread, so its draws do not depend on
    // what the other tests draw meanwhile.
    thread_local! {
        static GENERATOR: std::cell::RefCell<t2v::noise::TorchGenerator> =
            std::cell::RefCell::new(t2v::noise::TorchGenerator::new(2024));
    }
    let t = GENERATOR.with(|g| g.borrow_mut().randn_tensor(shape, &Device::Cpu)).unwrap();
    (t * std as f64).unwrap()
}

/// x·Wᵀ + b in float64, and the magnitudes' product.
fn linear_f64(x: &Tensor, w: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
    let y = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap();
    let s = x.abs().unwrap().matmul(&w.abs().unwrap().t().unwrap()).unwrap().broadcast_add(&b.abs().unwrap()).unwrap();
    (y, s)
}

// (rows, k, n): ragged tiles, odd depths (a last pair with one value), depths past a packed block
// (512 values), rows past a packed block of A (192) and past one task's share.
const LINEAR_SHAPES: [(usize, usize, usize); 5] =
    [(37, 24, 13), (7, 25, 45), (400, 1100, 70), (12, 2, 32), (2100, 97, 33)];

#[test]
fn bf16_linear_matches_float64_of_the_rounded_operands() {
    for path in BF16_PATHS {
        on_path(path, || {
            for (m, k, n) in LINEAR_SHAPES {
                let x = randn(&[m, k], 1.0);
                let w = randn(&[n, k], 0.2).to_dtype(DType::BF16).unwrap();
                let b = randn(&[n], 1.0);
                let got = linear(&x, &w, Some(&b)).unwrap();
                assert_eq!(got.dtype(), DType::F32);
                let (want, scale) = linear_f64(&rounded(&x), &f64_of(&w), &f64_of(&b));
                let tight = err_in_scale(&got, &want, &scale);
                let (want32, scale32) = linear_f64(&f64_of(&x), &f64_of(&w), &f64_of(&b));
                let loose = err_in_scale(&got, &want32, &scale32);
                println!(
                    "{path}: linear {m}×{k}·{k}×{n}: {tight:.1e} from the rounded operands, {loose:.1e} from float32's"
                );
                assert!(tight < 1e-5, "{path}: {m}×{k}×{n}: {tight:.2e} from float64 of the rounded operands");
                assert!(loose < 4e-3, "{m}×{k}×{n}: {loose:.2e} from float64 of the float32 operands");
                if k > 2 {
                    assert!(loose > 1e-5, "{m}×{k}×{n}: the input was not rounded ({loose:.2e})");
                }
                // without a bias
                let got = linear(&x, &w, None).unwrap();
                let zero = Tensor::zeros(n, DType::F64, &Device::Cpu).unwrap();
                let (want, scale) = linear_f64(&rounded(&x), &f64_of(&w), &zero);
                assert!(err_in_scale(&got, &want, &scale) < 1e-5, "{m}×{k}×{n} without a bias");
            }
        });
    }
}

#[test]
fn fused_geglu_gives_the_bits_of_the_projection_then_geglu() {
    use t2v::kernels::linear::{fuses_geglu, linear_geglu, PackedLinear};
    // (float16 weights also with float16 products, as a `--dtype f16` run's layers take them)
    for (path, dtype, f16_products) in
        [Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Avx512Fp16, Isa::Amx].into_iter().flat_map(|p| {
            [(DType::BF16, false), (DType::F16, false), (DType::F32, false), (DType::F16, true)].map(|(d, h)| (p, d, h))
        })
    {
        on_path(path, || {
            t2v::kernels::with_f16_products(f16_products, || {
                // (rows, k, n): rows below a task's share (one thread), columns split among the
                // threads, rows split, odd depths, and halves not in whole panels (never fused); the
                // float32 products with the weight streamed (rows ≤ n) and packed whole, over one
                // and several blocks of depth
                for (m, k, n) in [
                    (7, 25, 96),
                    (37, 24, 64),
                    (300, 160, 128),
                    (2100, 97, 64),
                    (40, 32, 48),
                    (64, 700, 160),
                    (400, 1000, 96),
                ] {
                    let x = randn(&[m, k], 1.0);
                    let w = randn(&[n, k], 0.2).to_dtype(dtype).unwrap();
                    let b = randn(&[n], 1.0);
                    let fused = fuses_geglu(&x, &w, Some(&b));
                    // fused wherever the halves are whole panels: into the products on vectors
                    // (float32, widened, `vdpbf16ps`, float16 products) and on AMX tiles (bfloat16
                    // weights, all these depths in one block of tiles)
                    assert_eq!(fused, n % 32 == 0, "{path}: {m}×{k}·{k}×{n} {dtype:?}");
                    for bias in [Some(&b), None] {
                        let got = linear_geglu(&x, &w, bias).unwrap();
                        let want = t2v::kernels::geglu::geglu(&linear(&x, &w, bias).unwrap()).unwrap();
                        assert_eq!(got.dims(), &[m, n / 2]);
                        let want = want.to_vec2::<f32>().unwrap();
                        assert!(
                            got.to_vec2::<f32>().unwrap() == want,
                            "{path}: {m}×{k}·{k}×{n} {dtype:?} f16 products {f16_products} (fused: {fused})"
                        );
                        // the weight packed once for many calls (long videos' chunks)
                        let packed = PackedLinear::new_geglu(&w, bias).unwrap();
                        assert_eq!(packed.is_some(), fused);
                        if let Some(packed) = packed {
                            assert!(packed.forward(&x).is_err(), "packed for the gated product only");
                            let got = packed.forward_geglu(&x).unwrap().to_vec2::<f32>().unwrap();
                            assert!(got == want, "{path}: {m}×{k}·{k}×{n} {dtype:?} packed once");
                        }
                    }
                }
            })
        });
    }
}

#[test]
fn gelu_gives_the_same_bits_on_8_and_16_lanes() {
    // the fused GEGLU on tiles runs GELU on 16 lanes; the AVX2 path on 8: the same operations,
    // so the same bits, over ±0, tiny, ordinary, saturated and non-finite gates
    let mut gate: Vec<f32> = (0..20_000).map(|i| -14.0 + 28.0 * i as f32 / 19_999.0).collect();
    gate.extend([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40, 100.0, -100.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
    // a length that leaves one vector of eight and a remainder for the scalar loop
    gate.truncate(gate.len() / 16 * 16 + 13);
    let n = gate.len();
    let mut h = vec![1.5f32; 2 * n];
    h[n..].copy_from_slice(&gate);
    let h = Tensor::from_vec(h, (1, 2 * n), &Device::Cpu).unwrap();
    let bits = |path: Isa| {
        let mut out = None;
        on_path(path, || {
            let y = t2v::kernels::geglu::geglu(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            out = Some(y.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        });
        out
    };
    if let (Some(narrow), Some(wide)) = (bits(Isa::Avx2), bits(Isa::Avx512)) {
        for (i, (a, b)) in narrow.iter().zip(&wide).enumerate() {
            assert_eq!(a, b, "gelu({}): {} on 8 lanes, {} on 16", gate[i], f32::from_bits(*a), f32::from_bits(*b));
        }
    }
}

/// Tensors handed to the layers as they are stored (bfloat16 matrices beside float32 biases, as
/// `store_matrices_as` gives them), for building layers through a `VarBuilder`.
struct AsStored(std::collections::HashMap<String, Tensor>);

impl candle_nn::var_builder::SimpleBackend for AsStored {
    fn get(
        &self,
        _: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        _: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(name).cloned().ok_or_else(|| candle_core::Error::Msg(format!("no {name}")))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.get(candle_core::Shape::from(()), name, candle_nn::Init::Const(0.), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

#[test]
fn linear_layers_packed_at_load_give_the_bits_of_packing_per_call_and_of_the_residual_add() {
    use candle_core::Module;
    use t2v::kernels::linear::{linear_accumulate, linear_geglu};
    for path in [Isa::Avx2, Isa::Avx512Bf16, Isa::Amx] {
        on_path(path, || {
            // (rows, in, out): ragged panels and depths, and a feed-forward whose halves are in
            // whole panels (GEGLU fused on tiles)
            // (two blocks of depths on tiles: the residual added after the last only)
            for (m, k, n) in [(37, 24, 14), (300, 97, 70), (2100, 160, 128), (300, 3200, 96)] {
                let (x, w, b) =
                    (randn(&[m, k], 1.0), randn(&[n, k], 0.2).to_dtype(DType::BF16).unwrap(), randn(&[n], 1.0));
                let tensors = [("l.weight", &w), ("l.bias", &b)].map(|(name, t)| (name.to_string(), t.clone()));
                let vb = candle_nn::VarBuilder::from_backend(
                    Box::new(AsStored(tensors.into_iter().collect())),
                    DType::F32,
                    Device::Cpu,
                );
                let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let layer = t2v::nn::linear(k, n, vb.pp("l")).unwrap();
                let plain = t2v::nn::linear_no_bias(k, n, vb.pp("l")).unwrap();
                let projection = t2v::nn::geglu_projection(k, n, vb.pp("l")).unwrap();
                let packed = path >= Isa::Avx512Bf16;
                for l in [&layer, &plain, &projection] {
                    assert_eq!(l.is_packed(), packed, "{path}: {m}×{k}·{k}×{n}");
                    assert_eq!((l.out_dim(), l.in_dim(), l.weight_dtype()), (n, k, DType::BF16));
                }
                let x3 = x.reshape((1, m, k)).unwrap();
                assert!(bits(&layer.forward(&x3).unwrap()) == bits(&linear(&x, &w, Some(&b)).unwrap()), "{path}");
                assert!(bits(&plain.forward(&x).unwrap()) == bits(&linear(&x, &w, None).unwrap()), "{path}");
                let gated = projection.forward_geglu(&x3).unwrap();
                assert_eq!(gated.dims(), &[1, m, n / 2]);
                assert!(bits(&gated) == bits(&linear_geglu(&x, &w, Some(&b)).unwrap()), "{path}: GEGLU");
                assert!(bits(&layer.forward_geglu(&x).unwrap()) == bits(&gated), "{path}: GEGLU unpacked order");
                // the residual added as the product is written: the bits of the product, then add
                let residual = randn(&[1, m, n], 1.0);
                let want = bits(
                    &t2v::kernels::add::add(&linear(&x, &w, Some(&b)).unwrap().unsqueeze(0).unwrap(), &residual)
                        .unwrap(),
                );
                let got = bits(&layer.forward_residual(&x3, &residual).unwrap());
                let bad: Vec<_> = got
                    .iter()
                    .zip(&want)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(i, (a, b))| (i / n, i % n, *a, *b))
                    .take(5)
                    .collect();
                assert!(got == want, "{path}: {m}×{k}·{k}×{n} residual {bad:?}");
                let prepared = layer.prepare(true).unwrap();
                assert!(
                    bits(&prepared.forward_residual(&x3, &residual).unwrap()) == want,
                    "{path}: prepared, residual"
                );
                assert!(layer.forward_residual(&x3, &residual.narrow(1, 1, m - 1).unwrap()).is_err());
                let acc = randn(&[m, n], 1.0);
                let want = linear_accumulate(acc.copy().unwrap(), &x, &w).unwrap();
                let got = plain.accumulate_without_bias(acc.copy().unwrap(), &x).unwrap();
                assert!(bits(&got) == bits(&want), "{path}: accumulated");
                // a layer packed for the bfloat16 products refuses to run on a path without them
                if packed {
                    on_path_inner(Isa::Avx2, || {
                        let err = layer.forward(&x).unwrap_err().to_string();
                        assert!(err.contains("load the model again"), "{err}");
                    });
                }
            }
        });
    }
}

#[test]
fn temporal_convolutions_tiled_at_load_give_the_bits_of_tiling_per_call() {
    use t2v::kernels::conv::{temporal_conv3, temporal_conv3_tiles, TemporalTiles};
    on_path(Isa::Amx, || {
        // (videos, cin, cout, frames, h, w): frames of whole 16-pixel groups (the tiles' kernel),
        // an odd channel count, and frames of 20 pixels (the tensor remade for the other kernels)
        for (b, cin, cout, f, h, w) in [(2, 64, 32, 4, 4, 4), (1, 19, 48, 5, 4, 8), (2, 32, 16, 3, 4, 5)] {
            let x = randn(&[b, cin, f, h, w], 1.0);
            let wt = randn(&[cout, cin, 3, 1], 0.1).to_dtype(DType::BF16).unwrap();
            let bias = randn(&[cout], 1.0);
            let tiles = TemporalTiles::resident(&wt).unwrap().expect("bfloat16 weights on the amx path");
            let back = tiles.weight().unwrap();
            let bits16 = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            assert!(bits16(&back) == bits16(&wt), "the weights remade from the tiles");
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for bias in [Some(&bias), None] {
                let want = temporal_conv3(&x, &wt, bias).unwrap();
                let got = temporal_conv3_tiles(&x, &tiles, bias).unwrap();
                assert_eq!(got.dims(), want.dims());
                assert!(bits(&got) == bits(&want), "{b}×{cin}→{cout}, {f} frames of {h}×{w}");
            }
            // on a path without the tiles, the tensor is remade and multiplied there
            on_path_inner(Isa::Avx2, || {
                assert!(TemporalTiles::resident(&wt).unwrap().is_none());
                let want = temporal_conv3(&x, &wt, Some(&bias)).unwrap();
                let got = temporal_conv3_tiles(&x, &tiles, Some(&bias)).unwrap();
                assert!(bits(&got) == bits(&want), "avx2: {b}×{cin}→{cout}");
            });
        }
        // the layer keeps its weights tiled where they load as bfloat16
        let (wt, lb) = (randn(&[32, 16, 3, 1, 1], 0.1).to_dtype(DType::BF16).unwrap(), randn(&[32], 1.0));
        let tensors = [("t.weight", &wt), ("t.bias", &lb)].map(|(n, t)| (n.to_string(), t.clone()));
        let vb = candle_nn::VarBuilder::from_backend(
            Box::new(AsStored(tensors.into_iter().collect())),
            DType::F32,
            Device::Cpu,
        );
        let layer = t2v::nn::temporal_conv(16, 32, vb.pp("t")).unwrap();
        assert!(layer.is_tiled());
        let x = randn(&[1, 16, 4, 4, 4], 1.0);
        let want = temporal_conv3(&x, &wt, Some(&lb)).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(bits(&layer.forward(&x).unwrap()) == bits(&want), "the layer");
    });
}

/// Linear layers and a 1×1 convolution with `dtype` weights on the current path: within float32
/// sums' rounding of float64 of the widened weights (the activations not rounded).
fn assert_widened(dtype: DType) {
    let path = isa();
    for (m, k, n) in LINEAR_SHAPES {
        let x = randn(&[m, k], 1.0);
        let w = randn(&[n, k], 0.2).to_dtype(dtype).unwrap();
        let b = randn(&[n], 1.0);
        let got = linear(&x, &w, Some(&b)).unwrap();
        let (want, scale) = linear_f64(&f64_of(&x), &f64_of(&w), &f64_of(&b));
        let err = err_in_scale(&got, &want, &scale);
        assert!(err < 1e-5, "{path}: {m}×{k}×{n}: {err:.2e} from float64 of the widened weights");
    }
    let x = randn(&[2, 37, 5, 7], 1.0);
    let w = randn(&[21, 37, 1, 1], 0.2).to_dtype(dtype).unwrap();
    let b = randn(&[21], 1.0);
    let got = conv2d(&x, &w, Some(&b), 1, 0).unwrap();
    let want = conv2d_fallback(&f64_of(&x), &f64_of(&w), Some(&f64_of(&b)), 1, 0).unwrap();
    let scale = conv2d_fallback(&f64_of(&x).abs().unwrap(), &f64_of(&w).abs().unwrap(), None, 1, 0).unwrap();
    let err = err_in_scale(&got, &want, &(scale + 1.0).unwrap());
    assert!(err < 1e-5, "{path}: 1×1 convolution {err:.2e}");
}

#[test]
fn bf16_weights_are_widened_off_the_bf16_path() {
    for path in [Isa::Avx512, Isa::Avx2, Isa::Generic] {
        on_path(path, || assert_widened(DType::BF16));
    }
}

#[test]
fn bf16_pointwise_convolution_matches_float64_of_the_rounded_operands() {
    for path in BF16_PATHS {
        on_path(path, || {
            // (images, cin, cout, h, w): odd channels, ragged tiles; many images (one per task) and
            // one large image (split across threads)
            for (n, cin, cout, h, w) in [(2, 37, 21, 5, 7), (5, 64, 40, 16, 16), (1, 320, 33, 64, 70)] {
                let x = randn(&[n, cin, h, w], 1.0);
                let wt = randn(&[cout, cin, 1, 1], 0.1).to_dtype(DType::BF16).unwrap();
                let b = randn(&[cout], 1.0);
                let got = conv2d(&x, &wt, Some(&b), 1, 0).unwrap();
                let (tight, loose) =
                    tight_and_loose(&got, &x, &wt, Some(&b), |x, w, b| conv2d_fallback(x, w, b, 1, 0).unwrap());
                println!(
                    "{path}: 1×1 conv {n}×{cin}→{cout} {h}×{w}: {tight:.1e} from the rounded operands, {loose:.1e} from float32's"
                );
                assert!(tight < 1e-5, "{path}: {tight:.2e}");
                assert!(loose < 4e-3 && loose > 1e-5, "{loose:.2e}");
            }
        });
    }
}

/// The 3×3 convolutions keep float32 products for bfloat16 weights (Winograd F(4×4) amplifies
/// the rounding of its transformed planes too much); the temporal one, Winograd F(4, 3) along
/// frames, rounds its transformed operands (not the input itself): held to the unrounded float64
/// result, within a few bfloat16 roundings of the magnitudes' sum.
#[test]
fn bf16_winograd_convolutions_stay_near_float64() {
    for path in BF16_PATHS {
        on_path(path, || {
            let abs = |t: &Tensor| t.abs().unwrap();
            // 3×3: channel blocks of 128 with an odd last one, ragged tiles
            for (n, cin, cout, h, w) in [(2, 19, 23, 9, 11), (1, 131, 14, 6, 6)] {
                let x = randn(&[n, cin, h, w], 1.0);
                let wt = randn(&[cout, cin, 3, 3], 0.1).to_dtype(DType::BF16).unwrap();
                let b = randn(&[cout], 1.0);
                let got = conv2d_with(&x, &wt, Some(&b), 1, 1, ConvAlgo::Winograd).unwrap();
                let (xf, wf, bf) = (f64_of(&x), f64_of(&wt), f64_of(&b));
                let want = conv2d_fallback(&xf, &wf, Some(&bf), 1, 1).unwrap();
                let scale = conv2d_fallback(&abs(&xf), &abs(&wf), Some(&abs(&bf)), 1, 1).unwrap();
                let err = err_in_scale(&got, &want, &scale);
                println!("{path}: 3×3 conv {n}×{cin}→{cout} {h}×{w}: {err:.1e} from float64 of the widened weights");
                assert!(err < 1e-5, "3×3 {cin}→{cout}: {err:.2e}");
            }
            // temporal (3, 1, 1) in Winograd F(4, 3) along frames
            assert_winograd_temporal_near_float64(DType::BF16, 1e-5, 1e-2);
        });
    }
}

/// The temporal (3, 1, 1) convolution in Winograd F(4, 3) along frames with `dtype` weights on
/// the current path, held to float64 of the widened weights and float32 input: its transformed
/// operands are rounded where the path multiplies in `dtype`, so the error is above `above`
/// (they were) and below `below` (in the scale of the magnitudes' sum).
fn assert_winograd_temporal_near_float64(dtype: DType, above: f64, below: f64) {
    let abs = |t: &Tensor| t.abs().unwrap();
    for (b, cin, cout, f, h, w) in [(1, 19, 23, 8, 4, 4), (2, 64, 40, 6, 16, 16)] {
        let x = randn(&[b, cin, f, h, w], 1.0);
        let wt = randn(&[cout, cin, 3, 1, 1], 0.1).to_dtype(dtype).unwrap();
        let bias = randn(&[cout], 1.0);
        let got = temporal_conv3_with(&x, &wt, Some(&bias), TemporalAlgo::Winograd).unwrap();
        let (xf, wf, bf) = (f64_of(&x), f64_of(&wt), f64_of(&bias));
        let want = temporal_conv3_fallback(&xf, &wf, Some(&bf)).unwrap();
        let scale = temporal_conv3_fallback(&abs(&xf), &abs(&wf), Some(&abs(&bf))).unwrap();
        let err = err_in_scale(&got, &want, &scale);
        println!("{}: temporal conv {b}×{cin}→{cout}, {f} frames of {h}×{w}: {dtype:?} {err:.1e}", isa());
        assert!(err < below && err > above, "temporal {cin}→{cout}: {err:.2e}");
    }
}

/// The direct 3×3 convolution on AMX tiles (bfloat16 weights on the `amx` path, where the output
/// channels and the rows' pixels come in 16s): both operands rounded to bfloat16, float32 sums,
/// held to float64 of the rounded operands (tight) and of float32's (loose); the automatic
/// choice takes it there, and Winograd elsewhere.
#[test]
fn bf16_tiles_convolution_matches_float64_of_the_rounded_operands() {
    on_path(Isa::Amx, || {
        // (images, cin, cout, h, w): an odd channel count short of a tile, one past two tiles of
        // pairs, 2×2 blocks with a lone last group of channels and of pixels, with and without
        // a bias
        for (n, cin, cout, h, w, with_bias, k) in [
            (2, 19, 32, 5, 16, true, 3),
            (1, 65, 48, 7, 48, true, 3),
            (3, 8, 16, 3, 32, false, 3),
            (1, 320, 64, 4, 16, true, 3),
            // input channels enough that a task takes a span of a row's pixel groups, not bands
            (1, 1856, 16, 2, 32, true, 3),
        ] {
            let pad = k / 2;
            let x = randn(&[n, cin, h, w], 1.0);
            let wt = randn(&[cout, cin, k, k], 0.1).to_dtype(DType::BF16).unwrap();
            let b = randn(&[cout], 1.0);
            let bias = with_bias.then_some(&b);
            let got = conv2d_with(&x, &wt, bias, 1, pad, ConvAlgo::Tiles).unwrap();
            let auto = conv2d(&x, &wt, bias, 1, pad).unwrap();
            let diff = (&got - &auto).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "the automatic choice is the tiles' kernel");
            let (tight, loose) =
                tight_and_loose(&got, &x, &wt, bias, |x, w, b| conv2d_fallback(x, w, b, 1, pad).unwrap());
            println!("amx: {k}×{k} tiles {n}×{cin}→{cout} {h}×{w}: {tight:.1e} from the rounded operands, {loose:.1e} from float32's");
            assert!(tight < 1e-5, "{k}×{k} tiles {cin}→{cout}: {tight:.2e}");
            assert!(loose < 4e-3 && loose > 1e-5, "{k}×{k} tiles {cin}→{cout}: {loose:.2e}");
        }
        // sizes the tiles do not take: Winograd, or the unfolded product on tiles for planes of
        // 16 pixels at most (the UNet's 4×4 level) and for 8×8 planes in calls of at most 1,024
        // rows (4 frames under guidance at the 8×8 level)
        let wt = randn(&[16, 16, 3, 3], 0.1).to_dtype(DType::BF16).unwrap();
        for (n, side, want) in [
            (1, 12, ConvAlgo::Winograd),
            (17, 8, ConvAlgo::Winograd),
            (16, 8, ConvAlgo::Unfolded),
            (2, 4, ConvAlgo::Unfolded),
            (80, 4, ConvAlgo::Unfolded),
        ] {
            let x = randn(&[n, 16, side, side], 1.0);
            assert!(conv2d_with(&x, &wt, None, 1, 1, ConvAlgo::Tiles).is_err(), "{side}-pixel rows");
            let chosen = conv2d_with(&x, &wt, None, 1, 1, want).unwrap();
            let auto = conv2d(&x, &wt, None, 1, 1).unwrap();
            let diff = (&chosen - &auto).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{n} images of {side}×{side}: {want:?}");
        }
    });
}

/// The temporal convolution directly on AMX tiles (a 3×1 kernel over images of frames × pixels:
/// bfloat16 weights on the `amx` path, output channels and frames' pixels in 16s), held as the
/// 3×3 one is; the automatic choice takes it there.
#[test]
fn bf16_tiles_temporal_convolution_matches_float64_of_the_rounded_operands() {
    on_path(Isa::Amx, || {
        // (videos, cin, cout, frames, h, w, bias): frames of one pixel group, of four, and of
        // 1,024 pixels split into spans across tasks (320 channels); one frame; odd channels
        for (b, cin, cout, f, h, w, with_bias) in [
            (1, 19, 32, 5, 4, 4, true),
            (2, 65, 48, 3, 8, 8, true),
            (1, 320, 32, 4, 32, 32, true),
            (1, 8, 16, 1, 4, 8, false),
        ] {
            let x = randn(&[b, cin, f, h, w], 1.0);
            let wt = randn(&[cout, cin, 3, 1, 1], 0.1).to_dtype(DType::BF16).unwrap();
            let bb = randn(&[cout], 1.0);
            let bias = with_bias.then_some(&bb);
            let got = temporal_conv3_with(&x, &wt, bias, TemporalAlgo::Tiles).unwrap();
            let auto = temporal_conv3_with(&x, &wt, bias, TemporalAlgo::Auto).unwrap();
            let diff = (&got - &auto).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "the automatic choice is the tiles' kernel");
            let (tight, loose) =
                tight_and_loose(&got, &x, &wt, bias, |x, w, b| temporal_conv3_fallback(x, w, b).unwrap());
            println!("amx: temporal tiles {b}×{cin}→{cout}, {f} frames of {h}×{w}: {tight:.1e} from the rounded operands, {loose:.1e} from float32's");
            assert!(tight < 1e-5, "temporal tiles {cin}→{cout}: {tight:.2e}");
            assert!(loose < 4e-3 && loose > 1e-5, "temporal tiles {cin}→{cout}: {loose:.2e}");
        }
        // frames the tiles do not take (9 pixels) are refused when asked for
        let x = randn(&[1, 16, 3, 3, 3], 1.0);
        let wt = randn(&[16, 16, 3, 1, 1], 0.1).to_dtype(DType::BF16).unwrap();
        assert!(temporal_conv3_with(&x, &wt, None, TemporalAlgo::Tiles).is_err(), "9-pixel frames");
    });
}

/// Attention's probabilities · values in bfloat16 on the `amx` path ([`t2v::nn::ValueProduct`]):
/// a long sequence (past the short kernel's 64 tokens) with the values rounded to bfloat16 stays
/// within bfloat16's rounding of the float32 attention and differs from it (the tiles ran); short
/// sequences and the other paths keep float32's exact result.
#[test]
fn bf16_attention_values_stay_near_float32() {
    use t2v::nn::{multi_head_attention, ValueProduct};
    let run = |q: &Tensor, values| multi_head_attention(q, q, q, 2, 0.125, 1, values).unwrap();
    let max_diff = |a: &Tensor, b: &Tensor| {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    };
    on_path(Isa::Amx, || {
        // (batch, tokens, heads·d): 300 tokens takes the long kernel, 40 the short one
        let long = randn(&[2, 300, 128], 1.0);
        let diff = max_diff(&run(&long, ValueProduct::Bfloat16), &run(&long, ValueProduct::Float32));
        println!("amx: attention with bfloat16 values, 300 tokens: {diff:.1e} from float32's");
        // outputs are weighted means of the values: within two of bfloat16's steps (2⁻⁸ relative)
        // of the largest value, each of which the rounding may move by half a step
        let largest = long.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff > 1e-6 && diff < largest / 128.0, "{diff:.2e} (values up to {largest:.2})");
        let short = randn(&[2, 40, 128], 1.0);
        assert_eq!(max_diff(&run(&short, ValueProduct::Bfloat16), &run(&short, ValueProduct::Float32)), 0.0);
    });
    on_path(Isa::Avx512, || {
        let long = randn(&[1, 200, 128], 1.0);
        assert_eq!(max_diff(&run(&long, ValueProduct::Bfloat16), &run(&long, ValueProduct::Float32)), 0.0);
    });
}

/// Bits of a float32 tensor.
fn bits_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn layer_norm_matches_float64_and_gives_the_same_bits_at_every_vector_width() {
    use t2v::kernels::layer_norm::layer_norm;
    // rows of a transformer's widths, a ragged one, and rows far from zero mean (the variance
    // from the deviations, not E[x²] − mean²)
    for (rows, k, offset) in [(37, 320, 0.0), (5, 33, 0.0), (8, 1280, 300.0)] {
        let x = (randn(&[rows, k], 1.0) + offset).unwrap();
        let (g, b) = (randn(&[k], 1.0), randn(&[k], 1.0));
        // float64: (x − mean)/√(var + eps)·γ + β
        let xf = f64_of(&x);
        let mean = xf.mean_keepdim(1).unwrap();
        let d = xf.broadcast_sub(&mean).unwrap();
        let var = d.sqr().unwrap().mean_keepdim(1).unwrap();
        let want = d
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&f64_of(&g))
            .unwrap()
            .broadcast_add(&f64_of(&b))
            .unwrap();
        let mut seen: Vec<(Isa, Vec<u32>)> = Vec::new();
        for path in [Isa::Avx2, Isa::Avx512, Isa::Amx] {
            on_path(path, || {
                let got = layer_norm(&x, &g, &b, 1e-5).unwrap();
                let err = (f64_of(&got) - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let err = err.to_scalar::<f64>().unwrap();
                // (a mean of 300 is summed in float32: its rounding moves every output)
                let bound = if offset == 0.0 { 2e-5 } else { 2e-4 };
                println!("{path}: {rows}×{k} (mean {offset}): {err:.2e} from float64");
                assert!(err < bound, "{path}: {rows}×{k} (mean {offset}): {err:.2e} from float64");
                seen.push((path, bits_of(&got)));
            });
        }
        for (path, bits) in &seen[1..] {
            assert!(*bits == seen[0].1, "{path} and {}: {rows}×{k}", seen[0].0);
        }
    }
}

#[test]
fn products_of_rows_in_tiles_give_the_bits_of_products_of_float32_rows() {
    use t2v::kernels::layer_norm::{layer_norm, layer_norm_tiles};
    use t2v::kernels::linear::PackedLinear;
    on_path(Isa::Amx, || {
        // (rows, in, out): rows past whole 16s, one product on one thread, columns split among
        // threads (few rows), rows split (many), an odd depth
        for (rows, k, n) in [(37, 64, 48), (300, 128, 256), (2100, 64, 96), (21, 33, 32)] {
            let x = randn(&[rows, k], 1.0);
            let (g, b) = (randn(&[k], 1.0), randn(&[k], 0.5));
            let w = randn(&[n, k], 0.1).to_dtype(DType::BF16).unwrap();
            let bias = randn(&[n], 1.0);
            let residual = randn(&[rows, n], 1.0);
            let layer = PackedLinear::resident(&w, Some(&bias), false).unwrap().expect("bf16 weights pack on amx");
            assert!(layer.takes_tiles());
            let normed = layer_norm(&x, &g, &b, 1e-5).unwrap();
            let tiles = layer_norm_tiles(&x, &g, &b, 1e-5).unwrap().expect("tiles on amx");
            let what = format!("{rows}×{k}·{k}×{n}");
            assert!(
                bits_of(&layer.forward_tiles(&tiles).unwrap()) == bits_of(&layer.forward(&normed).unwrap()),
                "{what}"
            );
            let got = layer.forward_residual_tiles(&tiles, &residual).unwrap();
            assert!(bits_of(&got) == bits_of(&layer.forward_residual(&normed, &residual).unwrap()), "{what}, residual");
        }
        // the feed-forward: GEGLU's gated rows into tiles for the second projection
        for (rows, k, inner) in [(37, 64, 64), (300, 128, 128), (2100, 64, 64)] {
            let x = randn(&[rows, k], 1.0);
            let (g, b) = (randn(&[k], 1.0), randn(&[k], 0.5));
            let proj_w = randn(&[2 * inner, k], 0.1).to_dtype(DType::BF16).unwrap();
            let proj_b = randn(&[2 * inner], 1.0);
            let out_w = randn(&[k, inner], 0.1).to_dtype(DType::BF16).unwrap();
            let out_b = randn(&[k], 1.0);
            let proj = PackedLinear::resident(&proj_w, Some(&proj_b), true).unwrap().unwrap();
            let out = PackedLinear::resident(&out_w, Some(&out_b), false).unwrap().unwrap();
            assert!(proj.is_geglu() && proj.gates_into_tiles());
            let gated = proj.forward_geglu(&layer_norm(&x, &g, &b, 1e-5).unwrap()).unwrap();
            let want = out.forward_residual(&gated, &x).unwrap();
            let tiles = layer_norm_tiles(&x, &g, &b, 1e-5).unwrap().unwrap();
            assert!(bits_of(&proj.forward_tiles(&tiles).unwrap()) == bits_of(&gated), "{rows}×{k}: gated rows");
            let gated_tiles = proj.forward_geglu_tiles(&tiles).unwrap();
            let got = out.forward_residual_tiles(&gated_tiles, &x).unwrap();
            assert!(bits_of(&got) == bits_of(&want), "{rows}×{k}, inner {inner}: the feed-forward");
        }
    });
    // elsewhere there are no tiles: the float32 rows go on
    on_path(Isa::Avx512Bf16, || {
        let x = randn(&[20, 64], 1.0);
        let (g, b) = (randn(&[64], 1.0), randn(&[64], 0.5));
        assert!(layer_norm_tiles(&x, &g, &b, 1e-5).unwrap().is_none());
        let w = randn(&[32, 64], 0.1).to_dtype(DType::BF16).unwrap();
        let layer = PackedLinear::resident(&w, None, false).unwrap().unwrap();
        assert!(!layer.takes_tiles());
    });
}

/// Float16 weights on the `avx512fp16` path: both operands rounded to float16 and multiplied by
/// `vfmadd231ph`, each lane summing 32 products in float16 before they go into float32. Held to
/// float64 of the rounded operands within float16 sums' rounding (an order of magnitude looser
/// than float32 sums, and over the depths of two flushes and of two packed blocks), and to
/// float32's operands within about a bfloat16 rounding; elsewhere float16 weights are widened
/// exactly and the activations not rounded.
#[test]
fn f16_linear_and_convolutions_match_float64_of_the_rounded_operands() {
    use t2v::kernels::with_f16_products;
    on_path(Isa::Avx512Fp16, || {
        with_f16_products(true, || {
            for (m, k, n) in LINEAR_SHAPES {
                let x = randn(&[m, k], 1.0);
                let w = randn(&[n, k], 0.2).to_dtype(DType::F16).unwrap();
                let b = randn(&[n], 1.0);
                let got = linear(&x, &w, Some(&b)).unwrap();
                assert_eq!(got.dtype(), DType::F32);
                let (want, scale) = linear_f64(&rounded_to(&x, DType::F16), &f64_of(&w), &f64_of(&b));
                let tight = err_in_scale(&got, &want, &scale);
                let (want32, scale32) = linear_f64(&f64_of(&x), &f64_of(&w), &f64_of(&b));
                let loose = err_in_scale(&got, &want32, &scale32);
                println!("avx512fp16: linear {m}×{k}·{k}×{n}: {tight:.1e} from the rounded operands, {loose:.1e} from float32's");
                assert!(tight < 2e-3, "{m}×{k}×{n}: {tight:.2e} from float64 of the rounded operands");
                assert!(loose < 2e-3, "{m}×{k}×{n}: {loose:.2e} from float64 of the float32 operands");
                if k > 2 {
                    assert!(loose > 1e-6, "{m}×{k}×{n}: the input was not rounded ({loose:.2e})");
                }
            }
            for (n, cin, cout, h, w) in [(2, 37, 21, 5, 7), (5, 64, 40, 16, 16), (1, 320, 33, 64, 70)] {
                let x = randn(&[n, cin, h, w], 1.0);
                let wt = randn(&[cout, cin, 1, 1], 0.1).to_dtype(DType::F16).unwrap();
                let b = randn(&[cout], 1.0);
                let got = conv2d(&x, &wt, Some(&b), 1, 0).unwrap();
                let (tight, loose) =
                    tight_and_loose(&got, &x, &wt, Some(&b), |x, w, b| conv2d_fallback(x, w, b, 1, 0).unwrap());
                println!("avx512fp16: 1×1 conv {n}×{cin}→{cout} {h}×{w}: {tight:.1e} from the rounded operands, {loose:.1e} from float32's");
                assert!(tight < 2e-3 && loose < 2e-3 && loose > 1e-6, "1×1 {cin}→{cout}: {tight:.2e}, {loose:.2e}");
            }
            // the temporal convolution rounds its transformed operands (Winograd F(4, 3) along frames)
            assert_winograd_temporal_near_float64(DType::F16, 1e-6, 5e-3);
        })
    });
    // off the path, and on it outside `with_f16_products` (a float32 run of float16 weights),
    // float16 weights are widened and nothing else is rounded
    for (path, asked) in [(Isa::Avx512Fp16, false), (Isa::Avx512Bf16, true), (Isa::Avx512, true), (Isa::Avx2, true)] {
        on_path(path, || with_f16_products(asked, || assert_widened(DType::F16)));
    }
}

/// The float16 sums are flushed into float32 every 32 pairs of depths, so a long product of
/// values of one sign (where float16 sums would grow past their precision fastest) stays within
/// float16's rounding of its terms, not of its whole sum's growth.
#[test]
fn f16_long_sums_of_one_sign_stay_near_float64() {
    on_path(Isa::Avx512Fp16, || {
        t2v::kernels::with_f16_products(true, || {
            let (m, k, n) = (12, 4096, 32);
            let x = randn(&[m, k], 1.0).abs().unwrap();
            let w = randn(&[n, k], 0.2).abs().unwrap().to_dtype(DType::F16).unwrap();
            let got = linear(&x, &w, None).unwrap();
            let zero = Tensor::zeros(n, DType::F64, &Device::Cpu).unwrap();
            let (want, scale) = linear_f64(&rounded_to(&x, DType::F16), &f64_of(&w), &zero);
            let err = err_in_scale(&got, &want, &scale);
            println!("avx512fp16: {m}×{k}·{k}×{n} of positive terms: {err:.1e}");
            assert!(err < 2e-3, "{err:.2e}");
        })
    });
}
