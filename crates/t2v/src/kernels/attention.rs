//! Multi-head attention straight from the projections' layout: q (batch, tokens, heads·d) and
//! k, v (batch / repeat, keys, heads·d) in, (batch, tokens, heads·d) out, so that the heads are
//! never split into a (batch·heads, tokens, d) copy and merged back (four full copies a layer),
//! and the text embeddings' k and v are read once per video instead of repeated per frame.
//!
//! * Long sequences (the spatial attention over 1024 tokens, the cross-attention to 77 text
//!   tokens, the VAE's attention): per (batch, head) the keys and values are packed once, then
//!   blocks of query rows go through scores = q·kᵀ ([`super::packed_matmul`]), a row softmax (max
//!   subtracted, vectorised `exp`) and out = p·v, with the score block small enough for L2. The
//!   softmax is exact: each block holds every key of its rows.
//! * Short sequences (the temporal attention across 16 frames, for every pixel and head: hundreds
//!   of thousands of 16×16 problems a layer): one small loop nest per (batch, head).
//!
//! Other devices, dtypes and CPUs without AVX2/FMA split the heads and run candle's ops over
//! blocks of rows ([`attention_in_blocks`]).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::packed_matmul::{self, Init, PackedB};
use super::{avx2, SendPtr, Src};

/// Sequences at most this long (queries and keys) take the loop kernel.
pub const SHORT: usize = 64;

/// Score elements of one block of query rows (96 rows × 1024 keys: 384 KiB, with the packed
/// keys and values within a 1 MiB L2; at least 12 rows, 432 KiB at 9,216 keys).
const SCORE_BLOCK: usize = 96 * 1024;

/// How a long sequence's probabilities multiply its values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValueProduct {
    /// In float32.
    #[default]
    Float32,
    /// Where the CPU has AMX tiles ([`super::amx`]): probabilities and values rounded to
    /// bfloat16, float32 sums, as `--dtype bf16`'s other products (elsewhere in float32). The
    /// scores (q·kᵀ) stay float32: rounding q and k too took small-t2v's guidance-9 frames from
    /// 3.1e-2 to 3.8e-2 of the float32 reference, where the values alone leave them at 3.1e-2.
    /// Guided step at 4 frames of 256×256, Emerald Rapids: long attention 0.54–0.58 → 0.34–0.40 s.
    Bfloat16,
    /// On the `avx512fp16` path ([`super::fp16`]): probabilities and values rounded to float16,
    /// float16 sums of 32 products added in float32, as `--dtype f16`'s other products
    /// (elsewhere in float32). The scores stay float32, as for bfloat16.
    Float16,
}

struct MultiHeadAttention {
    heads: usize,
    scale: f32,
    repeat: usize,
    values: ValueProduct,
    /// (starts, length): attend within tokens [start, start + length) of every row, for each
    /// start (the inputs hold the whole sequences; the output holds the windows one after
    /// another along the batch: window i of row b at output row i·batch + b).
    windows: Option<(Vec<usize>, usize)>,
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: vectorisable without reassociating one long chain.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The shapes of one call: `batch` query rows of `tokens` × `heads·d`; keys and values have
/// `batch / repeat` rows of `keys` × `heads·d`.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    tokens: usize,
    keys: usize,
    heads: usize,
    d: usize,
    repeat: usize,
    /// Floats from one batch row of q to the next, and of k and v.
    q_row: usize,
    kv_row: usize,
    /// Float offset of the first token used in each row (a window of a longer sequence).
    first: usize,
}

impl Dims {
    fn width(&self) -> usize {
        self.heads * self.d
    }

    /// Output row `j` of a call over windows starting at float offsets `starts`: the input row
    /// it reads and the dimensions with that window's first token.
    fn output_row(self, starts: &[usize], j: usize) -> (Dims, usize) {
        (Dims { first: starts[j / self.batch], ..self }, j % self.batch)
    }
}

impl MultiHeadAttention {
    /// Short sequences: per batch row, every head with the queries in vector lanes ([`lanes`]);
    /// without AVX2, per (batch, head) scores row by row, softmax, weighted sum of values.
    fn short(&self, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], dm: Dims, starts: &[usize]) {
        let (t, hd) = (dm.tokens, dm.width());
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            let wide = super::avx512();
            let scratch = || vec![0f32; 2 * t.div_ceil(lanes::L) * lanes::L * hd];
            out.par_chunks_mut(t * hd).enumerate().for_each_init(scratch, |scratch, (j, out)| {
                let (dm, b) = dm.output_row(starts, j);
                // SAFETY: AVX2 and FMA (and AVX-512F for `wide`) checked; `scratch` holds
                // two transposed copies of one row.
                unsafe {
                    if wide {
                        lanes::attend_avx512(self.scale, q, k, v, out, dm, b, scratch)
                    } else {
                        lanes::attend_avx2(self.scale, q, k, v, out, dm, b, scratch)
                    }
                }
            });
            return;
        }
        out.par_chunks_mut(t * hd).enumerate().for_each(|(j, out)| {
            let (dm, b) = dm.output_row(starts, j);
            short_video(self.scale, q, k, v, out, dm, b)
        });
    }

    /// Long sequences: per (batch, head, chunk of query rows) a task that packs that head's
    /// keys and values and runs blocks of query rows through two packed GEMMs and a softmax.
    fn long(&self, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], dm: Dims, starts: &[usize]) {
        let (t, s, d, hd) = (dm.tokens, dm.keys, dm.d, dm.width());
        let threads = rayon::current_num_threads().max(1);
        // Enough tasks for every thread even when there is a single head (the VAE's attention):
        // query chunks of one head then pack its keys and values once each.
        let pairs = starts.len() * dm.batch * dm.heads;
        let chunks = (2 * threads).div_ceil(pairs).min(t.div_ceil(packed_matmul::MR)).max(1);
        let chunk_rows = t.div_ceil(chunks);
        // whole 12-row tiles of the AVX-512 product (two micro-panels): at 9,216 keys (1024×576)
        // the score block held 10 rows, and every tile of both products went through the ragged
        // edge's scratch copy
        let tile_rows = 2 * packed_matmul::MR;
        let rows_per_block = (SCORE_BLOCK / s / tile_rows * tile_rows).clamp(tile_rows, t.max(tile_rows));
        let optr = SendPtr(out.as_mut_ptr());
        let wide = super::wide(super::KernelKind::Attention);
        let half = match self.values {
            ValueProduct::Bfloat16 if super::amx() => Some(super::bf16::Half::Bf16),
            ValueProduct::Float16 if super::avx512fp16() => Some(super::bf16::Half::F16),
            _ => None,
        };
        (0..pairs * chunks).into_par_iter().for_each(|task| {
            let (pair, chunk) = (task / chunks, task % chunks);
            let (j, h) = (pair / dm.heads, pair % dm.heads);
            let (dm, b) = dm.output_row(starts, j);
            let (r0, r1) = (chunk * chunk_rows, ((chunk + 1) * chunk_rows).min(t));
            if r0 >= r1 {
                return;
            }
            let kv = (b / dm.repeat) * dm.kv_row + dm.first + h * d;
            let keys = PackedB::from_transposed_rows(Src::F32(&k[kv..]), s, d, hd, false);
            let values = if let Some(half) = half {
                PackedB::from_rows_half(&v[kv..], half, s, d, hd, false)
            } else {
                PackedB::from_rows(&v[kv..], s, d, hd, false)
            };
            // each block's scores are written by the first GEMM before the softmax reads them
            let mut scores = super::output_buffer(rows_per_block.min(r1 - r0) * s);
            let mut r = r0;
            while r < r1 {
                let rows = rows_per_block.min(r1 - r);
                let at = (j * t + r) * hd + h * d;
                let q_at = b * dm.q_row + dm.first + r * hd + h * d;
                // SAFETY: `avx2()` was checked before this op ran; q holds `rows` rows of hd
                // floats from `q_at` and out from `at`, scores rows×s floats; this task alone
                // writes columns [h·d, h·d + d) of these rows of `out`.
                unsafe {
                    packed_matmul::matmul_rows(
                        rows,
                        q.as_ptr().add(q_at),
                        hd,
                        &keys,
                        scores.as_mut_ptr(),
                        s,
                        Init::Overwrite,
                        wide,
                    );
                    for row in scores.chunks_mut(s).take(rows) {
                        softmax_row(row, self.scale);
                    }
                    packed_matmul::matmul_rows(
                        rows,
                        scores.as_ptr(),
                        s,
                        &values,
                        optr.get().add(at),
                        hd,
                        Init::Overwrite,
                        wide,
                    );
                }
                r += rows;
            }
        });
    }
}

/// One query row `b` of short attention, all heads (`out` is that row's tokens × heads·d).
#[inline(always)]
fn short_video(scale: f32, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], dm: Dims, b: usize) {
    let (t, s, d, hd) = (dm.tokens, dm.keys, dm.d, dm.width());
    let kv = (b / dm.repeat) * dm.kv_row + dm.first;
    let q = &q[b * dm.q_row + dm.first..][..t * hd];
    let mut p = [0f32; SHORT];
    for h in 0..dm.heads {
        let col = h * d;
        for ti in 0..t {
            let qi = &q[ti * hd + col..ti * hd + col + d];
            for (si, pi) in p[..s].iter_mut().enumerate() {
                let ks = kv + si * hd + col;
                *pi = dot(qi, &k[ks..ks + d]);
            }
            softmax_row(&mut p[..s], scale);
            let o = &mut out[ti * hd + col..ti * hd + col + d];
            o.fill(0.0);
            for (si, &w) in p[..s].iter().enumerate() {
                let vs = kv + si * hd + col;
                for (o, &vv) in o.iter_mut().zip(&v[vs..vs + d]) {
                    *o += w * vv;
                }
            }
        }
    }
}

/// Short attention with the queries in the lanes of a vector (eight at 256 bits, sixteen at
/// 512): per head and group of queries, a score vector per key (Σₑ k[key, e]·q[·, e], k
/// broadcast), the softmax across those vectors (elementwise: no horizontal sums), and the output
/// as Σ_key v[key, e]·p[key]. The temporal attention's heads are narrow (64 heads of 5 to 20
/// channels), where per-query dot products ([`short_video`]) run mostly scalar: this form keeps
/// every lane busy whatever the head width (`kernel_speed`'s "temporal attention" shapes). The
/// queries are transposed in and the outputs out, eight by eight in registers.
#[cfg(target_arch = "x86_64")]
mod lanes {
    use std::arch::x86_64::*;

    use super::{Dims, SHORT};
    use crate::kernels::packed_matmul::transpose8;
    use crate::kernels::vmath::{self, F32s};

    /// The most queries a vector holds (the scratch is sized for it).
    pub(super) const L: usize = <__m512 as F32s>::LANES;

    /// Row `b` (`out` is its tokens × heads·d) with `V::LANES` queries a vector; `scratch` holds
    /// 2·⌈t/L⌉·L·hd floats.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend<V: F32s>(
        scale: f32,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        dm: Dims,
        b: usize,
        scratch: &mut [f32],
    ) {
        let n = V::LANES;
        let (t, s, d, hd) = (dm.tokens, dm.keys, dm.d, dm.width());
        let groups = t.div_ceil(n);
        let (qt, ot) = scratch.split_at_mut(groups * n * hd);
        let q = &q[b * dm.q_row + dm.first..][..t * hd];
        let kv = (b / dm.repeat) * dm.kv_row + dm.first;
        let (kp, vp) = (k.as_ptr().add(kv), v.as_ptr().add(kv));
        // qt[(g·hd + c)·n + lane] = q[g·n + lane, c] (zero past the last query)
        transpose_rows(q.as_ptr(), t, hd, qt.as_mut_ptr(), n);
        let (sv, one) = (V::splat(scale), V::splat(1.0));
        // scores, then probabilities, of one head and group: p[..s] is written before it is read
        let mut p = [V::zero(); SHORT];
        for g in 0..groups {
            for h in 0..dm.heads {
                let col = h * d;
                let qg = qt.as_ptr().add((g * hd + col) * n);
                for (si, pi) in p[..s].iter_mut().enumerate() {
                    let kr = kp.add(si * hd + col);
                    let mut acc = V::zero();
                    for e in 0..d {
                        acc = V::fmadd(V::splat(*kr.add(e)), V::load(qg.add(e * n)), acc);
                    }
                    *pi = acc;
                }
                // softmax over the keys, as `softmax_row`: e^(x·scale − max·scale) / Σ
                let mut max = p[0];
                for &x in &p[1..s] {
                    max = max.max(x);
                }
                let shift = max.mul(sv);
                let mut sum = V::zero();
                for x in &mut p[..s] {
                    *x = vmath::exp(V::fmsub(*x, sv, shift));
                    sum = sum.add(*x);
                }
                let inv = one.div(sum);
                for x in &mut p[..s] {
                    *x = x.mul(inv);
                }
                let og = ot.as_mut_ptr().add((g * hd + col) * n);
                for e in 0..d {
                    let mut acc = V::zero();
                    for (si, &pi) in p[..s].iter().enumerate() {
                        acc = V::fmadd(V::splat(*vp.add(si * hd + col + e)), pi, acc);
                    }
                    acc.store(og.add(e * n));
                }
            }
        }
        untranspose_rows(ot.as_ptr(), t, hd, out.as_mut_ptr(), n);
    }

    /// `dst[(g·hd + c)·n + lane] = src[(g·n + lane)·hd + c]`, zero for rows ≥ `t` (n a multiple
    /// of 8: blocks of 8 rows, each transposed in registers into its 8 lanes).
    #[inline(always)]
    unsafe fn transpose_rows(src: *const f32, t: usize, hd: usize, dst: *mut f32, n: usize) {
        let c8 = hd / 8 * 8;
        for r0 in (0..t.div_ceil(n) * n).step_by(8) {
            let rows = t.saturating_sub(r0).min(8);
            let (g, lane0) = (r0 / n, r0 % n);
            let mut c = 0;
            while c < c8 {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, ri) in r[..rows].iter_mut().enumerate() {
                    *ri = _mm256_loadu_ps(src.add((r0 + i) * hd + c));
                }
                transpose8(&mut r);
                for (i, &ri) in r.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((g * hd + c + i) * n + lane0), ri);
                }
                c += 8;
            }
            for c in c8..hd {
                for i in 0..8 {
                    *dst.add((g * hd + c) * n + lane0 + i) = if i < rows { *src.add((r0 + i) * hd + c) } else { 0.0 };
                }
            }
        }
    }

    /// The inverse of [`transpose_rows`] for the `t` rows that exist.
    #[inline(always)]
    unsafe fn untranspose_rows(src: *const f32, t: usize, hd: usize, dst: *mut f32, n: usize) {
        let c8 = hd / 8 * 8;
        for r0 in (0..t).step_by(8) {
            let rows = (t - r0).min(8);
            let (g, lane0) = (r0 / n, r0 % n);
            let mut c = 0;
            while c < c8 {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, ri) in r.iter_mut().enumerate() {
                    *ri = _mm256_loadu_ps(src.add((g * hd + c + i) * n + lane0));
                }
                transpose8(&mut r);
                for (i, &ri) in r[..rows].iter().enumerate() {
                    _mm256_storeu_ps(dst.add((r0 + i) * hd + c), ri);
                }
                c += 8;
            }
            for c in c8..hd {
                for i in 0..rows {
                    *dst.add((r0 + i) * hd + c) = *src.add((g * hd + c) * n + lane0 + i);
                }
            }
        }
    }

    /// [`attend`] for AVX2 + FMA, eight queries a vector.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend_avx2(
        scale: f32,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        dm: Dims,
        b: usize,
        scratch: &mut [f32],
    ) {
        attend::<__m256>(scale, q, k, v, out, dm, b, scratch)
    }

    /// [`attend`] for AVX-512, sixteen queries a vector (a 16-frame window's in one).
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend_avx512(
        scale: f32,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        dm: Dims,
        b: usize,
        scratch: &mut [f32],
    ) {
        attend::<__m512>(scale, q, k, v, out, dm, b, scratch)
    }
}

/// `row ← softmax(row · scale)` (scale > 0), as torch: max subtracted, exponentials divided by
/// their sum.
#[inline]
fn softmax_row(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA checked.
        unsafe { simd::softmax_row(row, scale) };
        return;
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = ((*x - max) * scale).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_row(row: &mut [f32], scale: f32) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let main = n / 8 * 8;
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < main {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &x in &row[main..] {
            max = max.max(x);
        }
        let (sv, shift) = (_mm256_set1_ps(scale), _mm256_set1_ps(max * scale));
        let mut sumv = _mm256_setzero_ps();
        i = 0;
        while i < main {
            // (x − max)·scale as x·scale − max·scale in one fused step
            let e = super::super::vmath::exp::<__m256>(_mm256_fmsub_ps(_mm256_loadu_ps(p.add(i)), sv, shift));
            _mm256_storeu_ps(p.add(i), e);
            sumv = _mm256_add_ps(sumv, e);
            i += 8;
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), sumv);
        let mut sum: f32 = lanes.iter().sum();
        for x in &mut row[main..] {
            *x = (*x * scale - max * scale).exp();
            sum += *x;
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        i = 0;
        while i < main {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
            i += 8;
        }
        for x in &mut row[main..] {
            *x /= sum;
        }
    }
}

impl CustomOp3 for MultiHeadAttention {
    fn name(&self) -> &'static str {
        "multi-head-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            super::f32_of(q, lq, "attention q")?,
            super::f32_of(k, lk, "attention k")?,
            super::f32_of(v, lv, "attention v")?,
        );
        let (batch, q_tokens, width) = lq.shape().dims3()?;
        let kv_tokens = lk.shape().dims3()?.1;
        let (starts, tokens, keys) = match &self.windows {
            Some((starts, length)) => (starts.iter().map(|s| s * width).collect(), *length, *length),
            None => (vec![0], q_tokens, kv_tokens),
        };
        let dm = Dims {
            batch,
            tokens,
            keys,
            heads: self.heads,
            d: width / self.heads,
            repeat: self.repeat,
            q_row: q_tokens * width,
            kv_row: kv_tokens * width,
            first: 0,
        };
        let rows = starts.len() * batch;
        // both paths write every (token, head) slice of every row
        let mut out = super::output_buffer(rows * tokens * width);
        if tokens <= SHORT && keys <= SHORT {
            self.short(q, k, v, &mut out, dm, &starts);
        } else {
            self.long(q, k, v, &mut out, dm, &starts);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, tokens, width))))
    }
}

/// Score-matrix elements computed at once by candle's ops (64 MiB of float32): off the CPU
/// kernel, attention runs over blocks of (batch·heads) rows and query tokens within this budget,
/// so no full score matrix of a long sequence is held (a 32×32 latent has 1024 tokens a frame).
/// The result is the same.
const SCORE_BUDGET: usize = 16 << 20;

/// softmax(q·kᵀ·scale)·v per head, for q (batch, tokens, heads·d) and k, v (batch / repeat,
/// keys, heads·d) whose row b / repeat serves query rows b (the frames of a video sharing its
/// text embeddings); the output is (batch, tokens, heads·d). On the CPU with float32 tensors
/// (and AVX2/FMA) one kernel reads the heads in place, the long sequences' probabilities
/// multiplying the values as `values` says; elsewhere the heads are split into
/// (batch·heads, tokens, d) and [`attention_in_blocks`] runs candle's ops.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    repeat: usize,
    values: ValueProduct,
) -> Result<Tensor> {
    let (batch, tokens, width) = check_shapes(q, k, v, heads, repeat)?;
    if fast(q, k, v) {
        return run_op(q, k, v, MultiHeadAttention { heads, scale: scale as f32, repeat, values, windows: None });
    }
    let (k, v) = (super::copy::repeat_interleave(k, repeat)?, super::copy::repeat_interleave(v, repeat)?);
    let d = width / heads;
    let split = |x: &Tensor| -> Result<Tensor> {
        let n = x.dim(1)?;
        x.reshape((batch, n, heads, d))?.transpose(1, 2)?.contiguous()?.reshape((batch * heads, n, d))
    };
    let out = attention_in_blocks(&split(q)?, &split(&k)?, &split(&v)?, scale, SCORE_BUDGET)?;
    out.reshape((batch, heads, tokens, d))?.transpose(1, 2)?.contiguous()?.reshape((batch, tokens, width))
}

/// (batch, tokens, width) of q, once q, k and v are checked to fit `heads` heads and `repeat`
/// (row b / repeat of k and v serving query row b).
fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, repeat: usize) -> Result<(usize, usize, usize)> {
    let (batch, tokens, width) = q.dims3()?;
    let (kb, keys, kw) = k.dims3()?;
    if repeat == 0
        || kb * repeat != batch
        || kw != width
        || v.dims() != [kb, keys, width]
        || heads == 0
        || width % heads != 0
    {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} don't fit {heads} heads and repeat {repeat}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    Ok((batch, tokens, width))
}

/// Whether the CPU kernel runs (float32 on the CPU with AVX2/FMA).
fn fast(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    super::on_cpu(q.device()) && [q, k, v].iter().all(|t| t.dtype() == DType::F32) && avx2()
}

/// The CPU kernel on contiguous q, k and v.
fn run_op(q: &Tensor, k: &Tensor, v: &Tensor, op: MultiHeadAttention) -> Result<Tensor> {
    let c = super::copy::contiguous;
    c(q)?.apply_op3_no_bwd(&c(k)?, &c(v)?, &op)
}

/// [`multi_head_attention`] (self-attention, no repeat) within tokens [start, start + length)
/// of every row of q, k and v (batch, tokens, heads·d), for each start of `starts`: the windows'
/// outputs stacked along the batch, window i of row b at row i·batch + b of the
/// (starts·batch, length, heads·d) result. The same as narrowing all three per window and
/// concatenating, without the copies (the CPU kernel reads the windows in place and writes them
/// into one tensor). FreeNoise attends per window of frames.
#[allow(clippy::too_many_arguments)]
pub fn multi_head_attention_windows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    starts: &[usize],
    length: usize,
    values: ValueProduct,
) -> Result<Tensor> {
    let (_, tokens, _) = check_shapes(q, k, v, heads, 1)?;
    let last = starts.iter().copied().max();
    if last.is_none_or(|start| start + length > tokens) || length == 0 || k.dims() != q.dims() {
        candle_core::bail!(
            "attention windows of {length} tokens from {starts:?} don't fit q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if fast(q, k, v) {
        let windows = Some((starts.to_vec(), length));
        return run_op(q, k, v, MultiHeadAttention { heads, scale: scale as f32, repeat: 1, values, windows });
    }
    let outs = starts
        .iter()
        .map(|&start| {
            let part = |t: &Tensor| super::copy::contiguous(&t.narrow(1, start, length)?);
            multi_head_attention(&part(q)?, &part(k)?, &part(v)?, heads, scale, 1, values)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outs, 0)
}

/// softmax(q·kᵀ·scale)·v for (rows, tokens, head_dim) inputs with candle's ops, at most
/// `budget` scores computed at once.
pub fn attention_in_blocks(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, budget: usize) -> Result<Tensor> {
    let (rows, tokens, _) = q.dims3()?;
    let keys = k.dim(1)?;
    // The scale is applied to q (tokens × head_dim) rather than to the scores (tokens × keys):
    // the same product up to rounding, with far fewer multiplications.
    let q = (q * scale)?;
    let k_t = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let q_block = tokens.min((budget / keys).max(1));
    let row_block = rows.min((budget / (q_block * keys)).max(1));
    let mut row_outs = Vec::with_capacity(rows.div_ceil(row_block));
    for r in (0..rows).step_by(row_block) {
        let nr = row_block.min(rows - r);
        let (q_r, k_r, v_r) = (q.narrow(0, r, nr)?, k_t.narrow(0, r, nr)?, v.narrow(0, r, nr)?);
        let mut outs = Vec::with_capacity(tokens.div_ceil(q_block));
        for t in (0..tokens).step_by(q_block) {
            let nt = q_block.min(tokens - t);
            let scores = q_r.narrow(1, t, nt)?.matmul(&k_r)?;
            outs.push(candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v_r)?);
        }
        row_outs.push(if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(&outs, 1)? });
    }
    if row_outs.len() == 1 {
        Ok(row_outs.pop().unwrap())
    } else {
        Tensor::cat(&row_outs, 0)
    }
}
