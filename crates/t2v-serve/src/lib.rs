//! `t2v serve`: the model loaded once behind an HTTP API in the shape of OpenAI's videos API, a web
//! page at `/`, and a queue of jobs that survives restarts: in SQLite with in-process workers on
//! one machine, or in PostgreSQL shared with any number of `t2v worker` processes on others.
//!
//! The pieces: [`store`] (the queue and history, behind the [`store::JobStore`] interface),
//! [`worker`] (the workers' threads), [`storage`] (where results live), [`api`] (the routes),
//! [`events`] (live progress for the event streams), [`relay`] (events of other processes' workers),
//! [`preview`] (cheap previews of the latents), [`request`] (checking a request's fields).

pub mod api;
pub mod conn;
pub mod error;
pub mod events;
pub mod guard;
pub mod openapi;
pub mod predictions;
pub mod preview;
pub mod relay;
pub mod request;
pub mod storage;
pub mod store;
pub mod views;
pub mod webhook;
pub mod worker;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde::Serialize;
use t2v::checkpoint::{self as hub, HubOptions, ModelFolder, WeightsVariant, DEFAULT_MODEL};
use t2v::pipeline::{self, LoadOptions};

use crate::events::JobEvent;
use crate::request::Limits;
use crate::storage::ResultStore;
use crate::store::{JobStore, QueuePolicy};

/// Serve a model over HTTP: an API in the shape of OpenAI's videos API and a web page.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  t2v serve                                   # http://127.0.0.1:8000/\n  t2v serve --host 0.0.0.0 --api-key \"$KEY\"   # reachable from other machines\n  t2v serve --queue postgres://t2v:PW@db/t2v --workers 0   # the API alone; `t2v worker`s run the jobs\n\nOpenAI clients work by changing the base URL, e.g. in Python:\n  OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=\"KEY\").videos.create_and_poll(prompt=\"a corgi\")\n\nAlso: POST /v1/videos/sync (the MP4 when done), Cog's prediction API (POST /predictions, PUT /predictions/ID), webhooks signed as Standard Webhooks (--webhook-secret), Idempotency-Key; see /openapi.json."
)]
pub struct ServeArgs {
    /// A local folder in the diffusers layout, or a Hugging Face repo id (owner/name[@revision]),
    /// downloaded once into the Hugging Face cache. [default: damo-vilab/text-to-video-ms-1.7b]
    #[arg(long, short = 'm')]
    pub model: Option<String>,

    /// The address to listen on. Any address other than the loopback ones (127.0.0.1, ::1,
    /// localhost) needs --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// The port to listen on (0: any free port; the URL is printed).
    #[arg(long, short = 'p', default_value_t = 8000)]
    pub port: u16,

    /// The folder for the videos (videos/) and, without --queue, the job store (jobs.sqlite);
    /// created if missing. Reuse it to keep the queue and the history across restarts. With
    /// worker processes, every one of them must see the same folder (a shared volume).
    #[arg(long, default_value = "t2v-data")]
    pub data: PathBuf,

    #[command(flatten)]
    pub queue: QueueArgs,

    /// How many workers run jobs in this process (sharing one loaded model). 0 runs the API
    /// alone, for `t2v worker` processes on a PostgreSQL --queue.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,

    /// Require `Authorization: Bearer KEY` on the API (what OpenAI clients send). Read from the
    /// environment variable T2V_API_KEY when not given, which keeps it out of process listings.
    #[arg(long, env = "T2V_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Allow pages from this origin (e.g. https://example.org, or * for any) to call the API from
    /// a browser. Repeat for several. [default: none: cross-origin calls are refused]
    #[arg(long, value_name = "ORIGIN")]
    pub cors: Vec<String>,

    /// The largest request body with an uploaded video, in MiB (JSON bodies: 1 MiB).
    #[arg(long, default_value_t = 64)]
    pub max_upload_mb: usize,

    /// The most frames one job may ask for (long videos run with FreeNoise's windows).
    #[arg(long, default_value_t = 512)]
    pub max_frames: usize,

    /// The most one job may cost, in frames × height × width × denoising steps (video-to-video:
    /// the steps it runs). [default: the model's native size at 64 frames and 100 steps]
    #[arg(long, value_name = "COST")]
    pub max_job_cost: Option<u64>,

    /// The most jobs waiting in the queue: more are refused with 429 and `Retry-After`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued: u64,

    /// The most connections open at once (lowered to fit the file-descriptor limit); more are
    /// closed as they arrive.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// Seconds a client has to send a request's headers, and that an idle kept-alive connection
    /// stays open.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS", value_parser = parse_timeout)]
    pub header_timeout: f64,

    /// The key webhooks are signed with (Standard Webhooks: `whsec_` and base64 of 24 to 64
    /// random bytes). Read from T2V_WEBHOOK_SECRET when not given; without either, one is made at
    /// the first start, kept in the data folder's `webhook-secret` and printed once.
    #[arg(long, env = "T2V_WEBHOOK_SECRET", hide_env_values = true, value_name = "whsec_…")]
    pub webhook_secret: Option<String>,

    /// Let webhooks call private, loopback and link-local addresses (a server listening on
    /// loopback may always: it is one machine's).
    #[arg(long)]
    pub webhook_allow_private: bool,

    /// How often a webhook call is tried before it is given up.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=30))]
    pub webhook_max_attempts: u32,

    /// The wait before a failed webhook call's first retry, in seconds; each next one doubles (up
    /// to an hour).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS", value_parser = parse_timeout)]
    pub webhook_retry_seconds: f64,

    /// A folder of LoRAs (.safetensors files, or PEFT adapter folders) that requests may pick by
    /// name (`lora`), the name being the file's without `.safetensors`; `GET /v1/loras` lists them.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,

    #[command(flatten)]
    pub run: RunArgs,
}

/// Run jobs from a shared queue: the workers of a deployment of several machines, beside a
/// `t2v serve --workers 0` that takes the requests.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Example:\n  t2v worker --queue postgres://t2v:PW@db:5432/t2v --data /mnt/t2v --model damo-vilab/text-to-video-ms-1.7b"
)]
pub struct WorkerArgs {
    /// The model, as `t2v serve --model` (the same as the API's). [default: damo-vilab/text-to-video-ms-1.7b]
    #[arg(long, short = 'm')]
    pub model: Option<String>,

    /// The folder the results go to (videos/): the same folder the API reads, on a shared volume.
    #[arg(long, default_value = "t2v-data")]
    pub data: PathBuf,

    #[command(flatten)]
    pub queue: QueueArgs,

    /// How many workers run in this process, sharing one loaded model.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub workers: u64,

    /// Answer `GET /health` on this address (e.g. 0.0.0.0:8001), for an orchestrator's probes:
    /// 200 once the model is loaded, 503 before.
    #[arg(long, value_name = "ADDR:PORT")]
    pub health: Option<SocketAddr>,

    #[command(flatten)]
    pub run: RunArgs,
}

/// The queue's options, for the API and the workers.
#[derive(clap::Args, Debug, Clone)]
pub struct QueueArgs {
    /// The job queue: postgres://USER:PASSWORD@HOST:PORT/DATABASE, shared by the API and worker
    /// processes on any machine, or sqlite:PATH (one process). Read from T2V_QUEUE when not given.
    /// [default: sqlite: jobs.sqlite in --data]
    #[arg(long, env = "T2V_QUEUE", hide_env_values = true, value_name = "URL")]
    pub queue: Option<String>,

    /// How long a worker's claim on a job lasts without its heartbeat (renewed six times a
    /// period): a job whose worker died runs on another worker after this.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = parse_lease)]
    pub lease_seconds: f64,

    /// How often a job whose worker died (or whose server was killed) is started before it is
    /// failed (a job that kills its worker must not kill workers forever).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("a number of seconds from 0.1 to 3600, not `{s}`")),
    }
}

fn parse_lease(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.5..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("a number of seconds from 0.5 to 86400, not `{s}`")),
    }
}

impl QueueArgs {
    pub fn policy(&self) -> QueuePolicy {
        QueuePolicy { lease: Duration::from_secs_f64(self.lease_seconds), max_attempts: self.max_attempts }
    }
}

/// How jobs run, for the API's in-process workers and `t2v worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// A live preview every N denoising steps at most (less often when it would cost more than
    /// 2% of the steps); 0 turns previews off.
    #[arg(long, default_value_t = 2)]
    pub preview_every: usize,

    /// Where to run: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute precision: f32, f16, or bf16 (on the CPU: float16 or bfloat16 weights, float32
    /// activations, products in the narrow type where the CPU multiplies in it).
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// Never use the network: the model must be in the Hugging Face cache.
    #[arg(long)]
    pub offline: bool,

    /// A second model for zeroscope's two passes (such as cerspense/zeroscope_v2_XL): a request's
    /// `upscale` re-renders its video with it, by video-to-video at its size (default: its native
    /// size). Loaded for each such job once the first pass is done.
    #[arg(long, value_name = "MODEL")]
    pub upscale_model: Option<String>,
}

/// The served model, as the API describes it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// As given: a folder or a repo id (what the settings record). Never shown: a folder is a
    /// path of the server's.
    #[serde(skip)]
    pub spec: String,
    /// What the API calls it: the repo id, or the folder's name.
    pub name: String,
    pub native_width: usize,
    pub native_height: usize,
    pub vae_scale: usize,
    pub dtype: String,
    pub video_to_video: bool,
}

/// Running figures, for `/v1/t2v/info`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stats {
    /// Jobs this process ran to an end (of any kind).
    pub jobs_run: u64,
    pub steps: u64,
    pub step_s_total: f64,
    pub previews: u64,
    pub preview_s_total: f64,
}

impl Stats {
    pub fn record_step(&mut self, seconds: f64) {
        self.steps += 1;
        self.step_s_total += seconds;
    }

    pub fn record_preview(&mut self, seconds: f64) {
        self.previews += 1;
        self.preview_s_total += seconds;
    }

    pub fn mean_step_s(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.step_s_total / self.steps as f64)
    }

    pub fn mean_preview_s(&self) -> Option<f64> {
        (self.previews > 0).then(|| self.preview_s_total / self.previews as f64)
    }
}

/// What the API and the workers of one process share.
pub struct Shared {
    pub store: Arc<dyn JobStore>,
    pub hub: events::Hub,
    pub model: ModelInfo,
    pub videos_dir: PathBuf,
    /// Where workers publish results (the folder `videos_dir`).
    pub results: Box<dyn ResultStore>,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub preview_every: usize,
    pub policy: QueuePolicy,
    /// This process, in stored events: the relay passes on only other processes' events.
    pub origin: String,
    /// Other processes share the store: events go through it too.
    pub relay_events: bool,
    /// Workers in this process.
    pub workers: usize,
    /// The model is loaded (or, without workers, its configuration read).
    pub ready: AtomicBool,
    /// Wakes the workers when a job is queued.
    pub wake: tokio::sync::Notify,
    /// Running jobs asked to stop.
    pub cancels: Mutex<HashSet<String>>,
    /// The process is shutting down: running jobs stop at their next step and wait in the queue.
    pub stopping: AtomicBool,
    /// Ends the event streams at shutdown.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    pub stats: Mutex<Stats>,
    /// Uploads checked (decoded) at once: each may hold a frame budget's worth of memory.
    pub decodes: tokio::sync::Semaphore,
    /// Webhook settings, and the calls' bookkeeping.
    pub webhooks: webhook::Webhooks,
    /// The LoRAs requests may pick, by name (`--lora-dir`).
    pub loras: std::collections::BTreeMap<String, PathBuf>,
    /// The model's scheduler config and its path: requests the worker's scheduler would refuse
    /// are refused when they arrive.
    pub scheduler_config: Option<(serde_json::Value, PathBuf)>,
    /// The second model of `upscale` requests (`--upscale-model`): its folder and description.
    pub upscale: Option<(PathBuf, ModelInfo)>,
    /// The URL this server listens on (links of jobs whose client's `Host` is unknown).
    pub listen_url: std::sync::OnceLock<String>,
}

/// Uploaded videos decoded at once.
pub const CONCURRENT_DECODES: usize = 2;

impl Shared {
    /// `message` with the server's own paths (the data folder, the model's folder) taken out:
    /// answers never show where the server keeps its files.
    pub fn redact(&self, message: &str) -> String {
        let mut out = message.to_string();
        let mut paths = vec![self.videos_dir.clone()];
        if let Ok(p) = std::fs::canonicalize(&self.videos_dir) {
            paths.push(p);
        }
        let spec = std::path::Path::new(&self.model.spec);
        if spec.is_absolute() || spec.exists() {
            paths.push(spec.to_path_buf());
            if let Ok(p) = std::fs::canonicalize(spec) {
                paths.push(p);
            }
        }
        // Longest first: a folder inside another is replaced whole.
        paths.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in paths {
            let text = p.display().to_string();
            if text.len() > 1 {
                let name = if p.starts_with(&self.videos_dir) || text.ends_with("videos") { "videos" } else { "model" };
                out = out.replace(&text, &format!("<{name}>"));
            }
        }
        out
    }
}

impl Shared {
    /// Sends `event` to this process's event streams and, when other processes share the store,
    /// through the store to theirs.
    pub async fn publish(&self, event: Arc<JobEvent>) {
        self.hub.send(event.clone());
        if self.relay_events {
            if let Err(e) = self.store.push_event(&self.origin, &event.id, event.name, &event.data).await {
                eprintln!("t2v: storing the {} event of {}: {e:#}", event.name, event.id);
            }
        }
        // Where the event happens (this process), its webhook calls are kept: once each.
        webhook::on_event(self, &event).await;
    }
}

/// Runs the server until SIGTERM or Ctrl-C.
pub fn run(args: ServeArgs) -> Result<()> {
    runtime()?.block_on(serve(args))
}

/// Runs workers until SIGTERM or Ctrl-C.
pub fn run_worker(args: WorkerArgs) -> Result<()> {
    runtime()?.block_on(worker_process(args))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("t2v-serve")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn dtype_of(name: &str) -> Result<DType> {
    t2v::params::parse_dtype(name).map_err(|e| anyhow::anyhow!("--dtype: {e}"))
}

/// This machine's name, for worker names.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String =
        name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').take(63).collect();
    if name.is_empty() {
        "host".into()
    } else {
        name
    }
}

/// The names of this process's workers: `HOST-PID-wI`. In a container the process id is the same
/// after a restart, so a restarted worker settles its dead predecessor's jobs at once
/// ([`JobStore::recover`] with [`worker_prefix`]) instead of after their lease.
fn worker_names(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{}w{i}", worker_prefix())).collect()
}

fn worker_prefix() -> String {
    format!("{}-{}-", hostname(), std::process::id())
}

/// The model's folder (downloaded when needed) and what the API says of it.
async fn find_model(spec: Option<&str>, run: &RunArgs) -> Result<(PathBuf, ModelInfo)> {
    let spec = spec.map(str::to_string).unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let folder = {
        let (given, offline) = (spec.clone(), run.offline);
        tokio::task::spawn_blocking(move || {
            let mut opts = HubOptions::from_env();
            opts.offline |= offline;
            hub::resolve_model(&given, &opts).map_err(anyhow::Error::from)
        })
        .await?
        .with_context(|| format!("finding the model {spec}"))?
    };
    let model_folder = ModelFolder::open(&folder).with_context(|| format!("opening the model {spec}"))?;
    let unet: t2v::unet3d::Config = model_folder.config("unet", "config.json")?;
    let vae: t2v::vae::Config = model_folder.config("vae", "config.json")?;
    let vae_scale = vae.scale_factor();
    let native = unet.sample_size.unwrap_or(32) * vae_scale;
    let name = if hub::RepoSpec::parse(&spec).is_some() && !std::path::Path::new(&spec).exists() {
        spec.clone()
    } else {
        folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| spec.clone())
    };
    let model = ModelInfo {
        spec: spec.clone(),
        name,
        native_width: native,
        native_height: native,
        vae_scale,
        dtype: run.dtype.to_ascii_lowercase(),
        video_to_video: true,
    };
    Ok((folder, model))
}

/// The second model of `--upscale-model`, found (downloaded when needed) at start.
async fn upscale_model(run: &RunArgs) -> Result<Option<(PathBuf, ModelInfo)>> {
    match &run.upscale_model {
        None => Ok(None),
        Some(spec) => Ok(Some(find_model(Some(spec), run).await.context("--upscale-model")?)),
    }
}

/// The device and precision, checked before anything loads.
fn load_options(run: &RunArgs) -> Result<LoadOptions> {
    let dtype = dtype_of(&run.dtype)?;
    let device = pipeline::select_device(&run.device)?;
    Ok(LoadOptions { device, dtype, variant: WeightsVariant::Auto, ..LoadOptions::default() })
}

/// Settles the jobs a dead earlier run of this process left running: on SQLite every one (no
/// other process uses the file), on a shared queue those of workers with this process's names.
async fn recover(store: &dyn JobStore, policy: QueuePolicy, who: &str) -> Result<()> {
    let prefix = worker_prefix();
    let workers = (store.backend() != "sqlite").then_some(prefix.as_str());
    let recovery = store.recover(policy.max_attempts, workers).await?;
    if !recovery.requeued.is_empty() {
        eprintln!(
            "t2v {who}: {} job(s) were running when this {who} stopped; queued again: {}",
            recovery.requeued.len(),
            recovery.requeued.join(", ")
        );
    }
    if !recovery.failed.is_empty() {
        eprintln!("t2v {who}: failed after too many interrupted attempts: {}", recovery.failed.join(", "));
    }
    Ok(())
}

struct Parts {
    store: Arc<dyn JobStore>,
    model: ModelInfo,
    data: PathBuf,
    api_key: Option<String>,
    limits: Limits,
    preview_every: usize,
    policy: QueuePolicy,
    workers: usize,
    webhooks: webhook::Webhooks,
    loras: std::collections::BTreeMap<String, PathBuf>,
    scheduler_config: Option<(serde_json::Value, PathBuf)>,
    upscale: Option<(PathBuf, ModelInfo)>,
}

fn shared(p: Parts) -> Result<Arc<Shared>> {
    let videos_dir = p.data.join("videos");
    std::fs::create_dir_all(&videos_dir).with_context(|| format!("creating the data folder {}", p.data.display()))?;
    let results = storage::Folder { dir: videos_dir.clone() };
    // What workers that died left staged or half written: nobody publishes it now. With SQLite
    // this process is the only one using the folder, so all of it; a shared folder may hold other
    // processes' work in progress, so only what is old.
    let age = if p.store.backend() == "sqlite" { Duration::ZERO } else { Duration::from_secs(3600) };
    results.remove_stale(age);
    let (shutdown, _) = tokio::sync::watch::channel(false);
    Ok(Arc::new(Shared {
        relay_events: p.store.backend() != "sqlite",
        store: p.store,
        hub: events::Hub::new(),
        model: p.model,
        videos_dir,
        results: Box::new(results),
        api_key: p.api_key,
        limits: p.limits,
        preview_every: p.preview_every,
        policy: p.policy,
        origin: format!("{}{}", worker_prefix(), uuid::Uuid::new_v4().simple()),
        workers: p.workers,
        ready: AtomicBool::new(false),
        wake: tokio::sync::Notify::new(),
        cancels: Mutex::new(HashSet::new()),
        stopping: AtomicBool::new(false),
        shutdown,
        stats: Mutex::new(Stats::default()),
        decodes: tokio::sync::Semaphore::new(CONCURRENT_DECODES),
        webhooks: p.webhooks,
        loras: p.loras,
        scheduler_config: p.scheduler_config,
        upscale: p.upscale,
        listen_url: std::sync::OnceLock::new(),
    }))
}

/// The model's thread with its workers.
struct Workers {
    thread: std::thread::JoinHandle<()>,
    /// Says when the model is loaded (or why it could not be).
    loaded: tokio::sync::oneshot::Receiver<Result<()>>,
    /// Fires when the workers end: at shutdown, or when one failed (then the process stops too,
    /// for its supervisor to start it again).
    ended: tokio::sync::oneshot::Receiver<()>,
}

/// Starts the model's thread with `count` workers.
fn start_workers(shared: &Arc<Shared>, folder: PathBuf, options: LoadOptions, count: usize) -> Result<Workers> {
    let (loaded_tx, loaded) = tokio::sync::oneshot::channel();
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    let (shared, handle) = (shared.clone(), tokio::runtime::Handle::current());
    let names = worker_names(count);
    let thread = std::thread::Builder::new()
        .name("t2v-model".into())
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| worker::run(shared, handle, folder, options, loaded_tx, names));
            if std::panic::catch_unwind(run).is_err() {
                eprintln!("t2v: a worker failed; stopping");
            }
            let _ = ended_tx.send(());
        })
        .context("starting the model thread")?;
    Ok(Workers { thread, loaded, ended })
}

/// Waits for the model to load, then for a stop signal; an error when the workers end first.
async fn run_until_stopped(workers: &mut Workers, ready: impl FnOnce()) -> Result<()> {
    let mut signal = std::pin::pin!(stop_signal());
    tokio::select! {
        loaded = &mut workers.loaded => match loaded {
            Ok(Ok(())) => {
                ready();
                tokio::select! {
                    _ = &mut signal => Ok(()),
                    _ = &mut workers.ended => Err(anyhow::anyhow!("the workers stopped unexpectedly")),
                }
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow::anyhow!("the model thread stopped while loading")),
        },
        _ = &mut signal => Ok(()),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    if !is_loopback(&args.host) && args.api_key.as_deref().is_none_or(str::is_empty) {
        bail!(
            "listening on {} lets other machines use this server: give it a key with --api-key KEY (or the T2V_API_KEY variable), \
             which clients send as `Authorization: Bearer KEY`",
            args.host
        );
    }
    let options = load_options(&args.run)?;
    // The model's folder and configs first: a wrong --model fails before anything else.
    let (folder, model) = find_model(args.model.as_deref(), &args.run).await?;
    let spec = model.spec.clone();

    std::fs::create_dir_all(&args.data).with_context(|| format!("creating the data folder {}", args.data.display()))?;
    let store = store::open(args.queue.queue.as_deref(), &args.data).await?;
    if args.workers == 0 && store.backend() == "sqlite" {
        bail!(
            "--workers 0 leaves the jobs to worker processes, which need a queue they share: \
             give --queue postgres://USER:PASSWORD@HOST:PORT/DATABASE (SQLite serves one process)"
        );
    }
    let policy = args.queue.policy();
    if args.workers > 0 {
        recover(store.as_ref(), policy, "serve").await?;
    }

    let native_cost = (model.native_width * model.native_height) as u64 * 64 * 100;
    let limits = Limits {
        max_frames: args.max_frames.max(1),
        max_side: 2048,
        max_steps: 1000,
        max_prompt_chars: 10_000,
        max_json_bytes: 1 << 20,
        max_upload_bytes: args.max_upload_mb.max(1) << 20,
        max_job_cost: args.max_job_cost.unwrap_or(native_cost).max(1),
        max_queued: args.max_queued,
        max_source_pixels: request::MAX_SOURCE_PIXELS,
        max_source_frames: request::MAX_SOURCE_FRAMES,
    };
    let host = args.host.trim_matches(['[', ']']);
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::from([127, 0, 0, 1])
    } else {
        host.parse().with_context(|| format!("--host {host} is not an IP address"))?
    };
    let (signer, new_secret) = webhook::secret(args.webhook_secret.as_deref(), &args.data)?;
    if let Some(secret) = new_secret {
        println!(
            "t2v serve: webhooks are signed with this new secret (kept in {}; give receivers it): {secret}",
            args.data.join("webhook-secret").display()
        );
    }
    let webhooks = webhook::Webhooks::new(
        Some(signer),
        args.webhook_allow_private || ip.is_loopback(),
        Duration::from_secs_f64(args.webhook_retry_seconds),
        args.webhook_max_attempts,
    );
    let loras = match &args.lora_dir {
        Some(dir) => find_loras(dir, &folder)?,
        None => Default::default(),
    };
    let scheduler_path = folder.join("scheduler").join("scheduler_config.json");
    let scheduler_config = match t2v::schedulers::load_scheduler_config(&scheduler_path) {
        Ok(json) => Some((json, scheduler_path)),
        Err(e) => {
            eprintln!("t2v serve: requests' step counts are checked by the workers only: {e}");
            None
        }
    };
    let shared = shared(Parts {
        store,
        model,
        data: args.data.clone(),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        limits,
        preview_every: args.run.preview_every,
        policy,
        workers: args.workers,
        webhooks,
        loras,
        scheduler_config,
        upscale: upscale_model(&args.run).await?,
    })?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, args.port))
        .await
        .with_context(|| format!("listening on {host}:{}", args.port))?;
    let addr = listener.local_addr()?;
    let url =
        if addr.is_ipv6() { format!("http://[{}]:{}/", addr.ip(), addr.port()) } else { format!("http://{addr}/") };
    let _ = shared.listen_url.set(url.trim_end_matches('/').to_string());
    println!(
        "t2v serve: listening on {url} (data: {}, queue: {}, workers: {}); loading {spec}",
        args.data.display(),
        shared.store.backend(),
        args.workers
    );

    if args.workers > 0 && shared.store.backend() == "sqlite" {
        // Inputs whose job is gone (a server killed between storing an upload and queueing it).
        remove_orphan_inputs(&shared).await;
    }
    let policy = guard::Policy { loopback: ip.is_loopback(), cors: args.cors.clone() };
    let app = api::router(shared.clone(), &args.cors, policy)?;
    let conn_limits = conn::ConnLimits {
        header_timeout: Duration::from_secs_f64(args.header_timeout),
        max_connections: conn::connection_cap(args.max_connections as usize),
    };
    let server = tokio::spawn(conn::serve(listener, app, conn_limits, shared.shutdown.subscribe()));
    if shared.relay_events {
        tokio::spawn(relay::run(shared.clone()));
    }
    tokio::spawn(webhook::deliver(shared.clone()));

    let (worker, result) = if args.workers == 0 {
        shared.ready.store(true, Ordering::SeqCst);
        println!("t2v serve: ready at {url}");
        stop_signal().await;
        (None, Ok(()))
    } else {
        let mut workers = start_workers(&shared, folder, options, args.workers)?;
        let result = run_until_stopped(&mut workers, || println!("t2v serve: ready at {url}")).await;
        (Some(workers.thread), result)
    };

    // Stop: running jobs halt at their next step and go back to the queue; streams end.
    eprintln!("t2v serve: stopping");
    stop_workers(&shared, worker).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    result
}

/// The LoRAs of `--lora-dir`: each `.safetensors` file (named without the extension) and each
/// PEFT adapter folder, checked against the model (one that does not fit is left out, said why).
fn find_loras(dir: &std::path::Path, model: &std::path::Path) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let mut found = std::collections::BTreeMap::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading --lora-dir {}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let name = if path.is_dir() && path.join("adapter_config.json").is_file() {
            name
        } else if let Some(stem) = name.strip_suffix(".safetensors") {
            stem.to_string()
        } else {
            continue;
        };
        if name.is_empty()
            || name.len() > 128
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            eprintln!("t2v serve: --lora-dir: `{name}` is left out: name LoRAs with letters, digits, `-`, `_` and `.`");
            continue;
        }
        let spec = t2v::lora::LoraSpec::new(&path, 1.0);
        match pipeline::check_loras(model, &[spec], WeightsVariant::Auto) {
            Ok(_) => {
                found.insert(name, path);
            }
            Err(e) => eprintln!("t2v serve: --lora-dir: `{name}` is left out: {e}"),
        }
    }
    println!(
        "t2v serve: {} LoRA(s) in {}: {}",
        found.len(),
        dir.display(),
        found.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    Ok(found)
}

/// Removes the input videos (and results) of jobs the store does not know: what a server killed
/// between storing an upload and queueing its job left.
async fn remove_orphan_inputs(shared: &Shared) {
    let Ok(entries) = std::fs::read_dir(&shared.videos_dir) else { return };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.split('.').next().filter(|id| api::is_job_id(id)) else { continue };
        if matches!(shared.store.get(id).await, Ok(None)) {
            let _ = std::fs::remove_file(entry.path());
            removed += 1;
        }
    }
    if removed > 0 {
        eprintln!("t2v serve: removed {removed} file(s) of jobs that do not exist");
    }
}

/// Stops the workers: each running job halts at its next step and goes back to the queue.
async fn stop_workers(shared: &Arc<Shared>, worker: Option<std::thread::JoinHandle<()>>) {
    shared.stopping.store(true, Ordering::SeqCst);
    shared.wake.notify_waiters();
    let _ = shared.shutdown.send(true);
    if let Some(worker) = worker {
        let joined = tokio::task::spawn_blocking(move || worker.join());
        // Decoding a long video cannot stop halfway; after a minute the job is left to its lease.
        if tokio::time::timeout(Duration::from_secs(60), joined).await.is_err() {
            eprintln!("t2v: a running job did not stop in time; it runs again once its lease expires");
        }
    }
}

async fn worker_process(args: WorkerArgs) -> Result<()> {
    let options = load_options(&args.run)?;
    let (folder, model) = find_model(args.model.as_deref(), &args.run).await?;
    std::fs::create_dir_all(&args.data).with_context(|| format!("creating the data folder {}", args.data.display()))?;
    let Some(queue) = args.queue.queue.as_deref().filter(|q| !q.trim().is_empty()) else {
        bail!("a worker needs the queue it shares with the API: --queue postgres://USER:PASSWORD@HOST:PORT/DATABASE (or T2V_QUEUE)");
    };
    let store = store::open(Some(queue), &args.data).await?;
    if store.backend() == "sqlite" {
        bail!(
            "SQLite serves one process: run the workers inside it (`t2v serve --workers N`), \
             or share a PostgreSQL queue (--queue postgres://…) with worker processes"
        );
    }
    let policy = args.queue.policy();
    recover(store.as_ref(), policy, "worker").await?;
    let count = args.workers as usize;
    let shared = shared(Parts {
        store,
        model,
        data: args.data.clone(),
        api_key: None,
        limits: Limits::none(),
        preview_every: args.run.preview_every,
        policy,
        workers: count,
        // Worker processes keep their jobs' webhook calls; the API process delivers them.
        webhooks: webhook::Webhooks::new(None, false, Duration::from_secs(5), 8),
        loras: Default::default(),
        scheduler_config: None,
        upscale: upscale_model(&args.run).await?,
    })?;
    if let Some(addr) = args.health {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} for --health"))?;
        let app = api::health_router(shared.clone());
        let limits =
            conn::ConnLimits { header_timeout: Duration::from_secs(10), max_connections: conn::connection_cap(64) };
        tokio::spawn(conn::serve(listener, app, limits, shared.shutdown.subscribe()));
    }
    println!(
        "t2v worker: {} worker(s) {} on the {} queue (lease {:.1}s, at most {} attempts); loading {}",
        count,
        worker_names(count).join(", "),
        shared.store.backend(),
        policy.lease.as_secs_f64(),
        policy.max_attempts,
        shared.model.spec
    );
    let mut workers = start_workers(&shared, folder, options, count)?;
    let result = run_until_stopped(&mut workers, || println!("t2v worker: ready")).await;
    eprintln!("t2v worker: stopping");
    stop_workers(&shared, Some(workers.thread)).await;
    result
}

/// SIGTERM or Ctrl-C (SIGINT).
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
