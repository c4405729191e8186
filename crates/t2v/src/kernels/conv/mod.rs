//! Fast, exact float32 CPU convolutions for the shapes of the ModelScope text-to-video UNet and
//! the VAE decoder, behind candle's custom-op interface. Our own because candle's CPU convolution
//! unfolds the input (im2col, 9× its size for 3×3) and multiplies directly, where Winograd needs
//! a quarter of the multiplications and no unfolded copy. This file chooses the kernel and wraps
//! it as a custom op; the kernels are in `winograd.rs` and `gemm_based.rs`.
//!
//! * 3×3, stride 1, padding 1 (the bulk of the work, `winograd.rs`): Winograd F(4×4, 3×3) with interpolation
//!   points {0, 1, −1, ½, −2, ∞} (more accurate in f32 than the usual {0, ±1, ±2}), a hand-written
//!   AVX2+FMA 6×16 GEMM micro-kernel over the 36 transformed planes, and channel sums split into
//!   blocks of 128 input channels (each block summed from zero, then added) so that the error
//!   stays a few 1e-6 of the output's magnitude (measured against a float64 direct convolution
//!   in `tests/conv.rs`; candle's direct f32 convolution: ~5e-7). Weights are transformed per
//!   call, per block of output channels, inside the parallel tasks (no 4×-sized copy of all the
//!   weights). Needs AVX2+FMA+F16C at run time (checked once); otherwise candle's convolution.
//! * 1×1, stride 1, padding 0 (`gemm_based.rs`): one GEMM per image (the `gemm` crate, as
//!   candle's matmul, or our packed product on the AVX-512 path).
//! * Every other kernel, stride and padding (the stride-2 downsamplers), and the 1×1 and temporal
//!   convolutions of few pixels (`UnfoldedPays`): one product over the unfolded input
//!   (`unfolded.rs`) through the linear layers' packed product, on the paths that have it.
//! * The temporal `Conv3d(k=(3,1,1), pad=(1,0,0))` of the UNet's temporal layers
//!   ([`temporal_conv3`], `gemm_based.rs`): 1-D Winograd F(4, 3) along frames (six GEMMs with half the
//!   multiplications; error ~1e-6) for F ≥ 3 — with float32 products at 256 bits fused as the
//!   3×3 kernel runs (`winograd.rs`: transforms beside the micro-kernel, for frames of at least
//!   16 pixels) — else three accumulated GEMMs over frame-shifted views of the input (no padded
//!   or im2col copy), or the unfolded product where the rows are few.
//!
//! Memory: the 3×3 and fused temporal kernels keep a transformed-input buffer (≤ 32 MB) between
//! calls, and each rayon thread a weight/product scratch (at most ~6 MB of transformed weights
//! and ~1 MB of products).
//!
//! Every entry point falls back to candle's own ops for devices other than the CPU, dtypes other
//! than f32 activations with f32/f16 weights, and shapes the kernels don't cover; weights may be
//! f16 (widened exactly to f32 inside the kernel, so the result equals the f32-weight result).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{f32_of, src_of};

mod gemm_based;
mod unfolded;
#[cfg(target_arch = "x86_64")]
mod winograd;

/// `conv2d` on NCHW `x` (groups 1, dilation 1) with `weight` (Cout, Cin, K, K) and an optional
/// `bias` (Cout). On the CPU, with f32 `x` and f32/f16/bf16 weights, it runs the kernels of this
/// module (Winograd for 3×3 stride 1 padding 1, per-image products for 1×1, the unfolded product
/// for the rest where the packed product runs); otherwise candle's `Tensor::conv2d` (+ a broadcast
/// bias add).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_with(x, weight, bias, stride, padding, ConvAlgo::Auto)
}

/// Which algorithm [`conv2d_with`] uses on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAlgo {
    /// Winograd for 3×3 (stride 1, padding 1) and per-image products for 1×1, except where the
    /// unfolded product measured faster (`UnfoldedPays`); the unfolded product for any other
    /// kernel, stride or padding (on the packed-product paths; candle's convolution elsewhere).
    Auto,
    /// One product over the unfolded input (im2col) through the linear layers' packed product.
    Unfolded,
    /// candle's own convolution ([`conv2d_fallback`]).
    Candle,
    /// Winograd F(4×4, 3×3) in float32 (3×3, stride 1, padding 1, on the x86-64 paths).
    Winograd,
    /// The direct 3×3 convolution on AMX tiles for bfloat16 weights (stride 1, padding 1, output
    /// channels a multiple of 16 and rows of a multiple of 16 pixels, on the `amx` path).
    Tiles,
}

/// [`conv2d`] with a chosen CPU algorithm (for tests and benchmarks).
pub fn conv2d_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    algo: ConvAlgo,
) -> Result<Tensor> {
    let kind = match algo {
        ConvAlgo::Candle => None,
        ConvAlgo::Auto => fast_kind(x, weight, bias, stride, padding)?,
        ConvAlgo::Unfolded => {
            let kind = fast_kind(x, weight, bias, stride, padding)?.map(|_| Kind::Unfolded);
            if (kind.is_none() || !super::packed_product()) && super::on_cpu(x.device()) {
                bail!("conv2d: no unfolded product for input {:?}, weight {:?} on this path", x.dims(), weight.dims());
            }
            kind
        }
        ConvAlgo::Winograd | ConvAlgo::Tiles => {
            let want = if algo == ConvAlgo::Winograd { Kind::Wino3x3 } else { Kind::Tiles };
            let kind = fast_kind_with(x, weight, bias, stride, padding, Some(want))?;
            if kind != Some(want) {
                bail!("conv2d: no {algo:?} kernel for input {:?}, weight {:?} on this path", x.dims(), weight.dims());
            }
            kind
        }
    };
    if let Some(kind) = kind {
        let x = super::copy::contiguous(x)?;
        let weight = weight.contiguous()?;
        let op = ConvOp { kind, has_bias: bias.is_some(), stride, padding };
        return match bias {
            Some(b) => x.apply_op3_no_bwd(&weight, &b.contiguous()?, &op),
            None => x.apply_op2_no_bwd(&weight, &op),
        };
    }
    conv2d_fallback(x, weight, bias, stride, padding)
}

/// candle's own convolution (what [`conv2d`] falls back to).
pub fn conv2d_fallback(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let weight = if weight.dtype() != x.dtype() { weight.to_dtype(x.dtype())? } else { weight.clone() };
    let y = x.conv2d(&weight, padding, stride, 1, 1)?;
    match bias {
        Some(b) => {
            let b = if b.dtype() != y.dtype() { b.to_dtype(y.dtype())? } else { b.clone() };
            y.broadcast_add(&b.reshape((1, (), 1, 1))?)
        }
        None => Ok(y),
    }
}

/// `nn.Conv3d(Cin, Cout, kernel_size=(3, 1, 1), padding=(1, 0, 0))` on `x` (B, Cin, F, H, W):
/// `y[b, :, f] = bias + Σ_k W_k · x[b, :, f + k − 1]` (frames outside [0, F) are zero).
/// `weight` is (Cout, Cin, 3, 1, 1), (Cout, Cin, 3, 1) or (Cout, Cin, 3), f32 or f16.
pub fn temporal_conv3(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    temporal_conv3_with(x, weight, bias, TemporalAlgo::Auto)
}

/// Which algorithm [`temporal_conv3_with`] uses on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemporalAlgo {
    /// The stacked 1×1 form for F ≤ 2; Winograd when F ≥ 3 and either its fused form runs
    /// (float32 products at 256 bits, frames of at least 16 pixels) or, elsewhere on the
    /// 256-bit path, there are enough columns (B·F·H·W ≥ 512); else direct (or the unfolded
    /// product or the tiles where they pay).
    Auto,
    /// Three accumulated GEMMs over frame-shifted views.
    Direct,
    /// 1-D Winograd F(4, 3) along frames: six GEMMs with half the multiplications of Direct.
    Winograd,
    /// One product over the input unfolded to rows of (channel, tap), through the linear layers'
    /// packed product (the packed-product paths only).
    Unfolded,
    /// Directly on AMX tiles, as a 3×1 kernel over images of frames × pixels
    /// ([`super::amx::conv_direct`]; bfloat16 weights, frames of whole 16-pixel groups).
    Tiles,
    /// One 1×1 convolution over (channel, frame) rows with a block weight (`F²` blocks of taps
    /// and zeros): taken for F ≤ 2, where every block is a tap.
    Stacked,
}

/// The fewest columns (B·F·H·W) for which [`TemporalAlgo::Auto`] takes Winograd. Measured with
/// `kernel_speed vae <path> temporal` (16 frames, the UNet's four levels, with and without
/// guidance; Emerald Rapids): on the 512-bit path Winograd was faster at every shape, down to
/// 256 columns (1280 channels at 4², 1.5×); on the 256-bit path (the `gemm` crate) from 512
/// columns on, and 0.9× of the direct form at 256. (The fused form, [`FUSED_MIN_PIXELS`], is
/// chosen before this is asked.)
fn winograd_min_columns() -> usize {
    if super::wide(super::KernelKind::TemporalConv) {
        1
    } else {
        512
    }
}

/// The fewest pixels a frame for which [`TemporalAlgo::Auto`] takes the fused Winograd form
/// ([`gemm_based::temporal_fused`]: its columns are groups of 16 pixels of one frame tile, so
/// smaller frames leave most of each group empty). Measured on the AVX2 path (Emerald Rapids,
/// 1280 channels, ms a call, Winograd / unfolded / direct): 4×4 frames, 4 frames under guidance
/// 6.0 / 10.3 / 14.8, without 3.7 / 4.6 / 7.8, 16 frames 10.0 / 17.2 / 21.2; 2×2 frames
/// 5.7 / 2.7 / 6.1.
const FUSED_MIN_PIXELS: usize = 16;

/// [`temporal_conv3`] with a chosen CPU algorithm (for tests and benchmarks).
pub fn temporal_conv3_with(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, algo: TemporalAlgo) -> Result<Tensor> {
    let (b, cin, f, h, w) = x.dims5()?;
    let cout = weight.dim(0)?;
    let wdims = weight.dims();
    if wdims.len() < 3 || wdims[1] != cin || wdims[2] != 3 || wdims[3..].iter().any(|&d| d != 1) {
        bail!("temporal_conv3: weight {:?} doesn't fit input {:?}", wdims, x.dims());
    }
    let weight = weight.reshape((cout, cin, 3))?;
    if super::on_cpu(x.device())
        && x.dtype() == DType::F32
        && matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && bias.is_none_or(|b| matches!(b.dtype(), DType::F32 | DType::F16 | DType::BF16) && b.dims() == [cout])
    {
        let x = super::copy::contiguous(x)?;
        let weight = weight.contiguous()?;
        let op = TemporalOp { has_bias: bias.is_some(), algo };
        return match bias {
            Some(bb) => x.apply_op3_no_bwd(&weight, &bb.contiguous()?, &op),
            None => x.apply_op2_no_bwd(&weight, &op),
        };
    }
    temporal_conv3_fallback(&x.reshape((b, cin, f, h, w))?, &weight, bias)
}

/// candle's own ops for [`temporal_conv3`] (what it falls back to): conv2d with a (3, 1) kernel over
/// frames padded with a zero frame at each end, as torch's Conv3d pads.
pub fn temporal_conv3_fallback(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, f, h, w) = x.dims5()?;
    let cout = weight.dim(0)?;
    let weight = weight.reshape((cout, c, 3, 1))?;
    let weight = if weight.dtype() != x.dtype() { weight.to_dtype(x.dtype())? } else { weight };
    let padded = x.reshape((b, c, f, h * w))?.pad_with_zeros(2, 1, 1)?;
    let out = padded.conv2d(&weight, 0, 1, 1, 1)?;
    let out = match bias {
        Some(bb) => {
            let bb = if bb.dtype() != out.dtype() { bb.to_dtype(out.dtype())? } else { bb.clone() };
            out.broadcast_add(&bb.reshape((1, cout, 1, 1))?)?
        }
        None => out,
    };
    out.reshape((b, cout, f, h, w))
}

/// A temporal convolution's bfloat16 weights prepared once, at load, as the AMX tiles' direct
/// kernel reads them ([`super::amx::conv_direct`]), in place of the tensor: on the `amx` path
/// the weights were laid out as tiles on every call (`perf`: 3.7% of a 4-frame guided step).
/// The same sums as [`temporal_conv3`] with the tensor, so the same bits; where the tiles do not
/// take a call (another path, frames of pixels not in 16s) the tensor is remade from them.
pub struct TemporalTiles {
    #[cfg(target_arch = "x86_64")]
    tiles: super::amx::ConvTiles,
}

impl std::fmt::Debug for TemporalTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemporalTiles").finish_non_exhaustive()
    }
}

impl TemporalTiles {
    /// The tiles of `weight` ((cout, cin, 3) with any trailing unit dimensions) where the
    /// tiles' kernel would take it: bfloat16 on the CPU's `amx` path, output channels in 16s;
    /// `None` elsewhere (keep the tensor).
    pub fn resident(weight: &Tensor) -> Result<Option<TemporalTiles>> {
        let dims = weight.dims();
        if weight.dtype() != DType::BF16 || !super::on_cpu(weight.device()) || dims.len() < 3 || dims[2] != 3 {
            return Ok(None);
        }
        let (cout, cin) = (dims[0], dims[1]);
        // (frames of one 16-pixel group stand for any: what is left is the path and cout)
        if !direct_on_tiles(true, cout, 16) || dims[3..].iter().any(|&d| d != 1) {
            return Ok(None);
        }
        #[cfg(target_arch = "x86_64")]
        {
            let w: Vec<half::bf16> = weight.flatten_all()?.to_vec1()?;
            Ok(Some(TemporalTiles { tiles: super::amx::ConvTiles::new(&w, cin, cout, 3) }))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (cout, cin);
            Ok(None)
        }
    }

    /// The weight as a tensor again (cout, cin, 3), bfloat16, on the CPU.
    pub fn weight(&self) -> Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
        {
            let (cout, cin, taps) = self.tiles.dims();
            Tensor::from_vec(self.tiles.weights(), (cout, cin, taps), &candle_core::Device::Cpu)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("temporal tiles are made on x86-64 only")
    }
}

/// [`temporal_conv3`] with weights prepared at load ([`TemporalTiles`]).
pub fn temporal_conv3_tiles(x: &Tensor, weight: &TemporalTiles, bias: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    {
        let (cout, cin, _) = weight.tiles.dims();
        if let Ok((_, xc, f, h, w)) = x.dims5() {
            let bias_fits =
                bias.is_none_or(|b| matches!(b.dtype(), DType::F32 | DType::F16 | DType::BF16) && b.dims() == [cout]);
            if super::on_cpu(x.device())
                && x.dtype() == DType::F32
                && xc == cin
                && bias_fits
                && direct_on_tiles(true, cout, h * w)
                && f > 0
            {
                let x = super::copy::contiguous(x)?;
                let op = TemporalTilesOp(weight);
                return match bias {
                    Some(b) => x.apply_op2_no_bwd(&b.contiguous()?, &op),
                    None => x.apply_op1_no_bwd(&op),
                };
            }
        }
    }
    temporal_conv3(x, &weight.weight()?.to_device(x.device())?, bias)
}

/// The temporal convolution on the tiles with prepared weights (x, and the bias where there is one).
#[cfg(target_arch = "x86_64")]
struct TemporalTilesOp<'a>(&'a TemporalTiles);

#[cfg(target_arch = "x86_64")]
impl TemporalTilesOp<'_> {
    fn run(&self, xs: &CpuStorage, xl: &Layout, bias: Option<Vec<f32>>) -> Result<(CpuStorage, Shape)> {
        let x = f32_of(xs, xl, "conv input")?;
        let (b, cin, f, h, wd) = xl.shape().dims5()?;
        let (cout, wcin, _) = self.0.tiles.dims();
        if wcin != cin || !direct_on_tiles(true, cout, h * wd) {
            bail!("t2v temporal conv: prepared weights for {wcin} channels don't fit input {:?}", xl.shape());
        }
        let mut out = super::output_buffer(b * cout * f * h * wd);
        // SAFETY: AMX and the sizes checked (direct_on_tiles, the tiles' own dims); the
        // operands' sizes are the layouts' (candle's shapes).
        unsafe {
            super::amx::conv_direct(x, &self.0.tiles, bias.as_deref(), &mut out, b, (f, h * wd), (3, 1));
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, f, h, wd))))
    }
}

#[cfg(target_arch = "x86_64")]
impl candle_core::CustomOp1 for TemporalTilesOp<'_> {
    fn name(&self) -> &'static str {
        "t2v-temporal-conv3-tiles"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s1, l1, None)
    }
}

#[cfg(target_arch = "x86_64")]
impl CustomOp2 for TemporalTilesOp<'_> {
    fn name(&self) -> &'static str {
        "t2v-temporal-conv3-tiles"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s1, l1, Some(bias_vec(s2, l2)?))
    }
}

// The custom ops: which kernel a call takes, and the checks on its operands.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Wino3x3,
    /// [`super::amx::conv_direct`] with a 3×3 kernel.
    Tiles,
    Pointwise,
    Unfolded,
}

fn fast_kind(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Option<Kind>> {
    fast_kind_with(x, weight, bias, stride, padding, None)
}

/// The kernel for these operands: the automatic choice, or for a 3×3 `want`ed by name, that
/// one where it applies.
fn fast_kind_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    want: Option<Kind>,
) -> Result<Option<Kind>> {
    if !super::on_cpu(x.device()) || x.dtype() != DType::F32 || x.rank() != 4 || weight.rank() != 4 {
        return Ok(None);
    }
    if !matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Ok(None);
    }
    let (images, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if wcin != cin || cout == 0 || cin == 0 || h == 0 || w == 0 {
        return Ok(None);
    }
    if let Some(b) = bias {
        if !matches!(b.dtype(), DType::F32 | DType::F16 | DType::BF16) || b.dims() != [cout] {
            return Ok(None);
        }
    }
    if stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
        return Ok(None);
    }
    let pixels = out_side(h, kh, stride, padding) * out_side(w, kw, stride, padding);
    let unfolded = super::packed_product();
    let three = kh == 3 && kw == 3 && stride == 1 && padding == 1;
    let one = kh == 1 && kw == 1 && stride == 1 && padding == 0;
    let bf16 = weight.dtype() == DType::BF16;
    let tiles = three && direct_on_tiles(bf16, cout, w) && want != Some(Kind::Wino3x3);
    let regular = if tiles {
        Some(Kind::Tiles)
    } else if three && super::avx2() {
        Some(Kind::Wino3x3)
    } else if one {
        Some(Kind::Pointwise)
    } else {
        None
    };
    Ok(match regular {
        Some(Kind::Pointwise) if unfolded && UnfoldedPays::Pointwise { pixels }.holds(cout) => Some(Kind::Unfolded),
        Some(Kind::Wino3x3)
            if unfolded
                && want.is_none()
                && UnfoldedPays::Plane3x3 { pixels, rows: images * pixels, tiles: bf16_on_tiles(bf16) }.holds(cout) =>
        {
            Some(Kind::Unfolded)
        }
        Some(kind) => Some(kind),
        None if unfolded => Some(Kind::Unfolded),
        None => None,
    })
}

/// The side of a convolution's output.
fn out_side(side: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (side + 2 * padding - kernel) / stride + 1
}

/// Where the unfolded product ([`unfolded`]) beats the per-image products of a 1×1 convolution
/// and the Winograd temporal one: where the rows are few beside the weight, which the unfolded
/// product streams once from its float16 storage while the others transform or pack it first.
/// `kernel_speed`, Emerald Rapids, float16 weights, 1280 channels at the UNet's 4×4 level,
/// GFLOP/s, other → unfolded:
///
/// * 1×1 with 8 images (4 frames under guidance) 74–188 → 158–210, with 32 images 139 → 211; at
///   8×8 level (208 against 219). Judged per image (`pixels` of one output image), so that a
///   layer run on chunks of frames takes the same kernel, and the same sums, for every chunk size.
/// * Temporal, 2×4 frames (128 rows) 98 → 250 (256-bit path 77 → 110); 2×16 frames (512 rows)
///   241 → 253, level; at 8×8 with 16 frames 338 → 202. Judged by all the rows: the temporal
///   convolutions run on whole videos.
///
/// The 3×3 convolutions stay with Winograd: unfolding won only with 8 images of 4×4 (155–208 →
/// 184–232) and lost far with 32 (580 → 238) and at 8×8 (586 → 252). With bfloat16 weights on
/// AMX tiles too (`KERNEL_SPEED_WEIGHTS=bf16`): the VAE's 3×3 at 100–230 unfolded against
/// Winograd's 370–500.
///
/// The temporal convolution with bfloat16 weights on AMX tiles (`tiles`), 4 frames under
/// guidance, Winograd → unfolded: 320 channels at 32² 287 → 127, 640 at 16² 209 → 203, 1280 at 8²
/// 67 → 356 and at 4² 218 → 227; 16 frames, 1280 at 8² 177 → 278 and at 4² 72 → 608. Unfolded
/// where the rows are at most twice the output channels — for frames the direct kernel on tiles
/// does not take (pixels not in whole 16s): it takes the others, ahead of both (4 frames under
/// guidance, Winograd / unfolded → tiles: 320 channels at 32² 270 / 115 → 440–458, 640 at 16²
/// 196 / 191 → 460–501, 1280 at 8² 78 / 246 → 395–398, at 4² 22 / 259 → 216–233; 16 frames at
/// 8² 181 / 229 → 529–745, at 4² 56 / 256 → 319–340).
///
/// The temporal convolution with float16 weights multiplied in float16 (`f16`, `avx512fp16`,
/// `KERNEL_SPEED_WEIGHTS=f16`), 4 frames under guidance, Winograd → unfolded, Emerald Rapids:
/// 320 channels at 32² 320 → 135, 640 at 16² 304 → 183, 1280 at 8² 142 → 263 (Winograd's
/// per-call weight transform, rounded to float16, outweighs its products at 512 rows), at 4²
/// 45 → 254. Unfolded where the rows are at most the output channels.
///
/// 3×3 with bfloat16 weights on AMX tiles, where the tiles' direct kernel does not take the
/// planes (rows of fewer than 16 pixels), 1280 channels, Winograd → unfolded: at 4×4, 8 images
/// 106–120 → 280, 32 images 120–150 → 152; at 8×8 level (8 images 340–359 → 352, 32 images
/// 187–265 → 155). Unfolded for planes of at most 16 pixels, and for planes of 8×8 where the call
/// has at most 1,024 rows (images × pixels): measured again with the bfloat16 products' later
/// kernels (weights packed at load, the bias row fix), 8 images of 8×8 (4 frames under guidance),
/// Winograd → unfolded, three rounds: 537 → 735, 518 → 875, 411 → 840; 32 images (16 frames)
/// 714 → 749, 578 → 456, 535 → 402, so those stay with Winograd. In a 4-frame guided step
/// (`--profile`, 3×3 time over linear time in the same step, 9 steps a build, alternating):
/// 0.72 → 0.65.
enum UnfoldedPays {
    Pointwise { pixels: usize },
    Plane3x3 { pixels: usize, rows: usize, tiles: bool },
    Temporal { rows: usize, tiles: bool, f16: bool },
}

impl UnfoldedPays {
    fn holds(self, cout: usize) -> bool {
        match self {
            UnfoldedPays::Pointwise { pixels } => 64 * pixels <= cout,
            UnfoldedPays::Plane3x3 { pixels, rows, tiles } => tiles && (pixels <= 16 || (pixels <= 64 && rows <= 1024)),
            UnfoldedPays::Temporal { rows, tiles: true, .. } => rows <= 2 * cout,
            UnfoldedPays::Temporal { rows, f16: true, .. } => rows <= cout,
            UnfoldedPays::Temporal { rows, .. } => 4 * rows <= cout,
        }
    }
}

struct ConvOp {
    kind: Kind,
    has_bias: bool,
    stride: usize,
    padding: usize,
}

impl ConvOp {
    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bias: Option<Vec<f32>>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_of(xs, xl, "conv input")?;
        let w = src_of(ws, wl, "conv weight")?;
        let (n, cin, h, wd) = xl.shape().dims4()?;
        let (cout, wcin, kh, kw) = wl.shape().dims4()?;
        if wcin != cin {
            bail!("t2v conv: weight {:?} doesn't fit input {:?}", wl.shape(), xl.shape());
        }
        let (oh, ow) = (out_side(h, kh, self.stride, self.padding), out_side(wd, kw, self.stride, self.padding));
        // every kernel writes every output pixel (Winograd tiles cover the plane; the products
        // start from the bias or overwrite)
        let mut out = super::output_buffer(n * cout * oh * ow);
        match self.kind {
            Kind::Unfolded => {
                let (hw, k) = ((h, wd), (kh, kw));
                unfolded::conv2d(x, w, bias.as_deref(), &mut out, n, cin, cout, hw, k, self.stride, self.padding);
            }
            Kind::Wino3x3 => {
                if kh != 3 || kw != 3 || !super::avx2() {
                    bail!("t2v conv: winograd kernel needs a 3x3 kernel and AVX2+FMA");
                }
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    winograd::conv3x3(x, w, bias.as_deref(), &mut out, n, cin, cout, h, wd);
                }
            }
            Kind::Tiles => {
                #[cfg(target_arch = "x86_64")]
                {
                    let super::Src::Bf16(wb) = w else { bail!("t2v conv: the tiles' kernel needs bfloat16 weights") };
                    let shape_fits = (kh, kw, self.stride, self.padding) == (3, 3, 1, 1);
                    if !shape_fits || !direct_on_tiles(true, cout, wd) {
                        bail!("t2v conv: the tiles' kernel needs a 3x3 kernel of stride 1, AMX and whole tiles");
                    }
                    // SAFETY: AMX and the sizes checked above; the operands' sizes are the
                    // layouts' (checked by candle's shapes).
                    unsafe {
                        super::amx::conv_direct(
                            x,
                            &super::amx::ConvTiles::new(wb, cin, cout, kh * kw),
                            bias.as_deref(),
                            &mut out,
                            n,
                            (h, wd),
                            (kh, kw),
                        )
                    };
                }
                #[cfg(not(target_arch = "x86_64"))]
                bail!("t2v conv: the tiles' kernel runs only on x86-64");
            }
            Kind::Pointwise => {
                if kh != 1 || kw != 1 {
                    bail!("t2v conv: pointwise kernel needs a 1x1 kernel");
                }
                gemm_based::pointwise(x, w, bias.as_deref(), &mut out, n, cin, cout, h * wd);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, cout, oh, ow))))
    }
}

fn bias_vec(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    Ok(src_of(s, l, "conv bias")?.to_f32_vec())
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "t2v-conv2d"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.has_bias {
            bail!("t2v conv: bias expected");
        }
        self.run(s1, l1, s2, l2, None)
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "t2v-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(s1, l1, s2, l2, Some(bias_vec(s3, l3)?))
    }
}

/// Whether bfloat16 weights (`bf16`) multiply on AMX tiles here (the `amx` path): directly, or
/// through the unfolded product.
fn bf16_on_tiles(bf16: bool) -> bool {
    bf16 && super::amx()
}

/// Whether the tiles' direct kernel ([`super::amx::conv_direct`]) takes these weights for `cout`
/// output channels over rows of `w` pixels (the 3×3 convolutions' image rows, the temporal ones'
/// frames): bfloat16 on tiles, channels and pixels in whole tiles.
fn direct_on_tiles(bf16: bool, cout: usize, w: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        bf16_on_tiles(bf16) && super::amx::conv_direct_fits(cout, w)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (bf16, cout, w);
        false
    }
}

struct TemporalOp {
    has_bias: bool,
    algo: TemporalAlgo,
}

impl TemporalOp {
    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bias: Option<Vec<f32>>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_of(xs, xl, "conv input")?;
        let w = src_of(ws, wl, "conv weight")?;
        let (b, cin, f, h, wd) = xl.shape().dims5()?;
        let (cout, wcin, k) = wl.shape().dims3()?;
        if wcin != cin || k != 3 {
            bail!("t2v temporal conv: weight {:?} doesn't fit input {:?}", wl.shape(), xl.shape());
        }
        // every frame of every channel starts from the bias or is overwritten by a first GEMM
        let mut out = super::output_buffer(b * cout * f * h * wd);
        // the direct kernel on tiles wherever it runs (see UnfoldedPays for the figures)
        let bf16 = matches!(w, super::Src::Bf16(_));
        let tiles = direct_on_tiles(bf16, cout, h * wd);
        let algo = match self.algo {
            TemporalAlgo::Auto if tiles => TemporalAlgo::Tiles,
            TemporalAlgo::Tiles if !tiles => {
                bail!("t2v temporal conv: the tiles' kernel needs AMX, bfloat16 weights and frames of whole 16-pixel groups")
            }
            TemporalAlgo::Auto if f <= 2 => TemporalAlgo::Stacked,
            // the fused form wherever frames hold whole groups of 16 pixels (see FUSED_MIN_PIXELS)
            TemporalAlgo::Auto if gemm_based::temporal_fused(w) && h * wd >= FUSED_MIN_PIXELS => TemporalAlgo::Winograd,
            TemporalAlgo::Auto
                if super::packed_product()
                    && UnfoldedPays::Temporal {
                        rows: b * f * h * wd,
                        tiles: bf16_on_tiles(bf16),
                        f16: w.multiplies_in_f16(),
                    }
                    .holds(cout) =>
            {
                TemporalAlgo::Unfolded
            }
            TemporalAlgo::Auto if f >= 3 && b * f * h * wd >= winograd_min_columns() => TemporalAlgo::Winograd,
            TemporalAlgo::Auto => TemporalAlgo::Direct,
            TemporalAlgo::Unfolded if !super::packed_product() => {
                bail!("t2v temporal conv: the unfolded product needs the packed product's instructions")
            }
            chosen => chosen,
        };
        if algo == TemporalAlgo::Tiles {
            #[cfg(target_arch = "x86_64")]
            if let super::Src::Bf16(wb) = w {
                // SAFETY: AMX, the weight's type and the sizes checked (direct_on_tiles); the
                // operands' sizes are the layouts' (candle's shapes).
                unsafe {
                    super::amx::conv_direct(
                        x,
                        &super::amx::ConvTiles::new(wb, cin, cout, 3),
                        bias.as_deref(),
                        &mut out,
                        b,
                        (f, h * wd),
                        (3, 1),
                    )
                };
            }
        } else if algo == TemporalAlgo::Unfolded {
            unfolded::temporal(x, w, bias.as_deref(), &mut out, b, cin, cout, f, h * wd);
        } else if algo == TemporalAlgo::Stacked {
            gemm_based::temporal_stacked(x, w, bias.as_deref(), &mut out, b, cin, cout, f, h * wd);
        } else if algo == TemporalAlgo::Winograd {
            gemm_based::temporal_wino(x, w, bias.as_deref(), &mut out, b, cin, cout, f, h * wd);
        } else {
            gemm_based::temporal(x, w, bias.as_deref(), &mut out, b, cin, cout, f, h * wd);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, f, h, wd))))
    }
}

impl CustomOp2 for TemporalOp {
    fn name(&self) -> &'static str {
        "t2v-temporal-conv3"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.has_bias {
            bail!("t2v temporal conv: bias expected");
        }
        self.run(s1, l1, s2, l2, None)
    }
}

impl CustomOp3 for TemporalOp {
    fn name(&self) -> &'static str {
        "t2v-temporal-conv3"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(s1, l1, s2, l2, Some(bias_vec(s3, l3)?))
    }
}

/// G for the points {0, 1, −1, ½, −2, ∞}: 3 taps → 6 (the 2-D F(4×4, 3×3)'s weight transform for
/// its remainder channels; the temporal F(4, 3) does the same operations over whole rows,
/// `gemm_based::g3to6_rows`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn g3to6(a: f32, b: f32, c: f32) -> [f32; 6] {
    let ac = a + c;
    // (plain mul/add: `f32::mul_add` is a libm call without an FMA target feature)
    [
        a,
        (ac + b) * (1.0 / 3.0),
        (b - ac) * (1.0 / 3.0),
        (16.0 * a + (8.0 * b + 4.0 * c)) * (-1.0 / 15.0),
        (4.0 * c + (-2.0 * b + a)) * (1.0 / 15.0),
        c,
    ]
}
