//! The layers every network here is built from. Weight matrices and kernels may be kept in the
//! narrower dtype they are stored in (float16 checkpoints) and are widened to the compute dtype
//! one layer at a time, as they are used: the same numbers as widening them all at load time,
//! in half the memory.
//!
//! Each layer runs a CPU kernel of [`crate::kernels`] or candle's ops (the kernel chooses) and
//! records its time and floating-point operations in [`crate::profile`]: here, and only here, so
//! that the model code above and the kernels below count nothing themselves.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::kernels;
pub use crate::kernels::attention::ValueProduct;
use crate::profile::{count_flops, timed};

/// Widens a narrow weight to `dtype` (a no-op when it already is).
pub(crate) fn widen(w: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if w.dtype() == dtype {
        Ok(w.clone())
    } else {
        timed("widen weights", || w.to_dtype(dtype))
    }
}

/// `nn.Linear`: y = x·Wᵀ + b over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

/// A linear layer's weight: the tensor, or packed for good where the CPU multiplies it as it is
/// stored ([`kernels::linear::PackedLinear::resident`]: bfloat16 weights on the bfloat16 paths,
/// float16 ones of a `--dtype f16` run on `avx512fp16`, packed once at load instead of on every
/// call, in the same memory).
#[derive(Debug, Clone)]
enum LinearWeight {
    Tensor(Tensor),
    Packed(std::sync::Arc<kernels::linear::PackedLinear>),
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    linear_with_bias(in_dim, out_dim, vb, false)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.))?;
    Linear::new(weight, None, false)
}

/// A feed-forward's first projection (in, 2·inner), for [`Linear::forward_geglu`]: where its
/// weight is packed at load, it is packed in the order of the product with GEGLU fused in.
pub fn geglu_projection(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    linear_with_bias(in_dim, out_dim, vb, true)
}

/// [`linear`], packed for GEGLU with `geglu` ([`geglu_projection`]).
fn linear_with_bias(in_dim: usize, out_dim: usize, vb: VarBuilder, geglu: bool) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.))?;
    let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.))?;
    Linear::new(weight, Some(bias), geglu)
}

impl Linear {
    /// The layer of `weight` (out, in) and `bias` (out), its weight packed now and kept packed
    /// where the kernels take it so ([`kernels::linear::PackedLinear::resident`]; for GEGLU with
    /// `geglu`).
    fn new(weight: Tensor, bias: Option<Tensor>, geglu: bool) -> candle_core::Result<Linear> {
        let weight = match kernels::linear::PackedLinear::resident(&weight, bias.as_ref(), geglu)? {
            Some(packed) => LinearWeight::Packed(std::sync::Arc::new(packed)),
            None => LinearWeight::Tensor(weight),
        };
        Ok(Linear { weight, bias })
    }

    /// The output width.
    pub fn out_dim(&self) -> usize {
        match &self.weight {
            LinearWeight::Tensor(w) => w.dims().first().copied().unwrap_or(0),
            LinearWeight::Packed(p) => p.out_dim(),
        }
    }

    /// The input width.
    pub fn in_dim(&self) -> usize {
        match &self.weight {
            LinearWeight::Tensor(w) => w.dims().get(1).copied().unwrap_or(0),
            LinearWeight::Packed(p) => p.in_dim(),
        }
    }

    /// The dtype the weight is kept in (bfloat16 or float16 where it is packed for good).
    pub fn weight_dtype(&self) -> DType {
        match &self.weight {
            LinearWeight::Tensor(w) => w.dtype(),
            LinearWeight::Packed(p) => p.weight_dtype(),
        }
    }

    /// Whether the weight was packed at load ([`kernels::linear::PackedLinear::resident`]).
    pub fn is_packed(&self) -> bool {
        matches!(self.weight, LinearWeight::Packed(_))
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `acc += x·Wᵀ`, the bias left out (the caller adds it as its sums need): `x` (…, in),
    /// `acc` (…, out) with the same leading dimensions; in place where the kernels run.
    pub fn accumulate_without_bias(&self, acc: Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        let out_dim = self.out_dim();
        over_rows(x, out_dim, |rows| {
            let acc = acc.reshape((rows.dim(0)?, out_dim))?;
            match &self.weight {
                LinearWeight::Tensor(w) => kernels::linear::linear_accumulate(acc, rows, w),
                LinearWeight::Packed(p) => p.accumulate(acc, rows),
            }
        })
    }

    /// `x·Wᵀ + b + residual`, `residual` shaped as the output: the add fused into the product
    /// where the weight is packed ([`kernels::linear::PackedLinear::forward_residual`], timed as
    /// the linear layer), else the layer and [`add`]. The same bits either way.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::Packed(p) if !p.is_geglu() => residual_over_rows(x, residual, p),
            _ => add(&self.forward(x)?, residual),
        }
    }

    /// `value · gelu(gate)` of this projection's output split into two halves (…, out/2):
    /// diffusers' `GEGLU`, fused into the product where the kernels can
    /// ([`kernels::linear::fuses_geglu`], timed as the linear layer it is part of), else the
    /// layer and [`geglu`].
    pub fn forward_geglu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = match &self.weight {
            LinearWeight::Packed(p) if p.is_geglu() => {
                return over_rows(x, self.out_dim(), |rows| p.forward_geglu(rows))
            }
            LinearWeight::Packed(_) => return geglu(&self.forward(x)?),
            LinearWeight::Tensor(w) => w,
        };
        let in_dim = self.in_dim();
        let rows = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?;
        if !kernels::linear::fuses_geglu(&rows, w, self.bias.as_ref()) {
            return geglu(&self.forward(x)?);
        }
        over_rows(x, self.out_dim(), |rows| kernels::linear::linear_geglu(rows, w, self.bias.as_ref()))
    }

    /// As [`Linear::prepare`] for [`PreparedLinear::forward_geglu`]: where GEGLU fuses into the
    /// product, the weight is packed in the fused product's order.
    pub fn prepare_geglu(&self, pack: bool) -> candle_core::Result<PreparedLinear<'_>> {
        if let (true, LinearWeight::Tensor(w)) = (pack, &self.weight) {
            let packed = timed("linear", || kernels::linear::PackedLinear::new_geglu(w, self.bias.as_ref()))?;
            if packed.is_some() {
                return Ok(PreparedLinear { packed, layer: self });
            }
        }
        self.prepare(pack)
    }

    /// This layer ready for many calls when `pack` (FreeNoise's windows and the chunks of a long
    /// video run the same layers many times): its weight packed now and kept, at the cost of
    /// holding the packed (float32) copy meanwhile. Without `pack`, each call packs its own. A
    /// weight packed at load is used as it is either way.
    pub fn prepare(&self, pack: bool) -> candle_core::Result<PreparedLinear<'_>> {
        let packed = match (pack, &self.weight) {
            (true, LinearWeight::Tensor(w)) => {
                timed("linear", || kernels::linear::PackedLinear::new(w, self.bias.as_ref()))?
            }
            _ => None,
        };
        Ok(PreparedLinear { packed, layer: self })
    }
}

/// `product` of `x`'s rows (…, in) flattened to (rows, in), giving (rows, out_dim), reshaped back
/// to (…, out_dim): one matrix product over all leading dimensions, timed and counted as a linear
/// layer's.
fn over_rows(
    x: &Tensor,
    out_dim: usize,
    product: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let in_dim = *dims.last().expect("linear input has a last dimension");
    let rows = x.elem_count() / in_dim.max(1);
    let y = timed("linear", || product(&x.reshape((rows, in_dim))?))?;
    count_flops("linear", 2 * rows * in_dim * out_dim);
    // (out_dim, or half of it where GEGLU was fused in)
    *dims.last_mut().unwrap() = y.dim(1)?;
    y.reshape(dims)
}

/// `packed`'s product of `x` (…, in) plus `residual` (…, out) through [`over_rows`] (float32
/// operands on the CPU, as every packed product).
fn residual_over_rows(
    x: &Tensor,
    residual: &Tensor,
    packed: &kernels::linear::PackedLinear,
) -> candle_core::Result<Tensor> {
    let out_dim = packed.out_dim();
    let mut want = x.dims().to_vec();
    if let Some(last) = want.last_mut() {
        *last = out_dim;
    }
    if residual.dims() != want {
        candle_core::bail!("linear: residual {:?} for an output of {want:?}", residual.dims());
    }
    let residual = residual.reshape((residual.elem_count() / out_dim.max(1), out_dim))?;
    over_rows(x, out_dim, |rows| packed.forward_residual(rows, &residual))
}

/// A [`Linear`] whose weight is packed once for many calls on float32 activations
/// ([`Linear::prepare`]) where the kernels run; other calls go to the layer itself.
pub struct PreparedLinear<'a> {
    packed: Option<kernels::linear::PackedLinear>,
    layer: &'a Linear,
}

impl PreparedLinear<'_> {
    pub fn layer(&self) -> &Linear {
        self.layer
    }

    /// [`Linear::forward_geglu`], through the weight packed beforehand where there is one
    /// ([`Linear::prepare_geglu`] packs it for the fused product where the kernels fuse it).
    pub fn forward_geglu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.packed.as_ref().filter(|_| x.dtype() == DType::F32 && x.device().is_cpu()) {
            Some(packed) if packed.is_geglu() => over_rows(x, self.layer.out_dim(), |rows| packed.forward_geglu(rows)),
            Some(_) => geglu(&self.forward(x)?),
            None => self.layer.forward_geglu(x),
        }
    }

    /// [`Linear::forward_residual`], through the weight packed beforehand where there is one.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        match self.packed.as_ref().filter(|_| x.dtype() == DType::F32 && x.device().is_cpu()) {
            Some(packed) if !packed.is_geglu() => residual_over_rows(x, residual, packed),
            Some(_) => add(&self.forward(x)?, residual),
            None => self.layer.forward_residual(x, residual),
        }
    }

    /// The weight packed for good or for these calls, where there is one.
    fn packed(&self) -> Option<&kernels::linear::PackedLinear> {
        match (&self.packed, &self.layer.weight) {
            (Some(p), _) => Some(p),
            (None, LinearWeight::Packed(p)) => Some(p),
            _ => None,
        }
    }

    /// Whether this layer reads rows in AMX tiles ([`Activations::Tiles`]).
    pub fn takes_tiles(&self) -> bool {
        self.packed().is_some_and(|p| p.takes_tiles())
    }

    /// Whether this feed-forward projection reads rows in AMX tiles with GEGLU fused in
    /// ([`PreparedLinear::forward_geglu_activations`]).
    pub fn takes_geglu_tiles(&self) -> bool {
        self.packed().is_some_and(|p| p.takes_tiles() && p.is_geglu())
    }

    /// The packed product of rows in tiles, timed and counted as the linear layer, shaped as
    /// `dims` with the product's width last (`residual` added as it is written).
    fn tiles_product(
        &self,
        a: &kernels::packed_matmul::PackedA,
        dims: &[usize],
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let Some(packed) = self.packed().filter(|p| p.takes_tiles()) else {
            candle_core::bail!("linear: rows in AMX tiles for a layer that does not multiply on them")
        };
        let (rows, out_dim) = (a.m(), packed.out_dim());
        let y = timed("linear", || match residual {
            Some(r) => packed.forward_residual_tiles(a, &r.reshape((rows, out_dim))?),
            None => packed.forward_tiles(a),
        })?;
        count_flops("linear", 2 * rows * packed.in_dim() * out_dim);
        let mut dims = dims.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = y.dim(1)?;
        }
        y.reshape(dims)
    }

    /// [`Module::forward`] of activations in either form.
    pub fn forward_activations(&self, x: &Activations) -> candle_core::Result<Tensor> {
        match x {
            Activations::Rows(x) => self.forward(x),
            Activations::Tiles(a, dims) => self.tiles_product(a, dims, None),
        }
    }

    /// [`PreparedLinear::forward_geglu`] of a LayerNorm's output; where `tiles` (the next layer
    /// [`PreparedLinear::takes_tiles`]), the input is in tiles and the projection can, the gated
    /// output rounded into AMX tiles for that layer
    /// ([`kernels::linear::PackedLinear::forward_geglu_tiles`]).
    pub fn forward_geglu_activations(&self, x: &Activations, tiles: bool) -> candle_core::Result<Activations> {
        let packed = self.packed().filter(|p| p.is_geglu() && p.takes_tiles());
        match (x, packed) {
            (Activations::Rows(x), _) => Ok(Activations::Rows(self.forward_geglu(x)?)),
            (Activations::Tiles(a, dims), Some(p)) if tiles && p.gates_into_tiles() => {
                let (rows, in_dim, out_dim) = (a.m(), p.in_dim(), p.out_dim());
                let gated = timed("linear", || p.forward_geglu_tiles(a))?;
                count_flops("linear", 2 * rows * in_dim * out_dim);
                let mut dims = dims.clone();
                if let Some(last) = dims.last_mut() {
                    *last = gated.k();
                }
                Ok(Activations::Tiles(gated, dims))
            }
            (Activations::Tiles(a, dims), Some(_)) => Ok(Activations::Rows(self.tiles_product(a, dims, None)?)),
            (Activations::Tiles(..), None) => {
                candle_core::bail!("linear: rows in AMX tiles for a projection not packed for GEGLU on them")
            }
        }
    }

    /// [`PreparedLinear::forward_residual`] of activations in either form.
    pub fn forward_residual_activations(&self, x: &Activations, residual: &Tensor) -> candle_core::Result<Tensor> {
        match x {
            Activations::Rows(x) => self.forward_residual(x, residual),
            Activations::Tiles(a, dims) => self.tiles_product(a, dims, Some(residual)),
        }
    }
}

impl Module for PreparedLinear<'_> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.packed.as_ref().filter(|_| x.dtype() == DType::F32 && x.device().is_cpu()) {
            Some(packed) => over_rows(x, self.layer.out_dim(), |rows| packed.forward(rows)),
            None => self.layer.forward(x),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // the bias added as the product is written
        over_rows(x, self.out_dim(), |rows| match &self.weight {
            LinearWeight::Tensor(w) => kernels::linear::linear(rows, w, self.bias.as_ref()),
            LinearWeight::Packed(p) => p.forward(rows),
        })
    }
}

/// `nn.Conv2d` with groups 1 and dilation 1 (all this model uses).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    /// Whether a float16 weight multiplies in float16 ([`kernels::with_f16_products`] when built).
    f16_products: bool,
}

pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let weight = vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", Init::Const(0.))?;
    let bias = vb.get_with_hints(out_channels, "bias", Init::Const(0.))?;
    Ok(Conv2d { weight, bias, stride, padding, f16_products: kernels::f16_products() })
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c_in, kh, kw) = self.weight.dims4()?;
        let kind = match (kh, self.stride) {
            (1, _) => "conv 1x1",
            (_, 1) => "conv 3x3",
            _ => "conv 3x3 stride 2",
        };
        // The kernels widen float16 weights themselves, and add the bias as they write.
        let y = timed(kind, || {
            kernels::with_f16_products(self.f16_products, || {
                kernels::conv::conv2d(x, &self.weight, Some(&self.bias), self.stride, self.padding)
            })
        })?;
        count_flops(kind, 2 * c_in * kh * kw * y.elem_count());
        Ok(y)
    }
}

/// `nn.Conv3d(in, out, kernel_size=(3, 1, 1), padding=(1, 0, 0))`: a convolution along frames
/// only, with zero frames padded at both ends (diffusers' `TemporalConvLayer`).
#[derive(Debug, Clone)]
pub struct TemporalConv {
    weight: TemporalWeight,
    bias: Tensor,
    /// Whether a float16 weight multiplies in float16 ([`kernels::with_f16_products`] when built).
    f16_products: bool,
}

/// (out, in, 3, 1): the Conv3d kernel with its unit width dropped, applied as a 2D convolution
/// over (frames, H·W); or laid out for good as the AMX tiles read it
/// ([`kernels::conv::TemporalTiles`]: bfloat16 weights on the `amx` path, in the same memory).
#[derive(Debug, Clone)]
enum TemporalWeight {
    Tensor(Tensor),
    Tiles(std::sync::Arc<kernels::conv::TemporalTiles>),
}

pub fn temporal_conv(in_channels: usize, out_channels: usize, vb: VarBuilder) -> candle_core::Result<TemporalConv> {
    let weight = vb.get((out_channels, in_channels, 3, 1, 1), "weight")?.reshape((out_channels, in_channels, 3, 1))?;
    let bias = vb.get(out_channels, "bias")?;
    // The kernel may stay in its stored (narrower) dtype; it is widened when used.
    let weight = match kernels::conv::TemporalTiles::resident(&weight)? {
        Some(tiles) => TemporalWeight::Tiles(std::sync::Arc::new(tiles)),
        None => TemporalWeight::Tensor(weight),
    };
    Ok(TemporalConv { weight, bias, f16_products: kernels::f16_products() })
}

impl TemporalConv {
    /// Whether the weights are kept as the AMX tiles read them.
    pub fn is_tiled(&self) -> bool {
        matches!(self.weight, TemporalWeight::Tiles(_))
    }

    /// (batch, C, frames, H, W) → (batch, out, frames, H, W).
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let c = xs.dim(1)?;
        let out = timed("temporal conv", || match &self.weight {
            TemporalWeight::Tensor(w) => {
                kernels::with_f16_products(self.f16_products, || kernels::conv::temporal_conv3(xs, w, Some(&self.bias)))
            }
            TemporalWeight::Tiles(t) => kernels::conv::temporal_conv3_tiles(xs, t, Some(&self.bias)),
        })?;
        count_flops("temporal conv", 2 * 3 * c * out.elem_count());
        Ok(out)
    }
}

/// `nn.Embedding`: rows of a table by id.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
}

pub fn embedding(count: usize, dim: usize, vb: VarBuilder) -> candle_core::Result<Embedding> {
    Ok(Embedding { table: vb.get_with_hints((count, dim), "weight", Init::Const(0.))? })
}

impl Embedding {
    /// `ids`: u32 of any shape → (..., dim) in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.table.dim(1)?);
        let rows = self.table.index_select(&ids.flatten_all()?, 0)?;
        widen(&rows, dtype)?.reshape(dims)
    }
}

/// `nn.LayerNorm(size, eps)` with its affine scale and shift (candle's).
#[derive(Debug, Clone)]
pub struct LayerNorm(candle_nn::LayerNorm);

pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm(candle_nn::layer_norm(size, eps, vb)?))
}

impl LayerNorm {
    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    /// This norm of `x` as the linear layers after it read it: where `tiles` (every one of them
    /// [`PreparedLinear::takes_tiles`]) and the kernels can, rounded into their AMX tiles
    /// ([`kernels::layer_norm::layer_norm_tiles`]: the same products, without a float32 output
    /// or repacking per product); else float32 rows.
    pub fn forward_rows(&self, x: &Tensor, tiles: bool) -> candle_core::Result<Activations> {
        if let (true, Some(bias)) = (tiles, self.0.bias()) {
            let packed =
                timed("layer norm", || kernels::layer_norm::layer_norm_tiles(x, self.0.weight(), bias, self.0.eps()))?;
            if let Some(packed) = packed {
                return Ok(Activations::Tiles(packed, x.dims().to_vec()));
            }
        }
        Ok(Activations::Rows(self.forward(x)?))
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        timed("layer norm", || match self.0.bias() {
            Some(bias) => kernels::layer_norm::layer_norm(x, self.0.weight(), bias, self.0.eps()),
            None => self.0.forward(x),
        })
    }
}

/// Activations as the linear layers after them read them: a LayerNorm's output
/// ([`LayerNorm::forward_rows`]) or a feed-forward's gated hidden layer
/// ([`PreparedLinear::forward_geglu_activations`]).
pub enum Activations {
    /// Float32 rows.
    Rows(Tensor),
    /// Rounded to bfloat16 in the layout of the AMX tiles' A operand, with the dimensions of
    /// the rows it stands for.
    Tiles(kernels::packed_matmul::PackedA, Vec<usize>),
}

/// `nn.GroupNorm(groups, channels, eps)` with its affine scale and shift.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", Init::Const(1.))?,
        bias: vb.get_with_hints(channels, "bias", Init::Const(0.))?,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// GroupNorm followed by SiLU, fused: the pair that opens every ResNet and temporal
    /// convolution stage.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        timed("group norm", || {
            kernels::group_norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
        })
    }

    /// The statistics of `x` as per-channel scales and shifts, for [`GroupNorm::apply_silu`] on
    /// bands of its rows ([`kernels::group_norm::group_norm_statistics`]).
    pub fn statistics(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        timed("group norm", || {
            kernels::group_norm::group_norm_statistics(x, &self.weight, &self.bias, self.groups, self.eps)
        })
    }

    /// [`GroupNorm::forward_silu`] on rows of the tensor whose `statistics` were taken.
    pub fn apply_silu(&self, rows: &Tensor, statistics: &Tensor) -> candle_core::Result<Tensor> {
        timed("group norm", || kernels::group_norm::group_norm_apply(rows, statistics, true))
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        timed("group norm", || {
            kernels::group_norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
        })
    }
}

/// softmax(q·kᵀ·scale)·v for (batch, tokens, head_dim) inputs (one head).
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    multi_head_attention(q, k, v, 1, scale, 1, ValueProduct::Float32)
}

/// Attention with `heads` heads for q (batch, tokens, heads·d) and k, v (batch / repeat, keys,
/// heads·d), row b / repeat of k and v serving query row b; (batch, tokens, heads·d) out
/// ([`kernels::attention::multi_head_attention`]), long sequences' probabilities multiplying the
/// values as `values` says ([`ValueProduct`]).
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    repeat: usize,
    values: ValueProduct,
) -> candle_core::Result<Tensor> {
    let (batch, tokens, width) = q.dims3()?;
    let keys = k.dim(1)?;
    // (profile labels: cross-attention attends to another sequence than its queries')
    let kind = if keys != tokens {
        "attention (cross)"
    } else if tokens <= kernels::attention::SHORT {
        "attention (short)"
    } else {
        "attention (long)"
    };
    count_flops(kind, 4 * batch * tokens * keys * width);
    timed(kind, || kernels::attention::multi_head_attention(q, k, v, heads, scale, repeat, values))
}

/// [`multi_head_attention`] of self-attention within tokens [start, start + length) of every
/// row, for each of `starts`, the windows stacked along the batch
/// ([`kernels::attention::multi_head_attention_windows`]): FreeNoise's windows of frames.
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
) -> candle_core::Result<Tensor> {
    let (batch, _, width) = q.dims3()?;
    let kind = if length <= kernels::attention::SHORT { "attention (short)" } else { "attention (long)" };
    count_flops(kind, 4 * starts.len() * batch * length * length * width);
    timed(kind, || kernels::attention::multi_head_attention_windows(q, k, v, heads, scale, starts, length, values))
}

/// Bytes of one activation that a frame-chunked section of a network computes at a time by
/// default: the per-frame layers of a long video run on chunks of frames, so that their
/// intermediates (a GroupNorm, a convolution, the attention's q, k and v...) stay this size
/// instead of scaling with the frames (see `map_chunks`).
pub const CHUNK_BYTES: usize = 32 << 20;

/// How many rows of `row_bytes` bytes one chunk of `chunk_bytes` holds: at least one.
pub(crate) fn chunk_rows(chunk_bytes: usize, row_bytes: usize) -> usize {
    (chunk_bytes / row_bytes.max(1)).max(1)
}

/// `f` applied to consecutive chunks of `n` rows of dimension `dim`, the results written side by
/// side along `dim` into one tensor, as if `f` had run on all `n` rows at once. `chunks` gives
/// each chunk as (start, length); with a single chunk `f`'s result is returned as it is. For
/// layers whose rows are independent (per frame, per pixel), the result is the same as one
/// call's, with only one chunk's intermediates held at a time.
pub(crate) fn map_chunks(
    dim: usize,
    chunks: &[(usize, usize)],
    mut f: impl FnMut(usize, usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let Some((&(start, len), rest)) = chunks.split_first() else { candle_core::bail!("map_chunks: no rows") };
    let first = f(start, len)?;
    if rest.is_empty() {
        return Ok(first);
    }
    let n: usize = chunks.iter().map(|c| c.1).sum();
    let mut dims = first.dims().to_vec();
    dims[dim] = n;
    let out = uninitialized(&dims, first.dtype(), first.device())?;
    let first = contiguous(&first)?;
    timed("layout copies", || out.slice_set(&first, dim, 0))?;
    drop(first);
    let mut at = len;
    for &(start, len) in rest {
        let chunk = contiguous(&f(start, len)?)?;
        timed("layout copies", || out.slice_set(&chunk, dim, at))?;
        at += len;
    }
    Ok(out)
}

/// Consecutive (start, length) chunks of at most `chunk` of `n` rows.
pub(crate) fn even_chunks(n: usize, chunk: usize) -> Vec<(usize, usize)> {
    let chunk = chunk.max(1);
    (0..n).step_by(chunk).map(|s| (s, chunk.min(n - s))).collect()
}

/// A tensor whose every element the caller writes before reading it: on the CPU in float32 an
/// unfilled buffer (no pass to zero it), elsewhere zeros.
pub(crate) fn uninitialized(dims: &[usize], dtype: DType, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    if device.is_cpu() && dtype == DType::F32 {
        let n = dims.iter().product();
        // every element is written by the chunks' slice_set before the tensor is returned
        Tensor::from_vec(kernels::output_buffer(n), dims, device)
    } else {
        Tensor::zeros(dims, dtype, device)
    }
}

/// torch's `repeat_interleave(repeat, dim=0)` for a (batch, ...) tensor.
pub fn repeat_interleave(xs: &Tensor, repeat: usize) -> candle_core::Result<Tensor> {
    if repeat == 1 {
        return Ok(xs.clone());
    }
    timed("layout copies", || kernels::copy::repeat_interleave(xs, repeat))
}

/// `x.contiguous()`: the moves between the per-frame and the per-video layout, and between
/// channels-first images and token sequences.
pub fn contiguous(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    timed("layout copies", || kernels::copy::contiguous(x))
}

/// Nearest-neighbour up-sampling of (n, C, H, W) images to (height, width): the up-samplers of
/// the UNet and the VAE decoder (torch's `F.interpolate(mode="nearest")`).
pub fn upsample_nearest2d(x: &Tensor, height: usize, width: usize) -> candle_core::Result<Tensor> {
    timed("upsample", || kernels::copy::upsample_nearest2d(x, height, width))
}

/// `dst[:, :, offset..] = rows (+ residual)` in place ([`kernels::add::set_rows`]).
fn set_rows(dst: &Tensor, offset: usize, rows: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<()> {
    timed("layout copies", || kernels::add::set_rows(dst, offset, rows, residual))
}

/// `a + b` for tensors of one shape: the residual connections.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    timed("residual add", || kernels::add::add(a, b))
}

/// `out[b, f, c, start + p] = seq[b, p, f, c] + xs[b, f, c, start + p]` in place: a temporal
/// transformer's sequences of frames back in the video layout, plus the residual
/// ([`kernels::add::add_from_sequences`]).
pub fn add_from_sequences(out: &Tensor, seq: &Tensor, xs: &Tensor, start: usize) -> candle_core::Result<()> {
    timed("residual add", || kernels::add::add_from_sequences(out, seq, xs, start))
}

/// `parts[i·n + s, j] += xs[s, starts[i] + j]` in place: the residual of windows stacked along
/// the sequences ([`kernels::add::add_windows`]).
pub fn add_windows(parts: &Tensor, xs: &Tensor, starts: &[usize]) -> candle_core::Result<()> {
    timed("residual add", || kernels::add::add_windows(parts, xs, starts))
}

/// FreeNoise's weighted sum of one window's output into the per-frame sums, in place
/// ([`kernels::add::accumulate_window`]).
pub fn accumulate_window(
    sums: &Tensor,
    part: &Tensor,
    start: usize,
    skip: usize,
    weights: &[f32],
) -> candle_core::Result<()> {
    timed("residual add", || kernels::add::accumulate_window(sums, part, start, skip, weights))
}

/// GEGLU, `h[..., :n] * gelu(h[..., n:])` with the exact (erf) GELU, as diffusers' `GEGLU`.
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    timed("geglu", || kernels::geglu::geglu(h))
}

/// SiLU, x·σ(x).
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    timed("silu", || candle_nn::ops::silu(x))
}

/// Per-image bytes of a 3×3 convolution's input from which it runs in bands of rows
/// ([`RowBands`]): only the VAE's layers at full size reach it (at 1024×576 the last decoder
/// block's input is 604 MB a frame), never a 256×256 frame's (67 MB) or the UNet's.
pub const BAND_FROM_BYTES: usize = 128 << 20;

/// About how many bytes of a convolution's input one band holds.
pub const BAND_BYTES: usize = 64 << 20;

thread_local! {
    static BANDS: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((BAND_FROM_BYTES, BAND_BYTES)) };
}

/// Runs `f` with 3×3 convolutions banded from `from_bytes` of input an image, `band_bytes` a
/// band (tests band small tensors with it).
pub fn with_bands<R>(from_bytes: usize, band_bytes: usize, f: impl FnOnce() -> R) -> R {
    kernels::with_thread_setting(&BANDS, (from_bytes, band_bytes), f)
}

/// The output rows of a 3×3 convolution (stride 1, padding 1) over an input of `height` rows,
/// in bands: output rows `r0..r1` need input rows `a..b` (one more on each side inside the
/// image), and a convolution of those rows alone, zero-padded, is exact on its rows `r0 − a ..
/// r1 − a` (the padded ones are the image's own border, or dropped). So a layer whose input is
/// derived per pixel (a GroupNorm with whole-image statistics, a nearest up-sampling) never
/// holds that input whole. At 1024×576 a frame's decode peaked at 1.86 GB of activations over
/// its weights, now 1.15 GB (resident: 2.34 → 1.40 GB; Emerald Rapids, 2026-12-07).
/// Bands hold a multiple of 4 input rows (Winograd's tiles) less the two of the border: about
/// 3% more work on the layers it bands. Each band is a separate convolution, so its sums are
/// grouped into tiles differently from the whole one's: equal to float32 rounding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowBands {
    height: usize,
    band: usize,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Band {
    /// Output rows r0..r1.
    pub r0: usize,
    pub r1: usize,
    /// Input rows a..b.
    pub a: usize,
    pub b: usize,
}

impl RowBands {
    /// Bands for an input of (images, channels, height, width) elements of `dtype_bytes`, or
    /// None where it is run whole.
    pub(crate) fn of(dims: (usize, usize, usize, usize), dtype_bytes: usize) -> Option<Self> {
        let (n, c, height, width) = dims;
        let (from, band_bytes) = BANDS.with(|b| b.get());
        let row_bytes = n * c * width * dtype_bytes;
        if c * height * width * dtype_bytes < from || row_bytes == 0 {
            return None;
        }
        let rows = (band_bytes / row_bytes).max(4);
        let band = (rows / 4 * 4).max(4) - 2;
        (band < height).then_some(Self { height, band })
    }

    pub(crate) fn iter(self) -> impl Iterator<Item = Band> {
        (0..self.height).step_by(self.band).map(move |r0| {
            let r1 = (r0 + self.band).min(self.height);
            Band { r0, r1, a: r0.saturating_sub(1), b: (r1 + 1).min(self.height) }
        })
    }
}

impl Conv2d {
    fn check_3x3(&self) -> candle_core::Result<()> {
        let (_, _, kh, kw) = self.weight.dims4()?;
        if (kh, kw, self.stride, self.padding) != (3, 3, 1, 1) {
            candle_core::bail!("bands need a 3×3 convolution of stride 1 and padding 1");
        }
        Ok(())
    }

    /// Output rows `band.r0..band.r1` (a view) from the input rows `band.a..band.b`.
    pub(crate) fn forward_band(&self, rows: &Tensor, band: Band) -> candle_core::Result<Tensor> {
        self.check_3x3()?;
        self.forward(rows)?.narrow(2, band.r0 - band.a, band.r1 - band.r0)
    }

    fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `conv(norm_silu(x))` (+ `add`, broadcast per image and channel), in bands of rows where
    /// `x` is large ([`RowBands`]).
    pub fn forward_norm_silu(&self, norm: &GroupNorm, x: &Tensor, add: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let Some(bands) = RowBands::of((n, c, h, w), x.dtype().size_in_bytes()) else {
            let y = self.forward(&norm.forward_silu(x)?)?;
            return match add {
                Some(t) => y.broadcast_add(t),
                None => Ok(y),
            };
        };
        let statistics = norm.statistics(x)?;
        let out = kernels::to_be_written((n, self.out_channels(), h, w), x.device())?;
        for band in bands.iter() {
            let y = self.forward_band(&norm.apply_silu(&x.narrow(2, band.a, band.b - band.a)?, &statistics)?, band)?;
            let y = match add {
                Some(t) => y.broadcast_add(t)?,
                None => y,
            };
            set_rows(&out, band.r0, &y, None)?;
        }
        Ok(out)
    }

    /// `conv(upsample_nearest2d(x, 2h, 2w))` (diffusers' `Upsample2D`), in bands of rows where
    /// the up-sampled input would be large ([`RowBands`]).
    pub fn forward_upsampled(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let Some(bands) = RowBands::of((n, c, 2 * h, 2 * w), x.dtype().size_in_bytes()) else {
            return self.forward(&upsample_nearest2d(x, 2 * h, 2 * w)?);
        };
        let out = kernels::to_be_written((n, self.out_channels(), 2 * h, 2 * w), x.device())?;
        for band in bands.iter() {
            // up-sampled rows a..b repeat the input rows a/2 ..= (b − 1)/2
            let (s0, s1) = (band.a / 2, (band.b - 1) / 2 + 1);
            let source = kernels::copy::contiguous(&x.narrow(2, s0, s1 - s0)?)?;
            let rows =
                upsample_nearest2d(&source, 2 * (s1 - s0), 2 * w)?.narrow(2, band.a - 2 * s0, band.b - band.a)?;
            set_rows(&out, band.r0, &self.forward_band(&rows, band)?, None)?;
        }
        Ok(out)
    }

    /// diffusers' `Downsample2D` with `padding=0`: one zero column on the right and one zero row
    /// at the bottom, then this stride-2 convolution without padding. Where `x` is large
    /// ([`RowBands`]) in bands of output rows, each from its own rows of `x` (and the zero row,
    /// for the last), so that the padded copy of `x` is only ever made a band at a time.
    pub fn forward_downsampled(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let pad = |rows: &Tensor, bottom: usize| rows.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, bottom);
        let (n, c, h, w) = x.dims4()?;
        let (_, _, k, _) = self.weight.dims4()?;
        let Some(bands) = RowBands::of((n, c, h, w), x.dtype().size_in_bytes()) else {
            return self.forward(&pad(x, 1)?);
        };
        if self.padding != 0 || h + 1 < k {
            candle_core::bail!("a padded down-sampling needs an unpadded convolution over at least {k} rows");
        }
        let (oh, ow) = ((h + 1 - k) / self.stride + 1, (w + 1 - k) / self.stride + 1);
        let out = kernels::to_be_written((n, self.out_channels(), oh, ow), x.device())?;
        // output rows o0..o1 read padded rows stride·o0 .. stride·(o1 − 1) + k
        let per_band = (bands.band / self.stride).max(1);
        for o0 in (0..oh).step_by(per_band) {
            let o1 = (o0 + per_band).min(oh);
            let (a, b) = (self.stride * o0, self.stride * (o1 - 1) + k);
            let rows = x.narrow(2, a, b.min(h) - a)?;
            set_rows(&out, o0, &self.forward(&pad(&rows, b - b.min(h))?)?, None)?;
        }
        Ok(out)
    }
}

/// diffusers' `ResnetBlock2D` (pre-norm, SiLU, `time_embedding_norm="default"`), on each image:
/// GroupNorm–SiLU–conv, plus the projected time embedding, GroupNorm–SiLU–conv, plus the
/// (1×1-projected when the width changes) input, divided by `output_scale_factor`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    /// Width of the time embedding; `None` for the VAE, which has none.
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, in_ch: usize, out_ch: usize, cfg: ResnetConfig) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: group_norm(cfg.groups, in_ch, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(in_ch, out_ch, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: match cfg.temb_channels {
                Some(t) => Some(linear(t, out_ch, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: group_norm(cfg.groups, out_ch, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(out_ch, out_ch, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if in_ch != out_ch {
                Some(conv2d(in_ch, out_ch, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// [`ResnetBlock2D::forward`] on the concatenation of `parts` along the channels (the up
    /// blocks' input and skip connection), computed on chunks of at most `chunk_bytes` of input
    /// per chunk of images: the concatenation, the norms and the convolutions are only ever held
    /// for one chunk. The same result as concatenating and calling `forward` (every op is per
    /// image).
    pub fn forward_chunked(
        &self,
        parts: &[&Tensor],
        temb: Option<&Tensor>,
        chunk_bytes: usize,
    ) -> candle_core::Result<Tensor> {
        let Some(first) = parts.first() else { candle_core::bail!("a ResNet block needs an input") };
        let n = first.dim(0)?;
        let row_bytes: usize = parts.iter().map(|p| p.elem_count() / n.max(1) * p.dtype().size_in_bytes()).sum();
        let chunks = even_chunks(n, chunk_rows(chunk_bytes, row_bytes));
        map_chunks(0, &chunks, |start, len| {
            let x = if parts.len() == 1 {
                first.narrow(0, start, len)?
            } else {
                let pieces = parts.iter().map(|p| p.narrow(0, start, len)).collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&pieces, 1)?
            };
            let temb = match temb {
                Some(t) if t.dim(0)? == n => Some(t.narrow(0, start, len)?),
                other => other.cloned(),
            };
            self.forward(&x, temb.as_ref())
        })
    }

    /// `x`: (n, C, H, W); `temb`: (n, temb_channels) when the block has a time projection.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?),
            _ => None,
        };
        // (in bands of rows where x is large, as the second convolution then is)
        let h = self.conv1.forward_norm_silu(&self.norm1, x, t.as_ref())?;
        if let Some(bands) = RowBands::of(x.dims4()?, x.dtype().size_in_bytes()) {
            return self.second_in_bands(x, h, bands);
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = add(&shortcut, &h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }

    /// The rest of [`ResnetBlock2D::forward`] in bands of rows ([`RowBands`]) after the first
    /// convolution (`h`, banded too): the normalised input is only ever held a band at a time,
    /// and the second convolution's output, with the shortcut added as it is written,
    /// overwrites `h` (which no one else holds) a band behind: band k is written once band
    /// k + 1 has read the row above it. Besides `x`, one tensor of the output's size is held,
    /// where the whole form holds four.
    fn second_in_bands(&self, x: &Tensor, h: Tensor, bands: RowBands) -> candle_core::Result<Tensor> {
        let statistics = self.norm2.statistics(&h)?;
        let write = |(band, y, shortcut): (Band, Tensor, Tensor)| -> candle_core::Result<()> {
            if self.output_scale_factor == 1.0 {
                set_rows(&h, band.r0, &y, Some(&shortcut))
            } else {
                set_rows(&h, band.r0, &((y + shortcut)? / self.output_scale_factor)?, None)
            }
        };
        let mut pending = None;
        for band in bands.iter() {
            let rows = self.norm2.apply_silu(&h.narrow(2, band.a, band.b - band.a)?, &statistics)?;
            let y = self.conv2.forward_band(&rows, band)?;
            drop(rows);
            let x_rows = x.narrow(2, band.r0, band.r1 - band.r0)?;
            let shortcut = match &self.conv_shortcut {
                Some(conv) => conv.forward(&x_rows)?,
                None => x_rows,
            };
            if let Some(previous) = pending.replace((band, y, shortcut)) {
                write(previous)?;
            }
        }
        if let Some(last) = pending {
            write(last)?;
        }
        Ok(h)
    }
}
