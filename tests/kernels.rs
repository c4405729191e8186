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
