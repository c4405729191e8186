//! Convolutions as one matrix product over the unfolded input (im2col): each output pixel's
//! receptive field laid out as a row of Cin·taps values, multiplied by the weight read as
//! (Cout, Cin·taps) through the linear layers' packed product ([`crate::kernels::linear`]: streamed
//! from the weight's own float16 storage where there are no more rows than output channels, else
//! packed whole once), then written back channel-major.
//!
//! For the shapes where the other kernels starve (measured in `kernel_speed`, see
//! [`super::UnfoldedPays`]): planes of a few pixels (the UNet's 4×4 level, where the 1×1's
//! per-image products and the temporal Winograd's transformed weights cost more than the work
//! itself), and strided or padded kernels (the stride-2 downsamplers, which took candle's own
//! convolution before: 65–91 → 124–223 GFLOP/s at the UNet's levels, 34–58 → 106–148 in the VAE
//! encoder). Candle unfolds the same way, but the whole input at once and into its own, slower
//! product; here the unfolded copy is made one block of rows at a time (at most
//! [`BLOCK_FLOATS`]), so a long video's downsampler never holds a copy nine times its input. The
//! sums are the direct convolution's, in float32.

use rayon::prelude::*;

use crate::kernels::packed_matmul::Init;
use crate::kernels::{linear, output_buffer, SendPtr, Src};

/// The most floats of unfolded rows held at a time (32 MB).
const BLOCK_FLOATS: usize = 8 << 20;

/// Output channels written back per task (one cache line of a product row).
const CHANNELS_PER_TASK: usize = 16;

/// `out (G, n, P) = bias + A · Wᵀ`, where A has `rows` = G·P rows of `k` values, row `r` built
/// by `unfold(r, row)` (which writes all `k` values), and `w` holds `n` rows of `k` values: row
/// `r = g·P + q` of the product is pixel `q` of group `g` (an image, or a video's frames).
#[allow(clippy::too_many_arguments)]
pub(super) fn product(
    rows: usize,
    per_group: usize,
    k: usize,
    w: Src,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    unfold: impl Fn(usize, &mut [f32]) + Sync,
) {
    assert!(out.len() >= rows * n && per_group > 0 && rows.is_multiple_of(per_group), "unfolded convolution sizes");
    assert!(w.len() >= n * k && bias.is_none_or(|b| b.len() >= n), "unfolded convolution weight");
    if rows == 0 || n == 0 {
        return;
    }
    let block = (BLOCK_FLOATS / k.max(1)).clamp(1, rows);
    // one block: the form its rows call for; several: packed once for all of them
    let weight = linear::Weight::for_rows(w, n, k, if block == rows { rows } else { usize::MAX });
    let init = bias.map_or(Init::Overwrite, Init::Bias);
    // both buffers are written in full before they are read: every row by `unfold`, every
    // product tile by the product (which overwrites or starts from the bias)
    let mut a = output_buffer(block * k);
    let mut y = output_buffer(block * n);
    let optr = SendPtr(out.as_mut_ptr());
    for r0 in (0..rows).step_by(block) {
        let m = block.min(rows - r0);
        if k > 0 {
            a[..m * k].par_chunks_mut(k).enumerate().for_each(|(i, row)| unfold(r0 + i, row));
        }
        weight.multiply(&a[..m * k], m, &mut y[..m * n], init);
        let y = &y;
        (0..n.div_ceil(CHANNELS_PER_TASK)).into_par_iter().for_each(|t| {
            let channels = t * CHANNELS_PER_TASK..((t + 1) * CHANNELS_PER_TASK).min(n);
            for (i, yrow) in y[..m * n].chunks_exact(n).enumerate() {
                let (g, q) = ((r0 + i) / per_group, (r0 + i) % per_group);
                for co in channels.clone() {
                    // SAFETY: (g, co, q) is inside out (g < G, co < n, q < P); each task writes
                    // only its own channels.
                    unsafe { *optr.get().add((g * n + co) * per_group + q) = yrow[co] };
                }
            }
        });
    }
}

/// `conv2d` (groups 1, dilation 1) of `x` (N, Cin, H, W) with a `kh`×`kw` kernel, `stride` and
/// zero `padding` on every side, into `out` (N, Cout, OH, OW).
#[allow(clippy::too_many_arguments)]
pub(super) fn conv2d(
    x: &[f32],
    w: Src,
    bias: Option<&[f32]>,
    out: &mut [f32],
    n: usize,
    cin: usize,
    cout: usize,
    (h, wd): (usize, usize),
    (kh, kw): (usize, usize),
    stride: usize,
    padding: usize,
) {
    let (oh, ow) = (super::out_side(h, kh, stride, padding), super::out_side(wd, kw, stride, padding));
    let taps = kh * kw;
    product(n * oh * ow, oh * ow, cin * taps, w, cout, bias, out, |r, row| {
        let (img, pix) = (r / (oh * ow), r % (oh * ow));
        let (oy, ox) = ((pix / ow) * stride, (pix % ow) * stride);
        for (ci, field) in row.chunks_exact_mut(taps).enumerate() {
            let plane = &x[(img * cin + ci) * h * wd..][..h * wd];
            for (ky, line) in field.chunks_exact_mut(kw).enumerate() {
                // rows and columns of the padded input: inside the image from `padding` on
                let iy = (oy + ky).wrapping_sub(padding);
                for (kx, v) in line.iter_mut().enumerate() {
                    let ix = (ox + kx).wrapping_sub(padding);
                    *v = if iy < h && ix < wd { plane[iy * wd + ix] } else { 0.0 };
                }
            }
        }
    });
}

/// The temporal `Conv3d(k=(3,1,1), pad=(1,0,0))` of `x` (B, Cin, F, HW) into `out` (B, Cout, F,
/// HW): row (b, f, p) holds `x[b, ci, f + t − 1, p]` at `3·ci + t` (zero outside the frames).
#[allow(clippy::too_many_arguments)]
pub(super) fn temporal(
    x: &[f32],
    w: Src,
    bias: Option<&[f32]>,
    out: &mut [f32],
    b: usize,
    cin: usize,
    cout: usize,
    f: usize,
    hw: usize,
) {
    let fhw = f * hw;
    product(b * fhw, fhw, 3 * cin, w, cout, bias, out, |r, row| {
        let (bb, fr, p) = (r / fhw, (r % fhw) / hw, r % hw);
        for (ci, taps) in row.chunks_exact_mut(3).enumerate() {
            let channel = &x[(bb * cin + ci) * fhw..][..fhw];
            for (t, v) in taps.iter_mut().enumerate() {
                let at = (fr + t).wrapping_sub(1);
                *v = if at < f { channel[at * hw + p] } else { 0.0 };
            }
        }
    });
}
