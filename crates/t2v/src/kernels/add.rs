//! Residual additions of same-shaped float32 tensors, in parallel (candle adds on one thread;
//! every block of the UNet ends in one or more of these over its whole activation).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "residual-add"
    }

    fn cpu_fwd(&self, a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some((a0, a1)), Some((b0, b1))) = (la.contiguous_offsets(), lb.contiguous_offsets()) else {
            candle_core::bail!("residual-add needs contiguous inputs");
        };
        let (a, b) = (&a.as_slice::<f32>()?[a0..a1], &b.as_slice::<f32>()?[b0..b1]);
        // every element is written below
        let mut out = super::output_buffer(a.len());
        out.par_chunks_mut(1 << 14).zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14))).for_each(|(o, (a, b))| {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = x + y;
            }
        });
        Ok((CpuStorage::F32(out), la.shape().clone()))
    }
}

/// `a + b` for tensors of one shape; on every thread for contiguous float32 CPU tensors.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if super::on_cpu(a.device())
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.dims() == b.dims()
        && a.is_contiguous()
        && b.is_contiguous()
    {
        return a.apply_op2_no_bwd(b, &Add);
    }
    a + b
}

/// The float32 data of an in-place op's destination (written) and source (read), both
/// contiguous (`op` names the op in errors).
fn in_place_operands<'a>(
    dst: &'a mut CpuStorage,
    ld: &Layout,
    src: &'a CpuStorage,
    ls: &Layout,
    op: &str,
) -> Result<(&'a mut [f32], &'a [f32])> {
    let (Some((d0, d1)), Some((s0, s1))) = (ld.contiguous_offsets(), ls.contiguous_offsets()) else {
        candle_core::bail!("{op} needs contiguous tensors");
    };
    let CpuStorage::F32(dst) = dst else { candle_core::bail!("{op} needs float32 tensors") };
    Ok((&mut dst[d0..d1], &src.as_slice::<f32>()?[s0..s1]))
}

/// `parts[i·n + s, j] += xs[s, starts[i] + j]`: each window of frames of `xs` (n, frames, C)
/// added to its place in `parts` (windows·n, L, C), where the windows' outputs are stacked.
struct AddWindows<'a> {
    starts: &'a [usize],
}

impl candle_core::InplaceOp2 for AddWindows<'_> {
    fn name(&self) -> &'static str {
        "add-windows"
    }

    fn cpu_fwd(&self, parts: &mut CpuStorage, lp: &Layout, xs: &CpuStorage, lx: &Layout) -> Result<()> {
        let (parts, xs) = in_place_operands(parts, lp, xs, lx, "add-windows")?;
        let (_, length, c) = lp.shape().dims3()?;
        let (n, frames, _) = lx.shape().dims3()?;
        parts.par_chunks_mut(length * c).enumerate().for_each(|(row, part)| {
            let (start, s) = (self.starts[row / n], row % n);
            let x = &xs[(s * frames + start) * c..][..length * c];
            for (p, &v) in part.iter_mut().zip(x) {
                *p += v;
            }
        });
        Ok(())
    }
}

/// `parts[i·n + s, j] += xs[s, starts[i] + j]` for parts (starts·n, L, C) and xs (n, frames, C):
/// the residual of FreeNoise's windows stacked along the sequences, added in place (the same
/// sums as adding the narrowed windows of `xs`, without copying them out first).
pub fn add_windows(parts: &Tensor, xs: &Tensor, starts: &[usize]) -> Result<()> {
    let (rows, length, c) = parts.dims3()?;
    let (n, frames, xc) = xs.dims3()?;
    if rows != starts.len() * n || xc != c || starts.iter().any(|&s| s + length > frames) {
        candle_core::bail!(
            "windows of {length} frames from {starts:?}: parts {:?} don't fit {:?}",
            parts.dims(),
            xs.dims()
        );
    }
    if super::on_cpu(parts.device())
        && parts.dtype() == DType::F32
        && xs.dtype() == DType::F32
        && parts.is_contiguous()
        && xs.is_contiguous()
    {
        return parts.inplace_op2(xs, &AddWindows { starts });
    }
    for (i, &start) in starts.iter().enumerate() {
        let sum = (parts.narrow(0, i * n, n)? + xs.narrow(1, start, length)?)?;
        parts.slice_set(&sum.contiguous()?, 0, i * n)?;
    }
    Ok(())
}

/// `acc[:, start + j] += part[:, j] · weights[j]` for j in [skip, L): FreeNoise's weighted sum of
/// one window's output into the per-frame sums, as diffusers' `accumulated_values[:, a:b] +=
/// chunk * weights` (the product rounded, then added: no fused multiply-add).
struct AccumulateWindow<'a> {
    start: usize,
    skip: usize,
    weights: &'a [f32],
}

impl candle_core::InplaceOp2 for AccumulateWindow<'_> {
    fn name(&self) -> &'static str {
        "accumulate-window"
    }

    fn cpu_fwd(&self, acc: &mut CpuStorage, la: &Layout, part: &CpuStorage, lp: &Layout) -> Result<()> {
        let (acc, part) = in_place_operands(acc, la, part, lp, "accumulate-window")?;
        let (n, frames, c) = la.shape().dims3()?;
        let length = self.weights.len();
        let (start, skip, weights) = (self.start, self.skip, self.weights);
        acc.par_chunks_mut(frames * c).zip(part.par_chunks(length * c)).with_min_len(n.div_ceil(64).max(1)).for_each(
            |(acc, part)| {
                for (j, &w) in weights.iter().enumerate().skip(skip) {
                    let dst = &mut acc[(start + j) * c..(start + j + 1) * c];
                    for (a, &x) in dst.iter_mut().zip(&part[j * c..(j + 1) * c]) {
                        *a += x * w;
                    }
                }
            },
        );
        Ok(())
    }
}

/// Adds window `part` (sequences, L, C), weighted per frame by `weights` (L of them), into
/// `acc` (sequences, frames, C) at frames [start + skip, start + L): in place on contiguous
/// float32 CPU tensors, else with candle's ops and `slice_set`. Frames before `skip` are left out
/// (the reference's tail window adds only the frames no earlier window reached).
pub fn accumulate_window(acc: &Tensor, part: &Tensor, start: usize, skip: usize, weights: &[f32]) -> Result<()> {
    let (n, frames, c) = acc.dims3()?;
    let length = weights.len();
    if part.dims() != [n, length, c] || start + length > frames || skip > length {
        candle_core::bail!(
            "window of {length} frames from {start} (skip {skip}): part {:?} doesn't fit sums {:?}",
            part.dims(),
            acc.dims()
        );
    }
    if super::on_cpu(acc.device())
        && acc.dtype() == DType::F32
        && part.dtype() == DType::F32
        && acc.is_contiguous()
        && part.is_contiguous()
    {
        return acc.inplace_op2(part, &AccumulateWindow { start, skip, weights });
    }
    let l = length - skip;
    let w = Tensor::from_slice(&weights[skip..], (1, l, 1), acc.device())?.to_dtype(part.dtype())?;
    let sum = (acc.narrow(1, start + skip, l)? + part.narrow(1, skip, l)?.broadcast_mul(&w)?)?;
    acc.slice_set(&sum.contiguous()?, 1, start + skip)
}

/// `out[b, f, c, start + p] = seq[b, p, f, c] + xs[b, f, c, start + p]`: see
/// [`add_from_sequences`].
struct AddFromSequences {
    start: usize,
}

impl candle_core::InplaceOp3 for AddFromSequences {
    fn name(&self) -> &'static str {
        "add-from-sequences"
    }

    fn cpu_fwd(
        &self,
        out: &mut CpuStorage,
        lo: &Layout,
        seq: &CpuStorage,
        ls: &Layout,
        xs: &CpuStorage,
        lx: &Layout,
    ) -> Result<()> {
        let (out, seq) = in_place_operands(out, lo, seq, ls, "add-from-sequences")?;
        let Some((x0, x1)) = lx.contiguous_offsets() else {
            candle_core::bail!("add-from-sequences needs contiguous tensors");
        };
        let xs = &xs.as_slice::<f32>()?[x0..x1];
        let (batch, frames, c, n) = lo.shape().dims4()?;
        let pixels = ls.shape().dims4()?.1;
        let start = self.start;
        // Per (video, frame): a transposition of its (pixels, C) block of `seq` into C rows of
        // `out`, in the square tiles of the layout copies (whole cache lines read and written),
        // each written element the tile's value plus the residual's. Tasks split C where there
        // are few (video, frame) pairs, so that every thread has work.
        const TILE: usize = super::copy::TILE;
        let (parts, part_len) = super::copy::tile_parts(batch * frames, c);
        let optr = super::SendPtr(out.as_mut_ptr());
        (0..batch * frames * parts).into_par_iter().for_each(|task| {
            let (bf, part) = (task / parts, task % parts);
            let (b, f) = (bf / frames, bf % frames);
            let (first, last) = (part * part_len, ((part + 1) * part_len).min(c));
            let mut tile = [0f32; TILE * TILE];
            for p0 in (0..pixels).step_by(TILE) {
                let p1 = (p0 + TILE).min(pixels);
                for c0 in (first..last).step_by(TILE) {
                    let c1 = (c0 + TILE).min(last);
                    for (i, p) in (p0..p1).enumerate() {
                        let row = ((b * pixels + p) * frames + f) * c;
                        for (j, &v) in seq[row + c0..row + c1].iter().enumerate() {
                            tile[j * TILE + i] = v;
                        }
                    }
                    for (j, ch) in (c0..c1).enumerate() {
                        let at = (bf * c + ch) * n + start + p0;
                        let residual = &xs[at..at + (p1 - p0)];
                        // SAFETY: `at..at + (p1 - p0)` lies within `out` (same shape as `xs`),
                        // and only this task writes channels [first, last) of (b, f).
                        let dst = unsafe { std::slice::from_raw_parts_mut(optr.get().add(at), p1 - p0) };
                        for ((d, &t), &x) in dst.iter_mut().zip(&tile[j * TILE..]).zip(residual) {
                            *d = t + x;
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

/// `out[b, f, c, start + p] = seq[b, p, f, c] + xs[b, f, c, start + p]` in place, for `out` and
/// `xs` (batch, frames, C, pixels) and `seq` (batch, P, frames, C): a temporal transformer's
/// sequences of frames (one per pixel, P pixels from `start` on) moved back to the video layout
/// with the residual added, in one pass, where a transposing copy, a copy of the residual's
/// part, the add and a copy into place would make four. The same sums as adding the copies.
pub fn add_from_sequences(out: &Tensor, seq: &Tensor, xs: &Tensor, start: usize) -> Result<()> {
    let (batch, frames, c, n) = out.dims4()?;
    let (sb, pixels, sf, sc) = seq.dims4()?;
    if xs.dims() != out.dims() || (sb, sf, sc) != (batch, frames, c) || start + pixels > n {
        candle_core::bail!(
            "add-from-sequences: pixels {start}..{} of {:?} from sequences {:?} and residual {:?}",
            start + pixels,
            out.dims(),
            seq.dims(),
            xs.dims()
        );
    }
    if super::on_cpu(out.device()) && [out, seq, xs].iter().all(|t| t.dtype() == DType::F32 && t.is_contiguous()) {
        return out.inplace_op3(seq, xs, &AddFromSequences { start });
    }
    let sum = (seq.permute((0, 2, 3, 1))? + xs.narrow(3, start, pixels)?)?;
    out.slice_set(&sum.contiguous()?, 3, start)
}

/// Where the rows of each (image, channel) plane of a 4-D float32 view lie: the plane's first
/// float and the step between rows (each row `W` contiguous floats).
struct PlaneRows {
    start: usize,
    image: usize,
    channel: usize,
    row: usize,
}

impl PlaneRows {
    fn of(l: &Layout, op: &str) -> Result<Self> {
        let s = l.stride();
        if l.dims().len() != 4 || (s[3] != 1 && l.dims()[3] > 1) {
            candle_core::bail!("{op} needs 4-D tensors with contiguous rows");
        }
        Ok(Self { start: l.start_offset(), image: s[0], channel: s[1], row: s[2] })
    }

    fn at(&self, image: usize, channel: usize, row: usize) -> usize {
        self.start + image * self.image + channel * self.channel + row * self.row
    }
}

/// `dst[:, :, offset + r, :] = rows[:, :, r, :] (+ residual[:, :, r, :])`: one band of a
/// convolution's output rows, and its residual, written into place in one pass.
struct SetRows {
    offset: usize,
}

impl SetRows {
    fn run(&self, dst: &mut CpuStorage, ld: &Layout, parts: &[(&CpuStorage, &Layout)]) -> Result<()> {
        let Some((d0, d1)) = ld.contiguous_offsets() else {
            candle_core::bail!("set-rows needs a contiguous destination");
        };
        let CpuStorage::F32(dst) = dst else { candle_core::bail!("set-rows needs float32 tensors") };
        let (_, c, height, w) = ld.shape().dims4()?;
        let (_, _, rows, _) = parts[0].1.shape().dims4()?;
        let sources = parts
            .iter()
            .map(|(s, l)| Ok((s.as_slice::<f32>()?, PlaneRows::of(l, "set-rows")?)))
            .collect::<Result<Vec<_>>>()?;
        let offset = self.offset;
        dst[d0..d1].par_chunks_mut(height * w).enumerate().for_each(|(plane, dst)| {
            let (image, ch) = (plane / c, plane % c);
            for (r, d) in dst[offset * w..(offset + rows) * w].chunks_mut(w).enumerate() {
                let (s, at) = (&sources[0].0, sources[0].1.at(image, ch, r));
                d.copy_from_slice(&s[at..at + w]);
                if let Some((s, p)) = sources.get(1) {
                    let at = p.at(image, ch, r);
                    for (d, &v) in d.iter_mut().zip(&s[at..at + w]) {
                        *d += v;
                    }
                }
            }
        });
        Ok(())
    }
}

impl candle_core::InplaceOp2 for SetRows {
    fn name(&self) -> &'static str {
        "set-rows"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, ld: &Layout, rows: &CpuStorage, lr: &Layout) -> Result<()> {
        self.run(dst, ld, &[(rows, lr)])
    }
}

impl candle_core::InplaceOp3 for SetRows {
    fn name(&self) -> &'static str {
        "set-rows-add"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        ld: &Layout,
        rows: &CpuStorage,
        lr: &Layout,
        residual: &CpuStorage,
        lx: &Layout,
    ) -> Result<()> {
        self.run(dst, ld, &[(rows, lr), (residual, lx)])
    }
}

/// `dst[:, :, offset..offset + R, :] = rows (+ residual)` in place, for `dst` (n, C, H, W)
/// contiguous and `rows`, `residual` (n, C, R, W) views with contiguous rows (narrowed bands):
/// one copy, where making the band contiguous, adding and `slice_set` make three. The same
/// sums as adding first.
pub fn set_rows(dst: &Tensor, offset: usize, rows: &Tensor, residual: Option<&Tensor>) -> Result<()> {
    let (n, c, height, w) = dst.dims4()?;
    let (rn, rc, r, rw) = rows.dims4()?;
    if (rn, rc, rw) != (n, c, w) || offset + r > height || residual.is_some_and(|x| x.dims() != rows.dims()) {
        candle_core::bail!(
            "set-rows: rows {:?} (residual {:?}) at row {offset} of {:?}",
            rows.dims(),
            residual.map(|x| x.dims()),
            dst.dims()
        );
    }
    let fits = |t: &Tensor| t.dtype() == DType::F32 && (t.stride()[3] == 1 || w == 1);
    if super::on_cpu(dst.device()) && dst.is_contiguous() && fits(dst) && fits(rows) && residual.is_none_or(fits) {
        let op = SetRows { offset };
        return match residual {
            Some(x) => dst.inplace_op3(rows, x, &op),
            None => dst.inplace_op2(rows, &op),
        };
    }
    let band = match residual {
        Some(x) => (rows + x)?,
        None => rows.clone(),
    };
    dst.slice_set(&band.contiguous()?, 2, offset)
}
