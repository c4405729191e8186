//! Loading checkpoint folders: the published configuration parses, weight variants are chosen as
//! documented, and every failure is typed and says what is wrong.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use t2v::checkpoint::{ModelFolder, WeightsFormat, WeightsVariant};
use t2v::pipeline::{check_params, GenerationParams, LoadOptions, TextToVideo};
use t2v::tokenizer::ClipTokenizer;
use t2v::unet3d::{self, UNet3DConditionModel};
use t2v::Error;
use tempfile::TempDir;

/// A fresh copy of a fixture model to damage, in a folder removed with the returned guard.
fn copy_model(name: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let dest = dir.path().join(name);
    copy_dir(&model_dir(name), &dest);
    (dir, dest)
}

fn load_err(root: &Path) -> Error {
    match TextToVideo::load(root, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", root.display()),
        Err(e) => e,
    }
}

fn unet_weights(root: &Path) -> PathBuf {
    root.join("unet").join("diffusion_pytorch_model.safetensors")
}

#[test]
fn published_configuration_loads() {
    let root = full_config_dir();
    let folder = ModelFolder::open(&root).unwrap();
    let unet: unet3d::Config = folder.config("unet", "config.json").unwrap();
    unet.validate().unwrap();
    assert_eq!(unet.block_out_channels, [320, 640, 1280, 1280]);
    assert_eq!(unet.cross_attention_dim, 1024);
    let te: t2v::text_encoder::Config = folder.config("text_encoder", "config.json").unwrap();
    assert_eq!((te.hidden_size, te.num_hidden_layers, te.hidden_act.as_str()), (1024, 23, "gelu"));
    let vae: t2v::vae::Config = folder.config("vae", "config.json").unwrap();
    assert_eq!((vae.scale_factor(), vae.scaling_factor), (8, 0.18215));
    let tok = ClipTokenizer::from_folder(&root.join("tokenizer")).unwrap();
    assert_eq!((tok.max_length(), tok.pad_id()), (77, 0));
    // The model card's size: sample_size 32 × VAE scale 8.
    assert_eq!(check_params(&root, &GenerationParams::new("x", 0)).unwrap(), (256, 256));
    // No weights: loading says so, naming the component.
    let err = load_err(&root);
    assert!(matches!(err, Error::FileMissing { .. }), "{err}");
    assert!(err.to_string().contains("text_encoder has no weights file"), "{err}");
}

#[test]
fn missing_configs_take_the_reference_defaults() {
    // An older config that names only some keys: the rest are UNet3DConditionModel's defaults.
    let cfg: unet3d::Config =
        serde_json::from_str(r#"{"_class_name": "UNet3DConditionModel", "sample_size": 32, "future_key": [1, 2]}"#)
            .unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.block_out_channels, [320, 640, 1280, 1280]);
    assert_eq!((cfg.layers_per_block, cfg.norm_num_groups, cfg.cross_attention_dim), (2, Some(32), 1024));
}

#[test]
fn missing_folder_and_files_are_named() {
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(matches!(err, Error::ModelFolderMissing { .. }));
    assert!(err.to_string().contains("/nonexistent/model does not exist"), "{err}");

    let (_dir, root) = copy_model("tiny-t2v");
    std::fs::remove_file(root.join("model_index.json")).unwrap();
    let err = load_err(&root);
    assert!(err.to_string().contains("model_index.json is missing"), "{err}");

    let (_dir, root) = copy_model("tiny-t2v");
    std::fs::remove_file(root.join("unet/config.json")).unwrap();
    let err = load_err(&root);
    assert!(matches!(err, Error::FileMissing { .. }), "{err}");
    assert!(err.to_string().contains("unet/config.json is missing"), "{err}");

    let (_dir, root) = copy_model("tiny-t2v");
    std::fs::remove_dir_all(root.join("vae")).unwrap();
    let err = load_err(&root);
    assert!(err.to_string().contains("vae is missing"), "{err}");
}

/// Rewrites the tiny UNet's weights through `edit`.
fn edit_unet(edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) -> (TempDir, PathBuf) {
    let (dir, root) = copy_model("tiny-t2v");
    let mut tensors = candle_core::safetensors::load(unet_weights(&root), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, unet_weights(&root)).unwrap();
    (dir, root)
}

#[test]
fn missing_tensor_is_named() {
    let name = "down_blocks.0.temp_convs.0.conv2.3.weight";
    let (_dir, root) = edit_unet(|t| {
        t.remove(name);
    });
    match load_err(&root) {
        Error::TensorMissing { component, name: missing, .. } => {
            assert_eq!((component.as_str(), missing.as_str()), ("unet", name));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn wrong_shape_reports_expected_and_found() {
    let name = "mid_block.attentions.0.proj_in.weight";
    let (_dir, root) = edit_unet(|t| {
        t.insert(name.into(), Tensor::zeros((8, 6), DType::F32, &Device::Cpu).unwrap());
    });
    let err = load_err(&root);
    match &err {
        Error::ShapeMismatch { name: n, expected, found, .. } => {
            assert_eq!((n.as_str(), &expected[..], &found[..]), (name, &[8usize, 8][..], &[8usize, 6][..]));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("has shape [8, 6], but its config.json expects [8, 8]"), "{err}");
}

#[test]
fn truncated_and_garbage_weights_are_corrupt() {
    let (_dir, root) = copy_model("tiny-t2v");
    let bytes = std::fs::read(unet_weights(&root)).unwrap();
    std::fs::write(unet_weights(&root), &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&root);
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err}");
    assert!(err.to_string().contains("truncated") && err.to_string().contains("download it again"), "{err}");

    std::fs::write(unet_weights(&root), b"<html>not a model</html>").unwrap();
    let err = load_err(&root);
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err}");
}

#[test]
fn unsupported_component_class_is_named_with_the_supported_ones() {
    let (_dir, root) = copy_model("tiny-t2v");
    let index = std::fs::read_to_string(root.join("model_index.json")).unwrap();
    std::fs::write(root.join("model_index.json"), index.replace("UNet3DConditionModel", "UNet2DConditionModel"))
        .unwrap();
    let err = load_err(&root);
    assert!(matches!(err, Error::UnsupportedClass { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("UNet2DConditionModel") && msg.contains("supported: UNet3DConditionModel"), "{msg}");
}

#[test]
fn fp16_variant_is_taken_when_alone_or_asked_for() {
    let (_dir, root) = copy_model("small-t2v");
    let fp16 = root.join("unet/diffusion_pytorch_model.fp16.safetensors");
    std::fs::copy(unet_weights(&root), &fp16).unwrap();
    let folder = ModelFolder::open(&root).unwrap();
    // Both present: the plain file unless fp16 is asked for.
    assert_eq!(folder.weights_files("unet", WeightsVariant::Auto).unwrap().paths, [unet_weights(&root)]);
    assert_eq!(folder.weights_files("unet", WeightsVariant::Fp16).unwrap().paths, std::slice::from_ref(&fp16));
    // Only the variant: taken automatically, and it computes the reference's output.
    std::fs::remove_file(unet_weights(&root)).unwrap();
    let files = folder.weights_files("unet", WeightsVariant::Auto).unwrap();
    assert_eq!((files.format, files.paths.clone()), (WeightsFormat::Safetensors, vec![fp16]));
    let err = folder.weights_files("unet", WeightsVariant::Full).unwrap_err();
    assert!(err.to_string().contains("no full-precision weights file"), "{err}");

    let cfg: unet3d::Config = folder.config("unet", "config.json").unwrap();
    let weights = folder.weights("unet", WeightsVariant::Auto, DType::F32, &Device::Cpu).unwrap();
    let unet = weights.build(|vb| UNet3DConditionModel::new(vb, &cfg)).unwrap();
    let refs = reference("small-t2v");
    let out = unet.forward(&refs["unet.sample"], 500.0, &refs["unet.context"]).unwrap();
    assert!(rel_err(&out, &refs["unet.t500.out"]) < MODULE_TOL);
}

#[test]
fn malicious_pickle_in_a_checkpoint_is_refused_and_runs_nothing() {
    let (_dir, root) = copy_model("tiny-t2v-bin");
    std::fs::copy(fixtures().join("malicious.bin"), root.join("vae/diffusion_pytorch_model.bin")).unwrap();
    let err = load_err(&root);
    assert!(matches!(err, Error::UnsafePickle { .. }), "{err}");
    assert!(err.to_string().contains("system"), "{err}");
    assert!(!Path::new("t2v-pickle-ran.txt").exists());
    assert!(!root.join("t2v-pickle-ran.txt").exists());
}

#[test]
fn bin_checkpoint_loads_whole() {
    let pipe = TextToVideo::load(model_dir("tiny-t2v-bin"), &LoadOptions::default()).unwrap();
    let refs = reference("tiny-t2v");
    let embeds = pipe.encode_prompt("Spiderman is surfing").unwrap();
    assert!(rel_err(&embeds, &refs["text.0.embeds"]) < MODULE_TOL);
}

#[test]
fn narrow_weights_stay_float16_and_vectors_widen() {
    let folder = ModelFolder::open(model_dir("small-t2v")).unwrap();
    let vb = |narrow| {
        folder.weights_with("unet", WeightsVariant::Auto, DType::F32, &Device::Cpu, narrow).unwrap().var_builder()
    };
    let w = vb(true).get((32, 32), "down_blocks.0.attentions.0.proj_in.weight").unwrap();
    let b = vb(true).get(32, "down_blocks.0.attentions.0.proj_in.bias").unwrap();
    assert_eq!((w.dtype(), b.dtype()), (DType::F16, DType::F32));
    let wide = vb(false).get((32, 32), "down_blocks.0.attentions.0.proj_in.weight").unwrap();
    assert_eq!(wide.dtype(), DType::F32);
    assert_eq!(max_abs_diff(&w.to_dtype(DType::F32).unwrap(), &wide), 0.0);
}

#[test]
fn vae_with_pre_0_15_attention_names_decodes_the_same() {
    // Checkpoints saved before diffusers 0.15 name the VAE's attention query/key/value/proj_attn.
    let (_dir, root) = copy_model("tiny-t2v");
    let path = root.join("vae/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_k.", "attentions.0.key.")
                .replace("attentions.0.to_v.", "attentions.0.value.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
            (k, v)
        })
        .collect();
    assert!(renamed.contains_key("decoder.mid_block.attentions.0.query.weight"));
    candle_core::safetensors::save(&renamed, &path).unwrap();
    let pipe = TextToVideo::load(&root, &LoadOptions::default()).unwrap();
    let refs = reference("tiny-t2v");
    let out = pipe.vae().decode(&refs["vae.latents"]).unwrap();
    assert!(rel_err(&out, &refs["vae.decoded"]) < MODULE_TOL);
}
