//! `t2v serve` as its users meet it: the real binary on the tiny fixture model, on 127.0.0.1 and
//! a free port, driven over HTTP (the API round trip and its errors, video-to-video over multipart,
//! 50 jobs from 10 clients, a SIGKILL and a restart). The page, in headless Chromium: page.rs.
//!
//! The tests take turns (one server at a time): the figures they print are then the server's own.

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use support::{agent, mp4_mdat, serial, wait_for};
use tempfile::TempDir;

fn tiny_model() -> PathBuf {
    common::model_dir("tiny-t2v")
}

// ---------- HTTP ----------

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `param` of an OpenAI-shaped error, checking the shape on the way.
    fn error_param(&self) -> Option<String> {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "error without a message: {v}");
        assert!(e["type"].as_str().is_some(), "error without a type: {v}");
        e["param"].as_str().map(str::to_string)
    }
}

fn request(method: &str, url: &str, headers: &[(&str, &str)], body: Option<(&str, &[u8])>) -> Reply {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some((content_type, bytes)) => req.set("Content-Type", content_type).send_bytes(bytes),
        None => req.call(),
    };
    let response = match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .filter_map(|n| response.header(&n).map(|v| (n.to_ascii_lowercase(), v.to_string())))
        .collect();
    let mut body = Vec::new();
    response.into_reader().take(256 << 20).read_to_end(&mut body).expect("read the body");
    Reply { status, headers, body }
}

fn multipart(fields: &[(&str, &str)], file: Option<(&str, &str, &[u8])>) -> (String, Vec<u8>) {
    let boundary = "t2v-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    if let Some((name, file_name, bytes)) = file {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file_name}\"\r\nContent-Type: video/mp4\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

// ---------- the server ----------

struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
    key: Option<String>,
}

impl Server {
    fn start(data: &Path, extra: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_t2v"));
        command
            .args(["serve", "--model"])
            .arg(tiny_model())
            .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--data"])
            .arg(data)
            .args(extra);
        let support::LaunchedServer { child, log, base } = support::launch_serve(command);
        let key = extra.iter().position(|a| *a == "--api-key").map(|i| extra[i + 1].to_string());
        let server = Server { child, base, log, key };
        wait_for("/health to answer 200", Duration::from_secs(60), || {
            (server.try_get("/health").is_some_and(|r| r.status == 200)).then_some(())
        });
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self) -> Vec<(&str, String)> {
        self.key.iter().map(|k| ("Authorization", format!("Bearer {k}"))).collect()
    }

    fn call(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Reply {
        let auth = self.auth();
        let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(method, &self.url(path), &headers, body)
    }

    fn try_get(&self, path: &str) -> Option<Reply> {
        let response = match agent().get(&self.url(path)).call() {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(_) => return None,
        };
        Some(Reply {
            status: response.status(),
            headers: HashMap::new(),
            body: response.into_string().ok()?.into_bytes(),
        })
    }

    fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None)
    }

    fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, Some(("application/json", body.to_string().as_bytes())))
    }

    /// Queues a job and returns its video object.
    fn create(&self, body: &Value) -> Value {
        let reply = self.post_json("/v1/videos", body);
        assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
        reply.json()
    }

    fn video(&self, id: &str) -> Value {
        let reply = self.get(&format!("/v1/videos/{id}"));
        assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
        reply.json()
    }

    fn wait_status(&self, id: &str, status: &str, limit: Duration) -> Value {
        wait_for(&format!("{id} to be {status}"), limit, || {
            let v = self.video(id);
            assert!(
                v["status"] == status || !(v["status"] == "completed" || v["status"] == "failed"),
                "{id} ended {} instead of {status}: {v}",
                v["status"]
            );
            (v["status"] == status).then_some(v)
        })
    }

    fn all_videos(&self) -> Vec<Value> {
        let list = self.get("/v1/videos?limit=100&order=asc").json();
        assert_eq!(list["has_more"], false);
        list["data"].as_array().unwrap().clone()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Resident memory, from /proc.
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap();
        kib / 1024.0
    }

    fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and the exit code once it has stopped.
    fn sigterm(mut self) -> i32 {
        // SAFETY: signalling a child process this test started and still owns.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let status =
            wait_for("the server to exit after SIGTERM", Duration::from_secs(60), || self.child.try_wait().unwrap());
        status.code().unwrap_or(-1)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The events of one job's stream until it ends: (name, data).
fn read_events(server: &Server, id: &str) -> Vec<(String, Value)> {
    let response = agent().get(&server.url(&format!("/v1/videos/{id}/events"))).call().expect("the event stream opens");
    assert_eq!(response.content_type(), "text/event-stream");
    let mut events = Vec::new();
    let mut name = String::new();
    for line in BufReader::new(response.into_reader()).lines().take(10_000) {
        let line = line.expect("the stream reads");
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            events.push((name.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    events
}

fn small_job(prompt: &str) -> Value {
    json!({"prompt": prompt, "num_inference_steps": 2, "num_frames": 4, "size": "32x32", "guidance_scale": 9})
}

fn png_rgb(bytes: &[u8]) -> (Vec<u8>, u32, u32) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (buf, info.width, info.height)
}

/// One MP4 box tree walk: the top-level box types.
fn mp4_boxes(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() && out.len() < 32 {
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        out.push(String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned());
        if size < 8 {
            break;
        }
        at += size;
    }
    out
}

#[test]
fn api_round_trip_and_errors() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let server = Server::start(data.path(), &["--max-upload-mb", "1"]);

    let info = server.get("/v1/t2v/info").json();
    assert_eq!((info["model"]["native_width"].as_u64(), info["model"]["native_height"].as_u64()), (Some(32), Some(32)));
    let spec = server.get("/openapi.json").json();
    assert!(spec["paths"]["/v1/videos/{video_id}/events"]["get"].is_object());
    let page = server.get("/");
    assert!(page.status == 200 && String::from_utf8_lossy(&page.body).contains("<form id=\"form\""));
    assert!(page.headers["content-security-policy"].contains("default-src 'self'"));

    // The reference's run 1, through the API: the thumbnail is the reference's middle frame.
    let refs = common::reference_json("tiny-t2v");
    let run = &refs["runs"][1];
    let created = server.create(&json!({
        "prompt": run["prompt"], "negative_prompt": run["negative_prompt"], "seed": run["seed"],
        "num_inference_steps": run["steps"], "guidance_scale": run["guidance_scale"], "scheduler": run["scheduler"],
        "num_frames": run["num_frames"], "size": "32x32", "model": "tiny-t2v",
    }));
    assert_eq!(created["object"], "video");
    assert!(created["status"] == "queued" || created["status"] == "in_progress", "{created}");
    assert_eq!((created["size"].as_str(), created["seconds"].as_str()), (Some("32x32"), Some("1")));
    assert_eq!(created["settings"]["seed"], run["seed"]);
    let id = created["id"].as_str().unwrap().to_string();
    let reply = server.get(&format!("/v1/videos/{id}"));
    if reply.json()["status"] != "completed" {
        assert!(
            reply.headers.get("openai-poll-after-ms").and_then(|v| v.parse::<u64>().ok()).is_some(),
            "no poll header"
        );
    }

    let events = read_events(&server, &id);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("events of {id}: {names:?}");
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    let steps: Vec<u64> =
        events.iter().filter(|(n, _)| n == "progress").map(|(_, d)| d["step"].as_u64().unwrap()).collect();
    assert_eq!(steps.last(), Some(&3), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0] + 1 == w[1]), "steps in order, none missed: {steps:?}");
    let preview = events.iter().find(|(n, _)| n == "preview").map(|(_, d)| d.clone()).expect("a preview event");
    let image = preview["image"].as_str().unwrap().strip_prefix("data:image/png;base64,").unwrap();
    let (_, pw, ph) = png_rgb(&base64::engine::general_purpose::STANDARD.decode(image).unwrap());
    assert_eq!((pw, ph), (4 * 32, 32), "four latent frames side by side");

    let done = server.video(&id);
    assert_eq!(
        (done["status"].as_str(), done["progress"].as_u64(), done["attempts"].as_u64()),
        (Some("completed"), Some(100), Some(1))
    );
    assert!(done["completed_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());
    assert!(done.get("error").is_some_and(Value::is_null));

    let mp4 = server.get(&format!("/v1/videos/{id}/content"));
    assert_eq!((mp4.status, mp4.headers["content-type"].as_str()), (200, "video/mp4"));
    assert_eq!(&mp4.body[4..8], b"ftyp");
    assert!(mp4_boxes(&mp4.body).contains(&"moov".to_string()));
    let path = data.path().join("check.mp4");
    std::fs::write(&path, &mp4.body).unwrap();
    let stored = t2v_settings::RunSettings::read(&path).expect("the MP4 carries its settings");
    assert_eq!(
        (stored.seed, stored.steps, stored.num_frames, stored.negative_prompt.as_deref()),
        (1, 3, 8, Some("blurry, low quality"))
    );
    let partial = request(
        "GET",
        &server.url(&format!("/v1/videos/{id}/content?variant=video")),
        &[("Range", "bytes=0-99")],
        None,
    );
    assert_eq!((partial.status, partial.body.len()), (206, 100));

    let thumbnail = server.get(&format!("/v1/videos/{id}/content?variant=thumbnail"));
    assert_eq!(thumbnail.headers["content-type"], "image/png");
    let (rgb, w, h) = png_rgb(&thumbnail.body);
    assert_eq!((w, h), (32, 32));
    let frames = &common::reference("tiny-t2v")[run["frames_key"].as_str().unwrap()];
    let expected = frames.get(4).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let worst = rgb.iter().zip(&expected).map(|(&a, &e)| (a as f32 - (e * 255.0).round()).abs()).fold(0f32, f32::max);
    assert!(worst <= 1.0, "thumbnail differs from the reference's frame 4 by {worst}/255");

    // Multipart, every field a string, as the OpenAI SDK sends it: seconds × fps gives the frames.
    let (ct, body) = multipart(
        &[("prompt", "a cat"), ("seconds", "0.5"), ("size", "32x32"), ("num_inference_steps", "2"), ("seed", "5")],
        None,
    );
    let reply = server.call("POST", "/v1/videos", Some((&ct, &body)));
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    let second = reply.json();
    assert_eq!((second["settings"]["num_frames"].as_u64(), second["settings"]["seed"].as_u64()), (Some(4), Some(5)));
    let second_id = second["id"].as_str().unwrap().to_string();
    server.wait_status(&second_id, "completed", Duration::from_secs(120));

    // Listing: newest first, in pages.
    let page1 = server.get("/v1/videos?limit=1").json();
    assert_eq!((page1["object"].as_str(), page1["has_more"].as_bool()), (Some("list"), Some(true)));
    assert_eq!(page1["data"][0]["id"], second_id.as_str());
    let page2 = server.get(&format!("/v1/videos?limit=1&after={second_id}")).json();
    assert_eq!(page2["data"][0]["id"], id.as_str());
    assert_eq!(page2["has_more"], false);

    // Errors: 400 naming the field, 404, 413, 415, 422.
    let bad = |body: Value| {
        let r = server.post_json("/v1/videos", &body);
        (r.status, r.error_param())
    };
    assert_eq!(bad(json!({"num_frames": 4})), (400, Some("prompt".into())));
    assert_eq!(bad(json!({"prompt": "x", "num_frames": 0})), (400, Some("num_frames".into())));
    assert_eq!(bad(json!({"prompt": "x", "num_inference_steps": "many"})), (400, Some("num_inference_steps".into())));
    assert_eq!(bad(json!({"prompt": "x", "width": 5000})), (400, Some("width".into())));
    assert_eq!(bad(json!({"prompt": "x", "size": "32 by 32"})), (400, Some("size".into())));
    assert_eq!(bad(json!({"prompt": "x", "guidance_scale": -2})), (400, Some("guidance_scale".into())));
    assert_eq!(bad(json!({"prompt": "x", "scheduler": "heun"})), (400, Some("scheduler".into())));
    assert_eq!(bad(json!({"prompt": "x", "model": "sora-2"})), (400, Some("model".into())));
    // Unknown fields are ignored (as vLLM-Omni and SGLang do): the error is the known field's.
    assert_eq!(bad(json!({"prompt": "x", "colour": "red", "num_frames": 0})), (400, Some("num_frames".into())));
    assert_eq!(bad(json!({"prompt": "x", "strength": 0.5})), (400, Some("strength".into())));
    assert_eq!(bad(json!(["prompt"])).0, 422);
    let r = server.call("POST", "/v1/videos", Some(("application/json", b"{\"prompt\": ")));
    assert_eq!((r.status, r.error_param()), (400, None));
    let r = server.call("POST", "/v1/videos", Some(("text/plain", b"prompt=x")));
    assert_eq!(r.status, 415);
    let huge = json!({"prompt": "x".repeat(2 << 20)});
    assert_eq!(server.post_json("/v1/videos", &huge).status, 413);
    let (ct, body) = multipart(&[("prompt", "x")], Some(("input_reference", "in.mp4", &vec![0u8; 2 << 20])));
    let r = server.call("POST", "/v1/videos", Some((&ct, &body)));
    assert_eq!(r.status, 413, "an upload over --max-upload-mb");
    let (ct, body) = multipart(&[("prompt", "x")], Some(("input_reference", "in.mp4", b"not really a video")));
    let r = server.call("POST", "/v1/videos", Some((&ct, &body)));
    assert_eq!((r.status, r.error_param()), (400, Some("input_reference".into())));
    assert_eq!(server.get("/v1/videos?limit=0").error_param(), Some("limit".into()));
    assert_eq!(server.get("/v1/videos?after=video_nope").error_param(), Some("after".into()));

    // Ids never reach the file system unless they are ids.
    let unknown = format!("video_{}", "0".repeat(32));
    for path in [
        format!("/v1/videos/{unknown}"),
        format!("/v1/videos/{unknown}/content"),
        "/v1/videos/..%2Fjobs.sqlite/content".to_string(),
        "/v1/videos/..%2F..%2Fetc%2Fpasswd/content".to_string(),
        format!("/v1/videos/{id}%2F..%2F..%2Fjobs.sqlite/content"),
        "/v1/nothing".to_string(),
    ] {
        let r = server.get(&path);
        assert_eq!(r.status, 404, "{path}");
        r.error_param();
    }
    assert_eq!(
        server.get(&format!("/v1/videos/{id}/content?variant=spritesheet")).error_param(),
        Some("variant".into())
    );
    // No CORS unless asked for.
    let r = request("GET", &server.url("/v1/videos"), &[("Origin", "http://evil.example")], None);
    assert!(!r.headers.contains_key("access-control-allow-origin"));

    // Cancel: a queued job fails at once; the running one at the end of its step.
    let long = json!({"prompt": "a long one", "num_inference_steps": 400, "num_frames": 4, "size": "32x32"});
    let running = server.create(&long)["id"].as_str().unwrap().to_string();
    let waiting = server.create(&small_job("behind it"))["id"].as_str().unwrap().to_string();
    server.wait_status(&running, "in_progress", Duration::from_secs(60));
    let r = server.call("POST", &format!("/v1/videos/{waiting}/cancel"), None).json();
    assert_eq!((r["status"].as_str(), r["error"]["code"].as_str()), (Some("failed"), Some("cancelled")));
    wait_for("a step of the long job", Duration::from_secs(60), || {
        (server.video(&running)["progress"].as_u64() > Some(0)).then_some(())
    });
    let asked = Instant::now();
    let r = server.call("POST", &format!("/v1/videos/{running}/cancel"), None);
    assert_eq!(r.status, 200);
    let cancelled = server.wait_status(&running, "failed", Duration::from_secs(30));
    let mean_step = server.get("/v1/t2v/info").json()["stats"]["mean_step_s"].as_f64().unwrap();
    eprintln!("cancel took {:.2}s (a step: {mean_step:.3}s)", asked.elapsed().as_secs_f64());
    assert_eq!(cancelled["error"]["code"], "cancelled");
    assert!(cancelled["progress"].as_u64().unwrap() < 95, "stopped before the end: {cancelled}");
    assert!(!data.path().join(format!("videos/{running}.mp4")).exists());

    // Delete: the job and its files go.
    let r = server.call("DELETE", &format!("/v1/videos/{second_id}"), None).json();
    assert_eq!(r, json!({"id": second_id, "object": "video.deleted", "deleted": true}));
    assert_eq!(server.get(&format!("/v1/videos/{second_id}")).status, 404);
    assert!(!data.path().join(format!("videos/{second_id}.mp4")).exists());
    assert!(data.path().join(format!("videos/{id}.mp4")).exists());
    assert_eq!(server.call("DELETE", &format!("/v1/videos/{second_id}"), None).status, 404);
}

#[test]
fn api_key_cors_and_address_safety() {
    let _turn = serial();
    let data = TempDir::new().unwrap();

    // Another address without a key: refused before anything listens.
    let out = Command::new(env!("CARGO_BIN_EXE_t2v"))
        .args(["serve", "--model"])
        .arg(tiny_model())
        .args(["--host", "0.0.0.0", "--port", "0", "--data"])
        .arg(data.path())
        .env_remove("T2V_API_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--api-key"), "{stderr}");

    let server = Server::start(data.path(), &["--api-key", "s3cret", "--cors", "http://app.example"]);
    let plain = |path: &str, headers: &[(&str, &str)]| request("GET", &server.url(path), headers, None);
    let r = plain("/v1/videos", &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert_eq!(plain("/v1/videos", &[("Authorization", "Bearer wrong")]).status, 401);
    assert_eq!(plain("/v1/videos", &[("Authorization", "Bearer s3cret")]).status, 200);
    assert_eq!(plain("/v1/t2v/info", &[]).status, 401);
    assert_eq!(
        request("POST", &server.url("/v1/videos"), &[], Some(("application/json", b"{\"prompt\":\"x\"}"))).status,
        401
    );
    // The page and the health check are open; the page asks for the key.
    assert_eq!(plain("/", &[]).status, 200);
    assert_eq!(plain("/health", &[]).status, 200);
    // CORS for the origin asked for only.
    let preflight = request(
        "OPTIONS",
        &server.url("/v1/videos"),
        &[
            ("Origin", "http://app.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization,content-type"),
        ],
        None,
    );
    assert_eq!(preflight.headers.get("access-control-allow-origin").map(String::as_str), Some("http://app.example"));
    let other = plain("/v1/videos", &[("Origin", "http://evil.example"), ("Authorization", "Bearer s3cret")]);
    assert!(!other.headers.contains_key("access-control-allow-origin"));
    assert_eq!(server.sigterm(), 0, "SIGTERM stops cleanly");
}

#[test]
fn fifty_jobs_from_ten_clients() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let server = Arc::new(Server::start(data.path(), &[]));

    // Warm up (first-run allocations), then measure.
    for i in 0..3 {
        let id = server.create(&small_job(&format!("warm-up {i}")))["id"].as_str().unwrap().to_string();
        server.wait_status(&id, "completed", Duration::from_secs(120));
    }
    let rss_before = server.rss_mib();

    // One watcher on the page's stream counts the completions.
    let completions = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let watcher = {
        let (url, completions) = (server.url("/v1/t2v/events"), completions.clone());
        let long =
            ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(900)).build();
        let response = long.get(&url).call().expect("the event stream opens");
        std::thread::spawn(move || {
            let mut name = String::new();
            for line in BufReader::new(response.into_reader()).lines().take(100_000) {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let (Some(d), "completed") = (line.strip_prefix("data: "), name.as_str()) {
                    let v: Value = serde_json::from_str(d).unwrap();
                    // Only this test's jobs: a warm-up job may still finish after the stream opens.
                    if !v["prompt"].as_str().is_some_and(|p| p.starts_with("client ")) {
                        continue;
                    }
                    let mut c = completions.lock().unwrap();
                    *c.entry(v["id"].as_str().unwrap().to_string()).or_default() += 1;
                    if c.len() >= 50 {
                        break;
                    }
                }
            }
        })
    };

    let started = Instant::now();
    let clients: Vec<_> = (0..10)
        .map(|c| {
            let server = server.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|k| {
                        let v = server.create(&small_job(&format!("client {c} job {k}")));
                        (c, k, v["id"].as_str().unwrap().to_string())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let submitted: Vec<(usize, usize, String)> = clients.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert_eq!(submitted.len(), 50);
    let submit_s = started.elapsed().as_secs_f64();
    let mut peak = rss_before;
    wait_for("50 jobs to end", Duration::from_secs(600), || {
        peak = peak.max(server.rss_mib());
        let counts = server.get("/v1/t2v/info").json()["jobs"].clone();
        (counts["queued"] == 0 && counts["in_progress"] == 0).then_some(())
    });
    let total_s = started.elapsed().as_secs_f64();
    let rss_after = server.rss_mib();
    watcher.join().unwrap();

    // Every job completed, exactly once.
    let videos: Vec<Value> =
        server.all_videos().into_iter().filter(|v| v["prompt"].as_str().unwrap().starts_with("client ")).collect();
    assert_eq!(videos.len(), 50);
    for v in &videos {
        assert_eq!((v["status"].as_str(), v["attempts"].as_u64()), (Some("completed"), Some(1)), "{v}");
        let id = v["id"].as_str().unwrap();
        assert!(data.path().join(format!("videos/{id}.mp4")).is_file());
    }
    let completions = completions.lock().unwrap();
    for (_, _, id) in &submitted {
        assert_eq!(completions.get(id), Some(&1), "{id} completed {:?} times in the event stream", completions.get(id));
    }
    let info = server.get("/v1/t2v/info").json();
    assert_eq!(info["stats"]["jobs_run"], 53, "3 warm-up jobs and 50 more, none twice");

    // In submission order: the list (ascending) is the order the server took them in; each ran
    // after the one before it ended, and each client's jobs are in the order it sent them.
    let timings = |v: &Value, k: &str| v["timings"][k].as_i64().unwrap();
    for pair in videos.windows(2) {
        assert!(
            timings(&pair[1], "started_at_ms") >= timings(&pair[0], "completed_at_ms"),
            "{} ran before {} ended",
            pair[1]["id"],
            pair[0]["id"]
        );
    }
    let position: HashMap<&str, usize> =
        videos.iter().enumerate().map(|(i, v)| (v["id"].as_str().unwrap(), i)).collect();
    for c in 0..10 {
        let mine: Vec<usize> = submitted.iter().filter(|s| s.0 == c).map(|s| position[s.2.as_str()]).collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "client {c}'s jobs ran out of order: {mine:?}");
    }

    let latency: Vec<f64> =
        videos.iter().map(|v| (timings(v, "completed_at_ms") - timings(v, "created_at_ms")) as f64 / 1e3).collect();
    let run_s: Vec<f64> =
        videos.iter().map(|v| (timings(v, "completed_at_ms") - timings(v, "started_at_ms")) as f64 / 1e3).collect();
    eprintln!(
        "load: 50 jobs from 10 clients submitted in {submit_s:.2}s, all done in {total_s:.1}s ({:.2} jobs/s); \
         run time per job {:.3}s mean; latency mean {:.1}s max {:.1}s; \
         RSS before {rss_before:.1} MiB, peak {peak:.1} MiB, after {rss_after:.1} MiB; mean step {:.3}s, mean preview {:.3} ms",
        50.0 / total_s,
        run_s.iter().sum::<f64>() / 50.0,
        latency.iter().sum::<f64>() / 50.0,
        latency.iter().cloned().fold(0.0, f64::max),
        info["stats"]["mean_step_s"].as_f64().unwrap(),
        info["stats"]["mean_preview_s"].as_f64().unwrap() * 1e3,
    );
    assert!(rss_after - rss_before < 8.0, "memory grew from {rss_before:.1} to {rss_after:.1} MiB over 50 jobs");
}

#[test]
fn sigkill_mid_job_then_restart_keeps_every_job() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let long = json!({"prompt": "long", "num_inference_steps": 60, "num_frames": 8, "size": "32x32"});

    let server = Server::start(data.path(), &[]);
    let done = server.create(&small_job("done before"))["id"].as_str().unwrap().to_string();
    server.wait_status(&done, "completed", Duration::from_secs(120));
    let killed = server.create(&long)["id"].as_str().unwrap().to_string();
    let queued: Vec<String> =
        (0..3).map(|i| server.create(&small_job(&format!("queued {i}")))["id"].as_str().unwrap().to_string()).collect();
    server.wait_status(&killed, "in_progress", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    server.sigkill();

    // First restart: everything is there; the interrupted job runs again (its second attempt).
    let server = Server::start(data.path(), &[]);
    let all: Vec<String> = server.all_videos().iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    let expected: Vec<String> = [done.clone(), killed.clone()].into_iter().chain(queued.iter().cloned()).collect();
    assert_eq!(all, expected);
    assert!(server.log().contains(&killed), "the restart names the job it queued again:\n{}", server.log());
    assert_eq!(server.video(&done)["status"], "completed");
    assert_eq!(server.get(&format!("/v1/videos/{done}/content")).status, 200);
    let again = server.wait_status(&killed, "in_progress", Duration::from_secs(60));
    assert_eq!(again["attempts"], 2);
    std::thread::sleep(Duration::from_millis(500));
    server.sigkill();

    // Second restart: the job that died twice is failed with the reason; the queued ones run, in order.
    let server = Server::start(data.path(), &[]);
    let failed = server.video(&killed);
    assert_eq!(
        (failed["status"].as_str(), failed["error"]["code"].as_str()),
        (Some("failed"), Some("interrupted")),
        "{failed}"
    );
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.contains("interrupted (attempt 2 of 2)") && !message.contains("too large"), "{failed}");
    let finished: Vec<Value> =
        queued.iter().map(|id| server.wait_status(id, "completed", Duration::from_secs(120))).collect();
    for pair in finished.windows(2) {
        assert!(pair[1]["timings"]["started_at_ms"].as_i64() >= pair[0]["timings"]["completed_at_ms"].as_i64());
    }
    assert!(finished.iter().all(|v| v["attempts"] == 1));

    // SIGTERM mid-job: a clean stop puts the job back in the queue without counting the attempt.
    let stopped = server.create(&long)["id"].as_str().unwrap().to_string();
    server.wait_status(&stopped, "in_progress", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    let log = server.log.clone();
    assert_eq!(server.sigterm(), 0, "{}", log.lock().unwrap());
    let server = Server::start(data.path(), &[]);
    let v = server.wait_status(&stopped, "completed", Duration::from_secs(300));
    assert_eq!(v["attempts"], 1, "{v}");
    assert_eq!(server.all_videos().len(), 6);
}

/// The official OpenAI Python SDK against the server (`videos.create_and_poll`, `download_content`):
/// the Python in T2V_TEST_PYTHON (default `python3`), when it can import `openai`.
#[test]
fn openai_python_sdk() {
    let _turn = serial();
    let Some(python) = t2v_testkit::python_with("openai", "pip install openai") else { return };
    let data = TempDir::new().unwrap();
    let server = Server::start(data.path(), &["--api-key", "sdk-key"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .args([&server.base, "sdk-key"])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("the SDK script", Duration::from_secs(300), || child.try_wait().unwrap());
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "the SDK script failed:\n{err}\nserver:\n{}", server.log());
    let seen: Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("OpenAI SDK: {seen}");
    assert_eq!(
        (seen["status"].as_str(), seen["size"].as_str(), seen["seconds"].as_str()),
        (Some("completed"), Some("32x32"), Some("1"))
    );
    assert!(std::fs::metadata(data.path().join("sdk.mp4")).unwrap().len() > 100);
}

#[test]
fn video_to_video_over_multipart() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let videos = data.path().join("videos");
    let server = Server::start(data.path(), &[]);
    assert_eq!(server.get("/v1/t2v/info").json()["model"]["video_to_video"], true);
    let page = String::from_utf8(server.get("/").body).unwrap();
    assert!(page.contains("name=\"input_reference\" type=\"file\"") && page.contains("name=\"strength\""));

    // The fixtures' v2v run 1 (DPM-Solver++, a negative prompt, strength 0.75), on its MP4.
    let refs: Value = serde_json::from_slice(
        &std::fs::read(tiny_model().join("v2v/v2v_reference.json")).expect("the v2v references"),
    )
    .unwrap();
    let run = &refs["runs"][1];
    let input = tiny_model().join(run["input_mp4"].as_str().unwrap());
    let clip = std::fs::read(&input).unwrap();
    let text = |k: &str| match &run[k] {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let fields = [
        ("prompt", text("prompt")),
        ("negative_prompt", text("negative_prompt")),
        ("seed", text("seed")),
        ("num_inference_steps", text("steps")),
        ("guidance_scale", text("guidance_scale")),
        ("scheduler", text("scheduler")),
        ("strength", text("strength")),
        ("size", "32x32".to_string()),
    ];
    let as_refs = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        for (k, v) in extra {
            all.retain(|(name, _)| name != k);
            all.push((k.to_string(), v.to_string()));
        }
        all
    };
    let post = |extra: &[(&str, &str)], file: Option<(&str, &[u8])>| {
        let all = as_refs(extra);
        let borrowed: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (ct, body) = multipart(&borrowed, file.map(|(name, bytes)| ("input_reference", name, bytes)));
        server.call("POST", "/v1/videos", Some((&ct, &body)))
    };

    // Named `upload.bin`: the content, not the name, says it is an MP4.
    let reply = post(&[], Some(("upload.bin", &clip)));
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    let created = reply.json();
    let id = created["id"].as_str().unwrap().to_string();
    let stored = videos.join(format!("{id}.input.mp4"));
    assert_eq!(std::fs::read(&stored).unwrap(), clip, "the upload is kept as sent");
    let recorded = &created["settings"]["input"];
    let sha: String = <sha2::Sha256 as sha2::Digest>::digest(&clip).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(recorded["sha256"], sha.as_str());
    assert_eq!((recorded["strength"].as_f64(), recorded["fit"].as_str()), (Some(0.75), Some("resize")));
    assert_eq!(created["settings"]["num_frames"], run["num_frames"], "every frame of the clip is read");
    let done = server.wait_status(&id, "completed", Duration::from_secs(180));
    assert_eq!(done["settings"]["input"], *recorded);

    // The command line, same settings and the same file: the same coded frames.
    let out = data.path().join("cli.mp4");
    let cli = Command::new(env!("CARGO_BIN_EXE_t2v"))
        .args(["generate", run["prompt"].as_str().unwrap(), "--model"])
        .arg(tiny_model())
        .arg("--video")
        .arg(&input)
        .args(["-n", run["negative_prompt"].as_str().unwrap(), "--seed", &text("seed"), "--steps", &text("steps")])
        .args(["-g", &text("guidance_scale"), "--scheduler", &text("scheduler"), "--strength", &text("strength")])
        .args(["--device", "cpu", "-q", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let served = server.get(&format!("/v1/videos/{id}/content")).body;
    let cli_mp4 = std::fs::read(&out).unwrap();
    assert!(mp4_mdat(&served).len() > 500);
    assert!(mp4_mdat(&served) == mp4_mdat(&cli_mp4), "the served frames differ from the command line's");
    let cli_settings = t2v_settings::RunSettings::read(&out).unwrap();
    let served_path = data.path().join("served.mp4");
    std::fs::write(&served_path, &served).unwrap();
    let served_settings = t2v_settings::RunSettings::read(&served_path).unwrap();
    let (a, b) = (served_settings.input.unwrap(), cli_settings.input.unwrap());
    assert_eq!(
        (a.sha256, a.strength, a.start_frame, a.every, a.fit),
        (b.sha256, b.strength, b.start_frame, b.every, b.fit)
    );
    assert_eq!((served_settings.num_frames, served_settings.seed), (cli_settings.num_frames, cli_settings.seed));

    // Bad requests: 400 naming the field, and no file left behind.
    let bad = |extra: &[(&str, &str)], file: Option<(&str, &[u8])>| {
        let r = post(extra, file);
        (r.status, r.error_param())
    };
    let input_400 = (400, Some("input_reference".to_string()));
    assert_eq!(bad(&[], Some(("clip.mp4", b"not really a video"))), input_400);
    assert_eq!(bad(&[], Some(("clip.mp4", &clip[..clip.len() / 3]))), input_400, "a truncated MP4");
    assert_eq!(bad(&[], Some(("clip.gif", b"GIF89a\x01\x00"))), input_400, "a broken GIF");
    assert_eq!(bad(&[], Some(("clip.mp4", b""))), input_400);
    assert_eq!(bad(&[("num_frames", "50")], Some(("clip.mp4", &clip))), input_400, "more frames than the clip has");
    let strength_400 = (400, Some("strength".to_string()));
    for s in ["0", "1.5", "-0.2", "strong", "0.05"] {
        assert_eq!(bad(&[("strength", s)], Some(("clip.mp4", &clip))), strength_400, "strength {s}");
    }
    assert_eq!(bad(&[("video_fit", "squash")], Some(("clip.mp4", &clip))), (400, Some("video_fit".into())));
    assert_eq!(bad(&[("video_every", "0")], Some(("clip.mp4", &clip))), (400, Some("video_every".into())));
    assert_eq!(bad(&[], None), strength_400, "strength without an input video");
    let r = server.post_json("/v1/videos", &json!({"prompt": "x", "input_reference": "clip.mp4"}));
    assert_eq!((r.status, r.error_param()), (400, Some("input_reference".into())));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("multipart/form-data"));
    let leftovers: Vec<String> = std::fs::read_dir(&videos)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".input") && !n.starts_with(&id))
        .collect();
    assert!(leftovers.is_empty(), "failed submissions left {leftovers:?}");

    // Frames chosen and fitted as asked: every 2nd frame from 1, cropped.
    let reply = post(
        &[("video_start", "1"), ("video_every", "2"), ("video_fit", "crop"), ("num_inference_steps", "4")],
        Some(("clip.mp4", &clip)),
    );
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    let second = reply.json();
    let second_id = second["id"].as_str().unwrap().to_string();
    let input = &second["settings"]["input"];
    assert_eq!(
        (input["start_frame"].as_u64(), input["every"].as_u64(), input["fit"].as_str()),
        (Some(1), Some(2), Some("crop"))
    );
    assert_eq!(second["settings"]["num_frames"].as_u64(), Some((run["num_frames"].as_u64().unwrap() - 1).div_ceil(2)));
    server.wait_status(&second_id, "completed", Duration::from_secs(180));

    // The upload stays across a restart, until the job is deleted.
    assert_eq!(server.sigterm(), 0);
    let server = Server::start(data.path(), &[]);
    assert_eq!(server.video(&id)["status"], "completed");
    assert!(stored.is_file());
    let r = server.call("DELETE", &format!("/v1/videos/{id}"), None);
    assert_eq!(r.status, 200);
    assert!(!stored.exists(), "deleting the job removes its input video");
    assert!(!videos.join(format!("{id}.mp4")).exists());
    assert!(videos.join(format!("{second_id}.input.mp4")).is_file());
}
