//! The queue past one process: the real binaries on the tiny fixture model, an API (`t2v serve`)
//! and workers (`t2v worker`) sharing a throwaway PostgreSQL cluster, with workers killed by SIGKILL
//! and the database restarted mid-run; and the same on SQLite with in-process workers.
//!
//! Every job must complete exactly once: its worker's log says so once, its attempts say how many
//! workers started it, and its result is on disk. The tests take turns (one deployment at a time).

#[path = "../../t2v/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::postgres::cluster_or_skip;
use support::{agent, serial, wait_for};
use tempfile::TempDir;

fn tiny_model() -> PathBuf {
    common::model_dir("tiny-t2v")
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A `t2v` process with its output (stdout and stderr) collected.
struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_t2v"));
        command.args(args).env_remove("T2V_API_KEY").env_remove("T2V_QUEUE");
        let (child, log) = support::spawn_logged(command);
        Proc { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_line(&self, what: &str, limit: Duration, f: impl Fn(&str) -> Option<String>) -> String {
        wait_for(what, limit, || self.log().lines().find_map(&f)).to_string()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and the exit code once it has stopped.
    fn sigterm(&mut self) -> i32 {
        // SAFETY: signalling a child process this test started and still owns.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let status =
            wait_for("the process to exit after SIGTERM", Duration::from_secs(90), || self.child.try_wait().unwrap());
        status.code().unwrap_or(-1)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Api {
    proc: Proc,
    base: String,
}

impl Api {
    fn start(data: &Path, extra: &[&str]) -> Api {
        let model = tiny_model();
        let mut args = vec!["serve", "--model", model.to_str().unwrap(), "--host", "127.0.0.1", "--port", "0"];
        args.extend(["--device", "cpu", "--data", data.to_str().unwrap()]);
        args.extend(extra);
        let proc = Proc::spawn(&args);
        let base = wait_for("the API's URL", Duration::from_secs(60), || support::listening_url(&proc.log()));
        let api = Api { proc, base };
        wait_for("/health to answer 200", Duration::from_secs(60), || {
            agent().get(&format!("{}/health", api.base)).call().ok().filter(|r| r.status() == 200)
        });
        api
    }

    /// GET a JSON answer; `None` while the server cannot answer (the database restarting).
    fn try_get(&self, path: &str) -> Option<Value> {
        let r = agent().get(&format!("{}{path}", self.base)).call().ok()?;
        serde_json::from_reader(r.into_reader()).ok()
    }

    fn get(&self, path: &str) -> Value {
        self.try_get(path).unwrap_or_else(|| panic!("GET {path} failed; API log:\n{}", self.proc.log()))
    }

    fn post(&self, path: &str, body: &Value) -> Value {
        let r = agent()
            .post(&format!("{}{path}", self.base))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap_or_else(|e| panic!("POST {path}: {e}; API log:\n{}", self.proc.log()));
        serde_json::from_reader(r.into_reader()).unwrap()
    }

    fn create(&self, body: &Value) -> String {
        self.post("/v1/videos", body)["id"].as_str().unwrap().to_string()
    }

    fn video(&self, id: &str) -> Option<Value> {
        self.try_get(&format!("/v1/videos/{id}"))
    }

    fn wait_until(&self, id: &str, what: &str, limit: Duration, f: impl Fn(&Value) -> bool) -> Value {
        wait_for(&format!("{id}: {what}"), limit, || self.video(id).filter(|v| f(v)))
    }

    /// Every job, oldest first.
    fn all(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.get(&format!("/v1/videos?limit=100&order=asc{after}"));
            out.extend(page["data"].as_array().unwrap().iter().cloned());
            if page["has_more"] != true {
                return out;
            }
            after = format!("&after={}", page["last_id"].as_str().unwrap());
        }
    }

    /// Waits until no job is queued or running; on a timeout, says what the processes said.
    fn wait_idle(&self, limit: Duration, workers: &[Proc]) {
        let started = Instant::now();
        loop {
            let counts = self.try_get("/v1/t2v/info").map(|i| i["jobs"].clone());
            if counts.as_ref().is_some_and(|c| c["queued"] == 0 && c["in_progress"] == 0) {
                return;
            }
            if started.elapsed() > limit {
                let logs: Vec<String> = workers.iter().map(Proc::log).collect();
                panic!(
                    "timed out after {limit:?} waiting for every job to end: {counts:?}\nAPI:\n{}\nworkers:\n{}",
                    self.proc.log(),
                    logs.join("\n----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn start_worker(data: &Path, queue: &str, lease: &str) -> Proc {
    let model = tiny_model();
    let proc = Proc::spawn(&[
        "worker",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--data",
        data.to_str().unwrap(),
        "--queue",
        queue,
        "--lease-seconds",
        lease,
    ]);
    proc.wait_line("the worker to be ready", Duration::from_secs(60), |l| {
        (l == "t2v worker: ready").then(|| l.to_string())
    });
    proc
}

fn small_job(prompt: &str) -> Value {
    json!({"prompt": prompt, "num_inference_steps": 2, "num_frames": 4, "size": "32x32"})
}

fn long_job(prompt: &str, steps: u32) -> Value {
    json!({"prompt": prompt, "num_inference_steps": steps, "num_frames": 4, "size": "32x32"})
}

/// How often each job's completion appears in the logs: `t2v: ID completed in …`.
fn completions(logs: &[String]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for log in logs {
        for line in log.lines() {
            if let Some(rest) = line.strip_prefix("t2v: ") {
                let mut words = rest.split_whitespace();
                if let (Some(id), Some("completed")) = (words.next(), words.next()) {
                    *seen.entry(id.to_string()).or_default() += 1;
                }
            }
        }
    }
    seen
}

/// Every job completed, with its result on disk, and completed once according to the logs.
fn assert_each_completed_once(api: &Api, data: &Path, logs: &[String], count: usize) -> Vec<Value> {
    let videos = api.all();
    assert_eq!(videos.len(), count);
    let done = completions(logs);
    for v in &videos {
        let id = v["id"].as_str().unwrap();
        assert_eq!(v["status"], "completed", "{v}");
        assert_eq!(done.get(id), Some(&1), "{id} completed {:?} times in the logs", done.get(id));
        assert!(data.join(format!("videos/{id}.mp4")).is_file(), "{id} has no video");
        assert!(v["worker"].as_str().is_some_and(|w| !w.is_empty()), "{v}");
    }
    videos
}

/// The worker process whose pid is in a worker's name (`HOST-PID-wI`).
fn owner<'a>(workers: &'a mut [Proc], worker: &str) -> &'a mut Proc {
    workers.iter_mut().find(|p| worker.contains(&format!("-{}-w", p.pid()))).expect("a worker of this test")
}

/// Reads a job's event stream in the background until it ends: (name, data).
fn watch_events(api: &Api, id: &str) -> std::thread::JoinHandle<Vec<(String, Value)>> {
    let long =
        ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(300)).build();
    let response = long.get(&format!("{}/v1/videos/{id}/events", api.base)).call().expect("the event stream opens");
    std::thread::spawn(move || {
        let mut events = Vec::new();
        let mut name = String::new();
        for line in BufReader::new(response.into_reader()).lines().take(100_000) {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                events.push((name.clone(), serde_json::from_str(d).unwrap()));
            }
        }
        events
    })
}

#[test]
fn postgres_api_and_three_workers_survive_a_sigkill() {
    let _turn = serial();
    let Some(pg) = cluster_or_skip() else { return };
    let data = TempDir::new().unwrap();
    let lease = "3";
    let api = Api::start(data.path(), &["--queue", &pg.url, "--workers", "0", "--lease-seconds", lease]);
    let info = api.get("/v1/t2v/info");
    assert_eq!(
        (info["queue"]["backend"].as_str(), info["queue"]["workers_in_process"].as_u64()),
        (Some("postgres"), Some(0))
    );
    let mut workers: Vec<Proc> = (0..3).map(|_| start_worker(data.path(), &pg.url, lease)).collect();

    // The long job first, so that a worker is surely in the middle of it when it is killed.
    let long = api.create(&long_job("long", 40));
    let events = watch_events(&api, &long);
    let running = api.wait_until(&long, "a step done", Duration::from_secs(60), |v| {
        v["status"] == "in_progress" && v["progress"].as_u64() > Some(0)
    });
    let doomed = running["worker"].as_str().unwrap().to_string();
    let small: Vec<String> = (0..29).map(|i| api.create(&small_job(&format!("job {i}")))).collect();
    let killed_at = now_ms();
    owner(&mut workers, &doomed).sigkill();
    let started = Instant::now();

    api.wait_idle(Duration::from_secs(300), &workers);
    let total_s = started.elapsed().as_secs_f64();
    let logs: Vec<String> = workers.iter().map(Proc::log).collect();
    let videos = assert_each_completed_once(&api, data.path(), &logs, 30);

    // The killed worker's job: taken over by another once its lease expired, on attempt 2.
    let taken = api.video(&long).unwrap();
    assert_eq!(taken["attempts"], 2, "{taken}");
    assert_ne!(taken["worker"].as_str(), Some(doomed.as_str()), "{taken}");
    let recovered_s = (taken["timings"]["started_at_ms"].as_i64().unwrap() - killed_at) as f64 / 1e3;
    let lease_s: f64 = lease.parse().unwrap();
    assert!(recovered_s >= lease_s * 0.5 && recovered_s < lease_s + 10.0, "taken over after {recovered_s:.1}s");
    for id in &small {
        let v = videos.iter().find(|v| v["id"] == id.as_str()).unwrap();
        assert_eq!(v["attempts"], 1, "{v}");
    }
    let names: BTreeSet<&str> = videos.iter().map(|v| v["worker"].as_str().unwrap()).collect();
    assert!(names.len() >= 2, "the jobs ran on several workers: {names:?}");

    // The API's event stream followed the job from process to process through the database.
    let events = events.join().unwrap();
    let names_seen: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names_seen.last(), Some(&"completed"), "{names_seen:?}");
    let attempts: BTreeSet<u64> =
        events.iter().filter(|(n, _)| n == "progress").filter_map(|(_, d)| d["attempt"].as_u64()).collect();
    assert_eq!(attempts, BTreeSet::from([1, 2]), "progress of both attempts: {names_seen:?}");
    assert!(events.iter().any(|(n, d)| n == "preview" && d["width"] == 4 * 32), "a preview: {names_seen:?}");
    let content = agent().get(&format!("{}/v1/videos/{long}/content", api.base)).call().unwrap();
    assert_eq!(content.header("content-type"), Some("video/mp4"));

    // A cancel reaches the job in whichever process runs it.
    // DDIM: with the checkpoint's leading spacing, DPM-Solver schedules this long repeat noise
    // levels and are refused.
    let mut endless = long_job("endless", 999);
    endless["scheduler"] = json!("ddim");
    let endless = api.create(&endless);
    api.wait_until(&endless, "running", Duration::from_secs(60), |v| v["progress"].as_u64() > Some(0));
    let asked = Instant::now();
    api.post(&format!("/v1/videos/{endless}/cancel"), &json!({}));
    let cancelled = api.wait_until(&endless, "cancelled", Duration::from_secs(30), |v| v["status"] == "failed");
    let cancel_s = asked.elapsed().as_secs_f64();
    assert_eq!(cancelled["error"]["code"], "cancelled", "{cancelled}");
    assert!(!data.path().join(format!("videos/{endless}.mp4")).exists());

    eprintln!(
        "postgres, 3 workers: 30 jobs in {total_s:.1}s after the kill; the killed worker's job was taken over \
         {recovered_s:.1}s after the SIGKILL (lease {lease_s}s) by {}; a cancel took {cancel_s:.2}s",
        taken["worker"]
    );
    for mut w in workers.into_iter().filter(|w| !w.log().contains(&doomed)) {
        assert_eq!(w.sigterm(), 0, "a worker stops cleanly on SIGTERM");
    }
}

#[test]
fn postgres_worker_then_database_restart_loses_nothing() {
    let _turn = serial();
    let Some(pg) = cluster_or_skip() else { return };
    let data = TempDir::new().unwrap();
    let lease = "4";
    let api = Api::start(data.path(), &["--queue", &pg.url, "--workers", "0", "--lease-seconds", lease]);
    let mut workers: Vec<Proc> = (0..2).map(|_| start_worker(data.path(), &pg.url, lease)).collect();
    let ids: Vec<String> = (0..12).map(|i| api.create(&long_job(&format!("job {i}"), 12))).collect();

    // A worker killed mid-job, and a new one started in its place.
    let running = wait_for("a job with a step done", Duration::from_secs(60), || {
        ids.iter()
            .find_map(|id| api.video(id).filter(|v| v["status"] == "in_progress" && v["progress"].as_u64() > Some(0)))
    });
    let killed_job = running["id"].as_str().unwrap().to_string();
    let doomed = running["worker"].as_str().unwrap().to_string();
    owner(&mut workers, &doomed).sigkill();
    workers.push(start_worker(data.path(), &pg.url, lease));

    // Then the database, as in a crash: no checkpoint, recovery from the write-ahead log.
    wait_for("3 jobs done", Duration::from_secs(120), || {
        (api.try_get("/v1/t2v/info")?["jobs"]["completed"].as_u64()? >= 3).then_some(())
    });
    pg.stop("immediate");
    let down_at = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    pg.restart();
    let api_back_s = wait_for("the API to answer again", Duration::from_secs(60), || {
        api.try_get("/v1/videos?limit=1").map(|_| down_at.elapsed().as_secs_f64())
    });
    // Jobs submitted after the restart run too.
    let after: Vec<String> = (0..2).map(|i| api.create(&small_job(&format!("after {i}")))).collect();
    api.wait_idle(Duration::from_secs(300), &workers);
    let total_s = down_at.elapsed().as_secs_f64();

    let logs: Vec<String> = workers.iter().map(Proc::log).collect();
    let videos = assert_each_completed_once(&api, data.path(), &logs, 14);
    let killed = videos.iter().find(|v| v["id"] == killed_job.as_str()).unwrap();
    assert_eq!(killed["attempts"], 2, "{killed}");
    assert_ne!(killed["worker"].as_str(), Some(doomed.as_str()));
    for v in &videos {
        // The database's outage may cost a worker its lease (then its job runs again), never a job.
        assert!(v["attempts"].as_u64().unwrap() <= 2, "{v}");
    }
    assert!(after.iter().all(|id| videos.iter().any(|v| v["id"] == id.as_str())));
    let reruns = videos.iter().filter(|v| v["attempts"] == 2).count();
    eprintln!(
        "postgres restart: the API answered {api_back_s:.1}s after the database went down (2 s down); \
         all 14 jobs completed once, {total_s:.1}s after; {reruns} ran twice (the killed worker's and any whose lease lapsed)"
    );
}

#[test]
fn sqlite_three_in_process_workers_and_a_kill() {
    let _turn = serial();
    let data = TempDir::new().unwrap();
    let extra = ["--workers", "3", "--lease-seconds", "3"];
    let api = Api::start(data.path(), &extra);
    assert_eq!(api.get("/v1/t2v/info")["queue"]["backend"], "sqlite");
    let long = api.create(&long_job("long", 40));
    api.wait_until(&long, "a step done", Duration::from_secs(60), |v| v["progress"].as_u64() > Some(0));
    let small: Vec<String> = (0..29).map(|i| api.create(&small_job(&format!("job {i}")))).collect();
    // Some small jobs run beside the long one before the kill.
    wait_for("2 small jobs done", Duration::from_secs(60), || {
        (api.get("/v1/t2v/info")["jobs"]["completed"].as_u64()? >= 2).then_some(())
    });
    let Api { proc: mut first, .. } = api;
    first.sigkill();
    let killed = Instant::now();

    let api = Api::start(data.path(), &extra);
    assert!(api.proc.log().contains(&long), "the restart names the job it queued again:\n{}", api.proc.log());
    api.wait_until(&long, "running again", Duration::from_secs(60), |v| v["attempts"] == 2);
    eprintln!(
        "sqlite, 3 in-process workers: the killed server's job ran again {:.1}s after the SIGKILL (restart included)",
        killed.elapsed().as_secs_f64()
    );
    api.wait_idle(Duration::from_secs(300), &[]);
    let logs = vec![first.log(), api.proc.log()];
    let videos = assert_each_completed_once(&api, data.path(), &logs, 30);
    let taken = videos.iter().find(|v| v["id"] == long.as_str()).unwrap();
    assert_eq!(taken["attempts"], 2, "{taken}");
    let names: BTreeSet<&str> = videos.iter().map(|v| v["worker"].as_str().unwrap()).collect();
    assert!(names.len() >= 2, "the jobs ran on several in-process workers: {names:?}");
    assert!(small.iter().all(|id| videos.iter().any(|v| v["id"] == id.as_str())));
}

/// Jobs per second of 1, 2 and 3 worker processes on the tiny model (for the README's figures):
/// `cargo test -p t2v-cli --test queue -- --ignored --nocapture`.
#[test]
#[ignore]
fn postgres_throughput_of_1_2_3_workers() {
    let _turn = serial();
    let Some(pg) = cluster_or_skip() else { return };
    let data = TempDir::new().unwrap();
    let api = Api::start(data.path(), &["--queue", &pg.url, "--workers", "0"]);
    for n in 1..=3 {
        let workers: Vec<Proc> = (0..n).map(|_| start_worker(data.path(), &pg.url, "30")).collect();
        let started = Instant::now();
        for i in 0..24 {
            api.create(&json!({"prompt": format!("{n} workers, job {i}"), "num_inference_steps": 8, "num_frames": 8, "size": "32x32"}));
        }
        api.wait_idle(Duration::from_secs(600), &workers);
        let s = started.elapsed().as_secs_f64();
        eprintln!("throughput: {n} worker(s): 24 jobs (8 steps, 8 frames, 32x32) in {s:.1}s = {:.2} jobs/s", 24.0 / s);
        drop(workers);
    }
}
