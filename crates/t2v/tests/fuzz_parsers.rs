//! Property tests over every parser of untrusted bytes in the library (issue 11): component and
//! scheduler configs, MP4 metadata, safetensors headers, pickles and tokenizer files. Each may
//! refuse its input, but none may panic, abort or hang; what is accepted must then run (a model
//! built from an accepted config runs a step, a scheduler its whole schedule, a tokenizer encodes).
//!
//! Case counts are fixed (the `cases` of each `proptest!` block) so the suite stays under a minute.

mod common;

use std::io::{Cursor, Read, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use serde_json::{json, Value};
use t2v::checkpoint::{ComponentWeights, WeightsFiles, WeightsFormat};
use t2v::pipeline::GenerationParams;
use t2v::schedulers::{build_scheduler, parse_scheduler_config, SchedulerKind};
use t2v::{sizing, text_encoder, unet3d, vae};

/// Values a config key might hold: mostly plausible, often hostile.
fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u64..=8).prop_map(Value::from),
        2 => prop::sample::select(vec![16u64, 32, 64, 1000, 1 << 20, 1 << 40, u64::MAX]).prop_map(Value::from),
        1 => (-5i64..0).prop_map(Value::from),
        2 => prop::sample::select(vec![0.0, 1e-5, 0.5, 0.012, 1.0, 2.0, -1.0, 1e300, 1e13, -0.0]).prop_map(|v: f64| json!(v)),
        1 => prop::sample::select(vec!["NaN", "Infinity", "-Infinity", "silu", "linear", "leading", "x"]).prop_map(Value::from),
        1 => prop::collection::vec(0u64..=8, 0..6).prop_map(|v| json!(v)),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
    ]
}

/// A JSON object over `keys`, each present or not, with an arbitrary value.
fn config_object(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(keys), any_value()), 0..10)
        .prop_map(|pairs| Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// A small, mostly valid UNet config with hostile values mixed in.
fn unet_config() -> impl Strategy<Value = Value> {
    let channels = prop::collection::vec(prop::sample::select(vec![0usize, 4, 8, 12]), 1..4);
    (
        channels,
        0usize..3,
        prop::sample::select(vec![0usize, 1, 2, 4]),
        0usize..6,
        any::<bool>(),
        config_object(UNET_KEYS),
    )
        .prop_map(|(ch, layers, groups, head, cross, extra)| {
            let levels = ch.len();
            let down: Vec<&str> = (0..levels)
                .map(|i| if cross && i + 1 < levels { "CrossAttnDownBlock3D" } else { "DownBlock3D" })
                .collect();
            let up: Vec<&str> =
                (0..levels).map(|i| if cross && i > 0 { "CrossAttnUpBlock3D" } else { "UpBlock3D" }).collect();
            let mut v = json!({
                "block_out_channels": ch, "layers_per_block": layers, "norm_num_groups": groups,
                "attention_head_dim": head, "down_block_types": down, "up_block_types": up,
                "cross_attention_dim": 4, "in_channels": 4, "out_channels": 4, "sample_size": 4,
            });
            for (k, x) in extra.as_object().unwrap() {
                if !matches!(k.as_str(), "block_out_channels" | "down_block_types" | "up_block_types") {
                    v[k] = x.clone();
                }
            }
            v
        })
}

const UNET_KEYS: &[&str] = &[
    "sample_size",
    "in_channels",
    "out_channels",
    "layers_per_block",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "mid_block_scale_factor",
    "act_fn",
    "downsample_padding",
    "block_out_channels",
];
const VAE_KEYS: &[&str] = &[
    "in_channels",
    "out_channels",
    "latent_channels",
    "norm_num_groups",
    "layers_per_block",
    "scaling_factor",
    "shift_factor",
    "sample_size",
    "block_out_channels",
    "act_fn",
    "use_quant_conv",
    "use_post_quant_conv",
];
const TEXT_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
];
const SCHEDULER_KEYS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "steps_offset",
    "timestep_spacing",
    "prediction_type",
    "solver_order",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "use_karras_sigmas",
    "final_sigmas_type",
    "lambda_min_clipped",
    "thresholding",
    "clip_sample",
    "set_alpha_to_one",
    "rescale_betas_zero_snr",
    "euler_at_final",
    "sample_max_value",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "variance_type",
];

/// Checks what an accepted frame count and size give, with the library's sizing, then runs.
fn params(frames: usize, side: usize, guidance: f64) -> GenerationParams {
    let mut p = GenerationParams::new("a", 0);
    (p.num_frames, p.height, p.width, p.guidance_scale) = (frames, Some(side), Some(side), guidance);
    p
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    /// UNet, VAE and text encoder configs: parse, validate, size a run; an accepted UNet config
    /// builds (zero weights) and predicts noise for a small clip.
    #[test]
    fn component_configs(
        unet in unet_config(),
        vae_json in config_object(VAE_KEYS),
        text in config_object(TEXT_KEYS),
        frames in prop::sample::select(vec![0usize, 1, 2, 3, usize::MAX, 1 << 40]),
        side in prop::sample::select(vec![0usize, 8, 16, 24, 1 << 40, usize::MAX - 7]),
        guidance in prop::sample::select(vec![0.0, 1.0, 9.0, 1e300, f64::NAN]),
    ) {
        let vae_cfg: Option<vae::Config> = serde_json::from_value(vae_json).ok();
        if let Some(cfg) = &vae_cfg {
            let _ = cfg.validate();
        }
        if let Ok(cfg) = serde_json::from_value::<text_encoder::Config>(text) {
            let _ = cfg.validate();
        }
        let Ok(cfg) = serde_json::from_value::<unet3d::Config>(unet) else { return Ok(()) };
        if cfg.validate().is_err() {
            return Ok(());
        }
        let vae_cfg = vae_cfg.filter(|v| v.validate().is_ok()).unwrap_or_default();
        let p = params(frames, side, guidance);
        if let Ok(shape) = sizing::run_shape(&cfg, &vae_cfg, &p) {
            let _ = sizing::estimate(&cfg, &vae_cfg, &shape, DType::F32, 1 << 30);
        }
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        let unet = unet3d::UNet3DConditionModel::new(vb, &cfg).expect("a validated config builds");
        let latents = Tensor::zeros((1, cfg.in_channels, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let context = Tensor::zeros((2, 3, cfg.cross_attention_dim), DType::F32, &Device::Cpu).unwrap();
        let out = unet.forward_shared_latents(&latents, 10.0, &context).expect("a validated UNet runs");
        prop_assert_eq!(out.dims(), &[2, cfg.out_channels, 2, 4, 4]);
    }

    /// Scheduler configs (any JSON object, and any text): an accepted one runs its whole schedule.
    #[test]
    fn scheduler_configs(
        config in config_object(SCHEDULER_KEYS),
        text in "[-{}\":,0-9a-zA-Z_. \\[\\]]{0,80}",
        ddim in any::<bool>(),
        steps in prop::sample::select(vec![0usize, 1, 2, 3, 7, 25, 999, 1000, 1001]),
        eta in prop::sample::select(vec![0.0, 0.5, 1.0]),
    ) {
        let path = Path::new("scheduler_config.json");
        let _ = parse_scheduler_config(&text, path);
        let kind = if ddim { SchedulerKind::Ddim } else { SchedulerKind::DpmSolverMultistep };
        let Ok(mut scheduler) = build_scheduler(kind, &config, path, steps, eta) else { return Ok(()) };
        let sample = Tensor::ones((2, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let model_output = (&sample * 0.5).unwrap();
        let timesteps = scheduler.timesteps().to_vec();
        prop_assert!(!timesteps.is_empty());
        let mut x = sample;
        for t in timesteps {
            let mut noise = |shape: &[usize]| Ok(Tensor::zeros(shape, DType::F32, &Device::Cpu)?);
            x = scheduler.step(&model_output, t, &x, &mut noise).expect("an accepted schedule steps");
        }
    }
}

/// An ISO-BMFF box of `typ` around `payload`, with its size field possibly lying.
fn mp4_box(typ: &[u8; 4], payload: &[u8], size: Option<u32>) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + payload.len());
    b.extend_from_slice(&size.unwrap_or(8 + payload.len() as u32).to_be_bytes());
    b.extend_from_slice(typ);
    b.extend_from_slice(payload);
    b
}

/// A tree of boxes on the path to the ©cmt comment, with sizes that may lie.
fn mp4_file() -> impl Strategy<Value = Vec<u8>> {
    let lie = prop::option::weighted(0.15, prop::sample::select(vec![0u32, 1, 7, 8, 9, 16, 100, u32::MAX]));
    (
        prop::collection::vec(any::<u8>(), 0..24),
        prop::collection::vec(lie, 7),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..8),
        0usize..80,
    )
        .prop_map(|(text, lies, iso, junk, cut)| {
            let mut data = vec![0, 0, 0, 1, 0, 0, 0, 0];
            data.extend_from_slice(&text);
            let data = mp4_box(b"data", &data, lies[0]);
            let cmt = mp4_box(b"\xa9cmt", &data, lies[1]);
            let ilst = mp4_box(b"ilst", &cmt, lies[2]);
            let mut meta_payload = if iso { vec![0, 0, 0, 0] } else { vec![] };
            meta_payload.extend(ilst);
            let meta = mp4_box(b"meta", &meta_payload, lies[3]);
            let udta = mp4_box(b"udta", &meta, lies[4]);
            let moov = mp4_box(b"moov", &udta, lies[5]);
            let mut file = mp4_box(b"ftyp", b"isom\0\0\0\0", lies[6]);
            file.extend(junk);
            file.extend(moov);
            let keep = file.len().saturating_sub(cut % 8);
            file.truncate(if cut >= 72 { keep } else { file.len() });
            file
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16384, failure_persistence: None, ..ProptestConfig::default() })]

    /// The MP4 metadata reader, over structured box trees and plain bytes.
    #[test]
    fn mp4_metadata(file in mp4_file(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = t2v::video::mp4_metadata_from(&mut Cursor::new(&file), file.len() as u64);
        let mut with_ftyp = b"\0\0\0\x08ftyp".to_vec();
        with_ftyp.extend(&bytes);
        let _ = t2v::video::mp4_metadata_from(&mut Cursor::new(&with_ftyp), with_ftyp.len() as u64);
        // A length that disagrees with the bytes there.
        let _ = t2v::video::mp4_metadata_from(&mut Cursor::new(&bytes), bytes.len() as u64 + 16);
    }

    /// Safetensors headers as JSON text, over hostile shapes, dtypes and offsets.
    #[test]
    fn safetensors_header_json(
        tensors in prop::collection::vec(
            (
                prop::sample::select(vec!["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "x"]),
                prop::collection::vec(prop::sample::select(vec![0u64, 1, 2, 3, 1 << 31, u64::MAX]), 0..4),
                prop::sample::select(vec![0u64, 4, 8, 16, u64::MAX]),
                prop::sample::select(vec![0u64, 4, 8, 16, u64::MAX]),
            ),
            0..4,
        ),
        data_len in prop::sample::select(vec![0u64, 8, 64, u64::MAX]),
        raw in prop::collection::vec(any::<u8>(), 0..48),
    ) {
        let header: serde_json::Map<String, Value> = tensors
            .iter()
            .enumerate()
            .map(|(i, (dtype, shape, a, b))| (format!("t{i}"), json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]})))
            .collect();
        let _ = t2v::checkpoint::summarize_safetensors_header(Value::Object(header).to_string().as_bytes(), data_len);
        let _ = t2v::checkpoint::summarize_safetensors_header(&raw, data_len);
    }
}

/// A safetensors file: a header over `tensors` (dtype, shape, whether its offsets lie) and the data.
fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let tensor = (
        prop::sample::select(vec!["F32", "F16", "BF16", "I64", "U8"]),
        prop::collection::vec(0usize..4, 0..3),
        prop::option::weighted(0.2, 0u64..64),
    );
    (prop::collection::vec(tensor, 1..4), prop::option::weighted(0.2, any::<u64>()), 0usize..8).prop_map(
        |(tensors, header_len_lie, cut)| {
            let mut header = serde_json::Map::new();
            let mut offset = 0u64;
            for (i, (dtype, shape, lie)) in tensors.iter().enumerate() {
                let size = match *dtype {
                    "F32" => 4,
                    "F16" | "BF16" => 2,
                    "I64" => 8,
                    _ => 1,
                };
                let len = shape.iter().product::<usize>() as u64 * size;
                let end = lie.unwrap_or(offset + len);
                header.insert(format!("w{i}"), json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}));
                offset += len;
            }
            let text = Value::Object(header).to_string();
            let mut file = header_len_lie.unwrap_or(text.len() as u64).to_le_bytes().to_vec();
            file.extend(text.as_bytes());
            file.extend(vec![0x3c; offset as usize]);
            file.truncate(file.len().saturating_sub(cut * 3));
            file
        },
    )
}

/// The first stored pickle of tiny-t2v-bin's UNet, with the archive's other entries.
fn pickle_archive() -> (Vec<(String, Vec<u8>)>, usize) {
    let path = common::model_dir("tiny-t2v-bin").join("unet/diffusion_pytorch_model.bin");
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut entries = Vec::new();
    let mut pickle = 0;
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        let name = f.name().unwrap().to_string();
        if name.ends_with("data.pkl") {
            pickle = entries.len();
        }
        entries.push((name, bytes));
    }
    (entries, pickle)
}

fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        zip.start_file(name.as_str(), options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

/// Edits of a byte string: flips, insertions, deletions, truncation.
fn mutations() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    prop::collection::vec((0u8..4, any::<usize>(), any::<u8>()), 1..6)
}

fn mutate(bytes: &mut Vec<u8>, edits: &[(u8, usize, u8)]) {
    for &(kind, at, byte) in edits {
        if bytes.is_empty() {
            bytes.push(byte);
            continue;
        }
        let at = at % bytes.len();
        match kind {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    /// Safetensors files: an accepted one opens and every tensor it names can be read.
    #[test]
    fn safetensors_files(file in safetensors_file()) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("w.safetensors");
        std::fs::write(&path, &file).unwrap();
        if t2v::checkpoint::inspect_safetensors(&path).is_err() {
            return Ok(());
        }
        let files = WeightsFiles { format: WeightsFormat::Safetensors, paths: vec![path] };
        let weights = ComponentWeights::open("unet", &files, DType::F32, &Device::Cpu, true).expect("accepted weights open");
        let vb = weights.var_builder();
        for i in 0..4 {
            let _ = vb.get_unchecked(&format!("w{i}"));
        }
    }

    /// PyTorch checkpoints: the tiny UNet's pickle edited at random; an accepted one loads.
    #[test]
    fn pickles(edits in mutations(), whole in prop::collection::vec(any::<u8>(), 0..64)) {
        let (mut entries, pickle) = pickle_archive();
        mutate(&mut entries[pickle].1, &edits);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.bin");
        write_zip(&path, &entries);
        if t2v::checkpoint::pth::check_pth_is_plain_state_dict(&path).is_ok() {
            let _ = t2v::checkpoint::pth::load_pth_tensors(&path, DType::F32, &Device::Cpu);
        }
        std::fs::write(&path, &whole).unwrap();
        let _ = t2v::checkpoint::pth::check_pth_is_plain_state_dict(&path);
    }

    /// Tokenizer folders: vocab, merges and config of arbitrary content; an accepted tokenizer
    /// encodes and decodes any prompt.
    #[test]
    fn tokenizer_files(
        vocab in prop::collection::vec(("[a-z<|>/]{1,6}", prop::sample::select(vec![0i64, 1, 2, 5, 9, -1, 1 << 40])), 0..12),
        merges in prop::collection::vec("[a-z</>#]{0,4}( [a-z</>]{0,4}){0,2}", 0..8),
        max_length in any_value(),
        bos in prop::sample::select(vec![json!("<|startoftext|>"), json!(null), json!({"content": "a"}), json!(3), json!({"x": 1})]),
        prompt in "\\PC{0,30}",
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut map: serde_json::Map<String, Value> = vocab.into_iter().map(|(t, id)| (t, json!(id))).collect();
        for (t, id) in [("<|startoftext|>", 100), ("<|endoftext|>", 101), ("a</w>", 102)] {
            map.entry(t.to_string()).or_insert(json!(id));
        }
        std::fs::write(tmp.path().join("vocab.json"), Value::Object(map).to_string()).unwrap();
        std::fs::write(tmp.path().join("merges.txt"), merges.join("\n")).unwrap();
        let config = json!({"model_max_length": max_length, "bos_token": bos});
        std::fs::write(tmp.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        if let Ok(tok) = t2v::tokenizer::ClipTokenizer::from_folder(tmp.path()) {
            let encoded = tok.encode_padded(&prompt).expect("an accepted tokenizer encodes");
            prop_assert_eq!(encoded.ids.len(), tok.max_length());
            let _ = tok.decode(&encoded.ids, true);
        }
    }
}
