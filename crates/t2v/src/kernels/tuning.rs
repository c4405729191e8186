//! Which vector width each kind of kernel runs at on the AVX-512 path, and whether `vdpbf16ps`
//! is worth taking for bfloat16 weights where AMX is absent ([`Tuning::bf16_dot`], read by
//! [`Isa::best`]), chosen per microarchitecture from a table of measurements (issue 24: tuned per
//! microarchitecture, not per instruction set).
//!
//! A CPU that has AVX-512 does not always run 512-bit work faster: Zen 4 splits each 512-bit
//! operation into two 256-bit halves, and its AVX2 kernels beat its AVX-512 ones (a guided step
//! 11.6 s against 13.4 s; linear layers 127 against 104 GFLOP/s, temporal convolutions 147
//! against 88), while on Zen 5 the 512-bit tiles double the linear layers' rate (404 against 225).
//! So each kind of kernel takes the width that measured faster on the CPU found, judged by whole
//! steps at the model's 16 frames (a kind's rate at 4 frames misled once: see the table); CPUs not
//! in the table take 512 bits everywhere, as the AVX-512 path always did.
//!
//! A path forced with `T2V_ISA` (or [`super::set_isa`]) is taken whole, at its own width, so that
//! the tests and the benchmark can still run and time every kernel of every path.

use std::fmt;
use std::sync::OnceLock;

use super::isa::{isa, isa_forced, Isa};

/// The kinds of kernel whose width is chosen per CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// Linear layers (the packed matrix product).
    Linear,
    /// Attention's two products.
    Attention,
    /// 3×3 convolutions (Winograd).
    Conv3x3,
    /// 1×1 convolutions.
    Conv1x1,
    /// The temporal convolutions (3 taps over frames).
    TemporalConv,
}

impl KernelKind {
    pub const ALL: [KernelKind; 5] =
        [KernelKind::Linear, KernelKind::Attention, KernelKind::Conv3x3, KernelKind::Conv1x1, KernelKind::TemporalConv];

    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Linear => "linear",
            KernelKind::Attention => "attention",
            KernelKind::Conv3x3 => "conv3x3",
            KernelKind::Conv1x1 => "conv1x1",
            KernelKind::TemporalConv => "temporal conv",
        }
    }
}

/// The microarchitecture found, the width each kind of kernel runs at there and whether its
/// `vdpbf16ps` pays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// The table's name for the CPU (`zen4`, `zen5`, …), or `other`.
    pub cpu: &'static str,
    /// Whether each kind of [`KernelKind::ALL`] runs its 512-bit kernels.
    pub wide: [bool; 5],
    /// Whether `vdpbf16ps` outruns float32 FMAs here, so that bfloat16 weights without AMX
    /// multiply in bfloat16 ([`Isa::Avx512Bf16`]) rather than widened to float32
    /// ([`Isa::Avx512`]); see [`Isa::best`].
    pub bf16_dot: bool,
}

impl Tuning {
    const ALL_WIDE: [bool; 5] = [true; 5];

    /// Whether `kind` runs its 512-bit kernels under this tuning (on the AVX-512 path).
    pub fn is_wide(&self, kind: KernelKind) -> bool {
        self.wide[kind as usize]
    }

    /// The table's row for a CPU (vendor from CPUID leaf 0, family and model from leaf 1).
    pub fn for_cpu(vendor: &str, family: u32, model: u32) -> Tuning {
        use KernelKind::*;
        let wide = |narrow: &[KernelKind]| {
            let mut w = Tuning::ALL_WIDE;
            for k in narrow {
                w[*k as usize] = false;
            }
            w
        };
        match (vendor, family, model) {
            // Zen 4 (family 0x19 with AVX-512): 512-bit work is split in two; every f32 kernel
            // measured faster at 256 bits (the figures at the top of this file).
            // Its `vdpbf16ps` does twice an FMA's work at the same rate: bfloat16 took a guided
            // step from 32.8 to 22.9 s.
            ("AuthenticAMD", 0x19, _) => {
                Tuning { cpu: "zen4", wide: wide(&[Linear, Attention, Conv3x3, Conv1x1, TemporalConv]), bf16_dot: true }
            }
            // Zen 5 (family 0x1A) and Sapphire/Emerald Rapids (Intel 6/143, 6/207): full 512-bit
            // units. Per kind at 4 frames the temporal convolutions looked faster at 256 bits (Zen 5
            // 270 against 241 GFLOP/s, Emerald Rapids 148 against 107), but the whole 16-frame step on
            // the Emerald Rapids was slower with them at 256 (42.2 against 37.1 s): 512 everywhere.
            ("AuthenticAMD", 0x1A, _) => Tuning { cpu: "zen5", wide: Tuning::ALL_WIDE, bf16_dot: true },
            // Sapphire/Emerald Rapids issue one `vdpbf16ps` every other cycle against two FMAs a
            // cycle (`amx_ceiling`'s vector rows, one core: 85 against 175 GFLOP/s), so without
            // AMX (a guest whose hypervisor hides it) bfloat16 products run at half float32's
            // rate: the packed product 134–148 GFLOP/s against 183–250 with the weights widened,
            // a 4-frame guided step 12.9 against 8.6 s (2026-12-07). There bfloat16 weights are
            // widened; with AMX the tiles take them.
            ("GenuineIntel", 6, 143 | 207) => {
                Tuning { cpu: "sapphire/emerald rapids", wide: Tuning::ALL_WIDE, bf16_dot: false }
            }
            _ => Tuning { cpu: "other", wide: Tuning::ALL_WIDE, bf16_dot: true },
        }
    }

    /// The tuning of the CPU this process runs on (read once).
    pub fn detected() -> Tuning {
        static DETECTED: OnceLock<Tuning> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let (vendor, family, model) = cpu_id();
            Tuning::for_cpu(&vendor, family, model)
        })
    }
}

impl fmt::Display for Tuning {
    /// "zen5: 512-bit linear, attention, conv3x3, conv1x1; 256-bit temporal conv".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let of = |wide: bool| -> Vec<&str> {
            KernelKind::ALL.into_iter().filter(|k| self.is_wide(*k) == wide).map(KernelKind::name).collect()
        };
        let (w, n) = (of(true), of(false));
        write!(f, "{}:", self.cpu)?;
        if !w.is_empty() {
            write!(f, " 512-bit {}", w.join(", "))?;
        }
        if !n.is_empty() {
            write!(f, "{} 256-bit {}", if w.is_empty() { "" } else { ";" }, n.join(", "))?;
        }
        if !self.bf16_dot {
            write!(f, "; bfloat16 weights widened to float32 without AMX (vdpbf16ps slower than FMAs)")?;
        }
        Ok(())
    }
}

/// Whether `kind` runs its 512-bit kernels: on the AVX-512 paths, forced whole by `T2V_ISA`, or
/// chosen by the CPU's [`Tuning`].
pub fn wide(kind: KernelKind) -> bool {
    isa() >= Isa::Avx512 && (isa_forced() || Tuning::detected().is_wide(kind))
}

/// What the kernels run with now, in words: the tuning on the AVX-512 path chosen by the CPU,
/// else the path's one width ("avx2: 256-bit everywhere").
pub fn describe() -> String {
    match isa() {
        Isa::Generic => "generic: candle's ops".to_string(),
        Isa::Neon => "neon: 128-bit linear; portable loops elsewhere".to_string(),
        Isa::Avx2 => "avx2: 256-bit everywhere".to_string(),
        i if isa_forced() => format!("{i} (forced): 512-bit everywhere"),
        _ => Tuning::detected().to_string(),
    }
}

/// (vendor, family, model) as CPUID reports them (display family and model: the extended fields
/// folded in, as Intel's and AMD's manuals define).
pub fn cpu_id() -> (String, u32, u32) {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaves 0 and 1 exist on every x86-64 CPU (safe to call since Rust 1.87).
        let (l0, l1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let mut vendor = Vec::with_capacity(12);
        for r in [l0.ebx, l0.edx, l0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let base_family = (l1.eax >> 8) & 0xF;
        let base_model = (l1.eax >> 4) & 0xF;
        let family = if base_family == 0xF { base_family + ((l1.eax >> 20) & 0xFF) } else { base_family };
        let model = if base_family == 0x6 || base_family == 0xF {
            (((l1.eax >> 16) & 0xF) << 4) | base_model
        } else {
            base_model
        };
        (String::from_utf8_lossy(&vendor).into_owned(), family, model)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (String::new(), 0, 0)
    }
}
