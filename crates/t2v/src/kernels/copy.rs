//! Making a strided (permuted, narrowed) float32 tensor contiguous, in parallel. candle copies
//! strided tensors on one thread; the UNet moves its activations between the per-frame layout
//! (batch·frames, C, H, W) and the per-video one (batch, C, frames, H, W) dozens of times a
//! step, so those copies are worth spreading over every thread.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Contiguous;

/// `dims` and `strides` with the dimensions of size 1 dropped and each run of dimensions that
/// the source walks contiguously (a stride equal to the next dimension's extent × stride)
/// merged into one: the copy then moves rows as long as the layout allows (a permuted
/// (frames, C, H, W) activation moves H·W floats at a time, not W), and a transposition shows
/// as one pair of dimensions.
pub(crate) fn merged(dims: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut d, mut s): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (&n, &st) in dims.iter().zip(strides) {
        if n == 1 {
            continue;
        }
        match (d.last_mut(), s.last_mut()) {
            (Some(ld), Some(ls)) if *ls == n * st => {
                *ld *= n;
                *ls = st;
            }
            _ => {
                d.push(n);
                s.push(st);
            }
        }
    }
    if d.is_empty() {
        (vec![1], vec![1])
    } else {
        (d, s)
    }
}

/// The source offset of index `i` over `dims` (row-major) with `strides`, from `start`.
#[inline(always)]
pub(crate) fn offset_of(mut i: usize, dims: &[usize], strides: &[usize], start: usize) -> usize {
    let mut offset = start;
    for (&n, &st) in dims.iter().zip(strides).rev() {
        offset += (i % n) * st;
        i /= n;
    }
    offset
}

/// Side of the square tiles of a transposing copy: runs of 64 floats (four cache lines) on both
/// sides, the 16 KiB tile within L1. Measured on a 128-frame activation's moves into and out of
/// sequences of frames (`kernel_speed`'s "layout copy"): 16-float tiles ran at half the speed.
pub(crate) const TILE: usize = 64;

/// How a tiled transposition splits the dimension it reads contiguously (`len` long) among the
/// tasks of each of `outer` independent indices: (parts, floats a part) in whole tiles, enough
/// parts for every thread to get about four tasks.
pub(crate) fn tile_parts(outer: usize, len: usize) -> (usize, usize) {
    let parts = (4 * super::threads()).div_ceil(outer.max(1)).clamp(1, len.div_ceil(TILE).max(1));
    let part_len = len.div_ceil(parts).div_ceil(TILE) * TILE;
    (len.div_ceil(part_len.max(1)), part_len)
}

/// The copy where the output's last dimension is strided in the source but dimension `p` is
/// contiguous there: a batched transposition between `p` (A) and the last dimension (B), in
/// tiles of TILE × TILE so that reads and writes both move whole cache lines. A task takes one
/// outer index with as much of A as the threads allow and sweeps B tile by tile, each tile
/// sweeping its part of A: the pages of one (A, B) slice (a 128-frame activation puts every
/// pixel's or channel's row on a page of its own) are each visited once while the slice's
/// few hundred of them stay in the TLB, where element by element (or tile after tile along A
/// first) every read lands on a page not seen since.
fn transpose(src: &[f32], out: &mut [f32], dims: &[usize], strides: &[usize], start: usize, p: usize) {
    let rank = dims.len();
    let (a_len, b_len, b_stride) = (dims[p], dims[rank - 1], strides[rank - 1]);
    // the output is contiguous: dimension p's rows are this far apart there
    let a_out: usize = dims[p + 1..].iter().product();
    let outer_dims: Vec<usize> = (0..rank - 1).filter(|&d| d != p).map(|d| dims[d]).collect();
    let outer_src: Vec<usize> = (0..rank - 1).filter(|&d| d != p).map(|d| strides[d]).collect();
    let outer_out: Vec<usize> = (0..rank - 1).filter(|&d| d != p).map(|d| dims[d + 1..].iter().product()).collect();
    let outer: usize = outer_dims.iter().product();
    let (parts, part_len) = tile_parts(outer, a_len);
    let optr = super::SendPtr(out.as_mut_ptr());
    (0..outer * parts).into_par_iter().for_each(|task| {
        let (o, part) = (task / parts, task % parts);
        let (first, last) = (part * part_len, ((part + 1) * part_len).min(a_len));
        let so = offset_of(o, &outer_dims, &outer_src, start);
        let oo = offset_of(o, &outer_dims, &outer_out, 0);
        let mut tile = [0f32; TILE * TILE];
        for b0 in (0..b_len).step_by(TILE) {
            let b1 = (b0 + TILE).min(b_len);
            for a0 in (first..last).step_by(TILE) {
                let a1 = (a0 + TILE).min(last);
                for (i, b) in (b0..b1).enumerate() {
                    let row = so + b * b_stride;
                    for (j, &v) in src[row + a0..row + a1].iter().enumerate() {
                        tile[j * TILE + i] = v;
                    }
                }
                for (j, a) in (a0..a1).enumerate() {
                    // SAFETY: row a of this outer index, columns [b0, b1), lies within `out`,
                    // and only this task writes rows [first, last) of it.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            tile[j * TILE..].as_ptr(),
                            optr.get().add(oo + a * a_out + b0),
                            b1 - b0,
                        )
                    };
                }
            }
        }
    });
}

impl CustomOp1 for Contiguous {
    fn name(&self) -> &'static str {
        "contiguous"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = storage.as_slice::<f32>()?;
        let (dims, strides) = merged(layout.dims(), layout.stride());
        let start = layout.start_offset();
        let rank = dims.len();
        let inner = dims[rank - 1];
        let inner_stride = strides[rank - 1];
        // every element is copied in
        let mut out = super::output_buffer(layout.shape().elem_count());
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        if inner_stride != 1 {
            if let Some(p) = (0..rank - 1).rev().find(|&d| strides[d] == 1) {
                transpose(src, &mut out, &dims, &strides, start, p);
                return Ok((CpuStorage::F32(out), layout.shape().clone()));
            }
        }
        let (outer_dims, outer_strides) = (&dims[..rank - 1], &strides[..rank - 1]);
        out.par_chunks_mut(inner).with_min_len((4096 / inner).max(1)).enumerate().for_each(|(row, dst)| {
            let offset = offset_of(row, outer_dims, outer_strides, start);
            if inner_stride == 1 {
                dst.copy_from_slice(&src[offset..offset + inner]);
            } else {
                for (i, v) in dst.iter_mut().enumerate() {
                    *v = src[offset + i * inner_stride];
                }
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `x.contiguous()`, copying float32 CPU tensors on every thread.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    if super::on_cpu(x.device()) && x.dtype() == DType::F32 && x.rank() > 0 {
        return x.apply_op1_no_bwd(&Contiguous);
    }
    x.contiguous()
}

/// Nearest-neighbour up-sampling of a contiguous float32 (n, C, H, W) image to (oh, ow), on
/// every thread. candle's `upsample_nearest2d` walks every output pixel on one thread with its
/// source offset recomputed: the VAE decoder's three 2× up-samplings write 27 M floats a
/// 256×256 frame, about 0.25 s a frame there against a few milliseconds spread over rows.
struct UpsampleNearest {
    height: usize,
    width: usize,
}

/// The source index of each of `to` outputs along an axis of `from`: candle's (and torch's
/// `nearest`) `min(floor(i · from / to), from − 1)`, computed as candle does in f64 so that the
/// two paths pick the same pixels at every size.
fn nearest_indices(from: usize, to: usize) -> Vec<usize> {
    let scale = from as f64 / to as f64;
    (0..to).map(|i| ((i as f64 * scale) as usize).min(from - 1)).collect()
}

impl CustomOp1 for UpsampleNearest {
    fn name(&self) -> &'static str {
        "upsample-nearest"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = super::f32_of(storage, layout, "the image")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let (oh, ow) = (self.height, self.width);
        let shape = Shape::from((n, c, oh, ow));
        // every output row is written below
        let mut out = super::output_buffer(shape.elem_count());
        if out.is_empty() || h == 0 || w == 0 {
            return Ok((CpuStorage::F32(out), shape));
        }
        let (rows, cols) = (nearest_indices(h, oh), nearest_indices(w, ow));
        let doubled = ow == 2 * w;
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, dst)| {
            let src = &src[plane * h * w..(plane + 1) * h * w];
            for y in 0..oh {
                let (done, rest) = dst.split_at_mut(y * ow);
                let dst_row = &mut rest[..ow];
                // a row that repeats the one above (each row twice at 2×) is one copy
                if y > 0 && rows[y] == rows[y - 1] {
                    dst_row.copy_from_slice(&done[(y - 1) * ow..]);
                    continue;
                }
                let src_row = &src[rows[y] * w..(rows[y] + 1) * w];
                if doubled {
                    for (pair, &v) in dst_row.chunks_exact_mut(2).zip(src_row) {
                        pair[0] = v;
                        pair[1] = v;
                    }
                } else {
                    for (v, &x) in dst_row.iter_mut().zip(&cols) {
                        *v = src_row[x];
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), shape))
    }
}

/// `x.upsample_nearest2d(height, width)`: a contiguous float32 CPU image on every thread,
/// anything else through candle.
pub fn upsample_nearest2d(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    if super::on_cpu(x.device()) && x.dtype() == DType::F32 && x.rank() == 4 && x.is_contiguous() {
        return x.apply_op1_no_bwd(&UpsampleNearest { height, width });
    }
    x.upsample_nearest2d(height, width)
}

/// torch's `repeat_interleave(repeat, dim=0)` for a (batch, ...) tensor: each row `repeat`
/// times in a row.
pub fn repeat_interleave(xs: &Tensor, repeat: usize) -> Result<Tensor> {
    if repeat == 1 {
        return Ok(xs.clone());
    }
    let dims = xs.dims();
    let mut expanded = vec![dims[0], repeat];
    expanded.extend_from_slice(&dims[1..]);
    let mut flat = vec![dims[0] * repeat];
    flat.extend_from_slice(&dims[1..]);
    contiguous(&xs.unsqueeze(1)?.broadcast_as(expanded)?)?.reshape(flat)
}
