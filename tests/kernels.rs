//! The CPU kernels against candle's standard ops (the path every other device takes) and a
//! float64 computation.

use candle_core::{DType, Device, Tensor};
use t2v::kernels::group_norm::group_norm;

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap();
    let d = d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let m = b.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
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
    assert_eq!(max_rel(&a, &c), 0.0);
}

#[test]
fn attention_in_blocks_equals_one_block() {
    use t2v::nn::attention_in_blocks;
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
}
