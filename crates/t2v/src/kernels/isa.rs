//! Which instruction set the CPU kernels run with: chosen once from what the CPU has, or forced
//! with `T2V_ISA=auto|amx|avx512fp16|avx512bf16|avx512|avx2|neon|generic` (or [`set_isa`]) so that one
//! machine can test and time every path. `generic` is candle's standard ops, the path that other
//! devices and CPUs take. `avx512bf16`, `avx512fp16` and `amx` differ from `avx512` only for
//! bfloat16 and float16 weights (`--dtype bf16`, `--dtype f16`): their matrix products run on
//! `vdpbf16ps`, on `vfmadd231ph`, or on AMX tiles; float32 work is the same on all four.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// The environment variable that forces a path.
pub const ISA_ENV: &str = "T2V_ISA";

/// An instruction-set path of the CPU kernels, from the most general to the fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// candle's standard ops (any CPU).
    Generic,
    /// AArch64 (NEON, part of every AArch64 CPU): the packed matrix product's 128-bit kernel for
    /// the linear layers; the other layers run their portable loops in parallel, or candle's ops.
    Neon,
    /// x86-64 with AVX2, FMA and F16C: 256-bit kernels.
    Avx2,
    /// x86-64 with AVX-512 (F, VL, BW, DQ) besides AVX2: 512-bit kernels where they pay, the
    /// AVX2 ones elsewhere.
    Avx512,
    /// The AVX-512 path plus AVX512_BF16 (Zen 4 and later, Intel since Cooper Lake): bfloat16
    /// weights multiply with `vdpbf16ps` (float32 accumulation) instead of being widened.
    Avx512Bf16,
    /// The AVX-512 + BF16 path plus AVX512_FP16 (Intel since Sapphire Rapids): float16 weights
    /// multiply with `vfmadd231ph` (float16 sums of 32 products added into float32,
    /// [`super::fp16`]) instead of being widened; bfloat16 ones take `vdpbf16ps` where it beats
    /// the float32 FMAs ([`super::tuning::Tuning::bf16_dot`]), else are widened.
    Avx512Fp16,
    /// The AVX-512 + BF16 path plus AMX-BF16 (Intel since Sapphire Rapids): the bfloat16
    /// products run on AMX tiles (`tdpbf16ps`, float32 accumulation, [`super::amx`]); float16
    /// weights are widened.
    Amx,
}

/// A path that cannot be used: an unknown name, or one this CPU cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IsaError {
    #[error(
        "unknown instruction set `{0}`: expected auto, amx, avx512fp16, avx512bf16, avx512, avx2, neon or generic"
    )]
    Unknown(String),
    #[error("this CPU cannot run the {0} kernels (it can run: {list})", list = Isa::available_list())]
    Unsupported(Isa),
}

impl Isa {
    pub const ALL: [Isa; 7] =
        [Isa::Generic, Isa::Neon, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Avx512Fp16, Isa::Amx];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512Fp16 => "avx512fp16",
            Isa::Amx => "amx",
        }
    }

    /// Whether this CPU can run the path (detected once).
    pub fn is_available(self) -> bool {
        match self {
            Isa::Generic => true,
            Isa::Neon => cfg!(target_arch = "aarch64"),
            Isa::Avx2 => detected().0,
            Isa::Avx512 => detected().1,
            Isa::Avx512Bf16 => detected().2,
            Isa::Avx512Fp16 => detected().3,
            Isa::Amx => detected().4,
        }
    }

    /// The fastest path this CPU can run: the widest it has, except that `avx512bf16` gives way
    /// to `avx512` where the CPU's `vdpbf16ps` is slower than its float32 FMAs
    /// ([`super::tuning::Tuning::bf16_dot`]: Intel's server cores without AMX; where they have
    /// AVX512_FP16, `avx512fp16` is taken and widens bfloat16 weights itself).
    pub fn best() -> Isa {
        let widest = *Isa::ALL.iter().rev().find(|i| i.is_available()).unwrap_or(&Isa::Generic);
        if widest == Isa::Avx512Bf16 && !super::tuning::Tuning::detected().bf16_dot {
            Isa::Avx512
        } else {
            widest
        }
    }

    /// Every path this CPU can run, from the most general.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    fn available_list() -> String {
        Isa::available().iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
    }

    /// `auto` (the best available), or a named path that this CPU can run.
    pub fn parse_available(s: &str) -> Result<Isa, IsaError> {
        let isa = if s.trim().eq_ignore_ascii_case("auto") { Isa::best() } else { s.parse()? };
        if isa.is_available() {
            Ok(isa)
        } else {
            Err(IsaError::Unsupported(isa))
        }
    }

    /// The path `T2V_ISA` asks for: `None` when unset or empty.
    pub fn from_env() -> Result<Option<Isa>, IsaError> {
        match std::env::var(ISA_ENV) {
            Ok(v) if !v.trim().is_empty() => Isa::parse_available(&v).map(Some),
            _ => Ok(None),
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = IsaError;

    fn from_str(s: &str) -> Result<Isa, IsaError> {
        let t = s.trim();
        Isa::ALL.into_iter().find(|i| i.name().eq_ignore_ascii_case(t)).ok_or_else(|| IsaError::Unknown(t.to_string()))
    }
}

/// (AVX2 path, AVX-512 path, AVX-512 + BF16 path, + FP16 path, AMX path) available on this CPU
/// (for AMX, with the tile state granted by the OS, which this asks for once). The AMX path does
/// not need FP16 (it widens float16 weights), so a guest shown AMX without FP16 still has it.
fn detected() -> (bool, bool, bool, bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<(bool, bool, bool, bool, bool)> = OnceLock::new();
        *HAS.get_or_init(|| {
            let avx2 =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq");
            let bf16 = avx512 && is_x86_feature_detected!("avx512bf16");
            let fp16 = bf16 && is_x86_feature_detected!("avx512fp16");
            let amx = bf16 && super::amx::cpu_has_amx_bf16() && super::amx::request_tile_state();
            (avx2, avx512, bf16, fp16, amx)
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (false, false, false, false, false)
    }
}

const UNSET: u8 = u8::MAX;
static CURRENT: AtomicU8 = AtomicU8::new(UNSET);
/// Whether the path was named (by `T2V_ISA` or [`set_isa`]) rather than chosen as the best.
static FORCED: AtomicBool = AtomicBool::new(false);

/// Whether the path the kernels take was named by `T2V_ISA` (other than `auto`) or [`set_isa`]:
/// then every kernel runs at that path's width (see [`super::tuning`]).
pub fn isa_forced() -> bool {
    isa();
    FORCED.load(Ordering::Relaxed)
}

/// The path the kernels take: the one set by [`set_isa`], else `T2V_ISA`'s, else the best this CPU
/// can run. An unusable `T2V_ISA` is not an error here (callers that want to report it check
/// [`Isa::from_env`] first); the best path is taken instead.
pub fn isa() -> Isa {
    match CURRENT.load(Ordering::Relaxed) {
        UNSET => {
            let named =
                std::env::var(ISA_ENV).is_ok_and(|v| !v.trim().is_empty() && !v.trim().eq_ignore_ascii_case("auto"));
            let from_env = Isa::from_env().ok().flatten();
            if named && from_env.is_some() {
                FORCED.store(true, Ordering::Relaxed);
            }
            let isa = from_env.unwrap_or_else(Isa::best);
            // Another thread may have set it meanwhile; its value wins.
            let _ = CURRENT.compare_exchange(UNSET, isa as u8, Ordering::Relaxed, Ordering::Relaxed);
            Isa::ALL[CURRENT.load(Ordering::Relaxed) as usize]
        }
        v => Isa::ALL[v as usize],
    }
}

/// Forces a path for the whole process (tests and benchmarks time each path this way).
pub fn set_isa(isa: Isa) -> Result<(), IsaError> {
    if !isa.is_available() {
        return Err(IsaError::Unsupported(isa));
    }
    CURRENT.store(isa as u8, Ordering::Relaxed);
    FORCED.store(true, Ordering::Relaxed);
    Ok(())
}
