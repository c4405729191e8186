//! `t2v serve`: the model loaded once behind an HTTP API in the shape of OpenAI's videos API, a web
//! page at `/`, and a queue of jobs in SQLite that survives restarts.
//!
//! The pieces: [`store`] (the queue and history, behind the [`store::JobStore`] interface),
//! [`worker`] (the model's thread), [`api`] (the routes), [`events`] (live progress for the event
//! streams), [`preview`] (cheap previews of the latents), [`request`] (checking a request's fields).

pub mod api;
pub mod error;
pub mod events;
pub mod openapi;
pub mod preview;
pub mod request;
pub mod store;
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

use crate::request::Limits;
use crate::store::{JobStore, SqliteStore};

/// Serve a model over HTTP: an API in the shape of OpenAI's videos API and a web page.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  t2v serve                                   # http://127.0.0.1:8000/\n  t2v serve --host 0.0.0.0 --api-key \"$KEY\"   # reachable from other machines\n\nOpenAI clients work by changing the base URL, e.g. in Python:\n  OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=\"KEY\").videos.create_and_poll(prompt=\"a corgi\")"
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

    /// The folder for the job store (jobs.sqlite) and the videos (videos/); created if missing.
    /// Reuse it to keep the queue and the history across restarts.
    #[arg(long, default_value = "t2v-data")]
    pub data: PathBuf,

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

    /// The most frames one job may ask for.
    #[arg(long, default_value_t = 256)]
    pub max_frames: usize,

    /// How often a job that was running when the server died is started again before it is
    /// failed (a job that kills the process must not kill it forever).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// A live preview every N denoising steps at most (less often when it would cost more than
    /// 2% of the steps); 0 turns previews off.
    #[arg(long, default_value_t = 2)]
    pub preview_every: usize,

    /// Where to run: cpu, cuda, cuda:N, metal, metal:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute precision: f32, f16, or bf16 (GPUs only).
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// Never use the network: the model must be in the Hugging Face cache.
    #[arg(long)]
    pub offline: bool,
}

/// The served model, as the API describes it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// As given: a folder or a repo id (what the settings record).
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

/// What the API and the worker share.
pub struct Shared {
    pub store: Arc<dyn JobStore>,
    pub hub: events::Hub,
    pub model: ModelInfo,
    pub videos_dir: PathBuf,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub preview_every: usize,
    /// The model is loaded.
    pub ready: AtomicBool,
    /// Wakes the worker when a job is queued.
    pub wake: tokio::sync::Notify,
    /// Running jobs asked to stop.
    pub cancels: Mutex<HashSet<String>>,
    /// The server is shutting down: the running job stops at its next step and waits in the queue.
    pub stopping: AtomicBool,
    /// Ends the event streams at shutdown.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    pub stats: Mutex<Stats>,
}

/// Runs the server until SIGTERM or Ctrl-C.
pub fn run(args: ServeArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("t2v-serve")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn dtype_of(name: &str) -> Result<DType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown --dtype `{other}`: use f32, f16 or bf16"),
    })
}

async fn serve(args: ServeArgs) -> Result<()> {
    if !is_loopback(&args.host) && args.api_key.as_deref().is_none_or(str::is_empty) {
        bail!(
            "listening on {} lets other machines use this server: give it a key with --api-key KEY (or the T2V_API_KEY variable), \
             which clients send as `Authorization: Bearer KEY`",
            args.host
        );
    }
    let dtype = dtype_of(&args.dtype)?;
    let device = pipeline::select_device(&args.device)?;
    if dtype == DType::BF16 && device.is_cpu() {
        bail!("--dtype bf16 needs a GPU: use --dtype f32 (fastest on the CPU) or f16");
    }

    // The model's folder and configs first: a wrong --model fails before anything else.
    let spec = args.model.clone().unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let folder = {
        let (given, offline) = (spec.clone(), args.offline);
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
        dtype: args.dtype.to_ascii_lowercase(),
        video_to_video: true,
    };

    // The data folder: the job store, and the videos beside it.
    let videos_dir = args.data.join("videos");
    std::fs::create_dir_all(&videos_dir)
        .with_context(|| format!("creating the data folder {}", args.data.display()))?;
    let store = SqliteStore::open(&args.data.join("jobs.sqlite"))?;
    let recovery = store.recover(args.max_attempts).await?;
    if !recovery.requeued.is_empty() {
        eprintln!(
            "t2v serve: {} job(s) were running when the server stopped; queued again: {}",
            recovery.requeued.len(),
            recovery.requeued.join(", ")
        );
    }
    if !recovery.failed.is_empty() {
        eprintln!("t2v serve: failed after too many interrupted attempts: {}", recovery.failed.join(", "));
    }

    let limits = Limits {
        max_frames: args.max_frames.max(1),
        max_side: 2048,
        max_steps: 1000,
        max_prompt_chars: 10_000,
        max_json_bytes: 1 << 20,
        max_upload_bytes: args.max_upload_mb.max(1) << 20,
    };
    let (shutdown, _) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        store: Arc::new(store),
        hub: events::Hub::new(),
        model,
        videos_dir,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        limits,
        preview_every: args.preview_every,
        ready: AtomicBool::new(false),
        wake: tokio::sync::Notify::new(),
        cancels: Mutex::new(HashSet::new()),
        stopping: AtomicBool::new(false),
        shutdown,
        stats: Mutex::new(Stats::default()),
    });

    let host = args.host.trim_matches(['[', ']']);
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::from([127, 0, 0, 1])
    } else {
        host.parse().with_context(|| format!("--host {host} is not an IP address"))?
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, args.port))
        .await
        .with_context(|| format!("listening on {host}:{}", args.port))?;
    let addr = listener.local_addr()?;
    let url =
        if addr.is_ipv6() { format!("http://[{}]:{}/", addr.ip(), addr.port()) } else { format!("http://{addr}/") };
    println!("t2v serve: listening on {url} (data: {}); loading {spec}", args.data.display());

    let app = api::router(shared.clone(), &args.cors)?;
    let server = {
        let mut stop = shared.shutdown.subscribe();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };

    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let options = LoadOptions { device, dtype, variant: WeightsVariant::Auto, ..LoadOptions::default() };
    let worker = {
        let (shared, handle) = (shared.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name("t2v-model".into())
            .spawn(move || worker::run(shared, handle, folder, options, loaded_tx))
            .context("starting the model thread")?
    };

    let mut signal = std::pin::pin!(stop_signal());
    let result = tokio::select! {
        loaded = loaded_rx => match loaded {
            Ok(Ok(())) => {
                println!("t2v serve: ready at {url}");
                (&mut signal).await;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow::anyhow!("the model thread stopped while loading")),
        },
        _ = &mut signal => Ok(()),
    };

    // Stop: the running job halts at its next step and goes back to the queue; streams end.
    eprintln!("t2v serve: stopping");
    shared.stopping.store(true, Ordering::SeqCst);
    shared.wake.notify_one();
    let _ = shared.shutdown.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let joined = tokio::task::spawn_blocking(move || worker.join());
    // Decoding a long video cannot stop halfway; after a minute the job is left to the next start.
    if tokio::time::timeout(Duration::from_secs(60), joined).await.is_err() {
        eprintln!("t2v serve: the running job did not stop in time; it runs again at the next start");
    }
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
