//! The other LoRA formats through the command line: T2V-Turbo-MS in one command
//! (`--lora unet_lora.pt --scheduler t2v-turbo`) reproduces its reference run
//! (`fixtures/lora-formats/tiny/turbo_reference.*`), and `--from` repeats it; a
//! Text-To-Video-Finetuning list and a Stable LoRA made for another model are refused before
//! any model work, naming what does not fit.

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use candle_core::Device;
use common::*;
use support::*;

#[test]
fn t2v_turbo_in_one_command_matches_its_reference_and_repeats_from_its_settings() {
    let formats = fixtures().join("lora-formats/tiny");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(formats.join("turbo_reference.json")).unwrap()).unwrap();
    let refs = candle_core::safetensors::load(formats.join("turbo_reference.safetensors"), &Device::Cpu).unwrap();
    let (_tmp, dir) = temp_dir();
    let out = dir.join("turbo.npy");
    let lora = formats.join(run["lora"].as_str().unwrap());
    let o = t2v(&[
        "generate",
        run["prompt"].as_str().unwrap(),
        "--model",
        model_dir("tiny-t2v").to_str().unwrap(),
        "--lora",
        lora.to_str().unwrap(),
        "--scheduler",
        "t2v-turbo",
        "--seed",
        &run["seed"].to_string(),
        "--steps",
        &run["steps"].to_string(),
        "--guidance-scale",
        &run["guidance_scale"].to_string(),
        "--num-frames",
        &run["num_frames"].to_string(),
        "--height",
        &run["height"].to_string(),
        "--width",
        &run["width"].to_string(),
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = max_abs_diff(&read_npy(&out), &refs["frames"]);
    println!("cli tiny-t2v T2V-Turbo run: frames max abs err {err:.2e}");
    assert!(err <= 1e-3, "{err:.2e}");

    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("turbo.npy.json")).unwrap()).unwrap();
    assert_eq!(settings["scheduler"], "t2v-turbo");
    let again = dir.join("again.npy");
    let from = dir.join("turbo.npy.json");
    let o = t2v(&["generate", "--from", from.to_str().unwrap(), "-q", "-o", again.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(max_abs_diff(&read_npy(&again), &read_npy(&out)), 0.0);
}

#[test]
fn list_and_stable_loras_for_another_model_are_refused_before_model_work() {
    let (_tmp, dir) = temp_dir();
    for (lora, expected) in [
        (fixtures().join("lora-formats/small/unet_list.pt"), "pair 0 (items 0 and 1)"),
        (fixtures().join("lora-formats/small/stable_lora.safetensors"), "conv_in.lora_A"),
        // T2V-Turbo's list without its sampler: the UNet has no guidance embedding.
        (fixtures().join("lora-formats/tiny/turbo_unet_lora.pt"), "pair 2 (items 4 and 5)"),
    ] {
        let out = dir.join("refused.npy");
        let o = t2v(&[
            "generate",
            "a cat",
            "--model",
            model_dir("tiny-t2v").to_str().unwrap(),
            "--lora",
            lora.to_str().unwrap(),
            "-q",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(expected), "{}: {}", lora.display(), stderr(&o));
        assert!(!out.exists());
    }
}

/// `--lora owner/name/subfolder:WEIGHT` from an offline Hub cache gives the frames of the same
/// file named by its path; the settings record the file in the snapshot.
#[test]
fn a_lora_from_the_hub_cache_by_repo_and_subfolder() {
    let (_tmp, dir) = temp_dir();
    let cache = dir.join("hub");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = cache.join("models--someone--video-loras");
    let sub = repo.join("snapshots").join(commit).join("webvid");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let file = model_dir("tiny-t2v").join("lora/pytorch_lora_weights.safetensors");
    std::fs::copy(&file, sub.join("pytorch_lora_weights.safetensors")).unwrap();
    let run = |lora: &str, out: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_t2v"))
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "generate",
                "a cat",
                "--model",
                model_dir("tiny-t2v").to_str().unwrap(),
                "--lora",
                lora,
                "--seed",
                "5",
                "--steps",
                "2",
                "--num-frames",
                "2",
                "--height",
                "32",
                "--width",
                "32",
                "-q",
                "-o",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let (a, b) = (dir.join("hub.npy"), dir.join("path.npy"));
    let o = run("someone/video-loras/webvid:0.6", &a);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&format!("{}:0.6", file.display()), &b);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(max_abs_diff(&read_npy(&a), &read_npy(&b)), 0.0);
    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("hub.npy.json")).unwrap()).unwrap();
    assert!(settings["loras"][0]["path"].as_str().unwrap().contains("snapshots"), "{settings}");

    let o = run("someone/video-loras/elsewhere", &dir.join("refused.npy"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("elsewhere/*.safetensors"), "{}", stderr(&o));
}
