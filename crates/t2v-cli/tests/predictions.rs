//! The service for clients other than OpenAI's SDK, on the real binary and the tiny fixture model
//! (127.0.0.1, free ports): a Cog/Replicate-style client of the prediction API with a webhook
//! receiver that verifies every signature (sync POST, respond-async, idempotent PUT, cancel, the
//! event filter, a retry after the receiver fails, a call that outlives a SIGKILL and restart),
//! webhooks of `/v1/videos`, refused webhook targets, and curl for `/v1/videos/sync` and
//! `Idempotency-Key`.
//!
//! The tests take turns (one server at a time).

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use support::{agent, mp4_mdat, serial, wait_for};
use tempfile::TempDir;

/// The receivers' key (24 bytes), given to the server as `--webhook-secret`.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn tiny_model() -> PathBuf {
    common::model_dir("tiny-t2v")
}

// ---------- a webhook receiver ----------

/// One call received: its headers, body, and whether its signature verified.
#[derive(Debug, Clone)]
struct Call {
    headers: HashMap<String, String>,
    body: Value,
    /// The body as sent (what signatures cover).
    raw: String,
    verified: bool,
    /// What the receiver answered.
    status: u16,
}

impl Call {
    fn id(&self) -> &str {
        &self.headers["webhook-id"]
    }
}

/// Checks a call as a receiver must (Standard Webhooks): the HMAC-SHA256 of `id.timestamp.body`
/// under the secret's bytes, among the signatures given, and a timestamp within 5 minutes.
fn verify(headers: &HashMap<String, String>, body: &[u8]) -> bool {
    let (Some(id), Some(ts), Some(sigs)) =
        (headers.get("webhook-id"), headers.get("webhook-timestamp"), headers.get("webhook-signature"))
    else {
        return false;
    };
    let Ok(ts_num) = ts.parse::<i64>() else { return false };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    if (now - ts_num).abs() > 300 {
        return false;
    }
    let key = base64::engine::general_purpose::STANDARD.decode(SECRET.trim_start_matches("whsec_")).unwrap();
    let mut mac = hmac::Hmac::<sha2_hmac::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    sigs.split(' ').any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

/// An HTTP receiver on 127.0.0.1: records every call; answers 500 to the first `fail_first`
/// calls, and 503 to all while `down`.
struct Receiver {
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(AtomicUsize::new(fail_first));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, f, d) = (calls.clone(), fail, down.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (c, f, d) = (c.clone(), f.clone(), d.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &c, &f, &d);
                });
            }
        });
        Receiver { url, calls, down }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls answered 2xx whose body is about `id` (a prediction or a video).
    fn delivered_for(&self, id: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.status < 300 && (c.body["id"] == id || c.body["data"]["id"] == id))
            .collect()
    }

    fn wait_event(&self, id: &str, done: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let started = Instant::now();
        loop {
            let calls = self.delivered_for(id);
            if done(&calls) {
                return calls;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no such webhook calls for {id}; received: {:#?}",
                self.calls()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn serve_one(
    stream: TcpStream,
    calls: &Mutex<Vec<Call>>,
    fail: &AtomicUsize,
    down: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0).min(1 << 20);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let verified = verify(&headers, &body);
    let status = if down.load(Ordering::SeqCst) {
        503
    } else if fail.load(Ordering::SeqCst) > 0 {
        fail.fetch_sub(1, Ordering::SeqCst);
        500
    } else {
        200
    };
    calls.lock().unwrap().push(Call {
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        raw: String::from_utf8_lossy(&body).into_owned(),
        verified,
        status,
    });
    let mut stream = stream;
    write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    stream.flush()
}

// ---------- the server ----------

struct Server {
    child: std::process::Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(data: &Path, extra: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_t2v"));
        command
            .args(["serve", "--model"])
            .arg(tiny_model())
            .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--data"])
            .arg(data)
            .args(["--webhook-secret", SECRET, "--webhook-retry-seconds", "0.2"])
            .args(extra)
            .env_remove("T2V_WEBHOOK_SECRET");
        let support::LaunchedServer { child, log, base } = support::launch_serve(command);
        let server = Server { child, base, log };
        wait_for("/health to answer 200", Duration::from_secs(60), || {
            let r = agent().get(&server.url("/health")).call().ok()?;
            (r.status() == 200).then_some(())
        });
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// (status, headers, body).
    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> (u16, HashMap<String, String>, Vec<u8>) {
        let mut req = agent().request(method, &self.url(path));
        for (k, v) in headers {
            req = req.set(k, v);
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
        let headers = response
            .headers_names()
            .into_iter()
            .filter_map(|n| response.header(&n).map(|v| (n.to_ascii_lowercase(), v.to_string())))
            .collect();
        let mut bytes = Vec::new();
        response.into_reader().take(64 << 20).read_to_end(&mut bytes).unwrap();
        (status, headers, bytes)
    }

    fn json(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> (u16, Value) {
        let (status, _, bytes) = self.send(method, path, headers, body);
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
        (status, v)
    }

    fn prediction(&self, id: &str) -> Value {
        let (status, v) = self.json("GET", &format!("/predictions/{id}"), &[], None);
        assert_eq!(status, 200, "{v}");
        v
    }

    fn wait_prediction(&self, id: &str, status: &str) -> Value {
        wait_for(&format!("prediction {id} to be {status}"), Duration::from_secs(120), || {
            let p = self.prediction(id);
            (p["status"] == status).then_some(p)
        })
    }

    fn job_count(&self) -> usize {
        let (_, v) = self.json("GET", "/v1/videos?limit=100", &[], None);
        v["data"].as_array().unwrap().len()
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

fn small_input(prompt: &str) -> Value {
    json!({"prompt": prompt, "num_inference_steps": 2, "num_frames": 4, "size": "32x32", "guidance_scale": 9})
}

fn is_mp4(bytes: &[u8]) -> bool {
    bytes.len() > 100 && &bytes[4..8] == b"ftyp"
}

#[test]
fn cog_client_with_a_webhook_receiver() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    // The receiver fails its first call: that call is retried.
    let receiver = Receiver::start(1);
    let server = Server::start(data.path(), &[]);

    // The schema as Cog publishes it.
    let (_, spec) = server.json("GET", "/openapi.json", &[], None);
    for name in ["Input", "Output", "PredictionRequest", "PredictionResponse", "Status", "WebhookEvent"] {
        assert!(spec["components"]["schemas"][name].is_object(), "{name} missing");
    }
    assert_eq!(spec["components"]["schemas"]["Input"]["properties"]["prompt"]["type"], "string");
    assert_eq!(spec["components"]["schemas"]["Output"]["format"], "uri");
    for path in ["/predictions", "/predictions/{prediction_id}", "/predictions/{prediction_id}/cancel"] {
        assert!(spec["paths"][path].is_object(), "{path} missing");
    }

    // 1. Synchronous POST: the finished prediction, every event to the webhook.
    let started = Instant::now();
    let (status, p) = server.json(
        "POST",
        "/predictions",
        &[],
        Some(&json!({"input": small_input("a red ball"), "webhook": receiver.url})),
    );
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    let pid = p["id"].as_str().unwrap().to_string();
    assert_eq!(pid.len(), 26, "Cog's id shape: {pid}");
    assert_eq!(p["input"]["prompt"], "a red ball");
    assert!(p["metrics"]["predict_time"].as_f64().unwrap() > 0.0, "{p}");
    for t in ["created_at", "started_at", "completed_at"] {
        assert!(p[t].as_str().is_some_and(|s| s.ends_with('Z') && s.len() == 24), "{t}: {p}");
    }
    assert!(p["logs"].as_str().unwrap().contains("succeeded"), "{p}");
    let output = p["output"].as_str().unwrap();
    assert!(output.starts_with(&server.base) && output.ends_with("/content"), "{output}");
    let (status, _, mp4) = server.send("GET", output.strip_prefix(&server.base).unwrap(), &[], None);
    assert!(status == 200 && is_mp4(&mp4), "the output is an MP4");
    eprintln!("sync prediction in {:.2}s", started.elapsed().as_secs_f64());

    // start (`starting`), logs and output (`processing`), completed (`succeeded`); the failed
    // first call arrives again later, so the order is not checked.
    let calls = receiver.wait_event(&pid, |c| {
        ["starting", "succeeded"].iter().all(|s| c.iter().any(|c| c.body["status"] == *s))
            && c.iter().any(|c| c.body["output"].is_string() && c.body["status"] == "processing")
    });
    let logs = calls.iter().filter(|c| c.body["status"] == "processing" && c.body["output"].is_null());
    assert!(
        logs.clone().any(|c| c.body["logs"].as_str().is_some_and(|l| l.contains("denoising: step"))),
        "a logs event with the step: {calls:?}"
    );
    let all = receiver.calls();
    assert!(all.iter().all(|c| c.verified), "every call is signed with the secret: {all:?}");
    // The failed first call came again, under the same webhook-id.
    let failed: Vec<&Call> = all.iter().filter(|c| c.status == 500).collect();
    assert_eq!(failed.len(), 1);
    assert!(all.iter().any(|c| c.status == 200 && c.id() == failed[0].id()), "the failed call was retried with its id");
    let signed_again = all.iter().filter(|c| c.id() == failed[0].id()).count();
    assert_eq!(signed_again, 2);
    verify_with_standardwebhooks(&all);

    // 2. respond-async with only the `completed` event.
    let body =
        json!({"input": small_input("a blue cube"), "webhook": receiver.url, "webhook_events_filter": ["completed"]});
    let (status, p) = server.json("POST", "/predictions", &[("Prefer", "respond-async")], Some(&body));
    assert_eq!((status, p["status"].as_str()), (202, Some("starting")), "{p}");
    let pid2 = p["id"].as_str().unwrap().to_string();
    let calls = receiver.wait_event(&pid2, |c| !c.is_empty());
    server.wait_prediction(&pid2, "succeeded");
    std::thread::sleep(Duration::from_millis(500));
    let calls2 = receiver.delivered_for(&pid2);
    assert_eq!(calls2.len(), 1, "only `completed`: {calls2:?}");
    assert_eq!((calls[0].body["status"].as_str(), calls[0].verified), (Some("succeeded"), true));

    // 3. PUT is idempotent: the same id twice makes one job.
    let before = server.job_count();
    let body = json!({"input": small_input("a green cone")});
    let (status, first) = server.json("PUT", "/predictions/client-id-1", &[("Prefer", "respond-async")], Some(&body));
    assert_eq!(status, 202, "{first}");
    let (status, again) = server.json("PUT", "/predictions/client-id-1", &[], Some(&body));
    assert_eq!((status, again["status"].as_str()), (200, Some("succeeded")), "{again}");
    assert_eq!((again["id"].as_str(), again["video_id"].clone()), (Some("client-id-1"), first["video_id"].clone()));
    assert_eq!(server.job_count(), before + 1, "the second PUT ran nothing");
    let (status, _) = server.json("PUT", "/predictions/a%2Fb", &[], Some(&body));
    assert_eq!(status, 400);

    // 4. Cancel: a queued prediction at once; a running one at its next step.
    let long = json!({"input": {"prompt": "a long one", "num_inference_steps": 400, "num_frames": 16, "size": "32x32", "scheduler": "ddim"},
        "webhook": receiver.url, "webhook_events_filter": ["completed"]});
    let (status, _) = server.json("PUT", "/predictions/runs-long", &[("Prefer", "respond-async")], Some(&long));
    assert_eq!(status, 202);
    let (_, _) = server.json(
        "PUT",
        "/predictions/waits",
        &[("Prefer", "respond-async")],
        Some(&json!({"input": small_input("queued")})),
    );
    server.wait_prediction("runs-long", "processing");
    let (status, c) = server.json("POST", "/predictions/waits/cancel", &[], None);
    assert_eq!((status, c["status"].as_str()), (200, Some("canceled")), "{c}");
    let (status, _) = server.json("POST", "/predictions/runs-long/cancel", &[], None);
    assert_eq!(status, 200);
    let p = server.wait_prediction("runs-long", "canceled");
    assert!(p["output"].is_null(), "{p}");
    let calls = receiver.wait_event("runs-long", |c| !c.is_empty());
    assert_eq!(calls[0].body["status"], "canceled");
    let (status, _) = server.json("POST", "/predictions/nobody/cancel", &[], None);
    assert_eq!(status, 404);
    let (status, _) = server.json("GET", "/predictions/nobody", &[], None);
    assert_eq!(status, 404);

    // 5. Targets a server must not call: refused when the request arrives.
    for bad in ["http://0.0.0.0:9/x", "http://[::]:9/x", "http://224.0.0.1/x", "ftp://127.0.0.1/x", "not a url"] {
        let (status, e) =
            server.json("POST", "/predictions", &[], Some(&json!({"input": small_input("x"), "webhook": bad})));
        assert_eq!((status, e["error"]["param"].as_str()), (400, Some("webhook")), "{bad}: {e}");
    }
    let (status, e) = server.json(
        "POST",
        "/predictions",
        &[],
        Some(&json!({"input": small_input("x"), "webhook_events_filter": ["done"]})),
    );
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("webhook_events_filter")), "{e}");
    let (status, e) =
        server.json("POST", "/predictions", &[], Some(&json!({"input": {"prompt": "x", "num_frames": 0}})));
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("num_frames")), "{e}");

    let (_, info) = server.json("GET", "/v1/t2v/info", &[], None);
    assert_eq!(info["webhooks"]["pending"], 0, "{info}\n{}", server.log());
    eprintln!("webhook calls: {} ({} failed once, retried)", receiver.calls().len(), failed.len());
}

/// The calls checked again by the specification's own Python library (`standardwebhooks`), when
/// the test Python has it (CI's tool venv does): each verifies, and none with its body changed.
fn verify_with_standardwebhooks(calls: &[Call]) {
    let Some(python) = t2v_testkit::python_with("standardwebhooks", "pip install standardwebhooks") else { return };
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
calls = json.load(sys.stdin)
wh = Webhook(sys.argv[1])
for c in calls:
    wh.verify(c["body"], c["headers"])
    try:
        wh.verify(c["body"] + " ", c["headers"])
        sys.exit("a changed body verified")
    except WebhookVerificationError:
        pass
print(len(calls))
"#;
    let list: Vec<Value> = calls.iter().map(|c| json!({"headers": c.headers, "body": c.raw})).collect();
    let mut child = Command::new(python)
        .args(["-c", script, SECRET])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(Value::Array(list).to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "standardwebhooks refused a call: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), calls.len().to_string());
    eprintln!("standardwebhooks verified {} calls", calls.len());
}

/// A webhook call the receiver could not take before the server was killed is made after the
/// restart, from the store, under the same id.
#[test]
fn webhook_calls_survive_a_restart() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let receiver = Receiver::start(0);
    receiver.down.store(true, Ordering::SeqCst);
    let server = Server::start(data.path(), &["--webhook-max-attempts", "30"]);
    let body =
        json!({"input": small_input("survives"), "webhook": receiver.url, "webhook_events_filter": ["completed"]});
    let (status, p) = server.json("PUT", "/predictions/survivor", &[("Prefer", "respond-async")], Some(&body));
    assert_eq!(status, 202, "{p}");
    server.wait_prediction("survivor", "succeeded");
    let refused = wait_for("a refused call", Duration::from_secs(30), || {
        receiver.calls().into_iter().find(|c| c.status == 503 && c.body["id"] == "survivor")
    });
    drop(server); // SIGKILL
    receiver.down.store(false, Ordering::SeqCst);
    let server = Server::start(data.path(), &[]);
    let calls = receiver.wait_event("survivor", |c| !c.is_empty());
    assert_eq!((calls[0].id(), calls[0].verified), (refused.id(), true));
    assert_eq!(calls[0].body["status"], "succeeded");
    assert!(server.log().contains("ready"), "{}", server.log());
}

/// The same on PostgreSQL: the calls are rows of the shared queue.
#[test]
fn webhook_calls_survive_a_restart_on_postgres() {
    let _turn = serial();
    let Some(cluster) = support::postgres::cluster_or_skip() else { return };
    let data = TempDir::new().unwrap();
    let receiver = Receiver::start(0);
    receiver.down.store(true, Ordering::SeqCst);
    let queue = ["--queue", cluster.url.as_str()];
    let server = Server::start(data.path(), &[&queue[..], &["--webhook-max-attempts", "30"]].concat());
    let body =
        json!({"input": small_input("on postgres"), "webhook": receiver.url, "webhook_events_filter": ["completed"]});
    let (status, p) = server.json("PUT", "/predictions/pg-survivor", &[("Prefer", "respond-async")], Some(&body));
    assert_eq!(status, 202, "{p}");
    // PUT again through the shared store: the same prediction.
    let (_, again) = server.json("PUT", "/predictions/pg-survivor", &[("Prefer", "respond-async")], Some(&body));
    assert_eq!(again["video_id"], p["video_id"]);
    server.wait_prediction("pg-survivor", "succeeded");
    wait_for("a refused call", Duration::from_secs(30), || {
        receiver.calls().into_iter().find(|c| c.status == 503 && c.body["id"] == "pg-survivor")
    });
    drop(server);
    receiver.down.store(false, Ordering::SeqCst);
    let _server = Server::start(data.path(), &queue);
    let calls = receiver.wait_event("pg-survivor", |c| !c.is_empty());
    assert!(calls[0].verified && calls[0].body["status"] == "succeeded");
}

fn curl() -> Option<PathBuf> {
    let found = Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        t2v_testkit::skip("curl is not installed: apt-get install curl");
        return None;
    }
    Some(PathBuf::from("curl"))
}

/// Runs curl: (status, headers, body).
fn run_curl(curl: &Path, args: &[&str]) -> (u16, String, Vec<u8>) {
    let dir = TempDir::new().unwrap();
    let (headers, body) = (dir.path().join("headers"), dir.path().join("body"));
    let o = Command::new(curl)
        .args(["-sS", "--max-time", "120", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    let status = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    (status, std::fs::read_to_string(&headers).unwrap().to_ascii_lowercase(), std::fs::read(&body).unwrap())
}

#[test]
fn curl_sync_idempotency_and_video_webhooks() {
    let _turn = serial();
    let Some(curl) = curl() else { return };
    let data = TempDir::new().unwrap();
    let receiver = Receiver::start(0);
    let server = Server::start(data.path(), &["--api-key", "k"]);
    let auth = "Authorization: Bearer k";
    let json_type = "Content-Type: application/json";
    let model = tiny_model().file_name().unwrap().to_string_lossy().into_owned();

    // /v1/videos/sync in vLLM-Omni's spelling: the MP4 itself.
    let body = json!({"prompt": "a corgi", "model": model, "seconds": "1", "fps": 4, "size": "32x32",
        "extra_params": {"num_inference_steps": 2, "guidance_scale": 9}, "user": "me", "boundary_ratio": 0.8});
    let url = server.url("/v1/videos/sync");
    let (status, headers, mp4) = run_curl(&curl, &["-H", auth, "-H", json_type, "-d", &body.to_string(), &url]);
    assert_eq!(status, 200, "{headers}{}", String::from_utf8_lossy(&mp4));
    assert!(is_mp4(&mp4) && headers.contains("content-type: video/mp4"), "{headers}");
    assert!(headers.contains("t2v-ignored-fields: boundary_ratio, user"), "{headers}");
    let id = headers.lines().find_map(|l| l.strip_prefix("t2v-video-id: ")).unwrap().trim().to_string();
    let (_, v) = server.json("GET", &format!("/v1/videos/{id}"), &[("Authorization", "Bearer k")], None);
    assert_eq!((v["settings"]["steps"].as_u64(), v["settings"]["num_frames"].as_u64()), (Some(2), Some(4)), "{v}");
    // `seconds` as a number; a model that is not this one; no key.
    let body = json!({"prompt": "x", "seconds": 1, "fps": 2, "num_inference_steps": 2, "size": "32x32"});
    let (status, _, mp4) = run_curl(&curl, &["-H", auth, "-H", json_type, "-d", &body.to_string(), &url]);
    assert!(status == 200 && is_mp4(&mp4));
    let (status, _, e) =
        run_curl(&curl, &["-H", auth, "-H", json_type, "-d", r#"{"prompt": "x", "model": "wan2.2"}"#, &url]);
    let e: Value = serde_json::from_slice(&e).unwrap();
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("model")), "{e}");
    let (status, _, _) = run_curl(&curl, &["-H", json_type, "-d", r#"{"prompt": "x"}"#, &url]);
    assert_eq!(status, 401);
    // What the worker would refuse is refused at once.
    let (status, _, e) = run_curl(
        &curl,
        &[
            "-H",
            auth,
            "-H",
            json_type,
            "-d",
            r#"{"prompt": "x", "num_inference_steps": 1000, "num_frames": 1}"#,
            &server.url("/v1/videos"),
        ],
    );
    let e: Value = serde_json::from_slice(&e).unwrap();
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("num_inference_steps")), "{e}");
    eprintln!("DPM-Solver, 1000 steps: {}", e["error"]["message"]);

    // Idempotency-Key: the same request twice is one video; another request with the key a 422.
    let videos = server.url("/v1/videos");
    let body =
        json!({"prompt": "once", "num_inference_steps": 2, "num_frames": 4, "size": "32x32", "webhook": receiver.url});
    let key = "Idempotency-Key: 7f1c2a";
    let (s1, h1, b1) = run_curl(&curl, &["-H", auth, "-H", json_type, "-H", key, "-d", &body.to_string(), &videos]);
    let (s2, h2, b2) = run_curl(&curl, &["-H", auth, "-H", json_type, "-H", key, "-d", &body.to_string(), &videos]);
    let (v1, v2): (Value, Value) = (serde_json::from_slice(&b1).unwrap(), serde_json::from_slice(&b2).unwrap());
    assert_eq!((s1, s2), (200, 200), "{v1} {v2}");
    assert_eq!(v1["id"], v2["id"]);
    assert!(!h1.contains("idempotent-replayed") && h2.contains("idempotent-replayed: true"), "{h2}");
    let other = json!({"prompt": "twice", "num_inference_steps": 2, "num_frames": 4, "size": "32x32"});
    let (s3, _, b3) = run_curl(&curl, &["-H", auth, "-H", json_type, "-H", key, "-d", &other.to_string(), &videos]);
    let e: Value = serde_json::from_slice(&b3).unwrap();
    assert_eq!((s3, e["error"]["code"].as_str()), (422, Some("idempotency_key_reused")), "{e}");

    // The video's webhook: OpenAI's event, signed.
    let vid = v1["id"].as_str().unwrap();
    let calls = receiver.wait_event(vid, |c| !c.is_empty());
    assert_eq!((calls[0].body["type"].as_str(), calls[0].verified), (Some("video.completed"), true), "{:?}", calls[0]);
    assert_eq!(calls[0].body["video"]["status"], "completed");
    let (_, list) = server.json("GET", "/v1/loras", &[("Authorization", "Bearer k")], None);
    assert_eq!(list, json!({"object": "list", "data": []}));
}

/// A LoRA of `--lora-dir` picked by name (vLLM-Omni's `lora`) gives the frames the command line
/// gives with `--lora FILE:WEIGHT` (the LoRA fixture's first run), and others than without it.
#[test]
fn loras_by_name() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let loras = TempDir::new().unwrap();
    let fixture = tiny_model().join("lora/pytorch_lora_weights.safetensors");
    std::fs::copy(&fixture, loras.path().join("yellow.safetensors")).unwrap();
    std::fs::write(loras.path().join("broken.safetensors"), b"not a safetensors file").unwrap();
    let dir = loras.path().to_str().unwrap();
    let server = Server::start(data.path(), &["--lora-dir", dir]);
    let (_, list) = server.json("GET", "/v1/loras", &[], None);
    assert_eq!(list, json!({"object": "list", "data": [{"id": "yellow", "object": "lora"}]}), "{}", server.log());

    let run = json!({"prompt": "a yellow ball rolling across a meadow", "seed": 3, "num_inference_steps": 4,
        "guidance_scale": 9.0, "scheduler": "dpm", "num_frames": 6, "size": "32x32"});
    let sync = |extra: Value| {
        let mut body = run.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, headers, bytes) = server.send("POST", "/v1/videos/sync", &[], Some(&body));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        (headers["t2v-video-id"].clone(), bytes)
    };
    let (id, with) = sync(json!({"lora": {"name": "yellow", "scale": 1.0}}));
    let (_, without) = sync(json!({}));
    let out = data.path().join("cli.mp4");
    let o = support::t2v(&[
        "generate",
        "a yellow ball rolling across a meadow",
        "--model",
        tiny_model().to_str().unwrap(),
        "--seed",
        "3",
        "--steps",
        "4",
        "--guidance-scale",
        "9",
        "--scheduler",
        "dpm",
        "--num-frames",
        "6",
        "--height",
        "32",
        "--width",
        "32",
        "-q",
        "--lora",
        &format!("{}:1.0", fixture.display()),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", support::stderr(&o));
    let cli = std::fs::read(&out).unwrap();
    assert!(mp4_mdat(&with).len() > 200);
    assert!(mp4_mdat(&with) == mp4_mdat(&cli), "the served LoRA run differs from the command line's");
    assert!(mp4_mdat(&with) != mp4_mdat(&without), "the LoRA changed nothing");

    // The video object names the LoRA by its file, never by the server's path.
    let (_, v) = server.json("GET", &format!("/v1/videos/{id}"), &[], None);
    assert_eq!(v["settings"]["loras"][0]["path"], "yellow.safetensors", "{v}");
    assert!(!v.to_string().contains(dir), "{v}");
    for bad in [
        json!("green"),
        json!({"name": "yellow", "path": "/etc/passwd"}),
        json!({"name": "broken"}),
        json!({"name": "yellow", "scale": "much"}),
    ] {
        let mut body = run.clone();
        body["lora"] = bad.clone();
        let (status, e) = server.json("POST", "/v1/videos", &[], Some(&body));
        assert_eq!((status, e["error"]["param"].as_str()), (400, Some("lora")), "{bad}: {e}");
    }
}
