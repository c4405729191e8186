//! `t2v serve` under attack (issue 26): the real binary on the tiny fixture model, on 127.0.0.1 and
//! a free port, under an address-space limit as a container would set it (RLIMIT_AS), fed what
//! killed or drove it before: uploads declaring enormous frames, big concurrent uploads, requests
//! from other sites, slow clients, jobs past any budget, edge values; then a soak of all of it
//! mixed with normal traffic and SIGKILLs, after which every accepted job has ended with a reason,
//! the database is intact and no stray file is left.
//!
//! Every loop is bounded in count and in time.

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{serial, wait_for};
use tempfile::TempDir;

/// The server's address-space limit: the 8 GiB of the report.
const MEMORY_LIMIT: u64 = 8 << 30;

// ---------- the server ----------

struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

#[derive(Clone, Copy)]
struct Limits {
    address_space: u64,
    open_files: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { address_space: MEMORY_LIMIT, open_files: None }
    }
}

impl Server {
    fn start(data: &Path, extra: &[&str]) -> Server {
        Server::start_with(data, extra, Limits::default())
    }

    fn start_with(data: &Path, extra: &[&str], limits: Limits) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_t2v"));
        command
            .args(["serve", "--model"])
            .arg(common::model_dir("tiny-t2v"))
            .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--data"])
            .arg(data)
            .args(extra);
        // SAFETY: between fork and exec only setrlimit runs, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let set = |resource, value: u64| {
                    let limit = libc::rlimit { rlim_cur: value as libc::rlim_t, rlim_max: value as libc::rlim_t };
                    if libc::setrlimit(resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                };
                set(libc::RLIMIT_AS, limits.address_space)?;
                if let Some(n) = limits.open_files {
                    set(libc::RLIMIT_NOFILE, n)?;
                }
                Ok(())
            });
        }
        let launched = support::launch_serve(command);
        let port = launched.port();
        let support::LaunchedServer { child, log, .. } = launched;
        let server = Server { child, port, log };
        wait_for("/health to answer 200", Duration::from_secs(60), || {
            server.try_call("GET", "/health", &[], None).is_some_and(|r| r.status == 200).then_some(())
        });
        server
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// One request on its own connection, every header as given (`Host` added unless given).
    fn try_call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Option<Reply> {
        raw_request(self.port, method, path, headers, body, Duration::from_secs(60))
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
        self.try_call(method, path, headers, body)
            .unwrap_or_else(|| panic!("{method} {path}: no answer; log:\n{}", self.log()))
    }

    fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], None)
    }

    fn post_json(&self, body: &Value) -> Reply {
        self.call("POST", "/v1/videos", &[("Content-Type", "application/json")], Some(body.to_string().as_bytes()))
    }

    fn alive(&self) -> bool {
        self.try_call("GET", "/health", &[], None).is_some_and(|r| r.status == 200)
    }

    /// (resident, peak resident) memory in MiB, from /proc.
    fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn sigterm(mut self) -> i32 {
        // SAFETY: signalling a child process this test started and still owns.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status =
            wait_for("the server to exit after SIGTERM", Duration::from_secs(90), || self.child.try_wait().unwrap());
        status.code().unwrap_or(-1)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------- HTTP by hand: every header under the test's control ----------

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {}", self.status, self.text()))
    }

    /// The error of a 4xx, checking its shape: `{"error": {"message", "type", "param", "code"}}`.
    fn error(&self) -> Value {
        assert!(
            self.header("content-type").is_some_and(|t| t.starts_with("application/json")),
            "{}: not JSON: {:?} {}",
            self.status,
            self.headers,
            self.text()
        );
        let v = self.json();
        let e = v["error"].clone();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{}: no message: {v}", self.status);
        assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{}: {v}", self.status);
        e
    }
}

fn raw_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    limit: Duration,
) -> Option<Reply> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(limit)).ok()?;
    stream.set_write_timeout(Some(limit)).ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head += &format!("Host: 127.0.0.1:{port}\r\n");
    }
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    if let Some(b) = body {
        head += &format!("Content-Length: {}\r\n", b.len());
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).ok()?;
    if let Some(b) = body {
        // A server that answers early (413) may close before all is sent: read what it said.
        let _ = stream.write_all(b);
    }
    let mut raw = Vec::new();
    let _ = stream.take(64 << 20).read_to_end(&mut raw);
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Some(Reply { status, headers, body })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
    out
}

fn multipart(fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> (String, Vec<u8>) {
    let boundary = "t2v-hostile-boundary-QX7d0";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    if let Some((file_name, bytes)) = file {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"input_reference\"; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn upload(server: &Server, fields: &[(&str, &str)], file: (&str, &[u8])) -> Reply {
    let (ct, body) = multipart(fields, Some(file));
    server.call("POST", "/v1/videos", &[("Content-Type", &ct)], Some(&body))
}

// ---------- hostile files ----------

/// A GIF whose screen is `w`×`h` with `frames` 1×1 frames: a few dozen bytes.
fn gif_declaring(w: u16, h: u16, frames: usize, frame_size: (u16, u16)) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&w.to_le_bytes());
    g.extend_from_slice(&h.to_le_bytes());
    g.extend_from_slice(&[0x80, 0, 0]); // a global palette of 2 colours
    g.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    for _ in 0..frames {
        g.extend_from_slice(&[0x21, 0xF9, 4, 0, 10, 0, 0, 0]); // 100 ms
        g.push(0x2C);
        g.extend_from_slice(&[0, 0, 0, 0]);
        g.extend_from_slice(&frame_size.0.to_le_bytes());
        g.extend_from_slice(&frame_size.1.to_le_bytes());
        g.push(0);
        // LZW, minimum code size 2: clear, one pixel of colour 0, end.
        g.extend_from_slice(&[2, 2, 0x44, 0x01, 0]);
    }
    g.push(0x3B);
    g
}

/// A `.npy` header announcing (frames, h, w, 3) uint8, without the data.
fn npy_declaring(frames: usize, h: usize, w: usize) -> Vec<u8> {
    t2v::video::npy_header_of("|u1", &[frames, h, w, 3])
}

/// The fixture MP4 with its `stsz` box declaring four billion frames of one size.
fn mp4_declaring_four_billion_frames() -> Vec<u8> {
    let mut mp4 = std::fs::read(common::model_dir("tiny-t2v").join("v2v/input.0.mp4")).unwrap();
    let at = mp4.windows(4).position(|w| w == b"stsz").expect("an stsz box");
    // After the type: version and flags, sample size, sample count.
    mp4[at + 8..at + 12].copy_from_slice(&100u32.to_be_bytes());
    mp4[at + 12..at + 16].copy_from_slice(&u32::MAX.to_be_bytes());
    mp4
}

/// An H.264 sequence parameter set (baseline profile, 4:2:0, frames only) declaring `width_mbs` ×
/// `height_mbs` macroblocks (16 pixels each), with its emulation-prevention bytes.
fn sps_declaring(width_mbs: u32, height_mbs: u32) -> Vec<u8> {
    let mut bits: Vec<bool> = Vec::new();
    let mut put = |value: u32, n: u32, bits: &mut Vec<bool>| (0..n).rev().for_each(|i| bits.push(value >> i & 1 == 1));
    let ue = |v: u32, bits: &mut Vec<bool>, put: &mut dyn FnMut(u32, u32, &mut Vec<bool>)| {
        let n = 32 - (v + 1).leading_zeros();
        put(0, n - 1, bits);
        put(v + 1, n, bits);
    };
    put(66, 8, &mut bits); // profile_idc: baseline
    put(0, 8, &mut bits); // constraint flags
    put(62, 8, &mut bits); // level_idc 6.2: the largest frames a level allows (139,264 macroblocks)
    ue(0, &mut bits, &mut put); // seq_parameter_set_id
    ue(0, &mut bits, &mut put); // log2_max_frame_num_minus4
    ue(2, &mut bits, &mut put); // pic_order_cnt_type
    ue(1, &mut bits, &mut put); // max_num_ref_frames
    put(0, 1, &mut bits); // gaps_in_frame_num_value_allowed_flag
    ue(width_mbs - 1, &mut bits, &mut put);
    ue(height_mbs - 1, &mut bits, &mut put);
    put(0b110, 3, &mut bits); // frame_mbs_only, direct_8x8_inference, no cropping
    put(0, 1, &mut bits); // no VUI
    put(1, 1, &mut bits); // rbsp_stop_one_bit
    while !bits.len().is_multiple_of(8) {
        bits.push(false);
    }
    let rbsp: Vec<u8> = bits.chunks(8).map(|b| b.iter().fold(0u8, |a, &x| a << 1 | x as u8)).collect();
    let mut nal = vec![0x67];
    for byte in rbsp {
        if nal.len() >= 2 && nal[nal.len() - 2..] == [0, 0] && byte <= 3 {
            nal.push(3);
        }
        nal.push(byte);
    }
    nal
}

/// The fixture MP4 with the SPS in its `avcC` replaced by [`sps_declaring`]'s: the boxes around
/// it resized and the chunk offsets moved, so that everything but the declared frame size is
/// the fixture's.
fn mp4_with_sps_declaring(width_mbs: u32, height_mbs: u32) -> Vec<u8> {
    let mut mp4 = std::fs::read(common::model_dir("tiny-t2v").join("v2v/input.0.mp4")).unwrap();
    let avcc = mp4.windows(4).position(|w| w == b"avcC").expect("an avcC box") - 4;
    // avcC: size, type, version, profile, compatibility, level, length size, SPS count, SPS length.
    assert_eq!(mp4[avcc + 13] & 0x1f, 1, "one SPS");
    let old_len = u16::from_be_bytes([mp4[avcc + 14], mp4[avcc + 15]]) as usize;
    let sps = sps_declaring(width_mbs, height_mbs);
    let delta = sps.len() as i64 - old_len as i64;
    mp4.splice(avcc + 16..avcc + 16 + old_len, sps.iter().copied());
    mp4[avcc + 14..avcc + 16].copy_from_slice(&(sps.len() as u16).to_be_bytes());
    let grow = |mp4: &mut Vec<u8>, at: usize| {
        let size = u32::from_be_bytes(mp4[at..at + 4].try_into().unwrap()) as i64 + delta;
        mp4[at..at + 4].copy_from_slice(&(size as u32).to_be_bytes());
    };
    grow(&mut mp4, avcc);
    for parent in [b"avc1", b"stsd", b"stbl", b"minf", b"mdia", b"trak", b"moov"] {
        // The nearest box of that type before avcC is the one that holds it.
        let at = mp4[..avcc].windows(4).rposition(|w| w == parent).expect("the boxes around avcC") - 4;
        grow(&mut mp4, at);
    }
    // moov comes before mdat here: every chunk offset moves by the change.
    let stco = mp4.windows(4).position(|w| w == b"stco").expect("an stco box") + 4;
    let count = u32::from_be_bytes(mp4[stco + 4..stco + 8].try_into().unwrap()) as usize;
    for i in 0..count {
        let at = stco + 8 + 4 * i;
        let offset = u32::from_be_bytes(mp4[at..at + 4].try_into().unwrap()) as i64 + delta;
        mp4[at..at + 4].copy_from_slice(&(offset as u32).to_be_bytes());
    }
    mp4
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

// ---------- the cases ----------

#[test]
fn uploads_are_decoded_within_a_budget() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let videos = data.path().join("videos");
    // What a dead server left: an input of no job, a staged result, the encoder's partial file
    // beside it, an upload and an input being stored.
    std::fs::create_dir_all(&videos).unwrap();
    let orphan = format!("video_{}", "ab".repeat(16));
    for name in [
        format!("{orphan}.input.gif"),
        format!("{orphan}.mp4"),
        format!(".staged.{orphan}.a1.host-7-w0.mp4"),
        format!("..staged.{orphan}.a1.host-7-w0.mp4.partial-4242-x1y2"),
        format!(".upload.{orphan}.partial"),
        format!(".{orphan}.input.partial"),
    ] {
        std::fs::write(videos.join(name), b"left over").unwrap();
    }
    let server = Server::start(data.path(), &[]);
    assert_eq!(files_in(&videos), Vec::<String>::new(), "what the dead server left stays");

    let fields = [("prompt", "a cat"), ("size", "32x32"), ("num_inference_steps", "2")];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a 65535x65535 GIF screen", gif_declaring(65535, 65535, 1, (1, 1)), "its screen is 65535x65535 pixels"),
        ("a 16384x16384 GIF screen", gif_declaring(16384, 16384, 2, (1, 1)), "16384x16384 pixels, more than the"),
        ("a 65535x65535 GIF frame on a 1x1 screen", gif_declaring(1, 1, 1, (65535, 65535)), "declares a rectangle"),
        ("a .npy of 8192x8192 frames", npy_declaring(2, 8192, 8192), "8192x8192 pixels, more than the"),
        ("an MP4 declaring 4 billion frames", mp4_declaring_four_billion_frames(), "declares 4294967295 frames"),
        (
            "an MP4 whose SPS declares 8192x4352 frames",
            mp4_with_sps_declaring(512, 272),
            "its H.264 frame size is 8192x4352 pixels, more than the",
        ),
    ];
    for (what, file, expected) in &cases {
        let name = if file.starts_with(b"GIF") {
            "x.gif"
        } else if file.starts_with(b"\x93NUMPY") {
            "x.npy"
        } else {
            "x.mp4"
        };
        let started = Instant::now();
        let r = upload(&server, &fields, (name, file));
        let e = if r.status == 400 { r.error() } else { panic!("{what}: {} {}", r.status, r.text()) };
        assert_eq!(e["param"], "input_reference", "{what}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(expected), "{what}: {message}");
        assert!(!message.contains(&data.path().display().to_string()), "{what}: a server path: {message}");
        assert!(started.elapsed() < Duration::from_secs(10), "{what}: took {:?}", started.elapsed());
        assert!(server.alive(), "{what}: the server died; log:\n{}", server.log());
    }
    // Frames past the budget are not decoded, even when asked for (here from frame 4095 on).
    let long = gif_declaring(8, 8, 5000, (1, 1));
    let mut asked = fields.to_vec();
    asked.extend([("video_start", "4095"), ("num_frames", "2")]);
    let r = upload(&server, &asked, ("long.gif", &long));
    assert_eq!(r.status, 400, "{}", r.text());
    let message = r.error()["message"].as_str().unwrap().to_string();
    assert!(message.contains("more than the 4096 frames"), "{message}");
    let (_, peak) = server.memory_mib();
    println!("peak memory after the hostile files: {peak:.0} MiB");
    assert!(peak < 1024.0, "decoding the hostile files took {peak:.0} MiB");
    assert_eq!(files_in(&videos), Vec::<String>::new(), "a refused upload left files");

    // 12 concurrent 40 MB uploads: streamed to disk, not held in memory.
    let (rss_before, _) = server.memory_mib();
    let big = vec![7u8; 40 << 20];
    let (ct, body) = multipart(&fields, Some(("big.mp4", &big)));
    let body = Arc::new(body);
    let port = server.port;
    let sampler_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pid = server.child.id();
    let sampler = {
        let stop = sampler_stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0f64;
            for _ in 0..6000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kb) = status.lines().find_map(|l| l.strip_prefix("VmRSS:")) {
                    peak = peak.max(kb.trim().trim_end_matches("kB").trim().parse::<f64>().unwrap_or(0.0) / 1024.0);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let (ct, body) = (ct.clone(), body.clone());
            std::thread::spawn(move || {
                raw_request(port, "POST", "/v1/videos", &[("Content-Type", &ct)], Some(&body), Duration::from_secs(120))
                    .map(|r| r.status)
            })
        })
        .collect();
    let statuses: Vec<Option<u16>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    sampler_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    let (rss_after, _) = server.memory_mib();
    println!("12 x 40 MB uploads: RSS {rss_before:.0} MiB before, {peak:.0} MiB at most, {rss_after:.0} MiB after");
    assert!(statuses.iter().all(|s| *s == Some(400)), "{statuses:?}");
    assert!(peak - rss_before < 200.0, "the uploads took {:.0} MiB", peak - rss_before);
    assert_eq!(files_in(&videos), Vec::<String>::new(), "the refused uploads left files");
}

#[test]
fn jobs_and_the_queue_have_caps() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let server = Server::start(data.path(), &[]);
    let info = server.get("/v1/t2v/info").json();
    // The tiny model's native 32x32 at 64 frames and 100 steps.
    let cap = 32 * 32 * 64 * 100;
    assert_eq!(info["limits"]["max_job_cost"], cap, "{info}");
    for body in [
        json!({"prompt": "x", "size": "2048x2048", "num_frames": 256, "num_inference_steps": 1000}),
        json!({"prompt": "x", "num_frames": 64, "num_inference_steps": 101}),
    ] {
        let r = server.post_json(&body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.error();
        assert_eq!(e["code"], "job_too_large");
        assert!(e["message"].as_str().unwrap().contains(&cap.to_string()), "the limit is said: {e}");
    }
    assert_eq!(server.post_json(&json!({"prompt": "x", "num_frames": 64, "num_inference_steps": 100})).status, 200);
    drop(server);

    // The queue: 3 at most; the 4th waiting job is refused with 429 and Retry-After.
    let data = TempDir::new().unwrap();
    let server = Server::start(data.path(), &["--max-queued", "3", "--max-job-cost", "100000000000"]);
    let long =
        json!({"prompt": "x", "num_frames": 16, "num_inference_steps": 500, "scheduler": "ddim", "size": "64x64"});
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..10 {
        let r = server.post_json(&long);
        match r.status {
            200 => accepted += 1,
            429 => {
                refused = Some(r);
                break;
            }
            other => panic!("{other}: {}", r.text()),
        }
    }
    let r = refused.expect("a full queue refuses");
    assert!((3..=4).contains(&accepted), "{accepted} accepted");
    assert!(r.header("retry-after").and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s >= 1), "{:?}", r.headers);
    let e = r.error();
    assert_eq!(e["code"], "queue_full");
    assert!(e["message"].as_str().unwrap().contains("--max-queued 3"), "{e}");
}

#[test]
fn other_sites_cannot_drive_it() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let server = Server::start(data.path(), &[]);
    let own = format!("http://{}", server.host());
    let job = json!({"prompt": "x", "num_frames": 2, "num_inference_steps": 1, "size": "32x32"}).to_string();
    let (form_ct, form) = multipart(&[("prompt", "x"), ("num_inference_steps", "1000")], None);

    // (what, headers, body, the status expected)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<&'a [u8]>, u16);
    let refused: Vec<Case> = vec![
        // A plain HTML form on another site (multipart) and `fetch` with a text/plain body.
        ("form post", vec![("Content-Type", &form_ct), ("Origin", "http://evil.example")], Some(form.as_slice()), 403),
        (
            "cross-site fetch",
            vec![("Content-Type", "text/plain"), ("Origin", "http://evil.example"), ("Sec-Fetch-Site", "cross-site")],
            Some(job.as_bytes()),
            403,
        ),
        ("a text/plain body", vec![("Content-Type", "text/plain")], Some(job.as_bytes()), 415),
        ("no Content-Type", vec![], Some(job.as_bytes()), 415),
        ("form-urlencoded", vec![("Content-Type", "application/x-www-form-urlencoded")], Some(&b"prompt=x"[..]), 415),
        (
            "Sec-Fetch-Site alone",
            vec![("Content-Type", "application/json"), ("Sec-Fetch-Site", "same-site")],
            Some(job.as_bytes()),
            403,
        ),
        ("an opaque origin", vec![("Content-Type", "application/json"), ("Origin", "null")], Some(job.as_bytes()), 403),
        (
            "DNS rebinding",
            vec![("Content-Type", "application/json"), ("Host", "evil.example:80")],
            Some(job.as_bytes()),
            403,
        ),
    ];
    for (what, headers, body, status) in &refused {
        let r = server.call("POST", "/v1/videos", headers, *body);
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        r.error();
    }
    // Reading through a rebound name is refused too.
    let r = server.call("GET", "/v1/videos", &[("Host", "attacker.example")], None);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        server.get("/v1/videos").json()["data"].as_array().unwrap().len(),
        0,
        "a cross-site request queued a job"
    );

    // The server's own page, and clients without a browser, still can.
    let r = server.call(
        "POST",
        "/v1/videos",
        &[("Content-Type", "application/json"), ("Origin", &own), ("Sec-Fetch-Site", "same-origin")],
        Some(job.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        server.post_json(&json!({"prompt": "x", "num_frames": 2, "num_inference_steps": 1, "size": "32x32"})).status,
        200
    );
    let r = server.call("DELETE", &format!("/v1/videos/{id}"), &[("Origin", "http://evil.example")], None);
    assert_eq!(r.status, 403);
    let r = server.call("POST", &format!("/v1/videos/{id}/cancel"), &[("Sec-Fetch-Site", "cross-site")], None);
    assert_eq!(r.status, 403);
    for host in ["localhost", &format!("localhost:{}", server.port), "[::1]"] {
        assert_eq!(server.call("GET", "/health", &[("Host", host)], None).status, 200, "{host}");
    }

    // The page fills its form from a link but never sends it by itself.
    let js = server.get("/app.js").text();
    assert!(js.contains("query.get(name)"), "the link still fills the form");
    assert!(!js.contains("get(\"submit\")"), "the page submits from its URL");
}

/// Opens `n` connections that send part of a request head and then nothing.
fn slow_clients(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHo");
            Some(s)
        })
        .collect()
}

/// Whether the server closed `s` (EOF or reset) within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn slow_clients_cannot_starve_the_others() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    // 256 files: room for 96 connections; 300 slow clients would have taken all of them.
    let limits = Limits { open_files: Some(256), ..Limits::default() };
    let server = Server::start_with(data.path(), &["--header-timeout", "2"], limits);
    let started = Instant::now();
    let mut slow = slow_clients(server.port, 300);
    assert!(slow.len() >= 200, "only {} connections opened", slow.len());
    // /health answers while they hang on (at the latest once the header timeout frees them).
    let answered = wait_for("/health among slow clients", Duration::from_secs(8), || {
        raw_request(server.port, "GET", "/health", &[], None, Duration::from_secs(3)).filter(|r| r.status == 200)
    });
    assert_eq!(answered.json()["status"], "ok");
    println!("/health answered {:.2}s after 300 slow clients connected", started.elapsed().as_secs_f64());
    // Each slow client is closed by the header timeout (or at once, past the connection cap).
    for s in slow.iter_mut() {
        assert!(closed_within(s, Duration::from_secs(6)), "a slow client is still connected after the header timeout");
    }
    // An idle kept-alive connection is closed too.
    let mut idle = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    idle.write_all(format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", server.host()).as_bytes()).unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(closed_within(&mut idle, Duration::from_secs(6)), "an idle keep-alive connection stays open");
    assert!(server.alive());

    // 200 slow clients under the default limits: /health answers at once.
    drop(server);
    let data = TempDir::new().unwrap();
    let server = Server::start(data.path(), &[]);
    let _slow = slow_clients(server.port, 200);
    let t = Instant::now();
    let r = raw_request(server.port, "GET", "/health", &[], None, Duration::from_secs(5)).expect("/health answers");
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "/health took {:?}", t.elapsed());
}

#[test]
fn exact_edges() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let server = Server::start(data.path(), &["--api-key", "s3cret-key"]);
    let auth = |scheme: &str| format!("{scheme} s3cret-key");
    let small = json!({"prompt": "x", "num_frames": 2, "num_inference_steps": 1, "size": "32x32"}).to_string();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = server.call(
            "POST",
            "/v1/videos",
            &[("Authorization", &auth(scheme)), ("Content-Type", "application/json")],
            Some(small.as_bytes()),
        );
        assert_eq!(r.status, 200, "{scheme}: {}", r.text());
    }
    for wrong in ["Bearer s3cret-kez", "Bearer s3cret-key-and-more", "Bearer ", "Basic s3cret-key", "s3cret-key"] {
        let r = server.call("GET", "/v1/videos", &[("Authorization", wrong)], None);
        assert_eq!(r.status, 401, "{wrong}");
        r.error();
    }
    let key = auth("Bearer");
    let authed = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, String)> {
        let mut h = vec![("Authorization", key.clone())];
        h.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        h
    };
    let call = |method: &str, path: &str, extra: &[(&'static str, &'static str)], body: Option<&[u8]>| {
        let h = authed(extra);
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        server.call(method, path, &h, body)
    };
    let json_ct = [("Content-Type", "application/json")];

    // The seed: 2^64 − 1 is the largest; 2^64 is a 400 naming it, as a number or a string.
    let max =
        br#"{"prompt": "x", "num_frames": 2, "num_inference_steps": 1, "size": "32x32", "seed": 18446744073709551615}"#;
    let r = call("POST", "/v1/videos", &json_ct, Some(max));
    assert_eq!((r.status, r.json()["settings"]["seed"].as_u64()), (200, Some(u64::MAX)));
    for over in [
        &br#"{"prompt": "x", "seed": 18446744073709551616}"#[..],
        br#"{"prompt": "x", "seed": "18446744073709551616"}"#,
        br#"{"prompt": "x", "seed": 1e30}"#,
    ] {
        let r = call("POST", "/v1/videos", &json_ct, Some(over));
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(over));
        assert_eq!(r.error()["param"], "seed");
    }

    // Every 4xx in the one JSON shape.
    let long_uri = format!("/v1/videos?after={}", "a".repeat(10_000));
    let cases: Vec<(u16, Reply)> = vec![
        (405, call("PUT", "/v1/videos", &[], None)),
        (405, call("DELETE", "/health", &[], None)),
        (
            413,
            call(
                "POST",
                "/v1/videos",
                &json_ct,
                Some(format!("{{\"prompt\": \"{}\"}}", "x".repeat(2 << 20)).as_bytes()),
            ),
        ),
        (414, call("GET", &long_uri, &[], None)),
        (415, call("POST", "/v1/videos", &[("Content-Type", "text/plain")], Some(b"x"))),
        (422, call("POST", "/v1/videos", &json_ct, Some(b"[1, 2]"))),
        (404, call("GET", "/nowhere", &[], None)),
        (400, call("GET", "/v1/videos?limit=abc", &[], None)),
    ];
    for (status, r) in &cases {
        assert_eq!(r.status, *status, "{}", r.text());
        r.error();
    }

    // No answer shows a path of the server's.
    let created = call("POST", "/v1/videos", &json_ct, Some(small.as_bytes())).json();
    let id = created["id"].as_str().unwrap().to_string();
    let gif = gif_declaring(8, 8, 4, (1, 1));
    let (ct, body) =
        multipart(&[("prompt", "x"), ("size", "32x32"), ("num_inference_steps", "2")], Some(("in.gif", &gif)));
    let h = authed(&[]);
    let mut h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    h.push(("Content-Type", &ct));
    let v2v = server.call("POST", "/v1/videos", &h, Some(&body));
    assert_eq!(v2v.status, 200, "{}", v2v.text());
    let model = common::model_dir("tiny-t2v");
    let forbidden = [data.path().display().to_string(), model.display().to_string()];
    let answers = [
        created.to_string(),
        v2v.text(),
        call("GET", &format!("/v1/videos/{id}"), &[], None).text(),
        call("GET", "/v1/videos", &[], None).text(),
        call("GET", "/v1/t2v/info", &[], None).text(),
    ];
    for answer in &answers {
        for path in &forbidden {
            assert!(!answer.contains(path.as_str()), "{path} in {answer}");
        }
    }
    assert_eq!(v2v.json()["settings"]["input"]["path"].as_str().map(|p| p.starts_with('/')), Some(false));
}

// ---------- the soak ----------

/// A small xorshift: the soak's choices, reproducible from the seed it prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct SoakFigures {
    requests: u64,
    accepted: BTreeSet<String>,
    deleted: BTreeSet<String>,
    kills: u64,
    peak_mib: f64,
}

/// One client's request of the soak's mix: normal jobs, hostile files, bad JSON, cross-site
/// posts, slow headers, cancels and deletes.
fn soak_request(port: u16, rng: &mut Rng, figures: &Mutex<SoakFigures>) {
    let json_ct = ("Content-Type", "application/json");
    let choice = rng.below(10);
    let reply = match choice {
        0..=2 => {
            let body = json!({"prompt": format!("soak {}", rng.below(1000)), "num_frames": 2 + rng.below(3),
                "num_inference_steps": 1 + rng.below(2), "size": "32x32", "seed": rng.below(1 << 20)});
            raw_request(
                port,
                "POST",
                "/v1/videos",
                &[json_ct],
                Some(body.to_string().as_bytes()),
                Duration::from_secs(30),
            )
        }
        3 => {
            let file = match rng.below(3) {
                0 => gif_declaring(65535, 65535, 1, (1, 1)),
                1 => gif_declaring(8, 8, 3, (1, 1)),
                _ => npy_declaring(2, 8192, 8192),
            };
            let (ct, body) =
                multipart(&[("prompt", "x"), ("size", "32x32"), ("num_inference_steps", "1")], Some(("f.gif", &file)));
            raw_request(port, "POST", "/v1/videos", &[("Content-Type", &ct)], Some(&body), Duration::from_secs(30))
        }
        4 => raw_request(port, "POST", "/v1/videos", &[json_ct], Some(b"{\"prompt\": [}"), Duration::from_secs(10)),
        5 => raw_request(
            port,
            "POST",
            "/v1/videos",
            &[("Content-Type", "text/plain"), ("Origin", "http://evil.example")],
            Some(b"{\"prompt\": \"x\"}"),
            Duration::from_secs(10),
        ),
        6 => {
            let mut s = slow_clients(port, 1 + rng.below(5) as usize);
            std::thread::sleep(Duration::from_millis(50));
            s.clear();
            None
        }
        7 | 8 => {
            let id = figures.lock().unwrap().accepted.iter().nth(rng.below(8) as usize).cloned();
            id.and_then(|id| {
                let (method, path) = if choice == 7 {
                    ("POST", format!("/v1/videos/{id}/cancel"))
                } else {
                    ("DELETE", format!("/v1/videos/{id}"))
                };
                let r = raw_request(port, method, &path, &[], None, Duration::from_secs(10));
                if choice == 8 && r.as_ref().is_some_and(|r| r.status == 200) {
                    figures.lock().unwrap().deleted.insert(id);
                }
                r
            })
        }
        _ => raw_request(port, "GET", "/v1/videos?limit=50", &[], None, Duration::from_secs(10)),
    };
    let mut f = figures.lock().unwrap();
    f.requests += 1;
    if let Some(r) = reply {
        assert!(r.status < 500 || r.status == 503, "{}: {}", r.status, r.text());
        if choice <= 3 && r.status == 200 {
            f.accepted.insert(r.json()["id"].as_str().unwrap().to_string());
        }
    }
}

fn soak(duration: Duration, kills: u64) {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let videos = data.path().join("videos");
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("soak: {duration:?}, {kills} SIGKILLs, seed {seed}");
    let figures = Arc::new(Mutex::new(SoakFigures::default()));
    let extra = ["--header-timeout", "2", "--max-queued", "40"];
    let mut server = Server::start(data.path(), &extra);
    let started = Instant::now();
    let kill_at: Vec<Duration> = (1..=kills).map(|k| duration * k as u32 / (kills as u32 + 1)).collect();
    let mut next_kill = 0;
    let mut rng = Rng(seed);
    while started.elapsed() < duration {
        let port = server.port;
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let figures = figures.clone();
                let mut rng = Rng(rng.next() | 1 | c);
                std::thread::spawn(move || {
                    for _ in 0..5 {
                        soak_request(port, &mut rng, &figures);
                    }
                })
            })
            .collect();
        if next_kill < kill_at.len() && started.elapsed() >= kill_at[next_kill] {
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            let peak = server.memory_mib().1;
            server.sigkill();
            next_kill += 1;
            let mut f = figures.lock().unwrap();
            f.kills += 1;
            f.peak_mib = f.peak_mib.max(peak);
        }
        for c in clients {
            // A killed server leaves its clients' requests unanswered (not a failure); a wrong
            // answer fails the test.
            c.join().expect("a client saw a wrong answer");
        }
        if next_kill > 0 && !server.alive() {
            server = Server::start(data.path(), &extra);
        }
        let peak = server.memory_mib().1;
        let mut f = figures.lock().unwrap();
        f.peak_mib = f.peak_mib.max(peak);
    }

    // The end: every accepted job completed or failed with its reason.
    let limit = Duration::from_secs(300);
    let jobs = wait_for("every job to end", limit, || {
        let r = raw_request(server.port, "GET", "/v1/videos?limit=100&order=asc", &[], None, Duration::from_secs(10))?;
        let mut all: Vec<Value> = r.json()["data"].as_array()?.clone();
        let mut after = all.last().and_then(|v| v["id"].as_str().map(str::to_string));
        let mut more = r.json()["has_more"] == true;
        for _ in 0..100 {
            if !more {
                break;
            }
            let path = format!("/v1/videos?limit=100&order=asc&after={}", after.clone()?);
            let page = raw_request(server.port, "GET", &path, &[], None, Duration::from_secs(10))?.json();
            all.extend(page["data"].as_array()?.iter().cloned());
            after = all.last().and_then(|v| v["id"].as_str().map(str::to_string));
            more = page["has_more"] == true;
        }
        all.iter().all(|v| v["status"] == "completed" || v["status"] == "failed").then_some(all)
    });
    let f = figures.lock().unwrap();
    let known: BTreeSet<String> = jobs.iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    for id in f.accepted.difference(&f.deleted) {
        assert!(known.contains(id), "accepted job {id} is lost");
    }
    let (mut completed, mut failed) = (0, 0);
    for v in &jobs {
        if v["status"] == "completed" {
            completed += 1;
        } else {
            failed += 1;
            let message = v["error"]["message"].as_str().unwrap_or("");
            assert!(!message.is_empty() && !message.contains("too large for the machine"), "{v}");
        }
    }
    let peak = f.peak_mib.max(server.memory_mib().1);
    println!(
        "soak: {} requests, {} kills, {} jobs accepted ({} deleted), {completed} completed, {failed} failed, peak {peak:.0} MiB",
        f.requests,
        f.kills,
        f.accepted.len(),
        f.deleted.len()
    );
    assert_eq!(f.kills, kills);
    assert!(peak < (MEMORY_LIMIT >> 20) as f64);
    assert_eq!(server.sigterm(), 0);

    // The database is intact; every file belongs to a job; nothing staged or partial is left.
    let db = rusqlite::Connection::open(data.path().join("jobs.sqlite")).unwrap();
    let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    for name in files_in(&videos) {
        let id = name.split('.').next().unwrap_or("");
        assert!(known.contains(id), "a stray file: {name}");
    }
}

#[test]
fn soak_one_minute_with_kills() {
    soak(Duration::from_secs(60), 2);
}

#[test]
#[ignore = "30 minutes: cargo test -p t2v-cli --test serve_hostile -- --ignored"]
fn soak_thirty_minutes_with_kills() {
    soak(Duration::from_secs(30 * 60), 12);
}
