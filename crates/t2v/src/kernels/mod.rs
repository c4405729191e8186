//! CPU kernels for the operations where candle's general ones cost the most time, each behind
//! candle's custom-op interface and used only for contiguous float32 tensors on the CPU; every
//! other device and dtype takes candle's standard ops, so the model code stays device-generic.

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the CPU kernels of this module off (or back on): every operation then takes candle's
/// standard ops, the path that CUDA and Metal devices take. The tests run the fixtures through
/// both paths.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether tensors on `device` take this module's kernels: the CPU, with the kernels enabled.
pub(crate) fn on_cpu(device: &candle_core::Device) -> bool {
    device.is_cpu() && ENABLED.load(Ordering::Relaxed)
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

/// The contiguous float32 data of a custom op's operand (`what` names it in errors).
pub(crate) fn f32_of<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (candle_core::CpuStorage::F32(_), None) => candle_core::bail!("{what} is not contiguous"),
        _ => candle_core::bail!("{what} must be f32"),
    }
}

/// The contiguous float32 or float16 data of a custom op's operand (a weight that may stay
/// float16 in memory).
pub(crate) fn src_of<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout, what: &str) -> candle_core::Result<gemm::Src<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{what} is not contiguous") };
    Ok(match s {
        candle_core::CpuStorage::F32(v) => gemm::Src::F32(&v[a..b]),
        candle_core::CpuStorage::F16(v) => gemm::Src::F16(&v[a..b]),
        _ => candle_core::bail!("{what} must be f32 or f16"),
    })
}

pub mod add;
pub mod attention;
pub mod conv;
pub mod copy;
pub mod geglu;
pub mod gemm;
pub mod group_norm;
pub mod linear;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vmath;

/// Keeps memory that the process frees mapped for its next allocation (glibc on Linux).
///
/// A UNet step allocates and frees hundreds of activation buffers of 10–400 MB. glibc serves
/// anything over 32 MB with a fresh `mmap` and unmaps it on free, so every such buffer is
/// faulted in and zeroed by the kernel page by page again: a quarter of a step's time went to
/// system time (27 s of page faults in a 100 s benchmark). With large blocks served from the
/// heap and the heap never trimmed, the buffers are reused; the peak resident memory is the
/// same (measured 4.42 → 4.48 GiB at 16 frames). Returns whether the settings took effect.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's thresholds; called before heavy work.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
