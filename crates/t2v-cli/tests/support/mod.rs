//! Helpers shared by the command line's tests: running the binary, temporary folders, `.npy` files,
//! polling and an HTTP client for the servers.
#![allow(dead_code)]

pub mod postgres;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

/// The turn of a test that runs a server (one at a time in a test binary, so that the figures
/// and timings each prints are its server's own). A test that failed holding it passes it on.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn t2v(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_t2v")).args(args).output().expect("t2v runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh folder, removed when the returned guard drops.
pub fn temp_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new().prefix("t2v-cli-").tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    (tmp, dir)
}

/// Reads a little-endian float32 `.npy` file as numpy writes and reads it.
pub fn read_npy(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "npy magic");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    assert_eq!((10 + header_len) % 64, 0, "header aligned to 64 bytes");
    let shape: Vec<usize> = header[header.find("'shape': (").unwrap() + 10..]
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data: Vec<f32> =
        bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Copies the model folder `from` into `to` (made if missing); without `weights`, its
/// `.safetensors` files are left out (a model whose settings can be checked but not run).
pub fn copy_model_folder(from: &Path, to: &Path, weights: bool) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_model_folder(&entry.path(), &target, weights);
        } else if weights || !entry.file_name().to_string_lossy().ends_with(".safetensors") {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The payload of an MP4's top-level `mdat` box: its coded frames (the same frames give the same
/// bytes: t2v's encoder is deterministic).
pub fn mp4_mdat(bytes: &[u8]) -> &[u8] {
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if &bytes[at + 4..at + 8] == b"mdat" {
            return &bytes[at + 8..at + size];
        }
        assert!(size >= 8, "a malformed MP4");
        at += size;
    }
    panic!("no mdat box")
}

/// Polls `f` every 50 ms until it gives a value; panics after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP client for the servers the tests start (bounded connect and request times).
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(120)).build()
}

/// A `t2v serve` started by a test, once it listens: its output (stdout and stderr) collected in
/// `log`, and the base URL it printed (`http://127.0.0.1:PORT`).
pub struct LaunchedServer {
    pub child: std::process::Child,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    pub base: String,
}

impl LaunchedServer {
    pub fn port(&self) -> u16 {
        self.base.rsplit(':').next().and_then(|p| p.parse().ok()).expect("the URL has a port")
    }
}

/// Starts `command` with its output (stdout and stderr, line by line) collected in the returned
/// log. The one process launcher of the test suites (`launch_serve`, queue.rs's workers).
pub fn spawn_logged(mut command: Command) -> (std::process::Child, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};

    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("t2v starts");
    let log = Arc::new(Mutex::new(String::new()));
    let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
    let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
    for stream in [out, err] {
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
    }
    (child, log)
}

/// The URL a `t2v serve` log says it listens on, once it has said so.
pub fn listening_url(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        let rest = l.strip_prefix("t2v serve: listening on ")?;
        Some(rest.split_whitespace().next()?.trim_end_matches('/').to_string())
    })
}

/// Starts `command` (a `t2v serve … --host 127.0.0.1 --port 0`, its arguments and process settings
/// given by the caller) and waits, at most 60 s, for the line that says where it listens. The
/// launcher of the service's test suites (serve.rs, serve_hostile.rs, page.rs, doors.rs).
pub fn launch_serve(mut command: Command) -> LaunchedServer {
    command.env_remove("T2V_API_KEY");
    let (child, log) = spawn_logged(command);
    let deadline = Instant::now() + Duration::from_secs(60);
    let base = loop {
        if let Some(url) = listening_url(&log.lock().unwrap()) {
            break url;
        }
        assert!(Instant::now() < deadline, "no URL printed within 60 s; output:\n{}", log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    LaunchedServer { child, log, base }
}

/// Runs `t2v` with `args`, panicking with its stderr (and `what`) when it fails.
pub fn run_ok(args: &[String], what: &str) -> Output {
    let o = t2v(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{what}: {}", stderr(&o));
    o
}

/// A fixture run through the binary: `args` (the run's settings) on the model in `model`, written
/// to `out` (`.npy`); the frames and the run's output. The runner of every suite that checks the
/// command line's frames against the reference (cli.rs, long.rs, lora.rs).
pub fn fixture_run(model: &Path, mut args: Vec<String>, out: &Path, what: &str) -> (Tensor, Output) {
    args.extend(["--model".into(), model.display().to_string(), "--output".into(), out.display().to_string()]);
    let o = run_ok(&args, what);
    (read_npy(out), o)
}
