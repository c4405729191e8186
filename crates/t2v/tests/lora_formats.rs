//! The key-less list LoRAs of Text-To-Video-Finetuning and T2V-Turbo (`fixtures/lora-formats/`,
//! made by `make_list_loras.py` with diffusers' own `UNet3DConditionModel.named_modules()`):
//! the module order t2v derives from the config is PyTorch's, the lists merge to the float64
//! updates, equal the same pairs in diffusers' format (bit for bit, frames too), and a list for
//! another model is refused naming the first pair that does not fit.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use t2v::checkpoint::{ModelFolder, WeightsVariant};
use t2v::lora::{self, LoraFile, LoraSpec, LoraTarget};
use t2v::pipeline::{Control, GenerationParams, LoadOptions, TextToVideo};
use t2v::unet3d;
use t2v::Error;

/// (model, list file name).
const FILES: [(&str, &str); 3] =
    [("tiny-t2v", "unet_list"), ("tiny-t2v", "turbo_unet_lora"), ("small-t2v", "unet_list")];

fn formats_dir(model: &str) -> PathBuf {
    fixtures().join("lora-formats").join(model.trim_end_matches("-t2v"))
}

fn list_path(model: &str, name: &str) -> PathBuf {
    formats_dir(model).join(format!("{name}.pt"))
}

fn list_json(model: &str, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(formats_dir(model).join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn cond_dim(model: &str, name: &str) -> Option<usize> {
    list_json(model, name)["time_cond_proj_dim"].as_u64().map(|d| d as usize)
}

fn unet_config(model: &str, time_cond_proj_dim: Option<usize>) -> unet3d::Config {
    let text = std::fs::read_to_string(model_dir(model).join("unet/config.json")).unwrap();
    let mut cfg: unet3d::Config = serde_json::from_str(&text).unwrap();
    if time_cond_proj_dim.is_some() {
        cfg.time_cond_proj_dim = time_cond_proj_dim;
    }
    cfg
}

/// The model's tensor shapes (with T2V-Turbo's zero `cond_proj`) and module order.
fn model_of(
    model: &str,
    time_cond_proj_dim: Option<usize>,
) -> (HashMap<LoraTarget, lora::TensorShapes>, lora::ModuleNames) {
    let cfg = unet_config(model, time_cond_proj_dim);
    let folder = ModelFolder::open(model_dir(model)).unwrap();
    let unet = folder.weights_with("unet", WeightsVariant::Auto, DType::F32, &Device::Cpu, true).unwrap();
    if let Some(d) = time_cond_proj_dim {
        unet.zero_if_absent("time_embedding.cond_proj.weight", &[cfg.block_out_channels[0], d]);
    }
    let te = folder.weights_with("text_encoder", WeightsVariant::Auto, DType::F32, &Device::Cpu, true).unwrap();
    let shapes =
        HashMap::from([(LoraTarget::Unet, unet.tensor_shapes()), (LoraTarget::TextEncoder, te.tensor_shapes())]);
    (shapes, t2v::pipeline::lora_module_names(&cfg))
}

/// Each tensor's merged update (the deltas applied to zeros), float32.
fn updates(model: &str, cond: Option<usize>, path: &Path, weight: f64) -> t2v::Result<HashMap<String, Tensor>> {
    let (shapes, order) = model_of(model, cond);
    let file = LoraFile::open(path)?;
    let deltas = lora::resolve_with_names(&[(file, weight)], &shapes, &order)?;
    Ok(deltas[&LoraTarget::Unet]
        .iter()
        .map(|(name, d)| {
            let zeros = Tensor::zeros(shapes[&LoraTarget::Unet][name].as_slice(), DType::F32, &Device::Cpu).unwrap();
            (name.clone(), lora::merge(&zeros, d, DType::F32).unwrap())
        })
        .collect())
}

#[test]
fn module_order_is_pytorch_named_modules_order() {
    for (model, name) in FILES {
        let json = list_json(model, name);
        let expected: Vec<String> =
            json["modules"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
        let got = unet3d::lora_module_order(&unet_config(model, cond_dim(model, name)));
        assert_eq!(got.len(), expected.len(), "{model} {name}: module count");
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "{model} {name}: module {i}");
        }
        println!("{model} {name}: {} modules in named_modules() order", got.len());
    }
}

#[test]
fn list_files_merge_to_the_float64_updates() {
    for (model, name) in FILES {
        let refs =
            candle_core::safetensors::load(formats_dir(model).join("reference.safetensors"), &Device::Cpu).unwrap();
        let cond = cond_dim(model, name);
        let merged = updates(model, cond, &list_path(model, name), 1.0).unwrap();
        let modules = unet3d::lora_module_order(&unet_config(model, cond));
        assert_eq!(merged.len(), modules.len(), "{model} {name}: every module has its update");
        // Full updates where the fixture keeps them.
        let mut worst = 0f64;
        let mut checked = 0;
        for (key, expected) in &refs {
            let Some(tensor) = key.strip_prefix(&format!("{name}/")) else { continue };
            if tensor == "sums" {
                continue;
            }
            let got = merged.get(tensor).unwrap_or_else(|| panic!("{model} {name}: `{tensor}` not merged"));
            worst = worst.max(rel_err(got, expected));
            checked += 1;
        }
        assert!(checked > 0);
        // Every module's update summed, in list order: each pair went to its own module.
        let sums = refs[&format!("{name}/sums")].to_vec1::<f64>().unwrap();
        assert_eq!(sums.len(), modules.len());
        let mut worst_sum = 0f64;
        for (m, expected) in modules.iter().zip(&sums) {
            let t = &merged[&format!("{m}.weight")];
            let got = t.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            let scale = t.abs().unwrap().to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            worst_sum = worst_sum.max((got - expected).abs() / scale.max(1e-12));
        }
        println!(
            "{model} {name}: {} tensors max rel err {worst:.2e}, {} sums max rel err {worst_sum:.2e}",
            checked,
            sums.len()
        );
        assert!(worst <= 1e-6, "{model} {name}: updates differ by {worst:.2e}");
        assert!(worst_sum <= 1e-6, "{model} {name}: update sums differ by {worst_sum:.2e}");
    }
}

/// The same pairs as a diffusers-format file (`unet.<module>.lora_A.weight` = down, `lora_B` =
/// up, no alpha: scale r/r = 1).
fn write_as_diffusers(model: &str, name: &str, path: &Path) {
    let tensors = t2v::checkpoint::pth::load_pth_tensor_list(&list_path(model, name)).unwrap();
    let modules = unet3d::lora_module_order(&unet_config(model, cond_dim(model, name)));
    let mut out = HashMap::new();
    for (m, pair) in modules.iter().zip(tensors.chunks(2)) {
        out.insert(format!("unet.{m}.lora_B.weight"), pair[0].clone());
        out.insert(format!("unet.{m}.lora_A.weight"), pair[1].clone());
    }
    candle_core::safetensors::save(&out, path).unwrap();
}

#[test]
fn a_list_equals_the_same_lora_in_diffusers_format() {
    let dir = tempfile::tempdir().unwrap();
    for (model, name) in [("tiny-t2v", "unet_list"), ("small-t2v", "unet_list")] {
        let copy = dir.path().join(format!("{model}.safetensors"));
        write_as_diffusers(model, name, &copy);
        let a = updates(model, None, &list_path(model, name), 0.7).unwrap();
        let b = updates(model, None, &copy, 0.7).unwrap();
        assert_eq!(a.len(), b.len());
        let worst = a.iter().map(|(k, t)| max_abs_diff(t, &b[k])).fold(0f64, f64::max);
        println!("{model}: list vs diffusers format, {} tensors, max abs diff {worst:.2e}", a.len());
        assert_eq!(worst, 0.0, "{model}: the two formats merge differently");
    }
}

fn params() -> GenerationParams {
    let mut p = GenerationParams::new("a list lora", 7);
    p.num_inference_steps = 2;
    p.num_frames = 2;
    p.height = Some(32);
    p.width = Some(32);
    p
}

#[test]
fn a_list_gives_the_frames_of_the_same_lora_in_diffusers_format() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.safetensors");
    write_as_diffusers("tiny-t2v", "unet_list", &copy);
    let run = |path: &Path| {
        let options = LoadOptions { loras: vec![LoraSpec::new(path, 0.5)], ..LoadOptions::default() };
        let pipe = TextToVideo::load(model_dir("tiny-t2v"), &options).unwrap();
        pipe.generate(&params(), &mut |_| Control::Continue).unwrap().frames
    };
    let list = run(&list_path("tiny-t2v", "unet_list"));
    let diffusers = run(&copy);
    let plain = TextToVideo::load(model_dir("tiny-t2v"), &LoadOptions::default())
        .unwrap()
        .generate(&params(), &mut |_| Control::Continue)
        .unwrap()
        .frames;
    let err = max_abs_diff(&list, &diffusers);
    let effect = max_abs_diff(&list, &plain);
    println!("tiny-t2v list vs diffusers format: frames max abs diff {err:.2e} (the LoRA moves them {effect:.2e})");
    assert_eq!(err, 0.0);
    assert!(effect > 1e-2, "the LoRA made no difference ({effect:.2e})");
}

/// T2V-Turbo's list carries `cond_proj`, whose base weight no file holds: with
/// `time_cond_proj_dim` the UNet gains it (zeros plus the pair); without, the list is refused.
#[test]
fn a_turbo_list_needs_the_guidance_embedding_width() {
    let path = list_path("tiny-t2v", "turbo_unet_lora");
    let options =
        LoadOptions { loras: vec![LoraSpec::new(&path, 1.0)], time_cond_proj_dim: Some(256), ..LoadOptions::default() };
    TextToVideo::load(model_dir("tiny-t2v"), &options).unwrap();
    let counts =
        t2v::pipeline::check_loras_with(model_dir("tiny-t2v"), &options.loras, WeightsVariant::Auto, Some(256))
            .unwrap()
            .unwrap();
    assert_eq!(counts, vec![175]);
    let refs =
        candle_core::safetensors::load(formats_dir("tiny-t2v").join("reference.safetensors"), &Device::Cpu).unwrap();
    let merged = updates("tiny-t2v", Some(256), &path, 1.0).unwrap();
    let cond = "time_embedding.cond_proj.weight";
    assert_eq!(merged[cond].dims(), &[8, 256]);
    let err = rel_err(&merged[cond], &refs[&format!("turbo_unet_lora/{cond}")]);
    assert!(err <= 1e-6, "cond_proj: {err:.2e}");

    let err = TextToVideo::load(
        model_dir("tiny-t2v"),
        &LoadOptions { loras: vec![LoraSpec::new(&path, 1.0)], ..LoadOptions::default() },
    )
    .err()
    .expect("a T2V-Turbo list without time_cond_proj_dim is refused");
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::Lora { .. }), "{msg}");
    assert!(msg.contains("pair 2 (items 4 and 5)") && msg.contains("time_embedding.linear_2"), "{msg}");
}

#[test]
fn a_list_for_another_model_is_refused_naming_the_first_pair() {
    // The tiny model's list on the small model: pair 0 already has other widths.
    let err = updates("small-t2v", None, &list_path("tiny-t2v", "unet_list"), 1.0).err().unwrap();
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains("pair 0 (items 0 and 1)") && msg.contains("`conv_in`"), "{msg}");

    // One pair short: every pair fits, the count does not.
    let dir = tempfile::tempdir().unwrap();
    let tensors = t2v::checkpoint::pth::load_pth_tensor_list(&list_path("tiny-t2v", "unet_list")).unwrap();
    let short = dir.path().join("short.pt");
    write_torch_list(&tensors[..tensors.len() - 2], &short);
    let msg = updates("tiny-t2v", None, &short, 1.0).err().unwrap().to_string();
    println!("{msg}");
    assert!(msg.contains("173 pairs") && msg.contains("174"), "{msg}");

    // An odd count.
    let odd = dir.path().join("odd.pt");
    write_torch_list(&tensors[..3], &odd);
    let msg = LoraFile::open(&odd).err().unwrap().to_string();
    assert!(msg.contains("3 tensors"), "{msg}");

    // Swapped up and down in one pair (conv_in's: (8, 4, 1, 1) and (4, 4, 3, 3)).
    let mut swapped = tensors.clone();
    swapped.swap(0, 1);
    let bad = dir.path().join("swapped.pt");
    write_torch_list(&swapped, &bad);
    let msg = match LoraFile::open(&bad) {
        Err(e) => e.to_string(),
        Ok(f) => {
            let (shapes, order) = model_of("tiny-t2v", None);
            lora::resolve_with_names(&[(f, 1.0)], &shapes, &order).err().unwrap().to_string()
        }
    };
    println!("{msg}");
    assert!(msg.contains("pair 0"), "{msg}");

    // Without the module order (the plain `resolve`), a list cannot be placed.
    let (shapes, _) = model_of("tiny-t2v", None);
    let file = LoraFile::open(list_path("tiny-t2v", "unet_list")).unwrap();
    let msg = lora::resolve(&[(file, 1.0)], &shapes).err().unwrap().to_string();
    assert!(msg.contains("module order"), "{msg}");
}

/// A minimal `torch.save` zip of a list of float32 tensors (protocol 2 pickle), as PyTorch
/// writes it: `archive/data.pkl`, `archive/data/<n>`, `archive/version`, `archive/byteorder`.
fn write_torch_list(tensors: &[Tensor], path: &Path) {
    use std::io::Write;
    let mut pkl: Vec<u8> = vec![0x80, 2, b']', b'('];
    let unicode = |out: &mut Vec<u8>, s: &str| {
        out.push(b'X');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let int = |out: &mut Vec<u8>, v: usize| {
        out.push(b'J');
        out.extend_from_slice(&(v as i32).to_le_bytes());
    };
    for (i, t) in tensors.iter().enumerate() {
        pkl.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
        pkl.push(b'(');
        // persistent id ('storage', torch.FloatStorage, key, 'cpu', numel)
        pkl.push(b'(');
        unicode(&mut pkl, "storage");
        pkl.extend_from_slice(b"ctorch\nFloatStorage\n");
        unicode(&mut pkl, &i.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, t.elem_count());
        pkl.extend_from_slice(b"tQ");
        int(&mut pkl, 0);
        let dims = t.dims();
        let mut strides = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1];
        }
        for v in [dims.to_vec(), strides] {
            pkl.push(b'(');
            for x in v {
                int(&mut pkl, x);
            }
            pkl.push(b't');
        }
        pkl.push(0x89); // False: requires_grad
        pkl.extend_from_slice(b"ccollections\nOrderedDict\n)R");
        pkl.extend_from_slice(b"tR");
    }
    pkl.extend_from_slice(b"e.");
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&pkl).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    for (i, t) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for x in v {
            zip.write_all(&x.to_le_bytes()).unwrap();
        }
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

// ---- Stable LoRA (`make_stable_lora.py`, keys named by Text-To-Video-Finetuning's converter) ----

fn stable_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(formats_dir("small-t2v").join("stable_modules.json")).unwrap())
        .unwrap()
}

#[test]
fn modelscope_names_are_the_converters() {
    let json = stable_json();
    let cfg = unet_config("small-t2v", None);
    let modules = json["modules"].as_array().unwrap();
    let names = json["modelscope_names"].as_array().unwrap();
    assert_eq!(modules.len(), names.len());
    for (m, ms) in modules.iter().zip(names) {
        assert_eq!(unet3d::modelscope_name(&cfg, m.as_str().unwrap()), ms.as_str().unwrap(), "{m}");
    }
    println!("small-t2v: {} ModelScope names as the converter gives them", names.len());
}

#[test]
fn stable_lora_merges_to_the_float64_updates() {
    let path = formats_dir("small-t2v").join("stable_lora.safetensors");
    let refs =
        candle_core::safetensors::load(formats_dir("small-t2v").join("stable_reference.safetensors"), &Device::Cpu)
            .unwrap();
    let merged = updates("small-t2v", None, &path, 1.0).unwrap();
    let modules: Vec<String> =
        stable_json()["modules"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
    assert_eq!(merged.len(), modules.len(), "every module of the file is merged");
    let mut worst = 0f64;
    for (name, expected) in refs.iter().filter(|(k, _)| *k != "sums") {
        worst = worst.max(rel_err(&merged[name], expected));
    }
    let sums = refs["sums"].to_vec1::<f64>().unwrap();
    let mut worst_sum = 0f64;
    for (m, expected) in modules.iter().zip(&sums) {
        let t = merged[&format!("{m}.weight")].to_dtype(DType::F64).unwrap();
        let got = t.sum_all().unwrap().to_scalar::<f64>().unwrap();
        let scale = t.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        worst_sum = worst_sum.max((got - expected).abs() / scale.max(1e-12));
    }
    println!(
        "small-t2v Stable LoRA: {} tensors max rel err {worst:.2e}, {} sums max rel err {worst_sum:.2e}",
        refs.len() - 1,
        sums.len()
    );
    assert!(worst <= 1e-5, "updates differ by {worst:.2e}");
    assert!(worst_sum <= 1e-5, "update sums differ by {worst_sum:.2e}");

    // Weights scale the updates.
    let half = updates("small-t2v", None, &path, 0.5).unwrap();
    let name = format!("{}.weight", modules[100]);
    let err = max_abs_diff(&(&merged[&name] * 0.5).unwrap(), &half[&name]);
    assert!(err <= 1e-6, "{err:.2e}");
}

#[test]
fn stable_lora_loads_and_for_another_model_is_refused() {
    let path = formats_dir("small-t2v").join("stable_lora.safetensors");
    let counts = t2v::pipeline::check_loras(model_dir("small-t2v"), &[LoraSpec::new(&path, 1.0)], WeightsVariant::Auto)
        .unwrap()
        .unwrap();
    assert_eq!(counts, vec![573]);
    let err = TextToVideo::load(
        model_dir("tiny-t2v"),
        &LoadOptions { loras: vec![LoraSpec::new(&path, 1.0)], ..LoadOptions::default() },
    )
    .err()
    .expect("the small model's Stable LoRA on the tiny model is refused");
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::Lora { .. }) && msg.contains(".lora_A`"), "{msg}");
}

// ---- T2V-Turbo-MS: the list LoRA over a UNet with a guidance embedding, its own sampler ----

/// `make_turbo_reference.py`: T2V-Turbo's pipeline and scheduler on `tiny-t2v` with
/// `turbo_unet_lora.pt` (cond_proj's base weight zero), frames within 1e-3.
#[test]
fn t2v_turbo_run_matches_its_reference() {
    let dir = formats_dir("tiny-t2v");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("turbo_reference.json")).unwrap()).unwrap();
    let refs = candle_core::safetensors::load(dir.join("turbo_reference.safetensors"), &Device::Cpu).unwrap();
    let options = LoadOptions {
        loras: vec![LoraSpec::new(dir.join(run["lora"].as_str().unwrap()), 1.0)],
        time_cond_proj_dim: Some(run["time_cond_proj_dim"].as_u64().unwrap() as usize),
        ..LoadOptions::default()
    };
    let pipe = TextToVideo::load(model_dir("tiny-t2v"), &options).unwrap();
    let mut params = GenerationParams::new(run["prompt"].as_str().unwrap(), run["seed"].as_u64().unwrap());
    params.num_inference_steps = run["steps"].as_u64().unwrap() as usize;
    params.guidance_scale = run["guidance_scale"].as_f64().unwrap();
    params.scheduler = t2v::schedulers::SchedulerKind::T2vTurbo;
    params.num_frames = run["num_frames"].as_u64().unwrap() as usize;
    params.height = Some(run["height"].as_u64().unwrap() as usize);
    params.width = Some(run["width"].as_u64().unwrap() as usize);

    let mut timesteps = Vec::new();
    let video = pipe
        .generate(&params, &mut |p| {
            timesteps.push(p.timestep as f64);
            Control::Continue
        })
        .unwrap();
    assert_eq!(timesteps, refs["timesteps"].to_vec1::<f64>().unwrap(), "timesteps");
    let err = max_abs_diff(&video.frames, &refs["frames"]);
    println!(
        "tiny-t2v T2V-Turbo run ({} steps, w {}): frames max abs err {err:.2e}",
        timesteps.len(),
        params.guidance_scale
    );
    assert!(err <= 1e-3, "frames differ by {err:.2e}");

    // The guidance scale reaches the UNet through the embedding: another w, other frames.
    params.guidance_scale = 3.0;
    let other = pipe.generate(&params, &mut |_| Control::Continue).unwrap();
    assert!(max_abs_diff(&other.frames, &video.frames) > 1e-3, "the guidance embedding changed nothing");

    // Without the guidance embedding the sampler is refused.
    let plain = TextToVideo::load(model_dir("tiny-t2v"), &LoadOptions::default()).unwrap();
    let msg = plain.generate(&params, &mut |_| Control::Continue).err().unwrap().to_string();
    assert!(msg.contains("time_cond_proj_dim"), "{msg}");
}

#[test]
fn t2v_turbo_timesteps_are_taken_every_50_over_n() {
    let path = model_dir("tiny-t2v").join("scheduler/scheduler_config.json");
    let config = t2v::schedulers::load_scheduler_config(&path).unwrap();
    let kind = t2v::schedulers::SchedulerKind::T2vTurbo;
    let of = |n: usize| t2v::schedulers::build_scheduler(kind, &config, &path, n, 0.0).unwrap().timesteps().to_vec();
    assert_eq!(of(4), vec![999, 759, 519, 279]);
    assert_eq!(of(1), vec![999]);
    assert_eq!(of(2), vec![999, 499]);
    assert_eq!(of(8), vec![999, 879, 759, 639, 519, 399, 279, 159]);
    assert!(t2v::schedulers::build_scheduler(kind, &config, &path, 51, 0.0).is_err());
    assert_eq!("t2v-turbo".parse::<t2v::schedulers::SchedulerKind>().unwrap(), kind);
    assert_eq!(kind.class_name(), "T2VTurboScheduler");
}

// ---- `--lora REPO/SUBFOLDER`: a LoRA from the Hub cache ----

/// MCM's layout (`yhzhai/mcm`, subfolder `modelscopet2v-webvid`) in a fake, offline cache: the
/// subfolder of the snapshot is the LoRA; a subfolder without one is refused naming what is missing.
#[test]
fn a_lora_repo_subfolder_resolves_through_the_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--someone--video-loras");
    let sub = repo.join("snapshots").join(commit).join("webvid");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::fs::copy(
        model_dir("tiny-t2v").join("lora/pytorch_lora_weights.safetensors"),
        sub.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    let mut opts = t2v::checkpoint::HubOptions::new(&cache);
    opts.offline = true;
    let resolved = t2v::checkpoint::hub::resolve_lora("someone/video-loras/webvid", &opts).unwrap();
    assert_eq!(resolved, sub);
    let counts =
        t2v::pipeline::check_loras(model_dir("tiny-t2v"), &[LoraSpec::new(&resolved, 1.0)], WeightsVariant::Auto)
            .unwrap()
            .unwrap();
    assert!(counts[0] > 0);
    // With a revision, and at the top level of a repo that has none there.
    assert_eq!(
        t2v::checkpoint::hub::resolve_lora(&format!("someone/video-loras/webvid@{commit}"), &opts).unwrap(),
        sub
    );
    let msg = t2v::checkpoint::hub::resolve_lora("someone/video-loras", &opts).err().unwrap().to_string();
    assert!(msg.contains("*.safetensors"), "{msg}");
    let msg = t2v::checkpoint::hub::resolve_lora("someone/video-loras/other", &opts).err().unwrap().to_string();
    assert!(msg.contains("other/*.safetensors"), "{msg}");
    // Not a path and not a repo.
    let msg = t2v::checkpoint::hub::resolve_lora("no-such-lora.safetensors", &opts).err().unwrap().to_string();
    assert!(msg.contains("no such file"), "{msg}");
}
