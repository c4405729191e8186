//! Seeded Gaussian noise that reproduces PyTorch's CPU generator bit for bit.
//!
//! Diffusers pipelines draw their initial latents (and, for DDIM with `eta > 0`, the per-step
//! variance noise) with `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`.
//! To give the same video for the same seed as the Python reference, this module mirrors the
//! exact sequence of operations PyTorch performs on the CPU:
//!
//! * `at::mt19937` (`aten/src/ATen/core/MT19937RNGEngine.h`): the classic MT19937 of
//!   Matsumoto & Nishimura, seeded with `init_genrand(seed & 0xffffffff)` by
//!   `CPUGeneratorImpl::set_current_seed` (which also clears the cached normal samples).
//! * `CPUGeneratorImpl::random()` (one 32-bit draw) and `random64()` (two draws, the first one
//!   is the high word) in `aten/src/ATen/CPUGeneratorImpl.cpp`.
//! * `at::uniform_real_distribution<T>` / `transformation::uniform_real`
//!   (`aten/src/ATen/core/DistributionsHelper.h`, `TransformationHelper.h`): a float keeps the
//!   low 24 bits of one 32-bit draw, a double keeps the low 53 bits of a 64-bit draw, scaled by
//!   2^-24 / 2^-53 into `[0, 1)`.
//! * `normal_kernel` (`aten/src/ATen/native/cpu/DistributionTemplates.h`), which picks one of two
//!   algorithms by size:
//!   - numel >= 16 (a fresh `randn` tensor is always contiguous): `normal_fill_AVX2`, the kernel
//!     x86 builds run. All numel float uniforms are drawn first, then Box–Muller is applied in
//!     blocks of 16 (`normal_fill_16_AVX2`: `u1 = 1 - data[j]`, `u2 = data[j + 8]`,
//!     `r = sqrt(-2 log u1)`, `r cos(2 pi u2)` to slot `j`, `r sin(2 pi u2)` to slot `j + 8`). When
//!     numel is not a multiple of 16 the last 16 slots are refilled with 16 *new* uniforms and
//!     transformed again, overwriting the tail of the previous block (so numel + 16 words are
//!     consumed). This path never touches the cached normal.
//!     The log/sin/cos are the Cephes polynomials of `avx_mathfun.h` (`log256_ps`,
//!     `sincos256_ps`), not libm, and as compiled by GCC with FMA contraction; both matter at the
//!     ulp level, so they are emulated here exactly (bit-identical to the reference fixtures).
//!     The portable `normal_fill_16` (libm `logf`/`cosf`/`sinf`, used by non-x86 builds of
//!     PyTorch, e.g. Apple silicon) differs from it by a few ulp on ~40% of the values.
//!   - numel < 16: `at::normal_distribution<double>` per element, serially: two double uniforms
//!     `u1, u2`, `r = sqrt(-2 log1p(-u2))`, `theta = 2 pi u1`; it returns `r cos(theta)` and caches
//!     `r sin(theta)` in the generator (`next_double_normal_sample`), which the next scalar draw
//!     consumes instead of drawing. The cache lives in the generator, so it survives across
//!     `randn` calls (and across fill-path calls, which ignore it). Values are rounded to f32.

use candle_core::{Device, Result, Tensor};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The MT19937 engine in the form PyTorch uses (`at::mt19937`).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; N],
    /// Index of the next word to temper; `N` means the state must be regenerated first
    /// (PyTorch tracks the same thing with `left_`/`next_`, starting at `left_ = 1`).
    index: usize,
}

impl Mt19937 {
    /// `init_genrand`: PyTorch keeps only the low 32 bits of the 64-bit seed for the state.
    fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, index: N }
    }

    fn regenerate(&mut self) {
        let s = &mut self.state;
        for k in 0..N {
            let y = (s[k] & UPPER_MASK) | (s[(k + 1) % N] & LOWER_MASK);
            let mag = if y & 1 != 0 { MATRIX_A } else { 0 };
            s[k] = s[(k + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    #[inline]
    fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.regenerate();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A stateful equivalent of `torch.Generator("cpu")` (`at::CPUGeneratorImpl`), limited to what
/// `torch.randn(..., dtype=torch.float32)` needs: the mt19937 state plus the cached second
/// Box–Muller value of the double normal sampler.
///
/// Successive calls advance the state exactly like successive `torch.randn(..., generator=g)`
/// calls on one generator, which diffusers relies on (initial latents, then scheduler noise).
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// `CPUGeneratorImpl::next_double_normal_sample_`, written and read only by the scalar
    /// (numel < 16) path.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`: a fresh engine and no cached normal.
    pub fn new(seed: u64) -> Self {
        TorchGenerator { engine: Mt19937::new(seed), next_double_normal: None }
    }

    /// `CPUGeneratorImpl::random()`.
    #[inline]
    fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// `CPUGeneratorImpl::random64()`: first draw is the high word.
    #[inline]
    fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: low 24 bits of one draw times 2^-24 (exact).
    #[inline]
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: low 53 bits of a 64-bit draw times 2^-53.
    #[inline]
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `at::normal_distribution<double>(0, 1)` (mean 0 / std 1 leave the value unchanged).
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(shape, generator=self, dtype=torch.float32)` on CPU.
    pub fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        if n >= 16 {
            self.normal_fill(n)
        } else {
            // cpu_serial_kernel over normal_distribution<double>, cast to float.
            (0..n).map(|_| self.normal_f64() as f32).collect()
        }
    }

    /// `torch.randperm(n, generator=self)` on CPU (`randperm_cpu` in
    /// `aten/src/ATen/native/TensorFactories.cpp`): the identity, then for each `i < n - 1` a
    /// swap of `i` with `i + random() % (n - i)`, one 32-bit draw each (the path of every `n`
    /// below 2^32 / 20). It neither reads nor writes the cached normal sample, so `randn`
    /// calls before and after it see the generator exactly as torch's would.
    pub fn randperm(&mut self, n: usize) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..n).collect();
        for i in 0..n.saturating_sub(1) {
            let z = (self.random() as u64 % (n - i) as u64) as usize;
            perm.swap(i, i + z);
        }
        perm
    }

    /// Same as [`randn`](Self::randn), returned as an f32 tensor of `shape` on `device`.
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let data = self.randn(shape);
        Tensor::from_vec(data, shape, device)
    }

    /// `normal_fill_AVX2` (see the module docs); `n >= 16`.
    fn normal_fill(&mut self, n: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// One block of `normal_fill_16_AVX2` with mean 0 and std 1: lanes `j` and `j + 8` form one
/// Box–Muller pair. Emulated lane by lane in f32 (see [`cephes_log`], [`cephes_sincos`]).
/// The closing `_mm256_fmadd_ps(n, std, mean)` is exact for std 1 / mean 0, so it is omitted.
#[inline]
fn box_muller_16(d: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2*pi rounded to float once.
    let two_pi = (2.0f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - d[j]; // [0, 1) -> (0, 1]
        let u2 = d[j + 8];
        let radius = (-2.0f32 * cephes_log(u1)).sqrt();
        let (sin, cos) = cephes_sincos(two_pi * u2);
        d[j] = radius * cos;
        d[j + 8] = radius * sin;
    }
}

// The math below mirrors `log256_ps` and `sincos256_ps` of `aten/src/ATen/native/cpu/avx_mathfun.h`
// (Pommier's Cephes-based SSE/AVX functions), one lane at a time. PyTorch's x86 wheels build that
// header with GCC, `-mavx2 -mfma` and GCC's default `-ffp-contract=fast`, so every multiply whose
// only use is an add/sub is fused into an FMA. The `mul_add` calls reproduce exactly those
// fusions (which product gets fused matters to the last bit); without them ~1% of values are off
// by one ulp against the reference.

// Constants exactly as written in avx_mathfun.h. There they are double literals stored into float
// arrays, i.e. rounded decimal -> double -> float; `c` does the same.
const fn c(x: f64) -> f32 {
    x as f32
}
#[allow(clippy::excessive_precision)]
const LOG_P: [f32; 9] = [
    c(7.0376836292E-2),
    c(-1.1514610310E-1),
    c(1.1676998740E-1),
    c(-1.2420140846E-1),
    c(1.4249322787E-1),
    c(-1.6668057665E-1),
    c(2.0000714765E-1),
    c(-2.4999993993E-1),
    c(3.3333331174E-1),
];
#[allow(clippy::excessive_precision)]
const LOG_Q1: f32 = c(-2.12194440e-4);
const LOG_Q2: f32 = c(0.693359375);
// 0.707106781186547524 in the header; as a double that is exactly FRAC_1_SQRT_2.
const SQRT_HALF: f32 = c(std::f64::consts::FRAC_1_SQRT_2);

/// `log256_ps` for one lane; `x` is in `(0, 1]` here (normal floats only).
#[inline]
fn cephes_log(x: f32) -> f32 {
    let x = x.max(f32::from_bits(0x0080_0000)); // clamp denormals away, as the original does
    let bits = x.to_bits();
    // exponent e and mantissa m in [0.5, 1)
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    // if m < sqrt(1/2): e -= 1, t = 2m - 1, else t = m - 1 (computed as (m - 1) + m or + 0)
    let small = m < SQRT_HALF;
    let t = (m - 1.0) + if small { m } else { 0.0 };
    if small {
        e -= 1.0;
    }
    let z = t * t;
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        y = y.mul_add(t, p);
    }
    y *= t;
    let y = y.mul_add(z, e * LOG_Q1); // y*z + e*q1: the product y*z is the fused one
    let y = (-z).mul_add(0.5, y); // y - z*0.5
    e.mul_add(LOG_Q2, t + y) // (t + y) + e*q2
}

#[allow(clippy::excessive_precision)]
const MINUS_DP: [f32; 3] = [c(-0.78515625), c(-2.4187564849853515625e-4), c(-3.77489497744594108e-8)];
#[allow(clippy::excessive_precision)]
const SINCOF: [f32; 3] = [c(-1.9515295891E-4), c(8.3321608736E-3), c(-1.6666654611E-1)];
#[allow(clippy::excessive_precision)]
const COSCOF: [f32; 3] = [c(2.443315711809948E-005), c(-1.388731625493765E-003), c(4.166664568298827E-002)];
#[allow(clippy::excessive_precision)]
const FOUR_OVER_PI: f32 = c(1.27323954473516); // 4 / pi

/// `sincos256_ps` for one lane: returns `(sin x, cos x)`; here `x` is in `[0, 2 pi)`.
#[inline]
fn cephes_sincos(x: f32) -> (f32, f32) {
    let sign_sin = x.to_bits() & 0x8000_0000;
    let ax = x.abs();
    // octant j = (trunc(|x| * 4/pi) + 1) & !1
    let j = ((ax * FOUR_OVER_PI) as i32 + 1) & !1;
    let jf = j as f32;
    let sign_sin = sign_sin ^ (((j & 4) as u32) << 29);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let use_first = j & 2 == 0;
    // extended precision reduction r = ((|x| - j*DP1) - j*DP2) - j*DP3, each step an FMA
    let mut r = ax;
    for dp in MINUS_DP {
        r = jf.mul_add(dp, r);
    }
    let z = r * r;
    // cos polynomial on [-pi/4, pi/4]: 1 - z/2 + z^2 (c0 z^2 + c1 z + c2)
    let mut c = COSCOF[0].mul_add(z, COSCOF[1]);
    c = c.mul_add(z, COSCOF[2]);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    // sin polynomial: r + r z (s0 z^2 + s1 z + s2)
    let mut s = SINCOF[0].mul_add(z, SINCOF[1]);
    s = s.mul_add(z, SINCOF[2]);
    s *= z;
    s = s.mul_add(r, r);
    let (sin, cos) = if use_first { (s, c) } else { (c, s) };
    (f32::from_bits(sin.to_bits() ^ sign_sin), f32::from_bits(cos.to_bits() ^ sign_cos))
}
