//! The sizes of a run, computed in one place with checked arithmetic, and the memory it needs,
//! so that a run too large to represent or to fit is refused before any work, with what to lower.
//!
//! The memory estimate is an upper bound built from the configs (`t2v bench` measures the real
//! peak; for the 1.7B model at 256×256 it measures 3.8 GiB at 4 frames and 4.4 GiB at 16, and
//! this estimate gives 3.9 and 4.6 GiB):
//!
//! * weights: the bytes the weights take once loaded, from the safetensors headers (float16
//!   matrices stay 2 bytes when kept narrow; `.bin` files count as their size, doubled when
//!   widened from float16);
//! * UNet activations, with B the batch (2 under classifier-free guidance), F frames, s the
//!   dtype's size and T_i = B·F·C_i·P_i·s the bytes of one tensor of level i (C_i channels,
//!   P_i latent pixels, a quarter of the level above's): (layers_per_block + 1)·Σ T_i for the
//!   skip connections the up blocks consume, plus 16·max T_i for the working set of the widest
//!   layer (the feed-forward's 8·C GEGLU projection, its input, the residual and the norm);
//!   attention never holds more than a block of scores;
//! * VAE decoding, one frame at a time: 8·C_0·H·W·s for the full-resolution up block, plus
//!   4·F·3·H·W·4 for the frames (decoded, concatenated, made contiguous, copied for writing);
//! * the latents: 8 copies of (C, F, h, w) (the scheduler's history, the noise, the guided halves);
//! * a fixed [`OVERHEAD`] for the allocator's slack, threads' buffers and the text encoder.

use candle_core::DType;

use crate::error::{gib, Error, Result};
use crate::params::{validate_params, GenerationParams};
use crate::{unet3d, vae};

/// Memory every run needs beside its weights and activations.
pub const OVERHEAD: u64 = 256 << 20;

/// The resolved sizes of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunShape {
    pub frames: usize,
    /// Pixels.
    pub height: usize,
    pub width: usize,
    pub latent_channels: usize,
    pub latent_height: usize,
    pub latent_width: usize,
    /// How many text embeddings the UNet sees at once: 2 under classifier-free guidance.
    pub batch: usize,
}

impl RunShape {
    /// The latents' shape, (1, C, frames, h, w).
    pub fn latent_dims(&self) -> [usize; 5] {
        [1, self.latent_channels, self.frames, self.latent_height, self.latent_width]
    }
}

fn too_large(what: &str) -> Error {
    Error::TooLarge(format!(
        "{what} is too large to compute: lower the number of frames or the frame size (height and width)"
    ))
}

/// Checked product of `factors`, as u64.
fn product(factors: &[u64], what: &str) -> Result<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f)).ok_or_else(|| too_large(what))
}

/// The sizes `params` ask of a model with these configs: the frame size as asked or the UNet's
/// `sample_size` times the VAE's scale (the reference's default), every check of
/// [`validate_params`], and every element count of the run representable (checked, never
/// wrapping).
pub fn run_shape(unet: &unet3d::Config, vae: &vae::Config, params: &GenerationParams) -> Result<RunShape> {
    let scale = vae.scale_factor();
    let side = unet.sample_size.unwrap_or(32).checked_mul(scale).ok_or_else(|| too_large("the default frame size"))?;
    let (height, width) = (params.height.unwrap_or(side), params.width.unwrap_or(side));
    validate_params(params, height, width, scale)?;
    let shape = RunShape {
        frames: params.num_frames,
        height,
        width,
        latent_channels: unet.in_channels,
        latent_height: height / scale,
        latent_width: width / scale,
        batch: if params.guidance_scale > 1.0 { 2 } else { 1 },
    };
    // Every tensor of the run is at most one of these, times a channel count of the configs;
    // each must have a size in bytes that fits an isize.
    let widest = unet.block_out_channels.iter().chain(&vae.block_out_channels).copied().max().unwrap_or(1);
    let (b, f, h, w) = (shape.batch as u64, shape.frames as u64, height as u64, width as u64);
    let largest = [
        product(&[b, f, widest as u64 * 8, h / scale as u64, w / scale as u64, 8], "a UNet activation")?,
        product(&[f, 3, h, w, 8], "the video's frames")?,
        product(&[widest as u64 * 8, h, w, 8], "a VAE activation")?,
    ];
    if largest.iter().any(|&bytes| bytes > isize::MAX as u64) {
        return Err(too_large("a tensor of this run"));
    }
    Ok(shape)
}

/// What a run needs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub activations: u64,
    /// The activations of the same run with one frame.
    pub one_frame: u64,
    /// What each frame beyond the first adds.
    pub per_frame: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.activations).saturating_add(OVERHEAD)
    }
}

/// The activations of a run of `shape` in `dtype`, as the module's formula gives them.
pub fn activation_bytes(unet: &unet3d::Config, vae: &vae::Config, shape: &RunShape, dtype: DType) -> Result<u64> {
    let s = dtype.size_in_bytes() as u64;
    let (b, f) = (shape.batch as u64, shape.frames as u64);
    let mut pixels =
        (shape.latent_height as u64).checked_mul(shape.latent_width as u64).ok_or_else(|| too_large("the latents"))?;
    let mut skips = 0u64;
    let mut widest = 0u64;
    for &c in &unet.block_out_channels {
        let t = product(&[b, f, c as u64, pixels.max(1), s], "a UNet activation")?;
        skips = skips.checked_add(t).ok_or_else(|| too_large("the UNet's activations"))?;
        widest = widest.max(t);
        pixels /= 4;
    }
    let layers = unet.layers_per_block as u64 + 1;
    let unet_bytes = product(&[layers, skips], "the UNet's skip connections")?
        .checked_add(product(&[16, widest], "the UNet's working set")?)
        .ok_or_else(|| too_large("the UNet's activations"))?;
    let (h, w) = (shape.height as u64, shape.width as u64);
    let c0 = vae.block_out_channels.first().copied().unwrap_or(1) as u64;
    let vae_bytes = product(&[8, c0, h, w, s], "the VAE's activations")?
        .checked_add(product(&[4, f, 3, h, w, 4], "the video's frames")?)
        .ok_or_else(|| too_large("the VAE's activations"))?;
    let latents = product(
        &[8, shape.latent_channels as u64, f, shape.latent_height as u64, shape.latent_width as u64, s],
        "the latents",
    )?;
    unet_bytes.max(vae_bytes).checked_add(latents).ok_or_else(|| too_large("the activations"))
}

/// [`activation_bytes`] with its share per frame (for saying how many frames fit).
pub fn estimate(
    unet: &unet3d::Config,
    vae: &vae::Config,
    shape: &RunShape,
    dtype: DType,
    weights: u64,
) -> Result<MemoryEstimate> {
    let activations = activation_bytes(unet, vae, shape, dtype)?;
    let one_frame = activation_bytes(unet, vae, &RunShape { frames: 1, ..*shape }, dtype)?;
    // The activations are the larger of two terms linear in the frames: the average slope from
    // one frame to the frames asked never overstates how many fit.
    let per_frame = match shape.frames as u64 {
        0 | 1 => activation_bytes(unet, vae, &RunShape { frames: 2, ..*shape }, dtype)?.saturating_sub(one_frame),
        f => activations.saturating_sub(one_frame) / (f - 1),
    };
    Ok(MemoryEstimate { weights, activations, one_frame, per_frame: per_frame.max(1) })
}

/// The memory this process can still use: the smallest of the kernel's `MemAvailable`, what its
/// cgroup's `memory.max` leaves (cgroup v2, else v1) and what `ulimit -v` leaves. `None` where
/// none can be read.
pub fn available_memory() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let meminfo = read("/proc/meminfo").and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024))
    });
    let cgroup_dir = read("/proc/self/cgroup")
        .and_then(|text| text.lines().find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string())))
        .map(|p| format!("/sys/fs/cgroup{}", if p == "/" { "" } else { &p }));
    let number = |p: &str| read(p).and_then(|v| v.trim().parse::<u64>().ok());
    let cgroup = cgroup_dir
        .iter()
        .map(String::as_str)
        .chain(["/sys/fs/cgroup"])
        .find_map(|dir| {
            let max = number(&format!("{dir}/memory.max"))?;
            Some(max.saturating_sub(number(&format!("{dir}/memory.current")).unwrap_or(0)))
        })
        .or_else(|| {
            let max = number("/sys/fs/cgroup/memory/memory.limit_in_bytes").filter(|&m| m < 1 << 60)?;
            Some(max.saturating_sub(number("/sys/fs/cgroup/memory/memory.usage_in_bytes").unwrap_or(0)))
        });
    [meminfo, cgroup, address_space_left()].into_iter().flatten().min()
}

/// What `ulimit -v` (RLIMIT_AS) leaves of this process's address space.
#[cfg(unix)]
fn address_space_left() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let used = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |pages| pages.saturating_mul(page));
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every platform
    let limit = limit.rlim_cur as u64;
    Some(limit.saturating_sub(used))
}

#[cfg(not(unix))]
fn address_space_left() -> Option<u64> {
    None
}

/// Refuses a run that needs more than `available` (when known), saying how much it needs and
/// how many frames would fit. `loaded` is true when the weights are already in memory (so only
/// the activations still have to fit).
pub fn check_fits(estimate: &MemoryEstimate, shape: &RunShape, available: Option<u64>, loaded: bool) -> Result<()> {
    let Some(available) = available else { return Ok(()) };
    let weights = if loaded { 0 } else { estimate.weights };
    let needed = weights.saturating_add(estimate.activations).saturating_add(OVERHEAD);
    if needed <= available {
        return Ok(());
    }
    let first = weights.saturating_add(OVERHEAD).saturating_add(estimate.one_frame);
    let fitting_frames = if available >= first { 1 + (available - first) / estimate.per_frame } else { 0 };
    let hint = if fitting_frames >= 1 && fitting_frames < shape.frames as u64 {
        format!(
            "lower the number of frames (about {fitting_frames} of {}×{} fit) or the frame size",
            shape.width, shape.height
        )
    } else if fitting_frames >= 1 {
        "lower the frame size (height and width) or the number of frames".to_string()
    } else if weights > 0 && weights.saturating_add(OVERHEAD) > available {
        "the weights alone do not fit: use float16 weights, or a machine with more memory".to_string()
    } else {
        "lower the frame size (height and width): even one frame of this size does not fit".to_string()
    };
    let breakdown = if loaded {
        format!("{} of activations", gib(estimate.activations))
    } else {
        format!("{} of weights, {} of activations", gib(estimate.weights), gib(estimate.activations))
    };
    Err(Error::InsufficientMemory { needed, available, breakdown, hint })
}
