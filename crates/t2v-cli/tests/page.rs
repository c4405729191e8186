//! The page of `t2v serve` as its visitors meet it: the real binary on the tiny fixture model, on
//! 127.0.0.1 and a free port, and the page in headless Chromium driven over its DevTools
//! websocket. A job queued, played and cancelled from the page; the layout on a 390 px phone and
//! a 1280 px desktop with a 200-character prompt in the queue (no horizontal overflow, select
//! boxes whole, the video-to-video section folded, an ETA); the gallery read a page at a time,
//! its videos loading nothing until they play. Screenshots go to `$T2V_ARTIFACTS_DIR` (else
//! under the test target folder) for CI to keep.
//!
//! The tests take turns: one server and one browser at a time.

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use support::{agent, serial, wait_for};
use tempfile::TempDir;

fn tiny_model() -> PathBuf {
    common::model_dir("tiny-t2v")
}

// ---------- the server ----------

struct Server {
    child: Child,
    base: String,
    log: std::sync::Arc<Mutex<String>>,
    /// The `--api-key`, sent with every call.
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
            let status = match agent().get(&server.url("/health")).call() {
                Ok(r) | Err(ureq::Error::Status(_, r)) => r.status(),
                Err(_) => 0,
            };
            (status == 200).then_some(())
        });
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `method path` with a JSON body (or none): the status and the JSON answer.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut req = agent().request(method, &self.url(path));
        if let Some(key) = &self.key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
            None => req.call(),
        };
        let response = match result {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = response.status();
        let mut text = String::new();
        response.into_reader().take(16 << 20).read_to_string(&mut text).expect("read the body");
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}")))
    }

    /// Queues a job and returns its video object.
    fn create(&self, body: &Value) -> Value {
        let (status, v) = self.call("POST", "/v1/videos", Some(body));
        assert_eq!(status, 200, "{v}");
        v
    }

    fn video(&self, id: &str) -> Value {
        let (status, v) = self.call("GET", &format!("/v1/videos/{id}"), None);
        assert_eq!(status, 200, "{v}");
        v
    }

    fn wait_status(&self, id: &str, status: &str, limit: Duration) -> Value {
        wait_for(&format!("{id} to be {status}"), limit, || {
            let v = self.video(id);
            assert!(
                v["status"] == status || !(v["status"] == "completed" || v["status"] == "failed"),
                "{id} ended {} instead of {status}: {v}\nserver:\n{}",
                v["status"],
                self.log.lock().unwrap()
            );
            (v["status"] == status).then_some(v)
        })
    }

    fn all_videos(&self) -> Vec<Value> {
        let (_, list) = self.call("GET", "/v1/videos?limit=100&order=asc", None);
        assert_eq!(list["has_more"], false);
        list["data"].as_array().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn small_job(prompt: &str) -> Value {
    json!({"prompt": prompt, "num_inference_steps": 2, "num_frames": 4, "size": "32x32", "guidance_scale": 9})
}

// ---------- the browser ----------

/// The page's DevTools connection: commands, and what the events on the way said (exceptions
/// thrown in the page, requests it sent).
struct DevTools {
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    exceptions: Vec<String>,
    /// (URL, resource type) of every request the page sent since `Network.enable`.
    requests: Vec<(String, String)>,
}

impl DevTools {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.socket
            .send(tungstenite::Message::text(json!({"id": id, "method": method, "params": params}).to_string()))
            .unwrap();
        for _ in 0..100_000 {
            let message = self.socket.read().unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
            let Ok(text) = message.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap();
            if v["method"] == "Runtime.exceptionThrown" {
                self.exceptions.push(v["params"]["exceptionDetails"].to_string());
            }
            if v["method"] == "Network.requestWillBeSent" {
                let p = &v["params"];
                self.requests.push((
                    p["request"]["url"].as_str().unwrap_or_default().to_string(),
                    p["type"].as_str().unwrap_or_default().to_string(),
                ));
            }
            if v["id"] == id {
                assert!(v.get("error").is_none(), "DevTools {method}: {v}");
                return v["result"].clone();
            }
        }
        panic!("no answer to {method}");
    }

    fn eval(&mut self, expression: &str) -> Value {
        self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true}))["result"]["value"]
            .clone()
    }

    /// An expression that returns `JSON.stringify(...)`, parsed.
    fn eval_json(&mut self, expression: &str) -> Value {
        let text = self.eval(expression);
        serde_json::from_str(text.as_str().unwrap_or("null")).unwrap_or(Value::Null)
    }

    /// Sets the viewport (CSS pixels, device scale 1).
    fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        );
    }

    /// A screenshot of what the viewport shows, saved as `name.png` in [`artifacts_dir`]; its
    /// path and size in pixels, printed.
    fn screenshot_viewport(&mut self, name: &str) -> (PathBuf, u32, u32) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        save_png(shot["data"].as_str().unwrap(), name)
    }

    /// A screenshot of the whole page (beyond the viewport) as wide as its content, saved as
    /// `name.png` in [`artifacts_dir`]; its path and size in pixels, printed.
    fn screenshot(&mut self, name: &str) -> (PathBuf, u32, u32) {
        let metrics = self.call("Page.getLayoutMetrics", json!({}));
        let width = metrics["cssContentSize"]["width"].as_f64().unwrap().ceil();
        // Chromium's largest capture is 16384 pixels a side.
        let height = metrics["cssContentSize"]["height"].as_f64().unwrap().ceil().min(16_000.0);
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}),
        );
        save_png(shot["data"].as_str().unwrap(), name)
    }
}

/// Writes a screenshot (base64 PNG) as `name.png` in [`artifacts_dir`]: its path and size in
/// pixels, printed.
fn save_png(base64_png: &str, name: &str) -> (PathBuf, u32, u32) {
    let png = base64::engine::general_purpose::STANDARD.decode(base64_png).unwrap();
    let info = png::Decoder::new(std::io::Cursor::new(&png)).read_info().unwrap().info().clone();
    let path = artifacts_dir().join(format!("{name}.png"));
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot {}: {}x{} pixels", path.display(), info.width, info.height);
    (path, info.width, info.height)
}

/// Where screenshots go: `$T2V_ARTIFACTS_DIR` (what CI keeps), else `page/` in the test target
/// folder.
fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("T2V_ARTIFACTS_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("page"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A headless Chromium with a fresh profile, its page target connected; killed on drop.
struct Browser {
    child: Child,
    _profile: TempDir,
    tools: DevTools,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// `None` (the test returns) where Chromium is not installed, outside CI.
    fn open() -> Option<Browser> {
        let chromium = t2v_testkit::chromium()?;
        let profile = TempDir::new().unwrap();
        let mut child = Command::new(&chromium)
            .args(t2v_testkit::chromium_flags(profile.path()))
            .args([
                "--mute-audio",
                "--autoplay-policy=no-user-gesture-required",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let browser_ws = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("chromium printed no DevTools address within 60 s");
            }
        };
        let port: u16 = browser_ws.trim_start_matches("ws://127.0.0.1:").split('/').next().unwrap().parse().unwrap();
        let targets: Value = wait_for("a page target", Duration::from_secs(30), || {
            let list = agent().get(&format!("http://127.0.0.1:{port}/json/list")).call().ok()?.into_string().ok()?;
            let v: Value = serde_json::from_str(&list).ok()?;
            v.as_array()?.iter().any(|t| t["type"] == "page").then_some(v)
        });
        let page_ws = targets.as_array().unwrap().iter().find(|t| t["type"] == "page").unwrap()["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_string();
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (socket, _) = tungstenite::client(page_ws.as_str(), stream).expect("DevTools connects");
        let mut tools = DevTools { socket, next_id: 0, exceptions: Vec::new(), requests: Vec::new() };
        tools.call("Runtime.enable", json!({}));
        tools.call("Network.enable", json!({}));
        Some(Browser { child, _profile: profile, tools })
    }
}

// ---------- the tests ----------

#[test]
fn page_submits_a_job_and_plays_it() {
    let _turn = serial();
    let Some(mut browser) = Browser::open() else { return };
    let data = TempDir::new().unwrap();
    let server = Server::start(data.path(), &[]);
    let tools = &mut browser.tools;

    // A phone's screen.
    tools.viewport(412, 915, true);
    // The link fills the form; the job is queued only by a click (a link alone never submits:
    // `submit=1` is ignored).
    let url = server.url("/?prompt=a%20red%20ball%20bouncing&num_inference_steps=4&num_frames=8&seed=11&submit=1");
    tools.call("Page.navigate", json!({"url": url}));
    wait_for("the form to be filled from the link", Duration::from_secs(30), || {
        let filled = tools.eval("document.querySelector('#form').prompt.value === 'a red ball bouncing'");
        (filled == true).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.all_videos().len(), 0, "the link alone queued a job");
    tools.eval("document.querySelector('#submit').click()");

    // The job of this page plays by itself once it is done and on screen (the visitor scrolls
    // down to the gallery).
    let started = Instant::now();
    let (submitted, played) = wait_for("the gallery's video to play", Duration::from_secs(180), || {
        let state = tools.eval_json(
            "document.querySelector('#gallery article.card')?.scrollIntoView(); \
             JSON.stringify({s: document.documentElement.dataset.submitted || null, p: document.documentElement.dataset.played || null, \
             err: document.querySelector('#form-message.error')?.textContent || null})",
        );
        assert!(state["err"].is_null(), "the page shows an error: {state}");
        let s = state["s"].as_str().map(str::to_string);
        (s.is_some() && state["p"] == state["s"])
            .then(|| (s.clone().unwrap(), state["p"].as_str().unwrap().to_string()))
    });
    eprintln!("the page's job {submitted} played after {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(submitted, played);
    let video = server.video(&submitted);
    assert_eq!(
        (video["status"].as_str(), video["settings"]["steps"].as_u64(), video["settings"]["num_frames"].as_u64()),
        (Some("completed"), Some(4), Some(8))
    );
    assert_eq!(video["settings"]["seed"], 11);
    // The gallery card shows it playing, with its settings and a download link.
    let card = tools.eval_json(&format!(
        "(() => {{ const c = document.querySelector('article.card[data-id=\"{submitted}\"]'); const v = c.querySelector('video'); \
         return JSON.stringify({{playing: c.dataset.playing, paused: v.paused, time: v.currentTime, w: v.videoWidth, \
         download: c.querySelector('a.download').getAttribute('href'), settings: c.querySelector('dl').textContent}}); }})()"
    ));
    assert_eq!((card["playing"].as_str(), card["w"].as_u64()), (Some("1"), Some(32)), "{card}");
    assert!(card["download"].as_str().unwrap().contains(&submitted), "{card}");
    assert!(card["settings"].as_str().unwrap().contains("seed11"), "{card}");
    assert!(tools.exceptions.is_empty(), "page exceptions: {:?}", tools.exceptions);

    // Video-to-video from the page: the form's input video and strength slider, sent as multipart.
    let v2v = tools.eval_json(
        "JSON.stringify({disabled: document.querySelector('#v2v').disabled, strength: form.strength.type + ' ' + form.strength.value, \
         fit: form.video_fit.value, file: form.input_reference.type})",
    );
    assert_eq!(v2v, json!({"disabled": false, "strength": "range 0.6", "fit": "resize", "file": "file"}));
    // The file as a user's choice would give it (a File in the input), made from the clip's bytes.
    let clip =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(tiny_model().join("v2v/input.0.mp4")).unwrap());
    let frames_field = tools.eval(&format!(
        "(() => {{ const bytes = Uint8Array.from(atob('{clip}'), (c) => c.charCodeAt(0)); \
         const files = new DataTransfer(); files.items.add(new File([bytes], 'clip.mp4', {{type: 'video/mp4'}})); \
         form.input_reference.files = files.files; form.input_reference.dispatchEvent(new Event('change')); \
         form.strength.value = '0.5'; form.prompt.value = 'a yellow ball'; form.num_inference_steps.value = '4'; \
         submitForm(); return form.num_frames.value; }})()"
    ));
    assert_eq!(frames_field, json!(""), "with an input video, the frame count is left to the video");
    let page_v2v = wait_for("the page to queue the video-to-video job", Duration::from_secs(60), || {
        let state = tools.eval_json(
            "JSON.stringify({s: document.documentElement.dataset.submitted || null, \
             err: document.querySelector('#form-message.error')?.textContent || null})",
        );
        assert!(state["err"].is_null(), "the page shows an error: {state}");
        state["s"].as_str().filter(|id| *id != submitted).map(str::to_string)
    });
    let job = server.wait_status(&page_v2v, "completed", Duration::from_secs(120));
    assert_eq!(
        (job["settings"]["input"]["strength"].as_f64(), job["settings"]["num_frames"].as_u64()),
        (Some(0.5), Some(6)),
        "{job}"
    );
    assert!(tools.exceptions.is_empty(), "page exceptions: {:?}", tools.exceptions);

    // The newer settings from the form: a sampler and FreeNoise's windows with a keyframe prompt.
    tools.eval(
        "form.input_reference.value = ''; form.input_reference.dispatchEvent(new Event('change')); \
         form.prompt.value = 'a green ball'; form.num_inference_steps.value = '2'; form.num_frames.value = '12'; \
         form.scheduler.value = 'euler_a'; form.scheduler.dispatchEvent(new Event('change')); \
         form.context_length.value = '8'; form.context_length.dispatchEvent(new Event('input')); \
         form.context_stride.value = '2'; form.context_weighting.value = 'flat'; form.prompts.value = '6: a blue cube'; \
         form.negative_prompts.value = '20: too far'; form.negative_prompts.dispatchEvent(new Event('input'));",
    );
    // The timeline draws each keyframe where it falls on the frames, a keyframe past the last
    // frame in red; fixed, the negative keyframe moves to its frame.
    let marks = |tools: &mut DevTools| {
        tools.eval_json(
            "JSON.stringify([...document.querySelectorAll('#timeline .mark')].map(m => \
             [m.className, m.dataset.frame ?? null, parseFloat(m.style.left)]))",
        )
    };
    let drawn = marks(tools);
    assert!(
        drawn.as_array().unwrap().iter().any(|m| m[0] == "mark negative past" && m[1] == "20"),
        "a keyframe past frame 11 is marked: {drawn}"
    );
    tools.eval("form.negative_prompts.value = '4: blurry'; form.negative_prompts.dispatchEvent(new Event('input'));");
    let drawn = marks(tools);
    // (frame, left in % of the axis) of one kind of marker (the browser keeps 6 digits of it).
    let frames_of = |kind: &str| -> Vec<(String, f64)> {
        drawn
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m[0] == kind)
            .map(|m| (m[1].as_str().unwrap_or("").to_string(), m[2].as_f64().unwrap()))
            .collect()
    };
    let placed = |kind: &str, expected: &[(&str, f64)]| {
        let got = frames_of(kind);
        assert_eq!(got.len(), expected.len(), "{kind}: {drawn}");
        for ((frame, left), (want_frame, want)) in got.iter().zip(expected) {
            assert_eq!(frame, want_frame, "{kind}: {drawn}");
            assert!((left - want / 11.0 * 100.0).abs() < 1e-3, "{kind} at frame {frame}: {drawn}");
        }
    };
    placed("mark prompt", &[("0", 0.0), ("6", 6.0)]);
    placed("mark negative", &[("4", 4.0)]);
    tools.eval("submitForm();");
    let page_long = wait_for("the page to queue the long-video job", Duration::from_secs(60), || {
        let state = tools.eval_json(
            "JSON.stringify({s: document.documentElement.dataset.submitted || null, \
             err: document.querySelector('#form-message.error')?.textContent || null})",
        );
        assert!(state["err"].is_null(), "the page shows an error: {state}");
        state["s"].as_str().filter(|id| *id != submitted && *id != page_v2v).map(str::to_string)
    });
    let job = server.wait_status(&page_long, "completed", Duration::from_secs(120));
    let s = &job["settings"];
    assert_eq!(
        (
            s["scheduler"].as_str(),
            s["num_frames"].as_u64(),
            s["context_length"].as_u64(),
            s["context_stride"].as_u64(),
            s["context_weighting"].as_str(),
            s["prompts"]["6"].as_str(),
            s["negative_prompts"]["4"].as_str(),
            s.get("input").is_none()
        ),
        (Some("euler_a"), Some(12), Some(8), Some(2), Some("flat"), Some("a blue cube"), Some("blurry"), true),
        "{job}"
    );
    // A keyframe line that is not FRAME: prompt is refused on the page, naming the field.
    tools.eval("form.prompts.value = 'a blue cube at six'; submitForm();");
    let refused = wait_for("the page to refuse the keyframe line", Duration::from_secs(10), || {
        tools.eval("document.querySelector('#form-message.error')?.textContent || null").as_str().map(str::to_string)
    });
    assert!(refused.contains("FRAME: prompt"), "{refused}");
    assert_eq!(tools.eval("form.prompts.classList.contains('field-error')"), true);
    assert_eq!(server.all_videos().len(), 3, "the refused form queued a job");

    // A job from another client appears in the queue with its progress and live preview.
    let other =
        server.create(&json!({"prompt": "a slow one", "num_inference_steps": 200, "num_frames": 8, "size": "32x32"}));
    let other = other["id"].as_str().unwrap();
    let shown = wait_for("the queue to show a preview", Duration::from_secs(60), || {
        let item = tools.eval(&format!(
            "(() => {{ const li = document.querySelector('#queue li[data-id=\"{other}\"]'); if (!li) return null; \
             const img = li.querySelector('img.preview'); return img.hidden ? null : JSON.stringify({{meta: li.querySelector('.meta').textContent, \
             value: li.querySelector('progress').value, preview: img.naturalWidth}}); }})()"
        ));
        item.as_str().map(|s| serde_json::from_str::<Value>(s).unwrap())
    });
    eprintln!("queue item: {shown}");
    assert!(shown["meta"].as_str().unwrap().contains("left"), "an ETA: {shown}");
    assert_eq!(shown["preview"], 4 * 32, "{shown}");

    tools.eval("scrollTo(0, 0)");
    let (_, w, h) = tools.screenshot("page-412-job");
    assert!(w == 412 && h >= 600, "screenshot {w}x{h}");
    // Cancel from the page: its button stops the job.
    tools.eval(&format!("document.querySelector('#queue li[data-id=\"{other}\"] .cancel').click()"));
    let cancelled = server.wait_status(other, "failed", Duration::from_secs(30));
    assert_eq!(cancelled["error"]["code"], "cancelled");
    assert!(tools.exceptions.is_empty(), "page exceptions: {:?}", tools.exceptions);
}

/// The LoRAs of `--lora-dir` in the form, chosen by name: the job records the one picked, and a
/// server without LoRAs shows no LoRA field.
#[test]
fn page_offers_the_servers_loras() {
    let _turn = serial();
    let Some(mut browser) = Browser::open() else { return };
    let data = TempDir::new().unwrap();
    let loras = TempDir::new().unwrap();
    std::fs::copy(tiny_model().join("lora/pytorch_lora_weights.safetensors"), loras.path().join("yellow.safetensors"))
        .unwrap();
    let server = Server::start(data.path(), &["--lora-dir", loras.path().to_str().unwrap()]);
    let tools = &mut browser.tools;
    tools.viewport(1280, 800, false);
    tools.call("Page.navigate", json!({"url": server.url("/")}));
    let offered = wait_for("the LoRA field", Duration::from_secs(30), || {
        let v = tools.eval_json(
            "JSON.stringify({hidden: document.querySelector('#lora-field')?.hidden ?? null,              options: [...(document.querySelector('#form')?.lora?.options || [])].map((o) => o.value)})",
        );
        (v["hidden"] == false).then_some(v)
    });
    assert_eq!(tools.eval("document.querySelector('#form').lora.checkVisibility()"), true);
    assert_eq!(offered["options"], json!(["", "yellow"]), "{offered}");
    tools.eval(
        "form.prompt.value = 'a yellow ball'; form.num_inference_steps.value = '2'; form.num_frames.value = '4'; \
         form.lora.value = 'yellow'; form.lora_scale.value = '0.5'; submitForm();",
    );
    let id = wait_for("the page to queue the LoRA job", Duration::from_secs(60), || {
        let state = tools.eval_json(
            "JSON.stringify({s: document.documentElement.dataset.submitted || null, \
             err: document.querySelector('#form-message.error')?.textContent || null})",
        );
        assert!(state["err"].is_null(), "the page shows an error: {state}");
        state["s"].as_str().map(str::to_string)
    });
    let job = server.wait_status(&id, "completed", Duration::from_secs(120));
    let lora = &job["settings"]["loras"][0];
    assert_eq!((lora["path"].as_str(), lora["weight"].as_f64()), (Some("yellow.safetensors"), Some(0.5)), "{job}");
    assert!(tools.exceptions.is_empty(), "page exceptions: {:?}", tools.exceptions);

    // Without --lora-dir the field stays hidden.
    let plain = TempDir::new().unwrap();
    let other = Server::start(plain.path(), &[]);
    tools.call("Page.navigate", json!({"url": other.url("/")}));
    let hidden = wait_for("the page to load", Duration::from_secs(30), || {
        let v = tools.eval(
            "document.querySelector('#model')?.textContent ? !document.querySelector('#form').lora.checkVisibility() : null",
        );
        v.as_bool()
    });
    assert!(hidden, "a LoRA field on a server without LoRAs");
}

/// 200 characters with words longer than a phone is wide (58, then 101 letters).
fn long_prompt() -> String {
    let word = "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch";
    let text = format!("a corgi surfing a wave at golden hour in {word} {word}{word}{word}");
    let text: String = text.chars().take(200).collect();
    assert_eq!(text.chars().count(), 200);
    text
}

/// "1h 2m", "3m 5s", "42s" (the page's durations) in seconds.
fn seconds(text: &str) -> f64 {
    text.split_whitespace()
        .map(|part| {
            let (number, unit) = part.split_at(part.len() - 1);
            let n: f64 = number.parse().unwrap_or_else(|_| panic!("a duration reads `{text}`"));
            n * match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                _ => panic!("a duration reads `{text}`"),
            }
        })
        .sum()
}

/// What the page shows, measured in the browser: the page's width against the viewport's,
/// elements past either edge, text wider than its box, the select boxes against their
/// container and their widest option, the gallery's videos and the folded sections.
const MEASURE: &str = r#"(() => {
  const vw = innerWidth;
  // Rendered and not in a folded section (closed <details> keep their boxes, unseen).
  const shown = (e) => e.checkVisibility() && !e.closest('.visually-hidden');
  const name = (e) => `${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''}${typeof e.className === 'string' && e.className ? '.' + e.className.trim().split(/\s+/).join('.') : ''} "${e.textContent.trim().slice(0, 24)}"`;
  const past = [...document.querySelectorAll('body *')].filter(shown).filter((e) => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && (r.right > vw + 0.5 || r.left < -0.5);
  }).slice(0, 8).map((e) => `${name(e)} ${Math.round(e.getBoundingClientRect().left)}..${Math.round(e.getBoundingClientRect().right)}`);
  const spilling = [...document.querySelectorAll('.prompt, .meta, .eta, dd, #form-message, label, legend, summary')]
    .filter(shown).filter((e) => e.scrollWidth > e.clientWidth + 1).slice(0, 8)
    .map((e) => `${name(e)} ${e.scrollWidth}>${e.clientWidth}`);
  const canvas = document.createElement('canvas').getContext('2d');
  const selects = [...document.querySelectorAll('#form select')].filter(shown).map((s) => {
    const r = s.getBoundingClientRect();
    const box = s.closest('fieldset, form').getBoundingClientRect();
    const cs = getComputedStyle(s);
    canvas.font = `${cs.fontStyle} ${cs.fontWeight} ${cs.fontSize} ${cs.fontFamily}`;
    const widest = Math.max(...[...s.options].map((o) => canvas.measureText(o.text).width));
    const room = s.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
    return {name: s.name || s.id, inside: r.left >= box.left - 0.5 && r.right <= box.right + 0.5 && r.right <= vw + 0.5,
            widest: Math.ceil(widest), room: Math.floor(room), height: Math.round(r.height),
            lineHeight: parseFloat(cs.lineHeight) || parseFloat(cs.fontSize) * 1.2};
  });
  const videos = [...document.querySelectorAll('#gallery video')].map((v) => ({
    autoplay: v.autoplay, preload: v.getAttribute('preload'), paused: v.paused, readyState: v.readyState,
    src: v.getAttribute('src'), button: !!v.closest('.card').querySelector('.play'),
    poster: v.getAttribute('poster')}));
  return JSON.stringify({
    vw, vh: innerHeight, scrollWidth: document.documentElement.scrollWidth, bodyWidth: document.body.scrollWidth,
    past, spilling, selects, videos,
    emptyPosters: document.querySelectorAll('[poster=""]').length,
    cards: document.querySelectorAll('#gallery article.card').length,
    loadMore: !document.querySelector('#load-more').hidden,
    v2vOpen: document.querySelector('#v2v-section').open,
    v2vShown: shown(document.querySelector('#v2v')),
    v2vDisabled: document.querySelector('#v2v').disabled,
    v2vNote: !document.querySelector('#v2v-note').hidden,
    longOpen: document.querySelector('#long-section').open,
    schedulers: [...form.scheduler.options].map((o) => o.value),
  });
})()"#;

fn measure(tools: &mut DevTools) -> Value {
    tools.eval_json(MEASURE)
}

/// The checks every layout must pass: nothing wider than the viewport, no text past its box,
/// each select box inside its container and as wide as its widest option.
fn assert_fits(m: &Value, what: &str) {
    let vw = m["vw"].as_u64().unwrap();
    assert!(
        m["scrollWidth"].as_u64().unwrap() <= vw && m["bodyWidth"].as_u64().unwrap() <= vw,
        "{what}: the page is wider than the {vw} px viewport: {m}"
    );
    assert_eq!(m["past"], json!([]), "{what}: elements past the viewport's edges");
    assert_eq!(m["spilling"], json!([]), "{what}: text wider than its box");
    let selects = m["selects"].as_array().unwrap();
    assert!(!selects.is_empty(), "{what}: no select box shown: {m}");
    for s in selects {
        assert_eq!(s["inside"], true, "{what}: a select box past its container: {s}");
        assert!(s["widest"].as_u64() <= s["room"].as_u64(), "{what}: a select box cuts its options off: {s}");
        assert!(
            s["height"].as_f64().unwrap() >= s["lineHeight"].as_f64().unwrap(),
            "{what}: a select box too low: {s}"
        );
    }
}

/// The layout with a 200-character prompt in the queue, at `width` × `height`; the page's state
/// asserted, then a screenshot.
fn check_layout(
    tools: &mut DevTools,
    server: &Server,
    busy: &str,
    width: u32,
    height: u32,
    mobile: bool,
) -> (u32, u32) {
    let what = format!("{width}x{height}");
    tools.viewport(width, height, mobile);
    // From a blank page: a reload of the same address would restore the last scroll position.
    tools.call("Page.navigate", json!({"url": "about:blank"}));
    tools.requests.clear();
    tools.call("Page.navigate", json!({"url": server.url("/")}));
    let started = Instant::now();
    loop {
        let state = tools.eval_json(&format!(
            "JSON.stringify({{model: document.querySelector('#model').textContent, \
             cards: document.querySelectorAll('#gallery article.card').length, \
             busy: !!document.querySelector('#queue li[data-id=\"{busy}\"]'), \
             status: document.querySelector('#server-status').textContent, \
             message: document.querySelector('#form-message').textContent}})"
        ));
        if state["model"] != "" && state["cards"].as_u64() >= Some(12) && state["busy"] == true {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: the page did not load its first gallery page and the queue: {state}; exceptions: {:?}; busy: {}",
            tools.exceptions,
            server.video(busy)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = measure(tools);
    assert_eq!((before["vw"].as_u64(), before["vh"].as_u64()), (Some(width as u64), Some(height as u64)), "{before}");

    // A 200-character prompt queued from the form, behind the busy job.
    let prompt = long_prompt();
    let previous = tools.eval("document.documentElement.dataset.submitted || null");
    tools.eval(&format!(
        "form.prompt.value = {}; form.num_inference_steps.value = '2'; form.num_frames.value = '4'; \
         form.width.value = '32'; form.height.value = '32'; document.querySelector('#submit').click();",
        json!(prompt)
    ));
    let queued = wait_for("the page to queue the long prompt", Duration::from_secs(30), || {
        let state = tools.eval_json(
            "JSON.stringify({s: document.documentElement.dataset.submitted || null, \
             err: document.querySelector('#form-message.error')?.textContent || null})",
        );
        assert!(state["err"].is_null(), "{what}: the page shows an error: {state}");
        state["s"].as_str().filter(|s| previous.as_str() != Some(*s)).map(str::to_string)
    });
    let job = server.video(&queued);
    assert_eq!((job["prompt"].as_str(), job["status"].as_str()), (Some(prompt.as_str()), Some("queued")), "{job}");

    // Its ETA: when the busy job ends (its progress) and how long jobs of its size took.
    let item = wait_for("an ETA for the queued job", Duration::from_secs(30), || {
        let item = tools.eval_json(&format!(
            "(() => {{ const li = document.querySelector('#queue li[data-id=\"{queued}\"]'); if (!li) return 'null'; \
             const r = li.getBoundingClientRect(); const p = li.querySelector('.prompt'); \
             return JSON.stringify({{meta: li.querySelector('.meta').textContent, eta: li.querySelector('.eta').textContent, \
             left: r.left, right: r.right, text: p.textContent, lines: Math.round(p.getBoundingClientRect().height / parseFloat(getComputedStyle(p).lineHeight))}}); }})()"
        ));
        item["eta"].as_str().filter(|e| e.contains("starts in about")).map(|_| item.clone())
    });
    eprintln!("{what}: the queued job: {item}");
    assert!(item["meta"].as_str().unwrap().contains("position"), "{item}");
    assert!(item["eta"].as_str().unwrap().contains("done in about"), "{item}");
    // Every queued job's ETA: later in the queue, later to start; none done before it starts.
    let etas = tools.eval_json(
        "JSON.stringify([...document.querySelectorAll('#queue li')].map((li) => li.querySelector('.eta').textContent).filter((t) => t))",
    );
    let mut last_start = 0.0;
    for text in etas.as_array().unwrap() {
        let text = text.as_str().unwrap();
        let (start, end) = text
            .strip_prefix("starts in about ")
            .and_then(|t| t.split_once(" · done in about "))
            .unwrap_or_else(|| panic!("{what}: an ETA reads `{text}`"));
        let (start, end) = (seconds(start), seconds(end));
        assert!(start > 0.0 && start >= last_start && end >= start, "{what}: ETAs out of order: {etas}");
        last_start = start;
    }
    assert_eq!(item["text"].as_str(), Some(prompt.as_str()));
    assert!(item["left"].as_f64().unwrap() >= 0.0 && item["right"].as_f64().unwrap() <= width as f64, "{item}");
    // Wrapped: at 390 px the prompt takes several lines (the third its last), not one line off screen.
    if mobile {
        assert!(item["lines"].as_u64().unwrap() >= 2, "{item}");
    }

    let m = measure(tools);
    eprintln!("{what}: {m}");
    assert_fits(&m, &what);
    assert_eq!(m["emptyPosters"], 0, "{what}: poster=\"\" fetches the page as an image");
    // The first page of the gallery, not the whole history; nothing of any video loaded.
    let cards = m["cards"].as_u64().unwrap();
    assert!((12..SEEDED as u64).contains(&cards) && m["loadMore"] == true, "{what}: {m}");
    for v in m["videos"].as_array().unwrap() {
        assert_eq!(
            (&v["autoplay"], v["preload"].as_str(), &v["paused"], v["readyState"].as_u64(), &v["src"], &v["button"]),
            (&json!(false), Some("none"), &json!(true), Some(0), &Value::Null, &json!(true)),
            "{what}: a gallery video that loads or plays by itself: {v}"
        );
    }
    // Video to video: available (this model has it), folded until opened; so are long videos.
    assert_eq!(
        (&m["v2vOpen"], &m["v2vShown"], &m["v2vDisabled"], &m["v2vNote"], &m["longOpen"]),
        (&json!(false), &json!(false), &json!(false), &json!(false), &json!(false)),
        "{what}: {m}"
    );
    assert_eq!(m["schedulers"], json!(["dpm", "ddim", "unipc", "euler", "euler_a", "lcm"]));

    tools.eval("scrollTo(0, 0)");
    let (_, shot_w, shot_h) = tools.screenshot(&format!("page-{width}"));
    assert!(shot_w == width && shot_h >= height / 2, "{what}: screenshot {shot_w}x{shot_h}");

    // What the page fetched: no video, no page as an image, thumbnails only of the cards near
    // the screen.
    let video_requests = tools.requests.iter().filter(|(u, _)| u.contains("variant=video")).count();
    let page_as_image = tools
        .requests
        .iter()
        .filter(|(u, t)| t == "Image" && u.starts_with(&server.base) && !u.contains("/v1/"))
        .count();
    let thumbnails = tools.requests.iter().filter(|(u, _)| u.contains("variant=thumbnail")).count();
    eprintln!("{what}: {} requests, {thumbnails} thumbnails for {cards} cards", tools.requests.len());
    assert_eq!((video_requests, page_as_image), (0, 0), "{what}: {:?}", tools.requests);
    assert!(thumbnails * 2 < cards as usize, "{what}: the thumbnails of cards far off screen: {:?}", tools.requests);

    // The folded sections open and still fit.
    tools.eval(
        "document.querySelector('#v2v-section').open = true; document.querySelector('#long-section').open = true;",
    );
    let open = measure(tools);
    assert_eq!((&open["v2vShown"], open["selects"].as_array().unwrap().len()), (&json!(true), 4), "{what}: {open}");
    assert_fits(&open, &format!("{what}, sections open"));
    tools.eval("document.querySelector('#long-section').scrollIntoView()");
    let (_, w, h) = tools.screenshot_viewport(&format!("page-{width}-settings"));
    assert_eq!((w, h), (width, height));
    tools.eval(
        "document.querySelector('#v2v-section').open = false; document.querySelector('#long-section').open = false;",
    );

    // Scrolled down, each card gets its poster; "Load more" brings the rest of the history.
    tools.eval("scrollTo(0, document.documentElement.scrollHeight)");
    wait_for("the posters of the cards scrolled to", Duration::from_secs(20), || {
        let last = tools.eval("[...document.querySelectorAll('#gallery video')].at(-1).getAttribute('poster')");
        last.as_str().filter(|p| p.contains("variant=thumbnail")).map(|_| ())
    });
    tools.eval("document.querySelector('#load-more').click()");
    wait_for("the next page of the gallery", Duration::from_secs(20), || {
        let m = measure(tools);
        (m["cards"] == SEEDED && m["loadMore"] == false).then_some(())
    });
    assert_fits(&measure(tools), &format!("{what}, the whole gallery"));

    if mobile {
        // A tap on the play button of a card that has loaded nothing: the source is set, the
        // file fetched, the video plays with its controls.
        tools.call("Emulation.setTouchEmulationEnabled", json!({"enabled": true, "maxTouchPoints": 5}));
        let at = tools.eval_json(
            "(() => { const b = document.querySelectorAll('#gallery article.card')[1].querySelector('.play'); \
             b.scrollIntoView({block: 'center'}); const r = b.getBoundingClientRect(); \
             return JSON.stringify({x: r.left + r.width / 2, y: r.top + r.height / 2}); })()",
        );
        let point = json!([{"x": at["x"], "y": at["y"]}]);
        tools.call("Input.dispatchTouchEvent", json!({"type": "touchStart", "touchPoints": point}));
        tools.call("Input.dispatchTouchEvent", json!({"type": "touchEnd", "touchPoints": []}));
        let state = wait_for("the card tapped to play", Duration::from_secs(30), || {
            let state = tools.eval_json(
                "(() => { const c = document.querySelectorAll('#gallery article.card')[1]; const v = c.querySelector('video'); \
                 return JSON.stringify({playing: c.dataset.playing || null, controls: v.controls, button: !!c.querySelector('.play')}); })()",
            );
            (state["playing"] == "1").then_some(state)
        });
        assert_eq!((&state["controls"], &state["button"]), (&json!(true), &json!(false)), "{state}");
        assert!(tools.requests.iter().any(|(u, _)| u.contains("variant=video")), "{:?}", tools.requests);
    } else {
        // A mouse over a card plays its video (the file fetched then); leaving it pauses.
        let centre = tools.eval_json(
            "(() => { const c = document.querySelector('#gallery article.card'); c.scrollIntoView(); \
             const r = c.querySelector('video').getBoundingClientRect(); \
             return JSON.stringify({x: r.left + r.width / 2, y: r.top + r.height / 2}); })()",
        );
        tools.call("Input.dispatchMouseEvent", json!({"type": "mouseMoved", "x": centre["x"], "y": centre["y"]}));
        wait_for("the hovered card to play", Duration::from_secs(30), || {
            (tools.eval("document.querySelector('#gallery article.card').dataset.playing === '1'") == true)
                .then_some(())
        });
        assert!(tools.requests.iter().any(|(u, _)| u.contains("variant=video")), "{:?}", tools.requests);
        tools.call("Input.dispatchMouseEvent", json!({"type": "mouseMoved", "x": 1, "y": 1}));
        wait_for("the card left to pause", Duration::from_secs(10), || {
            (tools.eval("document.querySelector('#gallery article.card video').paused") == true).then_some(())
        });
    }
    assert!(tools.exceptions.is_empty(), "{what}: page exceptions: {:?}", tools.exceptions);
    (shot_w, shot_h)
}

/// Finished jobs in the history: more than the gallery's first page.
const SEEDED: usize = 30;

#[test]
fn page_fits_a_phone_and_a_desktop() {
    let _turn = serial();
    let Some(mut browser) = Browser::open() else { return };
    let data = TempDir::new().unwrap();
    // The busy job below costs more than the default cap.
    let server = Server::start(data.path(), &["--max-job-cost", "1000000000000"]);
    let started = Instant::now();
    // The history, the first job with the long prompt (a gallery card with it).
    let ids: Vec<String> = (0..SEEDED)
        .map(|i| {
            let prompt = if i == 0 { long_prompt() } else { format!("a red ball, take {i}") };
            server.create(&small_job(&prompt))["id"].as_str().unwrap().to_string()
        })
        .collect();
    for id in &ids {
        server.wait_status(id, "completed", Duration::from_secs(120));
    }
    eprintln!("{SEEDED} jobs ran in {:.1}s", started.elapsed().as_secs_f64());
    // The worker busy for the whole check (999 steps of 16 frames take minutes even on a fast
    // machine; cancelled at the end): the long prompt's job waits in the queue behind it.
    let busy = server.create(&json!({"prompt": "a slow one", "num_inference_steps": 999, "scheduler": "ddim", "num_frames": 16, "size": "64x64"}));
    let busy = busy["id"].as_str().unwrap().to_string();
    server.wait_status(&busy, "in_progress", Duration::from_secs(60));

    let mut sizes = Vec::new();
    for (width, height, mobile) in [(390, 844, true), (1280, 800, false)] {
        sizes.push((width, check_layout(&mut browser.tools, &server, &busy, width, height, mobile)));
    }
    let still = server.video(&busy);
    eprintln!("the busy job after the checks: {}% done", still["progress"]);
    assert_eq!(still["status"], "in_progress", "the busy job ended before the checks did: {still}");
    eprintln!("screenshots (viewport width: pixels): {sizes:?}");
    let (status, _) = server.call("POST", &format!("/v1/videos/{busy}/cancel"), None);
    assert_eq!(status, 200);

    // With an API key, the page cannot ask the server before the visitor gives it: video to
    // video shows as available, the settings dialog asks for the key.
    drop(server);
    let data = TempDir::new().unwrap();
    let server = Server::start(data.path(), &["--api-key", "page-key"]);
    let tools = &mut browser.tools;
    tools.viewport(390, 844, true);
    tools.call("Page.navigate", json!({"url": server.url("/")}));
    let state = wait_for("the page to ask for the key", Duration::from_secs(30), || {
        let s = tools.eval_json(
            "JSON.stringify({dialog: document.querySelector('#settings').open, status: document.querySelector('#server-status').textContent, \
             v2vDisabled: document.querySelector('#v2v').disabled, v2vNote: !document.querySelector('#v2v-note').hidden, \
             v2vOpen: document.querySelector('#v2v-section').open})",
        );
        (s["dialog"] == true).then_some(s)
    });
    assert_eq!(
        state,
        json!({"dialog": true, "status": "API key needed", "v2vDisabled": false, "v2vNote": false, "v2vOpen": false})
    );
    // With the key given, the files come with it: the poster and the video as blobs.
    let done = server.create(&small_job("a keyed ball"));
    let done = done["id"].as_str().unwrap();
    server.wait_status(done, "completed", Duration::from_secs(60));
    tools.eval("localStorage.setItem('t2v.apiKey', 'page-key'); location.reload();");
    let card = format!("document.querySelector('#gallery article.card[data-id=\"{done}\"]')");
    wait_for("the keyed card's poster", Duration::from_secs(30), || {
        tools
            .eval(&format!("{card}?.scrollIntoView(); {card}?.querySelector('video').getAttribute('poster')"))
            .as_str()
            .filter(|p| p.starts_with("blob:"))
            .map(|_| ())
    });
    tools.eval(&format!("{card}.querySelector('.play').click()"));
    let played = wait_for("the keyed card to play", Duration::from_secs(30), || {
        let s = tools.eval_json(&format!(
            "JSON.stringify({{playing: {card}.dataset.playing || null, src: {card}.querySelector('video').getAttribute('src'), \
             download: {card}.querySelector('a.download').getAttribute('href'), status: document.querySelector('#server-status').textContent}})"
        ));
        (s["playing"] == "1").then_some(s)
    });
    assert!(
        played["src"].as_str().unwrap().starts_with("blob:")
            && played["download"] == played["src"]
            && played["status"] == "live",
        "{played}"
    );
    assert!(tools.exceptions.is_empty(), "page exceptions: {:?}", tools.exceptions);
}
