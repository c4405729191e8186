//! `y = x·Wᵀ + b` as one packed GEMM ([`super::packed_matmul`]) whose output tiles start as the bias
//! (candle's matmul would need a second pass over the output for the bias), float16 weights
//! widened as they are packed, once per call; bfloat16 weights multiply in bfloat16 where the CPU
//! has AVX512_BF16 ([`super::bf16`]: the input rounded as it is packed), else are widened too.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::bf16::Half;
use super::packed_matmul::{self, Init, PackedA, PackedB};

/// `x·Wᵀ + b` with the weight packed (or streamed) by the call; with `geglu`, the feed-forward's
/// first projection with GEGLU fused in ([`linear_geglu`]).
struct LinearOp {
    geglu: bool,
}

/// A weight as the products meet it: streamed from its own storage a few panels at a time where
/// the rows are few for its size ([`packed_matmul::streams_weight`]), else packed whole once.
pub(crate) enum Weight<'a> {
    Streamed { w: super::Src<'a>, n: usize, k: usize },
    Packed(PackedB),
}

impl<'a> Weight<'a> {
    /// The form for products of at most `rows` rows against `w` (n rows of k values).
    pub(crate) fn for_rows(w: super::Src<'a>, n: usize, k: usize, rows: usize) -> Self {
        if k > 0 && Self::streams(w, n, rows) {
            Weight::Streamed { w, n, k }
        } else {
            Weight::Packed(pack(w, n, k))
        }
    }

    /// Whether products of `rows` rows against `w` (n rows) stream it: float32 products (16-bit
    /// ones pack it in their own type) where the rows are few for its size.
    pub(crate) fn streams(w: super::Src, n: usize, rows: usize) -> bool {
        packed_matmul::streams_weight(rows, n) && Half::of(w).is_none()
    }

    /// `out (m×n) = init + x (m×k) · Wᵀ` at the linear layers' vector width.
    pub(crate) fn multiply(&self, x: &[f32], m: usize, out: &mut [f32], init: Init) {
        match self {
            Weight::Packed(packed) => multiply(x, m, packed, out, init, None),
            &Weight::Streamed { w, n, k } => {
                assert!(x.len() >= m * k && out.len() >= m * n, "linear operand sizes");
                let wide = super::wide(super::KernelKind::Linear);
                // SAFETY: sizes checked above; `packed_product()` was checked before any caller
                // ran (the linear ops, the unfolded convolutions).
                unsafe { packed_matmul::matmul_streamed(m, x.as_ptr(), k, w, n, k, out.as_mut_ptr(), n, init, wide) }
            }
        }
    }
}

/// A weight packed for the products (bfloat16 and float16 kept where the CPU multiplies in them,
/// else widened), on every thread.
fn pack(w: super::Src, n: usize, k: usize) -> PackedB {
    match Half::of(w) {
        Some(half) => PackedB::from_transposed_half(w, half, n, k, true),
        None => PackedB::from_transposed(w, n, k, true),
    }
}

/// `x·B + bias` for an input of float32 rows and a packed B.
fn product(x: &CpuStorage, lx: &Layout, packed: &PackedB, bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
    product_with(x, lx, packed.k(), packed.n(), bias, |x, m, out, init| multiply(x, m, packed, out, init, None))
}

/// `x·W + bias` for an input of float32 rows (m×k) into a new m×n output, the product written by
/// `multiply(x, m, out, init)`.
fn product_with(
    x: &CpuStorage,
    lx: &Layout,
    k: usize,
    n: usize,
    bias: Option<&[f32]>,
    multiply: impl FnOnce(&[f32], usize, &mut [f32], Init),
) -> Result<(CpuStorage, Shape)> {
    let x = super::f32_of(x, lx, "linear input")?;
    let (m, width) = lx.shape().dims2()?;
    if width != k {
        candle_core::bail!("linear: input width {width} ≠ weight width {k}");
    }
    // the GEMM overwrites (or starts from the bias in) every tile
    let mut out = super::output_buffer(m * n);
    multiply(x, m, &mut out, bias.map_or(Init::Overwrite, Init::Bias));
    Ok((CpuStorage::F32(out), Shape::from((m, n))))
}

/// `out (m×n) = init + x (m×k) · B` at the linear layers' vector width, plus `residual` (m×n)
/// where there is one.
fn multiply(x: &[f32], m: usize, packed: &PackedB, out: &mut [f32], init: Init, residual: Option<&[f32]>) {
    let (k, n) = (packed.k(), packed.n());
    assert!(x.len() >= m * k && out.len() >= m * n, "linear operand sizes");
    assert!(residual.is_none_or(|r| r.len() >= m * n), "linear residual size");
    let wide = super::wide(super::KernelKind::Linear);
    let residual = residual.map(|r| r.as_ptr());
    // SAFETY: sizes checked above, rows contiguous; `packed_product()` was checked before any linear op
    // was applied (`linear`, `linear_accumulate`, `PackedLinear::new`).
    unsafe { packed_matmul::matmul(m, x.as_ptr(), k, packed, out.as_mut_ptr(), n, init, wide, residual) };
}

impl LinearOp {
    fn run(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let w = super::src_of(w, lw, "linear weight")?;
        let (n, k) = lw.shape().dims2()?;
        if self.geglu {
            let bias = bias.map(geglu_bias);
            // float32 products of few rows: the weight streamed in pairs of panels
            #[cfg(target_arch = "x86_64")]
            {
                let m = lx.shape().dims2()?.0;
                if Weight::streams(w, n, m) {
                    let x = super::f32_of(x, lx, "linear input")?;
                    // every gated column of every row is written
                    let mut out = super::output_buffer(m * n / 2);
                    let wide = super::wide(super::KernelKind::Linear);
                    let init = bias.as_deref().map_or(Init::Overwrite, Init::Bias);
                    // SAFETY: the widths checked by geglu_fusable (n in whole pairs of panels) and
                    // here; x holds m×k floats, out m×n/2; the products' instructions checked there.
                    unsafe {
                        packed_matmul::matmul_streamed_geglu(
                            m,
                            x.as_ptr(),
                            k,
                            w,
                            n,
                            k,
                            out.as_mut_ptr(),
                            n / 2,
                            init,
                            wide,
                        )
                    };
                    return Ok((CpuStorage::F32(out), Shape::from((m, n / 2))));
                }
            }
            return gated_product(x, lx, &geglu_packed(w, n, k), bias.as_deref());
        }
        // streamed where the rows are few for the weight's size, else packed once per call
        let weight = Weight::for_rows(w, n, k, lx.shape().dims2()?.0);
        product_with(x, lx, k, n, bias, |x, m, out, init| weight.multiply(x, m, out, init))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        if self.geglu {
            "linear-geglu"
        } else {
            "linear"
        }
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(x, lx, w, lw, None)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        if self.geglu {
            "linear-geglu-bias"
        } else {
            "linear-bias"
        }
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = super::f32_of(b, lb, "linear bias")?;
        self.run(x, lx, w, lw, Some(b))
    }
}

/// Whether [`linear`] takes the fused GEMM for these operands.
fn fused(x_device: &candle_core::Device, x_dtype: DType, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    super::on_cpu(x_device)
        && super::packed_product()
        && x_dtype == DType::F32
        && matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && bias.is_none_or(|b| b.dtype() == DType::F32)
}

/// A linear layer's weight packed once for many calls on float32 inputs (FreeNoise runs the same
/// layers on every window of a video: packing per call would repeat the weight's widening and
/// transposition each time, a third of a small window's product at 1280 channels), or for good
/// in place of the weight ([`PackedLinear::resident`]).
pub struct PackedLinear {
    packed: PackedB,
    bias: Option<Vec<f32>>,
    /// Packed for [`PackedLinear::forward_geglu`] ([`PackedLinear::new_geglu`]).
    geglu: bool,
}

/// The product through a [`PackedLinear`], gated where it was packed for GEGLU.
struct PackedLinearOp<'a>(&'a PackedLinear);

impl CustomOp1 for PackedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "linear-packed"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let (packed, bias) = (&self.0.packed, self.0.bias.as_deref());
        if self.0.geglu {
            gated_product(x, lx, packed, bias)
        } else {
            product(x, lx, packed, bias)
        }
    }
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("out", &self.packed.n())
            .field("in", &self.packed.k())
            .field("half", &self.packed.half())
            .field("geglu", &self.geglu)
            .finish()
    }
}

/// `(x·Wᵀ + b) + residual` through a [`PackedLinear`], the residual added as the product is
/// written ([`packed_matmul::matmul`] with a residual).
struct PackedResidualOp<'a>(&'a PackedLinear);

impl CustomOp2 for PackedResidualOp<'_> {
    fn name(&self) -> &'static str {
        "linear-packed-residual"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, r: &CpuStorage, lr: &Layout) -> Result<(CpuStorage, Shape)> {
        let packed = &self.0.packed;
        let (k, n) = (packed.k(), packed.n());
        let residual = super::f32_of(r, lr, "linear residual")?;
        let rows = lx.shape().dims2()?.0;
        if lr.shape().dims2()? != (rows, n) {
            candle_core::bail!("linear-residual: residual {:?} for an output of {rows}×{n}", lr.shape().dims());
        }
        product_with(x, lx, k, n, self.0.bias.as_deref(), |x, m, out, init| {
            multiply(x, m, packed, out, init, Some(residual))
        })
    }
}

/// `acc += x·Wᵀ` in place through a [`PackedLinear`] (its bias left out).
struct PackedAccumulateOp<'a>(&'a PackedLinear);

impl candle_core::InplaceOp2 for PackedAccumulateOp<'_> {
    fn name(&self) -> &'static str {
        "linear-packed-accumulate"
    }

    fn cpu_fwd(&self, acc: &mut CpuStorage, la: &Layout, x: &CpuStorage, lx: &Layout) -> Result<()> {
        let packed = &self.0.packed;
        accumulate_into(acc, la, x, lx, packed.n(), packed.k(), |x, m, acc| {
            multiply(x, m, packed, acc, Init::Accumulate, None)
        })
    }
}

impl PackedLinear {
    /// `weight` (out, in) packed to be kept in its place for the model's life, where the CPU's
    /// products take it as it is stored: bfloat16 weights where [`super::avx512bf16`], float16
    /// ones where [`super::f16_products`], whose packed form has the same size as the weight
    /// (widened weights would be packed at twice their size: they stay tensors and are packed
    /// per call). With
    /// `geglu`, a feed-forward projection in the fused product's order where GEGLU fuses into it.
    /// The same products, so the same bits, as packing per call; what is saved is the packing
    /// (`gather_panel`: 3.7% of a 4-frame step's `perf` samples on Emerald Rapids). `None`
    /// elsewhere.
    pub fn resident(weight: &Tensor, bias: Option<&Tensor>, geglu: bool) -> Result<Option<PackedLinear>> {
        let kept = match weight.dtype() {
            DType::BF16 => super::avx512bf16(),
            DType::F16 => super::f16_products(),
            _ => false,
        };
        if !kept {
            return Ok(None);
        }
        if geglu {
            if let Some(packed) = Self::packed(weight, bias, true)? {
                return Ok(Some(packed));
            }
        }
        Self::packed(weight, bias, false)
    }

    /// The dtype the weight was packed in (bfloat16 or float16; float32 where widened).
    pub fn weight_dtype(&self) -> DType {
        match self.packed.half() {
            Some(Half::Bf16) => DType::BF16,
            Some(Half::F16) => DType::F16,
            None => DType::F32,
        }
    }

    /// The output width (the projection's whole width where packed for GEGLU).
    pub fn out_dim(&self) -> usize {
        self.packed.n()
    }

    /// The input width.
    pub fn in_dim(&self) -> usize {
        self.packed.k()
    }

    /// The packed form of `weight` (out, in) and `bias` (out) where [`linear`] would take the
    /// fused GEMM for float32 inputs on `device`; `None` elsewhere (call [`linear`] there).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<PackedLinear>> {
        Self::packed(weight, bias, false)
    }

    /// A feed-forward projection packed for [`PackedLinear::forward_geglu`] where GEGLU fuses
    /// into its products ([`fuses_geglu`] for float32 rows on `weight`'s device); `None`
    /// elsewhere.
    pub fn new_geglu(weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<PackedLinear>> {
        Self::packed(weight, bias, true)
    }

    fn packed(weight: &Tensor, bias: Option<&Tensor>, geglu: bool) -> Result<Option<PackedLinear>> {
        let takes = if geglu {
            geglu_fusable(weight.device(), weight, bias)
        } else {
            fused(weight.device(), DType::F32, weight, bias)
        };
        if !takes {
            return Ok(None);
        }
        let (n, k) = weight.dims2()?;
        let w = weight.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { return Ok(None) };
        let w = super::src_of(cpu, layout, "linear weight")?;
        let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
        Ok(Some(if geglu {
            PackedLinear { packed: geglu_packed(w, n, k), bias: bias.as_deref().map(geglu_bias), geglu }
        } else {
            PackedLinear { packed: pack(w, n, k), bias, geglu }
        }))
    }

    /// Whether this is packed for [`PackedLinear::forward_geglu`] (and not for `forward`).
    pub fn is_geglu(&self) -> bool {
        self.geglu
    }

    fn check(&self, x: &Tensor, geglu: bool) -> Result<Tensor> {
        if x.dtype() != DType::F32 || !x.device().is_cpu() {
            candle_core::bail!("packed linear: float32 inputs on the CPU only, not {:?}", x.dtype());
        }
        let still = match self.packed.half() {
            Some(Half::Bf16) => super::avx512bf16(),
            Some(Half::F16) => super::avx512fp16(),
            None => true,
        };
        if !still {
            candle_core::bail!(
                "packed linear: packed for the 16-bit products, but the kernels' path is now {}: load the model again",
                super::isa()
            );
        }
        if self.geglu != geglu {
            candle_core::bail!("packed linear: packed for {}", if self.geglu { "forward_geglu" } else { "forward" });
        }
        super::copy::contiguous(x)
    }

    /// `x` (rows, in) · Wᵀ + bias → (rows, out), for float32 `x` on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check(x, false)?.apply_op1_no_bwd(&PackedLinearOp(self))
    }

    /// [`linear_geglu`] through the weight packed by [`PackedLinear::new_geglu`]: (rows, out/2).
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        self.check(x, true)?.apply_op1_no_bwd(&PackedLinearOp(self))
    }

    /// `x (rows, in) · Wᵀ + bias + residual (rows, out)`: the product then the residual added, in
    /// one pass over the output (on AMX tiles, each block of it as it leaves the tiles), with the
    /// bits of the product followed by [`super::add::add`].
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let x = self.check(x, false)?;
        if residual.dtype() != DType::F32 {
            candle_core::bail!("packed linear: a float32 residual only, not {:?}", residual.dtype());
        }
        x.apply_op2_no_bwd(&super::copy::contiguous(residual)?, &PackedResidualOp(self))
    }

    /// Whether [`PackedLinear::forward_tiles`] takes rows already in AMX tiles
    /// ([`super::layer_norm::layer_norm_tiles`]): a bfloat16 weight, products on the tiles.
    pub fn takes_tiles(&self) -> bool {
        self.packed.is_bf16() && super::amx()
    }

    /// The product (gated where packed for GEGLU) of rows in AMX tiles: (rows, out), or
    /// (rows, out/2) with GEGLU. The same bits as [`PackedLinear::forward`] (or
    /// [`PackedLinear::forward_geglu`]) of the float32 rows those tiles were rounded from.
    pub fn forward_tiles(&self, a: &PackedA) -> Result<Tensor> {
        self.tiles_product(a, None)
    }

    /// [`PackedLinear::forward_tiles`] plus `residual` (rows, out), added as each block of the
    /// product leaves the tiles, as [`PackedLinear::forward_residual`] adds it.
    pub fn forward_residual_tiles(&self, a: &PackedA, residual: &Tensor) -> Result<Tensor> {
        if self.geglu {
            candle_core::bail!("packed linear: packed for forward_geglu, not a residual product");
        }
        self.tiles_product(a, Some(residual))
    }

    /// Whether [`PackedLinear::forward_geglu_tiles`] takes this projection: packed for GEGLU on
    /// AMX tiles, its gated half in whole depth tiles.
    pub fn gates_into_tiles(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.geglu && self.takes_tiles() && super::amx::gated_tiles_fit(self.packed.n());
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// [`PackedLinear::forward_tiles`] with GEGLU fused in, the gated output itself rounded into
    /// AMX tiles for the next product ([`PackedLinear::forward_residual_tiles`]): the same bits
    /// as that product of the float32 gated rows, without writing them, reading them back and
    /// packing them.
    pub fn forward_geglu_tiles(&self, a: &PackedA) -> Result<PackedA> {
        let (k, n) = (self.packed.k(), self.packed.n());
        if !self.gates_into_tiles() || !a.is_tiles() || a.k() != k {
            candle_core::bail!(
                "packed linear: a projection {n}×{k} that does not gate into AMX tiles, or rows of depth {}",
                a.k()
            );
        }
        #[cfg(target_arch = "x86_64")]
        {
            const T: usize = 16;
            let (m, gated) = (a.m(), n / 2);
            let tiles = gated.div_ceil(2).div_ceil(T);
            let group = tiles * T * T;
            // SAFETY: every element is written: the product writes each real row's pairs (the
            // gated half fills whole tiles, gates_into_tiles), the rows past m are zeroed here.
            let mut pairs = unsafe { super::aligned::Aligned::<u32>::uninit(m.div_ceil(T) * group) };
            if !m.is_multiple_of(T) {
                let last = &mut pairs[(m / T) * group..];
                for t in 0..tiles {
                    last[t * T * T + (m % T) * T..(t + 1) * T * T].fill(0);
                }
            }
            let init = self.bias.as_deref().map_or(Init::Overwrite, Init::Bias);
            // SAFETY: AMX checked with A in tiles of B's depth and gated_tiles_fit; `pairs` holds
            // ⌈m/16⌉ groups of `tiles` tiles, 16·tiles u32 a row's stride.
            unsafe {
                packed_matmul::matmul_tiles(
                    a,
                    &self.packed,
                    pairs.as_mut_ptr() as *mut f32,
                    tiles * T,
                    init,
                    packed_matmul::Epilogue::GegluTiles,
                )
            };
            Ok(PackedA { data: Vec::new(), pairs, half: Some(Half::Bf16), tiles: true, m, k: gated })
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("gates_into_tiles() is false off x86-64")
    }

    fn tiles_product(&self, a: &PackedA, residual: Option<&Tensor>) -> Result<Tensor> {
        let (k, n) = (self.packed.k(), self.packed.n());
        if !self.takes_tiles() || !a.is_tiles() || a.k() != k {
            candle_core::bail!(
                "packed linear: rows in tiles of depth {} for a weight {n}×{k} {}",
                a.k(),
                if self.takes_tiles() { "of the same depth" } else { "that does not multiply on AMX tiles" }
            );
        }
        let m = a.m();
        let width = if self.geglu { n / 2 } else { n };
        let residual = match residual {
            Some(r) => {
                if r.dims() != [m, n] || r.dtype() != DType::F32 || !r.device().is_cpu() {
                    candle_core::bail!("packed linear: residual {:?} for an output of {m}×{n}", r.dims());
                }
                Some(super::copy::contiguous(r)?)
            }
            None => None,
        };
        #[cfg(target_arch = "x86_64")]
        {
            let init = self.bias.as_deref().map_or(Init::Overwrite, Init::Bias);
            // every element (of the gated half with GEGLU) is written
            let mut out = super::output_buffer(m * width);
            let guard = residual.as_ref().map(|r| r.storage_and_layout());
            let epilogue = match &guard {
                Some((storage, layout)) => {
                    let candle_core::Storage::Cpu(cpu) = &**storage else {
                        candle_core::bail!("packed linear: a residual on the CPU only")
                    };
                    packed_matmul::Epilogue::Residual(super::f32_of(cpu, layout, "linear residual")?.as_ptr())
                }
                None if self.geglu => packed_matmul::Epilogue::Geglu,
                None => packed_matmul::Epilogue::Store,
            };
            // SAFETY: AMX checked (takes_tiles), A in tiles of B's depth, GEGLU packing only where
            // geglu_fits; `out` holds m rows of `width`, the residual m rows of n.
            unsafe { packed_matmul::matmul_tiles(a, &self.packed, out.as_mut_ptr(), width, init, epilogue) };
            drop(guard);
            Tensor::from_vec(out, (m, width), &candle_core::Device::Cpu)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (residual, width);
            unreachable!("takes_tiles() is false off x86-64")
        }
    }

    /// [`linear_accumulate`] through this weight: `acc (rows, out) += x (rows, in) · Wᵀ` in
    /// place (contiguous float32 sums), the bias left out.
    pub fn accumulate(&self, acc: Tensor, x: &Tensor) -> Result<Tensor> {
        let x = self.check(x, false)?;
        acc.inplace_op2(&x, &PackedAccumulateOp(self))?;
        Ok(acc)
    }
}

/// `x` (rows, in) · `weight` (out, in)ᵀ + `bias` (out) → (rows, out). On the CPU with float32
/// activations (and float32, float16 or bfloat16 weights) one fused GEMM; elsewhere candle's
/// matmul.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if fused(x.device(), x.dtype(), weight, bias) {
        let (x, w) = (super::copy::contiguous(x)?, weight.contiguous()?);
        return match bias {
            Some(b) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &LinearOp { geglu: false }),
            None => x.apply_op2_no_bwd(&w, &LinearOp { geglu: false }),
        };
    }
    let w = if weight.dtype() == x.dtype() { weight.clone() } else { weight.to_dtype(x.dtype())? };
    let y = x.matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `bias` (n) in the order of [`PackedB::from_transposed_bf16_geglu`]'s panels: value and gate
/// columns alternating by 16.
/// A GEGLU projection's weight packed for [`gated_product`]: in its own 16-bit type where the
/// products take it so, else widened to float32.
fn geglu_packed(w: super::Src, n: usize, k: usize) -> PackedB {
    match Half::of(w) {
        Some(half) => PackedB::from_transposed_half_geglu(w, half, n, k, true),
        None => PackedB::from_transposed_geglu(w, n, k, true),
    }
}

fn geglu_bias(bias: &[f32]) -> Vec<f32> {
    let (n, nr) = (bias.len(), packed_matmul::NR);
    (0..n).map(|j| bias[(j / (2 * nr)) * nr + (j / nr % 2) * (n / 2) + j % nr]).collect()
}

/// `value · gelu(gate)` of `x (m×k) · B + bias` for B packed by
/// [`PackedB::from_transposed_bf16_geglu`] and the bias in its order: a new m × n/2 output.
fn gated_product(x: &CpuStorage, lx: &Layout, packed: &PackedB, bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
    let x = super::f32_of(x, lx, "linear input")?;
    let (m, k) = lx.shape().dims2()?;
    let n = packed.n();
    if k != packed.k() {
        candle_core::bail!("linear-geglu: input width {k} ≠ weight width {}", packed.k());
    }
    #[cfg(target_arch = "x86_64")]
    if packed.is_bf16() && super::amx() && super::amx::geglu_fits(k, n) {
        // every gated column of every row is written
        let mut out = super::output_buffer(m * n / 2);
        let init = bias.map_or(Init::Overwrite, Init::Bias);
        // SAFETY: AMX checked (and with it AVX-512F), geglu_fits for B; x holds m×k floats, out m×n/2.
        unsafe { packed_matmul::matmul_geglu(m, x.as_ptr(), k, packed, out.as_mut_ptr(), n / 2, init) };
        return Ok((CpuStorage::F32(out), Shape::from((m, n / 2))));
    }
    #[cfg(target_arch = "x86_64")]
    if !(packed.is_bf16() && super::amx()) && super::avx2() && n.is_multiple_of(2 * packed_matmul::NR) {
        let mut out = super::output_buffer(m * n / 2);
        let init = bias.map_or(Init::Overwrite, Init::Bias);
        let wide = super::wide(super::KernelKind::Linear);
        // SAFETY: AVX2 checked, and a 16-bit B exists only where its products run (packed by
        // geglu_packed or PackedLinear for this path); n in whole pairs of panels; x holds m×k
        // floats, out m×n/2.
        unsafe { packed_matmul::matmul_gated(m, x.as_ptr(), k, packed, out.as_mut_ptr(), n / 2, init, wide) };
        return Ok((CpuStorage::F32(out), Shape::from((m, n / 2))));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, bias);
    candle_core::bail!("linear-geglu: input {m}×{k}, weight {n}×{k}: not a product GEGLU fuses into")
}

/// Whether GEGLU fuses into products with this weight and bias for float32 rows on `device`,
/// each half of the output in whole panels (every feed-forward of the published models): on AMX
/// tiles for a bfloat16 weight with its depths in one block of tiles, and into the products on
/// vectors for any other (float32, widened, or on `vdpbf16ps` or float16 products).
fn geglu_fusable(device: &candle_core::Device, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Ok((n, k)) = weight.dims2() {
        if !fused(device, DType::F32, weight, bias) || !n.is_multiple_of(2 * packed_matmul::NR) {
            return false;
        }
        if weight.dtype() == DType::BF16 && super::amx() {
            return super::amx::geglu_fits(k, n);
        }
        return super::avx2();
    }
    let _ = (device, weight, bias);
    false
}

/// Whether [`linear_geglu`] fuses GEGLU into the product for these operands (float32 rows).
pub fn fuses_geglu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.rank() == 2 && x.dtype() == DType::F32 && geglu_fusable(x.device(), weight, bias)
}

/// `value · gelu(gate)` of `x (rows, in) · weight (out, in)ᵀ + bias` split into halves (value,
/// gate) of out/2 columns: diffusers' `GEGLU`. Fused into the product where [`fuses_geglu`]
/// (the same bits, without the projection's output in memory); else the product, then
/// [`super::geglu::geglu`].
pub fn linear_geglu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if fuses_geglu(x, weight, bias) {
        let (x, w) = (super::copy::contiguous(x)?, weight.contiguous()?);
        return match bias {
            Some(b) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &LinearOp { geglu: true }),
            None => x.apply_op2_no_bwd(&w, &LinearOp { geglu: true }),
        };
    }
    super::geglu::geglu(&linear(x, weight, bias)?)
}

/// `acc += x·Wᵀ` in place: the product's tiles start from `acc`'s own values.
struct LinearAccumulateOp;

impl candle_core::InplaceOp3 for LinearAccumulateOp {
    fn name(&self) -> &'static str {
        "linear-accumulate"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        la: &Layout,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<()> {
        let w = super::src_of(w, lw, "linear weight")?;
        let (n, k) = lw.shape().dims2()?;
        accumulate_into(acc, la, x, lx, n, k, |x, m, acc| multiply(x, m, &pack(w, n, k), acc, Init::Accumulate, None))
    }
}

/// `acc (m×n) += x (m×k) · W` by `accumulate(x, m, acc)`, the operands checked first.
fn accumulate_into(
    acc: &mut CpuStorage,
    la: &Layout,
    x: &CpuStorage,
    lx: &Layout,
    n: usize,
    k: usize,
    accumulate: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<()> {
    let x = super::f32_of(x, lx, "linear input")?;
    let (m, width) = lx.shape().dims2()?;
    let Some((a0, a1)) = la.contiguous_offsets() else { candle_core::bail!("linear-accumulate: sums not contiguous") };
    let CpuStorage::F32(acc) = acc else { candle_core::bail!("linear-accumulate needs float32 sums") };
    if width != k || a1 - a0 != m * n {
        candle_core::bail!("linear-accumulate: input {m}×{width}, weight {n}×{k}, sums of {} values", a1 - a0);
    }
    accumulate(x, m, &mut acc[a0..a1]);
    Ok(())
}

/// `acc (rows, out) += x (rows, in) · weight (out, in)ᵀ`, without a bias: in place on the CPU
/// (contiguous float32 sums and input), so the sum never needs a second buffer; elsewhere
/// candle's matmul and add, returning the new sums. Returns the sums either way.
pub fn linear_accumulate(acc: Tensor, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = weight.dims2()?;
    if acc.dims() != [m, n] || k != k2 {
        candle_core::bail!("linear-accumulate: sums {:?}, input {m}×{k}, weight {n}×{k2}", acc.dims());
    }
    if fused(x.device(), x.dtype(), weight, None) && acc.dtype() == DType::F32 && acc.is_contiguous() {
        let (x, w) = (super::copy::contiguous(x)?, weight.contiguous()?);
        acc.inplace_op3(&x, &w, &LinearAccumulateOp)?;
        return Ok(acc);
    }
    let w = if weight.dtype() == x.dtype() { weight.clone() } else { weight.to_dtype(x.dtype())? };
    acc + x.matmul(&w.t()?)?
}
