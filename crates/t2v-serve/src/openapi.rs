//! The OpenAPI 3.1 description served at `/openapi.json`, written out by hand: a generator crate
//! would need annotations on every handler for a dozen routes. A test checks that every route is in it.

use serde_json::{json, Value};
use t2v::params::{DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_FRAMES, DEFAULT_STEPS, DEFAULT_STRENGTH};

fn error_responses(codes: &[&str]) -> Value {
    let mut out = serde_json::Map::new();
    for code in codes {
        let description = match *code {
            "400" => "A bad value: `error.param` names the field",
            "401" => "Missing or wrong API key",
            "404" => "No such video, or it has no content yet",
            "413" => "The body is larger than the server accepts",
            "415" => "Neither JSON nor multipart/form-data",
            "422" => "Well-formed, but this server cannot do it",
            _ => "Error",
        };
        out.insert(
            code.to_string(),
            json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    Value::Object(out)
}

fn with_errors(mut ok: Value, codes: &[&str]) -> Value {
    if let (Value::Object(map), Value::Object(errors)) = (&mut ok, error_responses(codes)) {
        map.extend(errors);
    }
    ok
}

fn id_param() -> Value {
    json!({"name": "video_id", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^video_[0-9a-f]{32}$"}})
}

pub fn spec() -> Value {
    let video = json!({"200": {"description": "The video object",
        "headers": {"openai-poll-after-ms": {"description": "While the job is queued or in progress: when to poll again", "schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Video"}}}}});
    let create_fields = json!({
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "description": "What the video shows (English)"},
            "model": {"type": "string", "description": "The served model's name; may be left out"},
            "size": {"type": "string", "description": "WIDTHxHEIGHT in pixels, multiples of the VAE scale; default: the model's native size", "example": "256x256"},
            "seconds": {"type": "string", "description": "Length; times fps gives the frames when num_frames is absent"},
            "negative_prompt": {"type": "string"},
            "seed": {"type": "integer", "minimum": 0, "description": "Default: random (the video object's settings show it)"},
            "num_inference_steps": {"type": "integer", "minimum": 1, "default": DEFAULT_STEPS},
            "guidance_scale": {"type": "number", "minimum": 0, "default": DEFAULT_GUIDANCE_SCALE},
            "num_frames": {"type": "integer", "minimum": 1, "default": DEFAULT_NUM_FRAMES, "description": "With input_reference: how many frames to read (exactly); default: all the frames chosen, up to 64"},
            "height": {"type": "integer"},
            "width": {"type": "integer"},
            "fps": {"type": "integer", "minimum": 1, "maximum": 60, "default": t2v::video::DEFAULT_FPS},
            "scheduler": {"type": "string", "enum": ["dpm", "ddim"], "default": "dpm"},
            "eta": {"type": "number", "minimum": 0, "maximum": 1, "default": 0, "description": "DDIM's eta"},
            "input_reference": {"type": "string", "format": "binary", "description": "Video-to-video: the video to re-render following the prompt, an MP4 (H.264), a GIF or a .npy array (frames, height, width, 3), up to the server's upload limit. multipart/form-data only (a JSON request with it is refused, 400). Read when the request arrives (an unreadable file is a 400 naming this field); its frames are resized to the size asked (default: the model's native size). Kept with the job until the job is deleted; the video object's settings.input records its SHA-256 and how it was read"},
            "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": DEFAULT_STRENGTH, "description": "With input_reference: how much of the video is replaced; the last int(num_inference_steps × strength) steps run, at least one"},
            "video_start": {"type": "integer", "minimum": 0, "default": 0, "description": "With input_reference: the first frame read (0-based)"},
            "video_every": {"type": "integer", "minimum": 1, "default": 1, "description": "With input_reference: read every n-th frame (3 turns 24 fps into 8)"},
            "video_fit": {"type": "string", "enum": ["resize", "crop", "pad"], "default": "resize", "description": "With input_reference: how frames of another aspect ratio reach the size: stretched, cropped, or padded with black"},
            "context_length": {"type": "integer", "minimum": 0, "description": "Long videos (FreeNoise): the temporal attention sees windows of this many frames, fused with weights, and the noise repeats shuffled from the first window; 0 or absent: off. At most num_frames"},
            "context_stride": {"type": "integer", "minimum": 1, "default": t2v::long_video::ContextWindows::DEFAULT_STRIDE, "description": "With context_length: frames between windows, at most context_length"},
            "context_weighting": {"type": "string", "enum": ["pyramid", "flat", "delayed_reverse_sawtooth"], "default": "pyramid", "description": "With context_length: how overlapping windows are weighted per frame"},
            "prompts": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Prompt travel: keyframe (0-based, from 1; frame 0's is prompt) → prompt, as {\"16\": \"a red car\"}; frames between keyframes blend their neighbours' text embeddings. In multipart, a JSON string of the object"}
        }
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "t2v serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Text to video in the shape of OpenAI's videos API: point an OpenAI client's base URL at /v1. Numbers may be sent as strings (multipart sends every field as one)."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "Needed when the server was started with an API key"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
                "Video": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "video"},
                    "status": {"enum": ["queued", "in_progress", "completed", "failed"]},
                    "progress": {"type": "integer", "minimum": 0, "maximum": 100},
                    "created_at": {"type": "integer"}, "completed_at": {"type": ["integer", "null"]}, "expires_at": {"type": "null"},
                    "model": {"type": "string"}, "prompt": {"type": "string"}, "size": {"type": "string"}, "seconds": {"type": "string"},
                    "error": {"type": ["object", "null"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
                    "settings": {"type": "object", "description": "Every setting of the run, the seed filled in (what `t2v generate --from` reads)"},
                    "queue_position": {"type": ["integer", "null"], "description": "1 for the next job to run, 0 for the running one"},
                    "attempts": {"type": "integer"}, "worker": {"type": ["string", "null"]},
                    "timings": {"type": "object", "properties": {"created_at_ms": {"type": "integer"}, "started_at_ms": {"type": ["integer", "null"]}, "completed_at_ms": {"type": ["integer", "null"]}}}
                }},
                "CreateVideo": create_fields
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/videos": {
                "post": {
                    "summary": "Queue a video: text-to-video, or video-to-video with an input video (multipart)",
                    "requestBody": {"required": true, "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/CreateVideo"}},
                        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/CreateVideo"}}}},
                    "responses": with_errors(video.clone(), &["400", "401", "413", "415", "422"])
                },
                "get": {
                    "summary": "List videos, newest first",
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                        {"name": "after", "in": "query", "schema": {"type": "string"}, "description": "The id of the last video of the previous page"},
                        {"name": "order", "in": "query", "schema": {"enum": ["desc", "asc"], "default": "desc"}}
                    ],
                    "responses": with_errors(json!({"200": {"description": "A page", "content": {"application/json": {"schema": {"type": "object", "properties": {
                        "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Video"}},
                        "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]}, "has_more": {"type": "boolean"}}}}}}}), &["400", "401"])
                }
            },
            "/v1/videos/{video_id}": {
                "parameters": [id_param()],
                "get": {"summary": "A video", "responses": with_errors(video.clone(), &["401", "404"])},
                "delete": {"summary": "Delete a video (a running job stops)", "responses": with_errors(json!({"200": {"description": "Deleted",
                    "content": {"application/json": {"schema": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "video.deleted"}, "deleted": {"type": "boolean"}}}}}}}), &["401", "404"])}
            },
            "/v1/videos/{video_id}/content": {
                "parameters": [id_param(), {"name": "variant", "in": "query", "schema": {"enum": ["video", "thumbnail"], "default": "video"}}],
                "get": {"summary": "The MP4 (video) or a PNG of its middle frame (thumbnail); Range requests are answered",
                    "responses": with_errors(json!({"200": {"description": "The file", "content": {"video/mp4": {}, "image/png": {}}}}), &["400", "401", "404"])}
            },
            "/v1/videos/{video_id}/cancel": {
                "parameters": [id_param()],
                "post": {"summary": "Cancel: a queued job fails at once (code `cancelled`), a running one at the end of its current step",
                    "responses": with_errors(video.clone(), &["401", "404"])}
            },
            "/v1/videos/{video_id}/events": {
                "parameters": [id_param()],
                "get": {"summary": "Server-Sent Events: queued {id, position, video}; progress {id, step, total_steps, progress, elapsed_s, step_s, eta_s}; preview {id, step, image (PNG data URL), width, height, cost_ms}; then completed or failed (the video object), and the stream ends",
                    "responses": with_errors(json!({"200": {"description": "An event stream", "content": {"text/event-stream": {}}}}), &["401", "404"])}
            },
            "/v1/t2v/events": {
                "get": {"summary": "Every job's events in one stream (as above, plus deleted {id})",
                    "responses": with_errors(json!({"200": {"description": "An event stream", "content": {"text/event-stream": {}}}}), &["401"])}
            },
            "/v1/t2v/info": {
                "get": {"summary": "The model (native size), defaults, limits, queue counts and timings (mean step, mean preview)",
                    "responses": with_errors(json!({"200": {"description": "Info", "content": {"application/json": {}}}}), &["401"])}
            },
            "/health": {"get": {"summary": "200 once the model is loaded, 503 while it loads", "security": [], "responses": {"200": {"description": "Ready"}, "503": {"description": "Loading"}}}},
            "/openapi.json": {"get": {"summary": "This description", "security": [], "responses": {"200": {"description": "OpenAPI 3.1"}}}},
            "/": {"get": {"summary": "The web page", "security": [], "responses": {"200": {"description": "HTML"}}}}
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_described() {
        let spec = super::spec();
        let source = include_str!("api.rs");
        let mut routes = 0;
        for line in source.lines() {
            let Some(rest) = line.trim().strip_prefix(".route(\"") else { continue };
            let path = rest.split('"').next().unwrap().replace("{id}", "{video_id}");
            if path == "/app.js" || path == "/app.css" {
                continue;
            }
            routes += 1;
            assert!(spec["paths"].get(&path).is_some(), "{path} is not in /openapi.json");
        }
        assert!(routes >= 10, "found only {routes} routes in api.rs");
    }
}
