//! Every door gives the same frames: the command line and the service on a model whose
//! `scheduler_config.json` is written as the published 1.7B's (by diffusers 0.15: no
//! `timestep_spacing`, keys left to their defaults), for DPM-Solver and DDIM. The Python package's
//! side of the same check is crates/t2v-py/tests/test_cli.py (the model card's script).

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::{agent, mp4_mdat, temp_dir, wait_for};

const PUBLISHED_SCHEDULER: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../t2v/configs/full-1.7b/scheduler/scheduler_config.json");

/// tiny-t2v with the published checkpoint's scheduler config in place of its full one.
fn published_style_model(into: &Path) -> std::path::PathBuf {
    let root = into.join("published-tiny");
    support::copy_model_folder(&common::model_dir("tiny-t2v"), &root, true);
    let published = std::fs::read_to_string(PUBLISHED_SCHEDULER).unwrap();
    assert!(!published.contains("timestep_spacing"), "the published config leaves timestep_spacing out");
    std::fs::write(root.join("scheduler").join("scheduler_config.json"), published).unwrap();
    root
}

fn json_of(response: ureq::Response) -> Value {
    serde_json::from_str(&response.into_string().unwrap()).unwrap()
}

#[test]
fn command_line_and_service_give_the_same_frames_on_a_published_style_config() {
    let (_tmp, dir) = temp_dir();
    let model = published_style_model(&dir);
    let mut command = Command::new(env!("CARGO_BIN_EXE_t2v"));
    command
        .args(["serve", "--model"])
        .arg(&model)
        .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--data"])
        .arg(dir.join("data"));
    let mut server = support::launch_serve(command);
    let http = agent();
    for scheduler in ["dpm", "ddim"] {
        let body = json!({
            "prompt": "a corgi surfing a wave", "seed": 7, "num_inference_steps": 4, "num_frames": 4,
            "guidance_scale": 9.0, "scheduler": scheduler,
        });
        let created = json_of(http.post(&format!("{}/v1/videos", server.base)).send_json(body).unwrap());
        let id = created["id"].as_str().unwrap().to_string();
        let done = wait_for(&format!("job {id} ({scheduler})"), Duration::from_secs(180), || {
            let v = json_of(http.get(&format!("{}/v1/videos/{id}", server.base)).call().ok()?);
            assert_ne!(v["status"], "failed", "{v}");
            (v["status"] == "completed").then_some(v)
        });
        let mut served = Vec::new();
        std::io::Read::read_to_end(
            &mut http.get(&format!("{}/v1/videos/{id}/content", server.base)).call().unwrap().into_reader(),
            &mut served,
        )
        .unwrap();

        let out = dir.join(format!("{scheduler}.mp4"));
        let o = Command::new(env!("CARGO_BIN_EXE_t2v"))
            .args(["generate", "a corgi surfing a wave", "--model"])
            .arg(&model)
            .args(["--seed", "7", "--steps", "4", "-f", "4", "-g", "9", "--scheduler", scheduler])
            .args(["--fps", &done["settings"]["fps"].to_string(), "--device", "cpu", "-q", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cli = std::fs::read(&out).unwrap();
        assert!(mp4_mdat(&served).len() > 100);
        assert!(
            mp4_mdat(&served) == mp4_mdat(&cli),
            "{scheduler}: the service's frames differ from the command line's on the published-style config"
        );
        println!("published-style config, {scheduler}: the service's coded frames equal the command line's");
    }
    // This server has no second model: an upscale is refused, naming the field.
    let refused =
        match http.post(&format!("{}/v1/videos", server.base)).send_json(json!({"prompt": "x", "upscale": true})) {
            Err(ureq::Error::Status(400, r)) => json_of(r),
            other => panic!("an upscale without --upscale-model: {other:?}"),
        };
    assert_eq!(refused["error"]["param"], "upscale", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("--upscale-model"), "{refused}");
    let _ = server.child.kill();
    let _ = server.child.wait();
}

/// zeroscope's two passes through the service (`--upscale-model`, a request's `upscale`) give the
/// coded frames of `t2v generate --upscale`: one library workflow behind both doors.
#[test]
fn the_services_upscale_is_the_command_lines() {
    let (_tmp, dir) = temp_dir();
    let (tiny, small) = (common::model_dir("tiny-t2v"), common::model_dir("small-t2v"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_t2v"));
    command
        .args(["serve", "--model"])
        .arg(&tiny)
        .arg("--upscale-model")
        .arg(&small)
        .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--data"])
        .arg(dir.join("data"));
    let mut server = support::launch_serve(command);
    let http = agent();
    let info = wait_for("the model to load", Duration::from_secs(60), || {
        let v = json_of(http.get(&format!("{}/v1/t2v/info", server.base)).call().ok()?);
        (v["ready"] == true).then_some(v)
    });
    assert_eq!(info["upscale"]["model"], "small-t2v", "{info}");
    let body = json!({
        "prompt": "a cat", "negative_prompt": "blurry", "seed": 3, "num_inference_steps": 2, "num_frames": 2,
        "scheduler": "ddim", "width": 16, "height": 16, "upscale": {"size": "48x32", "strength": 0.5},
    });
    let created = json_of(http.post(&format!("{}/v1/videos", server.base)).send_json(body).unwrap());
    let id = created["id"].as_str().unwrap().to_string();
    let done = wait_for(&format!("job {id}"), Duration::from_secs(180), || {
        let v = json_of(http.get(&format!("{}/v1/videos/{id}", server.base)).call().ok()?);
        assert_ne!(v["status"], "failed", "{v}");
        (v["status"] == "completed").then_some(v)
    });
    assert_eq!(done["size"], "48x32", "{done}");
    let up = &done["settings"]["upscale"];
    assert_eq!(
        (
            up["model"].as_str(),
            up["width"].as_u64(),
            up["height"].as_u64(),
            up["strength"].as_f64(),
            up["steps"].as_u64()
        ),
        (Some("small-t2v"), Some(48), Some(32), Some(0.5), Some(2)),
        "{done}"
    );
    let mut served = Vec::new();
    std::io::Read::read_to_end(
        &mut http.get(&format!("{}/v1/videos/{id}/content", server.base)).call().unwrap().into_reader(),
        &mut served,
    )
    .unwrap();

    let out = dir.join("up.mp4");
    let o = Command::new(env!("CARGO_BIN_EXE_t2v"))
        .args(["generate", "a cat", "-n", "blurry", "--model"])
        .arg(&tiny)
        .args(["--seed", "3", "--steps", "2", "-f", "2", "--scheduler", "ddim", "--height", "16", "--width", "16"])
        .arg("--upscale")
        .arg(&small)
        .args(["--upscale-size", "48x32", "--upscale-strength", "0.5"])
        .args(["--fps", &done["settings"]["fps"].to_string(), "--device", "cpu", "-q", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli = std::fs::read(&out).unwrap();
    assert!(mp4_mdat(&served).len() > 100);
    assert!(mp4_mdat(&served) == mp4_mdat(&cli), "the service's upscale differs from the command line's");

    // Sizes the upscale model cannot run, and strengths that run no step, are refused on arrival.
    for (upscale, expected) in [
        (json!({"size": "50x32"}), "multiple"),
        (json!({"strength": 0.1}), "strength"),
        (json!({"scale": 2}), "unknown `upscale` field"),
    ] {
        let body = json!({"prompt": "x", "num_inference_steps": 2, "upscale": upscale});
        let e = match http.post(&format!("{}/v1/videos", server.base)).send_json(body) {
            Err(ureq::Error::Status(400, r)) => json_of(r),
            other => panic!("{upscale}: {other:?}"),
        };
        assert_eq!(e["error"]["param"], "upscale", "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(expected), "{upscale}: {e}");
    }
    let _ = server.child.kill();
    let _ = server.child.wait();
}
