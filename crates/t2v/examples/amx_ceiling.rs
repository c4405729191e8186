//! What one core's AMX tiles can do, apart from any blocking: `tdpbf16ps` alone, and the 2×2
//! block of [`t2v::kernels::amx`] (four C tiles, two A and two B tiles a depth step) with its
//! operands in L1, L2 or memory, in the kernel's software-pipelined order and in the plain one
//! (each tile loaded just before its first product), each with the tiles' rows on 64-byte cache
//! lines and 16 bytes past them. GFLOP/s of one thread; run it pinned
//! (`taskset -c 0`) on a quiet machine, twice: the first pass also warms the core.
//!
//! Why its own tiles and not the library's kernels: the library's products bundle blocking,
//! packing and threads; this isolates how fast the tiles go when fed from each level of memory,
//! the ceiling those products are judged against (`cargo run --release -p t2v --example
//! amx_ceiling`). Linux on x86-64 with AMX-BF16 only.
//!
//! First, on any CPU with AVX512_BF16, the vector units' own ceilings: 512-bit `vfmadd231ps`
//! against `vdpbf16ps` on 12 independent sums (no loads), one core. Where `vdpbf16ps` does not
//! reach an FMA's rate per flop, bfloat16 weights without AMX are better widened to float32
//! (`kernels::tuning::Tuning::bf16_dot`). Where the CPU has AVX512_FP16, `vfmadd231ph` too: the
//! float16 products' ceiling (`kernels::fp16`).

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod tiles {
    use std::arch::asm;
    use std::time::Instant;

    use t2v::kernels::aligned::Aligned;

    /// Palette 1, all eight tiles 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Loads the tile configuration where the library found AMX-BF16 and Linux granted the tile
    /// state (its detection, [`t2v::kernels::Isa::Amx`]); false elsewhere.
    fn start() -> bool {
        if !t2v::kernels::Isa::Amx.is_available() {
            return false;
        }
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
        }
        let config = Config(c);
        // SAFETY: the tile state was granted; the configuration is valid.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        true
    }

    const TILE: usize = 256;
    /// Multiply-adds of one `tdpbf16ps`, times two.
    const FLOP: f64 = (16 * 16 * 32 * 2) as f64;

    /// `steps` depth steps of four products with no loads.
    fn products_only(steps: usize) {
        // SAFETY: tiles configured (start); register operands only.
        unsafe {
            asm!("tilezero tmm4", "tilezero tmm5", "tilezero tmm6", "tilezero tmm7", options(nostack, nomem));
            for _ in 0..steps {
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack, nomem)
                );
            }
        }
    }

    /// `steps` depth steps of the 2×2 block, A and B tiles taken in turn from `a` and `b`.
    fn block(a: &[u32], b: &[u32], steps: usize, pipelined: bool) {
        let (na, nb) = (a.len() / TILE, b.len() / TILE);
        let (mut ia, mut ib) = (0, 0);
        // SAFETY: tiles configured (start); every tile read lies in `a` or `b` (64-byte rows).
        unsafe {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            if pipelined {
                asm!("tileloadd tmm4, [{p} + {s}*1]", "tileloadd tmm5, [{p} + {s}*1]",
                     "tileloadd tmm6, [{p} + {s}*1]", "tileloadd tmm7, [{p} + {s}*1]",
                     p = in(reg) a.as_ptr(), s = in(reg) 64usize, options(nostack, readonly));
            }
            for _ in 0..steps {
                let a0 = a.as_ptr().add(ia * TILE);
                let a1 = a.as_ptr().add((ia + 1) % na * TILE);
                let b0 = b.as_ptr().add(ib * TILE);
                let b1 = b.as_ptr().add((ib + 1) % nb * TILE);
                if pipelined {
                    // the library's order: a register reloaded right after its last product
                    asm!(
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tileloadd tmm6, [{b0} + {s}*1]",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        "tileloadd tmm7, [{b1} + {s}*1]",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1, s = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                } else {
                    asm!(
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tileloadd tmm6, [{b0} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {s}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1, s = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
                ia = (ia + 2) % na;
                ib = (ib + 2) % nb;
            }
        }
    }

    fn rate(steps: usize, f: impl Fn()) -> f64 {
        let t = Instant::now();
        f();
        4.0 * steps as f64 * FLOP / t.elapsed().as_secs_f64() / 1e9
    }

    pub fn run() {
        if !start() {
            println!("no AMX-BF16 tiles here (or Linux did not grant their state)");
            return;
        }
        let steps = 2_000_000;
        // (A tiles, B tiles, where they lie): 1 KB a tile
        let sources = [
            (4, 4, "A and B in L1 (4 KB each)"),
            (8, 256, "A in L1, B 256 KB (L2)"),
            (256, 256, "A and B 256 KB each (L2)"),
            (8, 16384, "A in L1, B 16 MB (L3, memory)"),
            (16384, 16384, "A and B 16 MB each (memory)"),
        ];
        for pass in 1..=2 {
            println!("pass {pass}, GFLOP/s of one core:");
            println!("  products only, no loads           {:7.0}", rate(steps, || products_only(steps)));
            for (na, nb, what) in sources {
                // tile rows on cache lines (as the library lays its operands out), then each row
                // 16 bytes past one (as a plain Vec's allocation puts them)
                let ones = |n: usize| {
                    let mut v = Aligned::<u32>::zeroed(n * TILE + 16);
                    v.fill(0x3f80_3f80);
                    v
                };
                let (abuf, bbuf) = (ones(na), ones(nb));
                for skew in [0usize, 4] {
                    let a = &abuf[skew..][..na * TILE];
                    let b = &bbuf[skew..][..nb * TILE];
                    block(a, b, steps / 10, true);
                    let piped = rate(steps, || block(a, b, steps, true));
                    let plain = rate(steps, || block(a, b, steps, false));
                    println!(
                        "  {what:<34} {piped:7.0} pipelined, {plain:7.0} in plain order, rows {} bytes past a line",
                        skew * 4
                    );
                }
            }
        }
        // SAFETY: releases the tiles configured above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[cfg(target_arch = "x86_64")]
mod vectors {
    use std::arch::x86_64::*;
    use std::time::Instant;

    const SUMS: usize = 12;

    /// `steps` rounds of 12 independent `vfmadd231ps` (32 flops each); returns a sum so that
    /// nothing is optimised away.
    #[target_feature(enable = "avx512f")]
    unsafe fn fmas(steps: usize) -> f32 {
        let (x, y) = (_mm512_set1_ps(1.0 - 1e-7), _mm512_set1_ps(1e-7));
        let mut s = [_mm512_setzero_ps(); SUMS];
        for _ in 0..steps {
            for v in s.iter_mut() {
                *v = _mm512_fmadd_ps(*v, x, y);
            }
        }
        s.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }

    /// `steps` rounds of 12 independent `vdpbf16ps` (64 flops each).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dots(steps: usize) -> f32 {
        let one: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3f80));
        let small: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3380));
        let mut s = [_mm512_setzero_ps(); SUMS];
        for _ in 0..steps {
            for v in s.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, one, small);
            }
        }
        s.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }

    /// `steps` rounds of 12 independent `vfmadd231ph` (64 flops each: 32 float16 lanes).
    #[target_feature(enable = "avx512f,avx512fp16")]
    unsafe fn halves(steps: usize) -> f32 {
        // (1 − 2⁻¹¹ and 2⁻¹⁴ in float16's bits: sums that stay finite and normal)
        let x = _mm512_castsi512_ph(_mm512_set1_epi16(0x3bff));
        let y = _mm512_castsi512_ph(_mm512_set1_epi16(0x0400));
        let mut s = [_mm512_setzero_ph(); SUMS];
        for _ in 0..steps {
            for v in s.iter_mut() {
                *v = _mm512_fmadd_ph(*v, x, y);
            }
        }
        s.iter().map(|v| _mm512_reduce_add_ps(_mm512_castph_ps(*v))).sum()
    }

    fn gflops(flop_per_step: f64, steps: usize, f: impl Fn() -> f32) -> f64 {
        let t = Instant::now();
        std::hint::black_box(f());
        flop_per_step * steps as f64 / t.elapsed().as_secs_f64() / 1e9
    }

    pub fn run() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")) {
            println!("no AVX512_BF16 here: vector ceilings skipped");
            return;
        }
        let steps = 20_000_000;
        for pass in 1..=2 {
            // SAFETY: AVX-512F and AVX512_BF16 detected above.
            let fma = gflops((SUMS * 32) as f64, steps, || unsafe { fmas(steps) });
            let dot = gflops((SUMS * 64) as f64, steps, || unsafe { dots(steps) });
            println!(
                "pass {pass}, one core: vfmadd231ps {fma:6.1} GFLOP/s, vdpbf16ps {dot:6.1} GFLOP/s ({:.2}× the FMAs)",
                dot / fma
            );
            if is_x86_feature_detected!("avx512fp16") {
                // SAFETY: AVX512_FP16 detected.
                let half = gflops((SUMS * 64) as f64, steps, || unsafe { halves(steps) });
                println!("pass {pass}, one core: vfmadd231ph {half:6.1} GFLOP/s ({:.2}× the FMAs)", half / fma);
            }
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    vectors::run();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    tiles::run();
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    println!("AMX tiles exist on x86-64 only (and this example asks Linux for their state)");
}
