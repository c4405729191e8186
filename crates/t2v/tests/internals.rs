//! Checks of the library's internals (parsers, schedules, plans, file handling), through the
//! hidden `t2v::__internals` re-exports. They live here rather than in unit tests so that
//! `cargo test` does not compile the whole crate a second time in test mode.

mod pickle {
    use t2v::__internals::pickle::*;

    fn globals_of(pickle: &[u8]) -> std::result::Result<(), Problem> {
        validate_pickle(pickle)
    }

    #[test]
    fn stack_global_through_memo_is_named() {
        // proto 4: SHORT_BINUNICODE 'os', MEMOIZE, SHORT_BINUNICODE 'system', MEMOIZE, BINGET 0, BINGET 1, STACK_GLOBAL
        let p = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93\x8c\x02ls\x85R.";
        assert_eq!(globals_of(p), Err(Problem::Unsafe("os.system".into())));
    }

    #[test]
    fn inst_and_ext_are_refused() {
        assert_eq!(globals_of(b"(S'ls'\nios\nsystem\n."), Err(Problem::Unsafe("os.system".into())));
        assert_eq!(globals_of(b"\x80\x02\x82\x07."), Err(Problem::Unsafe("copyreg extension code 7".into())));
    }

    #[test]
    fn allowed_globals_in_unsupported_opcodes_are_corrupt() {
        let p = b"\x80\x04\x8c\x0bcollections\x8c\x0bOrderedDict\x93)R.";
        assert!(matches!(globals_of(p), Err(Problem::Corrupt(r)) if r.contains("SHORT_BINUNICODE")));
    }

    #[test]
    fn memory_bomb_and_deep_nesting_are_corrupt() {
        // K 0, BINPUT 0, then repeatedly: BINGET 0 BINGET 0 TUPLE2 BINPUT 0 (doubles each time)
        let mut p = b"\x80\x02K\x00q\x00".to_vec();
        for _ in 0..64 {
            p.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        assert!(matches!(globals_of(&p), Err(Problem::Corrupt(r)) if r.contains("expand")));
        let mut p = b"\x80\x02K\x00".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 100_000));
        p.push(b'.');
        assert!(matches!(globals_of(&p), Err(Problem::Corrupt(r)) if r.contains("nest")));
    }

    #[test]
    fn truncated_and_garbage_are_corrupt() {
        assert!(matches!(globals_of(b"\x80\x02X\xff\x00\x00\x00ab"), Err(Problem::Corrupt(_))));
        assert!(matches!(globals_of(b"\x80\x02}q\x00"), Err(Problem::Corrupt(r)) if r.contains("STOP")));
        assert!(matches!(globals_of(b"\xff\xfe"), Err(Problem::Corrupt(r)) if r.contains("unknown opcode")));
        assert!(matches!(globals_of(b"\x80\x02h\x05."), Err(Problem::Corrupt(r)) if r.contains("memo")));
        assert!(matches!(globals_of(b"\x80\x02R."), Err(Problem::Corrupt(r)) if r.contains("underflow")));
    }
}

mod schedulers {
    use std::path::Path;

    use candle_core::Tensor;
    use t2v::__internals::schedulers::*;

    #[test]
    fn non_finite_tokens_are_quoted_outside_strings_only() {
        let text = r#"{"a": -Infinity, "b": "NaN -Infinity", "c": [Infinity, NaN], "d\"NaN": 1}"#;
        let v = parse_scheduler_config(text, Path::new("x.json")).unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"], "NaN -Infinity");
        assert_eq!(v["c"][0], "Infinity");
        assert_eq!(v["c"][1], "NaN");
        assert_eq!(v["d\"NaN"], 1);
    }

    #[test]
    fn arange_and_linspace_edges() {
        assert_eq!(np_arange_f64(1000.0, 0.0, -250.0), vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(np_linspace(0.0, 999.0, 3), vec![0.0, 499.5, 999.0]);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
    }

    #[test]
    fn dynamic_thresholding_follows_torch_quantile() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[[0.5f32, -3.0, 2.0, 1.0, -1.5], [0.1, 0.2, -0.3, 0.4, 0.5]], &dev).unwrap();
        // ratio 0.5: rank 2 of |x| sorted -> s = 1.5 (row 0); row 1's s < 1 is raised to 1
        let y = threshold_sample(&x, 0.5, 10.0).unwrap().to_vec2::<f32>().unwrap();
        let expect0 = [0.5 / 1.5, -1.0, 1.0, 1.0 / 1.5, -1.0];
        for (a, b) in y[0].iter().zip(expect0) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        assert_eq!(y[1], vec![0.1, 0.2, -0.3, 0.4, 0.5]);
        // ratio 0.6: rank 2.4 -> s = 1.5 + 0.4 * (2 - 1.5) = 1.7; max_value caps it at 1.6
        let y = threshold_sample(&x, 0.6, 10.0).unwrap().to_vec2::<f32>().unwrap();
        assert!((y[0][2] - 1.0).abs() < 1e-6 && (y[0][3] - 1.0 / 1.7).abs() < 1e-6, "{y:?}");
        let y = threshold_sample(&x, 0.6, 1.6).unwrap().to_vec2::<f32>().unwrap();
        assert!((y[0][3] - 1.0 / 1.6).abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn float32_schedule_matches_torch_values() {
        // values printed by numpy emulating torch float32 (linspace, then cumprod in f64)
        let cfg = BetaConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        };
        let ac = alphas_cumprod(&cfg, Path::new("x")).unwrap();
        assert_eq!(ac[0], 0.9991499781608582f64 as f32);
        assert_eq!(ac[1], 0.9982960224151611f64 as f32);
        assert_eq!(ac[500], 0.27633246779441833f64 as f32);
        assert_eq!(ac[999], 0.00466009508818388f64 as f32);
        let zsnr = alphas_cumprod(&BetaConfig { rescale_betas_zero_snr: true, ..cfg }, Path::new("x")).unwrap();
        assert!(zsnr[999].abs() < 1e-6 && (zsnr[0] - ac[0]).abs() < 1e-6);
    }
}

mod long_video {
    use t2v::__internals::long_video::*;

    #[test]
    fn weights_are_diffusers_lists() {
        let w = |s: ContextWeighting, n| s.weights(n).unwrap();
        assert_eq!(w(ContextWeighting::Pyramid, 8), vec![1., 2., 3., 4., 4., 3., 2., 1.]);
        assert_eq!(w(ContextWeighting::Pyramid, 5), vec![1., 2., 3., 2., 1.]);
        assert_eq!(w(ContextWeighting::Flat, 3), vec![1., 1., 1.]);
        assert_eq!(w(ContextWeighting::DelayedReverseSawtooth, 4), vec![0.01, 2., 2., 1.]);
        assert_eq!(w(ContextWeighting::DelayedReverseSawtooth, 8), vec![0.01, 0.01, 0.01, 4., 4., 3., 2., 1.]);
        assert!(ContextWeighting::DelayedReverseSawtooth.weights(5).is_none());
    }

    #[test]
    fn plan_keeps_the_tail_quirk() {
        // 19 frames, windows of 8 every 3: 0, 3, 6, 9 fit (the last ends at 17), tail [11, 19).
        let plan = ContextWindows::new(8, 3, ContextWeighting::Pyramid).plan(19).unwrap();
        let starts: Vec<(usize, usize)> = plan.windows.iter().map(|w| (w.start, w.skip)).collect();
        assert_eq!(starts, vec![(0, 0), (3, 0), (6, 0), (9, 0), (11, 6)]);
        // Frames 17 and 18 get weights[6] = 2 each from the tail, whatever their own weights (2, 1).
        assert_eq!(plan.weight_sums[17], 2.0);
        assert_eq!(plan.weight_sums[18], 2.0);
        // ... while the outputs added there were multiplied by their own weights, 2 and 1; the
        // frames before the tail's were multiplied by what they are divided by.
        assert_eq!(plan.applied_sums[17], 2.0);
        assert_eq!(plan.applied_sums[18], 1.0);
        assert_eq!(plan.applied_sums[..17], plan.weight_sums[..17]);
        // Frame 9: weights 4 (window 6, j=3), 1 (window 9, j=0), plus window 3's j=6 → 2.
        assert_eq!(plan.weight_sums[9], 4.0 + 1.0 + 2.0);
        let exact = ContextWindows::new(8, 4, ContextWeighting::Flat).plan(16).unwrap();
        assert_eq!(exact.windows.len(), 3);
        assert_eq!(exact.weight_sums, vec![1., 1., 1., 1., 2., 2., 2., 2., 2., 2., 2., 2., 1., 1., 1., 1.]);
    }

    #[test]
    fn windows_are_checked() {
        let c = |l, s| ContextWindows::new(l, s, ContextWeighting::Pyramid).validate(20);
        assert!(c(8, 4).is_ok());
        assert!(c(20, 4).is_ok());
        assert!(c(21, 4).unwrap_err().to_string().contains("at most 20"));
        assert!(c(8, 0).unwrap_err().to_string().contains("at least 1"));
        assert!(c(8, 9).unwrap_err().to_string().contains("1 to 8"));
        let odd = ContextWindows::new(7, 2, ContextWeighting::DelayedReverseSawtooth).validate(20);
        assert!(odd.unwrap_err().to_string().contains("even"));
    }

    #[test]
    fn keyframes_are_checked() {
        let mut long = LongVideo::default();
        long.prompts.insert(9, "b".into());
        assert!(long.validate(10).is_ok());
        assert!(long.validate(9).unwrap_err().to_string().contains("past the last frame (8)"));
        long.negative_prompts.insert(0, "x".into());
        assert!(long.validate(10).unwrap_err().to_string().contains("frame 0"));
    }
}

mod video_input {
    use t2v::__internals::video_input::*;
    use t2v::Result;

    /// A GIF whose screen is `w`×`h`, with `frames` frames of one pixel.
    fn gif(w: u16, h: u16, frames: usize) -> Vec<u8> {
        let mut g = b"GIF89a".to_vec();
        g.extend_from_slice(&w.to_le_bytes());
        g.extend_from_slice(&h.to_le_bytes());
        g.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 255, 255, 255]);
        for _ in 0..frames {
            g.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0]);
            // LZW, minimum code size 2: clear, colour 0, end.
            g.extend_from_slice(&[2, 2, 0x44, 0x01, 0]);
        }
        g.push(0x3B);
        g
    }

    fn read(bytes: &[u8], name: &str, options: &ReadOptions) -> Result<InputVideo> {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        read_video(&path, options)
    }

    #[test]
    fn declared_sizes_are_checked_before_anything_is_allocated() {
        // 65535x65535 RGBA would be 16 GiB: refused from the header.
        let e = read(&gif(65535, 65535, 1), "a.gif", &ReadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("65535x65535 pixels"), "{e}");
        let small = ReadOptions { max_source_pixels: 64 * 64, ..ReadOptions::default() };
        let e = read(&gif(65, 64, 1), "a.gif", &small).unwrap_err().to_string();
        assert!(e.contains("65x64 pixels, more than the 4096 pixels"), "{e}");
        assert_eq!(read(&gif(64, 64, 2), "a.gif", &small).unwrap().frames, 2);
        // The frames a file offers.
        let few = ReadOptions { max_source_frames: 10, num_frames: Some(3), every: 5, ..ReadOptions::default() };
        let e = read(&gif(4, 4, 20), "a.gif", &few).unwrap_err().to_string();
        assert!(e.contains("more than the 10 frames"), "{e}");
        assert_eq!(read(&gif(4, 4, 20), "a.gif", &ReadOptions { every: 4, ..few.clone() }).unwrap().frames, 3);
    }

    #[test]
    fn npy_shapes_are_checked_against_the_budget() {
        let mut npy = t2v::video::npy_header_of("|u1", &[2, 100, 100, 3]);
        npy.extend(std::iter::repeat_n(0u8, 2 * 100 * 100 * 3));
        let budget = ReadOptions { max_source_pixels: 99 * 100, ..ReadOptions::default() };
        let e = read(&npy, "a.npy", &budget).unwrap_err().to_string();
        assert!(e.contains("100x100 pixels, more than the 9900"), "{e}");
        let frames = ReadOptions { max_source_frames: 1, ..ReadOptions::default() };
        let e = read(&npy, "a.npy", &frames).unwrap_err().to_string();
        assert!(e.contains("declares 2 frames, more than the 1"), "{e}");
        assert_eq!(read(&npy, "a.npy", &ReadOptions::default()).unwrap().frames, 2);
    }
}

mod images {
    use t2v::__internals::images::natural_cmp;

    #[test]
    fn names_sort_by_their_numbers() {
        let mut names = vec!["f10.png", "f2.png", "f1.png", "f002.png", "a.png"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, vec!["a.png", "f1.png", "f002.png", "f2.png", "f10.png"]);
    }
}

mod h264 {
    use t2v::__internals::h264::*;

    fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut b = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        b.extend_from_slice(kind);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn sample_tables_are_counted_without_expanding_them() {
        // stsz: version and flags, a sample size (all the same), four billion samples.
        let mut stsz = vec![0, 0, 0, 0];
        stsz.extend_from_slice(&100u32.to_be_bytes());
        stsz.extend_from_slice(&u32::MAX.to_be_bytes());
        let stbl = boxed(b"stbl", &boxed(b"stsz", &stsz));
        let trak = boxed(b"trak", &boxed(b"mdia", &boxed(b"minf", &stbl)));
        let mut moov_body = trak.clone();
        moov_body.extend_from_slice(&trak);
        let mut file = boxed(b"ftyp", b"isom\0\0\0\0");
        file.extend_from_slice(&boxed(b"moov", &moov_body));
        assert_eq!(declared_samples(&file), 2 * u32::MAX as u64);
        // trun: version and flags, sample count.
        let mut trun = vec![0, 0, 0, 0];
        trun.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(declared_samples(&boxed(b"moof", &boxed(b"traf", &boxed(b"trun", &trun)))), 7);
        // Truncated or malformed boxes count what they hold and stop.
        assert_eq!(declared_samples(&file[..file.len() - 3]), u32::MAX as u64);
        assert_eq!(declared_samples(&[0, 0, 0, 3, b'm', b'o', b'o', b'v']), 0);
    }
}

mod atomic {
    use t2v::__internals::atomic::{temporary_owner, SetAside};

    #[test]
    fn temporaries_name_their_process() {
        assert_eq!(temporary_owner(".clip.mp4.partial-1234-a8Xk2p"), Some(1234));
        assert_eq!(temporary_owner(".frames.old-77-zz"), Some(77));
        assert_eq!(temporary_owner(".a.partial-x.mp4.partial-9-q"), Some(9));
        assert_eq!(temporary_owner("clip.mp4.partial-1234-a8Xk2p"), None);
        assert_eq!(temporary_owner(".clip.mp4"), None);
        assert_eq!(temporary_owner(".clip.partial-12-"), None);
    }

    #[test]
    fn set_aside_files_come_back_or_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.mp4.json");
        assert!(SetAside::file(&path).unwrap().is_none(), "nothing to move");
        let listing = || {
            let mut n: Vec<String> =
                std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            n.sort();
            n
        };

        std::fs::write(&path, "old").unwrap();
        let aside = SetAside::file(&path).unwrap().unwrap();
        assert!(!path.exists());
        let names = listing();
        assert_eq!(names.len(), 1);
        assert_eq!(temporary_owner(&names[0]), Some(std::process::id()), "{names:?}");
        aside.restore();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(listing(), ["v.mp4.json"]);

        // A file that took the place meanwhile stays; the old one goes.
        let aside = SetAside::file(&path).unwrap().unwrap();
        std::fs::write(&path, "newcomer").unwrap();
        aside.restore();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "newcomer");
        assert_eq!(listing(), ["v.mp4.json"]);

        let aside = SetAside::file(&path).unwrap().unwrap();
        aside.discard();
        assert!(listing().is_empty());

        // Only regular files are moved.
        std::fs::create_dir(&path).unwrap();
        assert!(SetAside::file(&path).is_err());
        assert!(path.is_dir());
    }
}

mod tuning {
    use t2v::__internals::tuning::*;

    #[test]
    fn the_table_names_the_cpus_it_knows() {
        let zen4 = Tuning::for_cpu("AuthenticAMD", 0x19, 0x11);
        assert_eq!(zen4.cpu, "zen4");
        assert!(KernelKind::ALL.iter().all(|k| !zen4.is_wide(*k)));
        let zen5 = Tuning::for_cpu("AuthenticAMD", 0x1A, 0x02);
        assert!(KernelKind::ALL.iter().all(|k| zen5.is_wide(*k)));
        assert_eq!(zen5.to_string(), "zen5: 512-bit linear, attention, conv3x3, conv1x1, temporal conv");
        assert!(zen4.bf16_dot && zen5.bf16_dot);
        let mixed = Tuning { cpu: "mixed", wide: [true, true, true, true, false], bf16_dot: true };
        assert_eq!(mixed.to_string(), "mixed: 512-bit linear, attention, conv3x3, conv1x1; 256-bit temporal conv");
        assert_eq!(zen4.to_string(), "zen4: 256-bit linear, attention, conv3x3, conv1x1, temporal conv");
        let other = Tuning::for_cpu("GenuineIntel", 6, 85);
        assert_eq!(other.cpu, "other");
        assert!(KernelKind::ALL.iter().all(|k| other.is_wide(*k)));
        // Emerald Rapids: vdpbf16ps at half the FMAs' rate, so bfloat16 weights are widened
        // unless AMX takes them
        let emerald = Tuning::for_cpu("GenuineIntel", 6, 207);
        assert!(!emerald.bf16_dot);
        assert_eq!(
            emerald.to_string(),
            "sapphire/emerald rapids: 512-bit linear, attention, conv3x3, conv1x1, temporal conv; bfloat16 weights \
             widened to float32 without AMX (vdpbf16ps slower than FMAs)"
        );
    }

    #[test]
    fn this_cpu_is_read() {
        let (vendor, family, _) = cpu_id();
        if cfg!(target_arch = "x86_64") {
            assert!(vendor == "GenuineIntel" || vendor == "AuthenticAMD" || !vendor.is_empty(), "{vendor}");
            assert!(family >= 6, "family {family}");
        }
    }
}

mod params {
    use candle_core::DType;
    use t2v::__internals::params::*;

    #[test]
    fn every_spelling_of_a_dtype_parses_and_names_round_trip() {
        for (names, dtype) in [
            (&["f32", "float32", "FP32", "float", "torch.float32"][..], DType::F32),
            (&["f16", "float16", "fp16", "half", "torch.float16", " F16 "][..], DType::F16),
            (&["bf16", "bfloat16", "torch.bfloat16"][..], DType::BF16),
        ] {
            for name in names {
                assert_eq!(parse_dtype(name).unwrap(), dtype, "{name}");
            }
            assert_eq!(parse_dtype(dtype_name(dtype)).unwrap(), dtype);
        }
        assert!(parse_dtype("f64").unwrap_err().to_string().contains("use f32, f16 or bf16"));
    }
}
