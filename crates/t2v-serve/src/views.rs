//! What answers and events show of a job: the video object (OpenAI's fields, then t2v's) and
//! its settings without any path of the server's. The API and the workers (whose events carry
//! the same object) both read it from here.

use serde_json::{json, Value};

use crate::request;
use crate::store::Job;
use crate::ModelInfo;

/// A job's settings as answers show them: no path of the server's (the model by the name the
/// API gives it, the input video by its file name in the data folder).
pub fn public_settings(settings: &t2v_settings::RunSettings, model: &ModelInfo) -> t2v_settings::RunSettings {
    let mut s = settings.clone();
    if s.model == model.spec {
        s.model = model.name.clone();
    }
    if let Some(input) = &mut s.input {
        input.path = input.path.file_name().map(std::path::PathBuf::from).unwrap_or_default();
    }
    // LoRAs by their name in --lora-dir.
    for lora in &mut s.loras {
        lora.path = lora.path.file_name().map(std::path::PathBuf::from).unwrap_or_default();
    }
    s
}

/// The video object: OpenAI's fields, then t2v's (`settings`, `queue_position`, `attempts`, ...).
pub fn video_object(job: &Job, model: &ModelInfo) -> Value {
    let s = &public_settings(&job.settings, model);
    json!({
        "id": job.id,
        "object": "video",
        "status": job.status.as_str(),
        "progress": job.progress,
        "created_at": job.created_at_ms / 1000,
        "completed_at": job.completed_at_ms.map(|t| t / 1000),
        "expires_at": null,
        "model": model.name,
        "prompt": s.prompt,
        // The video's size: the second pass's when there is one.
        "size": s.upscale.as_ref().map_or(format!("{}x{}", s.width, s.height), |u| format!("{}x{}", u.width, u.height)),
        "seconds": request::seconds_string(s.num_frames, s.fps),
        "remixed_from_video_id": null,
        "error": job.error,
        "settings": s,
        "queue_position": job.queue_position,
        "attempts": job.attempts,
        "worker": job.worker,
        "timings": {
            "created_at_ms": job.created_at_ms,
            "started_at_ms": job.started_at_ms,
            "completed_at_ms": job.completed_at_ms,
        },
    })
}
