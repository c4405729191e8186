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
            "prompts": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Prompt travel: keyframe (0-based, from 1; frame 0's is prompt) → prompt, as {\"16\": \"a red car\"}; frames between keyframes blend their neighbours' text embeddings. In multipart, a JSON string of the object"},
            "negative_prompts": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Negative prompt travel: keyframe (0-based, from 1; frame 0's is negative_prompt) → negative prompt, blended between keyframes as prompts are. In multipart, a JSON string of the object"}
        }
    });
    // Cog's `Input`: the fields, each with its title and order (`x-order`), as Cog publishes them.
    let mut input = create_fields.clone();
    input["title"] = json!("Input");
    if let Some(props) = input["properties"].as_object_mut() {
        props.remove("input_reference");
        for (i, (name, schema)) in props.iter_mut().enumerate() {
            let title: String = name
                .split('_')
                .map(|w| {
                    let mut c = w.chars();
                    c.next().map(|f| f.to_uppercase().chain(c).collect::<String>()).unwrap_or_default()
                })
                .collect::<Vec<_>>()
                .join(" ");
            schema["title"] = json!(title);
            schema["x-order"] = json!(i);
        }
        props.insert("lora".into(), json!({"title": "Lora", "description": "A LoRA of the server's --lora-dir by name, or {\"name\", \"scale\"} (also lora_name/adapter, lora_scale), or a list of them: GET /v1/loras lists them"}));
    }
    let prediction_paths = json!({
        "/predictions": {
            "post": {
                "summary": "Create a prediction (Cog's API): waits for the end and answers the prediction; with `Prefer: respond-async`, 202 at once",
                "parameters": [{"name": "prefer", "in": "header", "required": false, "schema": {"type": "string"}, "description": "respond-async: answer at once (202)"}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
                "responses": with_errors(json!({
                    "200": {"description": "The finished prediction", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}},
                    "202": {"description": "Accepted (respond-async): the prediction now", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}}
                }), &["400", "401", "413", "415"])
            }
        },
        "/predictions/{prediction_id}": {
            "parameters": [{"name": "prediction_id", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}}],
            "put": {
                "summary": "Create a prediction idempotently: an id seen before answers its prediction and runs nothing new",
                "parameters": [{"name": "prefer", "in": "header", "required": false, "schema": {"type": "string"}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
                "responses": with_errors(json!({
                    "200": {"description": "The finished prediction", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}},
                    "202": {"description": "Accepted (respond-async)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}}
                }), &["400", "401", "413", "415"])
            },
            "get": {"summary": "A prediction", "responses": with_errors(json!({"200": {"description": "The prediction", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}}}), &["401", "404"])}
        },
        "/predictions/{prediction_id}/cancel": {
            "parameters": [{"name": "prediction_id", "in": "path", "required": true, "schema": {"type": "string"}}],
            "post": {"summary": "Cancel a prediction (queued: at once; running: at the end of its step)", "responses": with_errors(json!({"200": {"description": "The prediction", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}}}), &["401", "404"])}
        },
        "/v1/videos/sync": {
            "post": {
                "summary": "Create a video and answer the MP4 once it is done (vLLM-Omni's and SGLang's /v1/videos/sync); the fields of POST /v1/videos",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string"}}],
                "requestBody": {"required": true, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/CreateVideo"}},
                    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/CreateVideo"}}}},
                "responses": with_errors(json!({"200": {"description": "The MP4; header t2v-video-id names its video", "content": {"video/mp4": {}}}}), &["400", "401", "413", "415", "422"])
            }
        },
        "/v1/loras": {
            "get": {"summary": "The LoRAs a request may pick by name (`lora`), from --lora-dir",
                "responses": with_errors(json!({"200": {"description": "A list", "content": {"application/json": {"schema": {"type": "object", "properties": {
                    "object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "lora"}}}}}}}}}}), &["401"])}
        }
    });
    let mut create_fields = create_fields;
    if let Some(props) = create_fields["properties"].as_object_mut() {
        props.insert("webhook".into(), json!({"type": "string", "format": "uri", "description": "Posted OpenAI's video.completed or video.failed event, signed as Standard Webhooks says (webhook-id, webhook-timestamp, webhook-signature)"}));
        props.insert("lora".into(), input["properties"]["lora"].clone());
        props.insert("extra_params".into(), json!({"type": "object", "description": "More of these fields (vLLM-Omni's spelling); a field at the top level wins"}));
        props.insert(
            "video_params".into(),
            json!({"type": "object", "description": "width, height, fps, num_frames (vLLM-Omni's block)"}),
        );
    }
    let mut spec = json!({
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
                "CreateVideo": create_fields,
                "Input": input,
                "Output": {"title": "Output", "type": "string", "format": "uri", "description": "The URL of the MP4 on this server (GET it with the API key)"},
                "Status": {"title": "Status", "description": "An enumeration.", "enum": ["starting", "processing", "succeeded", "canceled", "failed"], "type": "string"},
                "WebhookEvent": {"title": "WebhookEvent", "description": "An enumeration.", "enum": ["start", "output", "logs", "completed"], "type": "string"},
                "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
                    "input": {"$ref": "#/components/schemas/Input"},
                    "id": {"title": "Id", "type": "string"},
                    "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                    "output_file_prefix": {"title": "Output File Prefix", "type": "string", "description": "Ignored: the output stays on this server"},
                    "webhook": {"title": "Webhook", "maxLength": 2048, "minLength": 1, "format": "uri", "type": "string"},
                    "webhook_events_filter": {"type": "array", "items": {"$ref": "#/components/schemas/WebhookEvent"}, "default": ["start", "output", "logs", "completed"]}
                }},
                "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
                    "input": {"$ref": "#/components/schemas/Input"},
                    "output": {"$ref": "#/components/schemas/Output"},
                    "id": {"title": "Id", "type": "string"},
                    "version": {"title": "Version", "type": "string"},
                    "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                    "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
                    "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
                    "logs": {"title": "Logs", "type": "string", "default": ""},
                    "error": {"title": "Error", "type": "string"},
                    "status": {"$ref": "#/components/schemas/Status"},
                    "metrics": {"title": "Metrics", "type": "object"},
                    "urls": {"title": "Urls", "type": "object", "description": "get, cancel and stream (the video's event stream)"},
                    "video_id": {"title": "Video Id", "type": "string", "description": "The same job under /v1/videos"}
                }}
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/videos": {
                "post": {
                    "summary": "Queue a video: text-to-video, or video-to-video with an input video (multipart). Fields this server does not know are ignored (listed in the t2v-ignored-fields header). Idempotency-Key: the same key and request within 24 h give the same video (header idempotent-replayed), another request with the key a 422",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255}}],
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
    });
    if let (Some(paths), Value::Object(more)) = (spec["paths"].as_object_mut(), prediction_paths) {
        paths.extend(more);
    }
    spec
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
