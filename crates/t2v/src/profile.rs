//! Where the time goes: seconds, calls and floating-point operations per kind of layer, for the
//! benchmark's effective GFLOP/s and its per-layer profile. The layers of [`crate::nn`] record
//! themselves here, once each (the kernels they call record nothing, so no time is counted
//! twice). Process-wide counters rather than `tracing` spans: the benchmark needs sums per kind,
//! not a trace, and a disabled profile costs one relaxed load per layer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Floating-point operations of the matrix products and convolutions run so far (2 per
/// multiply-add, as torch's FLOP counter counts them), whether or not profiling is on.
static FLOPS: AtomicU64 = AtomicU64::new(0);

static ENABLED: AtomicBool = AtomicBool::new(false);
static LAYERS: Mutex<Vec<LayerProfile>> = Mutex::new(Vec::new());

/// Where the time of one kind of layer went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerProfile {
    pub kind: &'static str,
    pub seconds: f64,
    pub calls: u64,
    /// Floating-point operations of its matrix products (0 for elementwise kinds).
    pub flops: u64,
}

/// Turns the per-kind timing on or off (off by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether layers are being timed.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Floating-point operations counted so far in this process.
pub fn flops() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

/// Each kind of layer timed since profiling was turned on or since the last call, slowest
/// first; the sums then start again.
pub fn take() -> Vec<LayerProfile> {
    let mut p = LAYERS.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
    p.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    p
}

fn entry<'a>(p: &'a mut Vec<LayerProfile>, kind: &'static str) -> &'a mut LayerProfile {
    match p.iter().position(|e| e.kind == kind) {
        Some(i) => &mut p[i],
        None => {
            p.push(LayerProfile { kind, seconds: 0.0, calls: 0, flops: 0 });
            p.last_mut().expect("just pushed")
        }
    }
}

/// Counts `n` floating-point operations of a layer of kind `kind`.
pub(crate) fn count_flops(kind: &'static str, n: usize) {
    FLOPS.fetch_add(n as u64, Ordering::Relaxed);
    if enabled() {
        if let Ok(mut p) = LAYERS.lock() {
            entry(&mut p, kind).flops += n as u64;
        }
    }
}

/// Runs `f`, adding its time to `kind` when profiling.
pub(crate) fn timed<T>(kind: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let started = Instant::now();
    let out = f();
    let seconds = started.elapsed().as_secs_f64();
    if let Ok(mut p) = LAYERS.lock() {
        let e = entry(&mut p, kind);
        e.seconds += seconds;
        e.calls += 1;
    }
    out
}
