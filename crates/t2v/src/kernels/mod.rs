//! CPU kernels for the operations where candle's general ones cost the most time, each behind
//! candle's custom-op interface and used only for contiguous float32 tensors on the CPU; every
//! other device and dtype takes candle's standard ops, so the model code stays device-generic.
//!
//! Each public function chooses for itself: the CPU kernel where it applies, candle's ops
//! otherwise, both within the fixtures' tolerances. The kernels are the bottom of the library: they
//! use nothing of it but each other, and record no time (the layers of [`crate::nn`] do).

pub mod add;
pub mod aligned;
#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod bf16;
pub mod conv;
pub mod copy;
#[cfg(target_arch = "x86_64")]
pub mod fp16;
pub mod geglu;
pub mod group_norm;
pub mod isa;
pub mod layer_norm;
pub mod linear;
pub mod packed_matmul;
pub mod tuning;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vmath;

use half::f16;
use rayon::prelude::*;

pub use isa::{isa, isa_forced, set_isa, Isa, IsaError};
pub use tuning::{wide, KernelKind, Tuning};

/// Whether tensors on `device` take this module's kernels: the CPU, on a path other than
/// [`Isa::Generic`] (candle's standard ops, the path that CUDA and Metal devices take).
pub(crate) fn on_cpu(device: &candle_core::Device) -> bool {
    device.is_cpu() && isa() != Isa::Generic
}

/// An output buffer of `n` floats that the kernel filling it writes in full before anything
/// reads it. Not zeroed: the allocator reuses freed activation buffers (see [`tune_allocator`]),
/// and zeroing one first is an extra write pass over every output (about 0.5 s of a 62 s
/// benchmark run, mostly in the memory-bound kernels: group norm, residual adds).
pub(crate) fn output_buffer(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns, and every caller overwrites all n elements
    // before the buffer is read or handed to candle (each use says why).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}

/// A float32 tensor of `shape` whose values are all about to be written (the bands of a
/// convolution's output): on the CPU uninitialised ([`output_buffer`]), so that neither the
/// allocator nor the kernel zeroes memory the writes then cover; zeros elsewhere.
pub(crate) fn to_be_written(
    shape: impl Into<candle_core::Shape>,
    device: &candle_core::Device,
) -> candle_core::Result<candle_core::Tensor> {
    let shape = shape.into();
    if on_cpu(device) {
        return candle_core::Tensor::from_vec(output_buffer(shape.elem_count()), shape, device);
    }
    candle_core::Tensor::zeros(shape, candle_core::DType::F32, device)
}

/// The contiguous float32 data of a custom op's operand (`what` names it in errors).
pub(crate) fn f32_of<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (candle_core::CpuStorage::F32(_), None) => candle_core::bail!("{what} is not contiguous"),
        _ => candle_core::bail!("{what} must be f32"),
    }
}

/// The contiguous float32, float16 or bfloat16 data of a custom op's operand (a weight that may
/// stay narrow in memory).
pub(crate) fn src_of<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<Src<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{what} is not contiguous") };
    Ok(match s {
        candle_core::CpuStorage::F32(v) => Src::F32(&v[a..b]),
        candle_core::CpuStorage::F16(v) => Src::F16(&v[a..b]),
        candle_core::CpuStorage::BF16(v) => Src::Bf16(&v[a..b]),
        _ => candle_core::bail!("{what} must be f32, f16 or bf16"),
    })
}

/// A contiguous float32, float16 or bfloat16 slice (weights may stay narrow in memory).
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [half::bf16]),
}

impl Src<'_> {
    pub fn len(&self) -> usize {
        match self {
            Src::F32(s) => s.len(),
            Src::F16(s) => s.len(),
            Src::Bf16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements [start, start + len).
    pub fn slice(self, start: usize, len: usize) -> Self {
        match self {
            Src::F32(s) => Src::F32(&s[start..start + len]),
            Src::F16(s) => Src::F16(&s[start..start + len]),
            Src::Bf16(s) => Src::Bf16(&s[start..start + len]),
        }
    }

    /// Whether these are bfloat16 values that the products take as they are ([`bf16`]): where
    /// [`avx512bf16`]; elsewhere bfloat16 weights are widened like float16 ones.
    pub fn multiplies_in_bf16(&self) -> bool {
        matches!(self, Src::Bf16(_)) && avx512bf16()
    }

    /// Whether these are float16 values that the products take as they are ([`fp16`]): where
    /// [`f16_products`]; elsewhere float16 weights are widened as they are packed.
    pub fn multiplies_in_f16(&self) -> bool {
        matches!(self, Src::F16(_)) && f16_products()
    }

    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Src::F32(s) => s[i],
            Src::F16(s) => s[i].to_f32(),
            Src::Bf16(s) => s[i].to_f32(),
        }
    }

    /// The values as float32 (float16 widened with the CPU's conversion instructions, in
    /// parallel for large weights; bfloat16 exactly, by a shift).
    pub fn to_f32_vec(self) -> Vec<f32> {
        use half::slice::HalfFloatSliceExt;
        match self {
            Src::F32(s) => s.to_vec(),
            Src::F16(s) => {
                let mut out = vec![0f32; s.len()];
                out.par_chunks_mut(1 << 16).zip(s.par_chunks(1 << 16)).for_each(|(d, h)| h.convert_to_f32_slice(d));
                out
            }
            Src::Bf16(s) => {
                let mut out = vec![0f32; s.len()];
                out.par_chunks_mut(1 << 16).zip(s.par_chunks(1 << 16)).for_each(|(d, h)| h.convert_to_f32_slice(d));
                out
            }
        }
    }
}

/// A raw output pointer shared by the tasks of a parallel loop, each of which writes its own
/// disjoint part of the buffer (the parallel loops say which part).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: the pointer is only dereferenced by tasks writing disjoint ranges of a buffer that
// outlives the parallel loop.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper rather than
    /// its raw-pointer field).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// rayon's threads (at least 1).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Whether the AVX2 kernels run (the AVX2 or the AVX-512 path: the CPU has AVX2, FMA and F16C);
/// without, kernels take a scalar loop or candle's ops.
pub fn avx2() -> bool {
    isa() >= Isa::Avx2
}

/// Whether the linear layers run the packed matrix product ([`packed_matmul`]): on the x86-64
/// paths and on AArch64's NEON one.
pub fn packed_product() -> bool {
    avx2() || isa() == Isa::Neon
}

/// Whether the AVX-512 kernels run (where one exists; the AVX2 ones elsewhere): the AVX-512 path
/// or the AVX-512 + BF16 one.
pub fn avx512() -> bool {
    isa() >= Isa::Avx512
}

/// Whether bfloat16 weights multiply in bfloat16 (`vdpbf16ps` or AMX tiles, float32 sums): on
/// the `avx512bf16` and `amx` paths, and on `avx512fp16` where the CPU's `vdpbf16ps` beats its
/// float32 FMAs ([`Tuning::bf16_dot`]); elsewhere they are widened to float32 as they are
/// packed, like float16 weights.
pub fn avx512bf16() -> bool {
    match isa() {
        Isa::Avx512Bf16 | Isa::Amx => true,
        Isa::Avx512Fp16 => Tuning::detected().bf16_dot,
        _ => false,
    }
}

/// Whether the path's CPU has AVX512_BF16's instructions (the `avx512bf16` path and those
/// above it), whether or not the products use them ([`avx512bf16`]).
pub(crate) fn bf16_instructions() -> bool {
    isa() >= Isa::Avx512Bf16
}

/// Whether float16 weights can multiply in float16 (`vfmadd231ph`, [`fp16`]): on the
/// `avx512fp16` path only, and there only in layers built for it ([`with_f16_products`]). On
/// `amx` they are widened: there `--dtype bf16` runs on the tiles, 8 times `vfmadd231ph`'s rate.
pub fn avx512fp16() -> bool {
    isa() == Isa::Avx512Fp16
}

thread_local! {
    /// Whether float16 weights met on this thread multiply in float16 ([`with_f16_products`]).
    static F16_PRODUCTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on this thread with float16 weights multiplied in float16 where the path can
/// ([`avx512fp16`]) when `on`, else widened to float32. Widened is the default, so that a float32
/// run of the published float16 weights (kept narrow in memory) has float32's products; the
/// model loaders build the layers of a `--dtype f16` run inside `with_f16_products(true, …)`,
/// and those layers keep the choice for their calls.
pub fn with_f16_products<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_thread_setting(&F16_PRODUCTS, on, f)
}

/// Runs `f` with this thread's `setting` at `value`, restored afterwards (also when `f`
/// panics): the per-thread switches of the layers that a caller sets for one piece of work.
pub(crate) fn with_thread_setting<T: Copy + 'static, R>(
    setting: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(setting, setting.with(|c| c.replace(value)));
    f()
}

/// Whether float16 weights multiply in float16 on this thread now ([`with_f16_products`] on
/// the `avx512fp16` path).
pub fn f16_products() -> bool {
    avx512fp16() && F16_PRODUCTS.with(|c| c.get())
}

/// Whether the bfloat16 products run on AMX tiles ([`Isa::Amx`]).
pub fn amx() -> bool {
    isa() == Isa::Amx
}

/// Hands the memory freed so far back to the system (glibc's `malloc_trim`), where
/// [`tune_allocator`] keeps it: between stages, not within one. Inside the denoising loop every
/// step allocates the sizes the step before freed, so kept blocks are reused; the VAE decode
/// that follows allocates other sizes, and the steps' heap, fragmented around what is still
/// alive, would stay resident beneath it. The decode's own pages are then faulted in once.
/// Returns whether memory was released.
pub fn release_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free memory of the allocator's arenas to the system.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Keeps memory that the process frees mapped for its next allocation (glibc on Linux).
///
/// A UNet step allocates and frees hundreds of activation buffers of 10–400 MB. glibc serves
/// anything over 32 MB with a fresh `mmap` and unmaps it on free, so every such buffer is
/// faulted in and zeroed by the kernel page by page again: a quarter of a step's time goes to
/// system time (27 s of page faults in a 100 s benchmark). With large blocks served from the
/// heap and the heap never trimmed, the buffers are reused; the peak resident memory is the
/// same (measured 4.42 → 4.48 GiB at 16 frames). Returns whether the settings took effect.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's thresholds; called before heavy work.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
