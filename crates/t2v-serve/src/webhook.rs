//! Webhooks for both APIs: a job's events become calls kept in the job store (so that retries
//! with backoff survive a restart), delivered by the API process and signed as the Standard
//! Webhooks specification says: `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed by the bytes of the
//! server's secret (`whsec_` + base64).
//!
//! Which calls: a prediction (Cog's API) sends Cog's events, `start` (queued, `starting`), `logs`
//! (progress, at most every 500 ms), `output` and `completed`, each body the prediction object, as
//! `webhook_events_filter` chooses; a video (`/v1/videos`) sends OpenAI's `video.completed` and
//! `video.failed` events. Targets are http(s) only; private, loopback and link-local addresses only
//! when the server listens on loopback itself or `--webhook-allow-private` says so, checked on the
//! addresses the name resolves to at each call (a name that resolves elsewhere later is refused then).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};

use crate::events::JobEvent;
use crate::store::{now_ms, DeliveryOutcome, Job, JobStatus};
use crate::Shared;

/// The events a prediction's webhook may ask for (Cog's `WebhookEvent`).
pub const PREDICTION_EVENTS: &[&str] = &["start", "output", "logs", "completed"];

/// `logs` calls of one prediction: at most one per this long (Cog's rate).
const LOGS_EVERY: Duration = Duration::from_millis(500);

/// Calls claimed at once, and how long a claim holds.
const BATCH: usize = 16;
const HOLD: Duration = Duration::from_secs(60);
/// Each call's time limit.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Ended deliveries are kept this long (for `/v1/t2v/info`'s counts).
const KEEP_ENDED_MS: i64 = 7 * 24 * 3600 * 1000;

/// The signing key: the bytes of the base64 after `whsec_`.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// `whsec_BASE64` (the prefix may be left out), at least 16 bytes of key.
    pub fn parse(secret: &str) -> Result<Self> {
        let text = secret.trim();
        let b64 = text.strip_prefix("whsec_").unwrap_or(text);
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .context("the webhook secret must be whsec_ followed by base64 (as `t2v serve` prints a new one)")?;
        if key.len() < 16 {
            bail!("the webhook secret holds {} bytes: give at least 16 (24 to 64 is usual)", key.len());
        }
        Ok(Self { key })
    }

    /// A new random secret, as text.
    pub fn generate() -> String {
        let mut bytes = Vec::with_capacity(32);
        bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// The `webhook-signature` value of a call: `v1,` and the base64 HMAC-SHA256 of
    /// `msg_id.timestamp.body`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &str) -> String {
        let mut mac = hmac::Hmac::<sha2_hmac::Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
        mac.update(body.as_bytes());
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The secret to sign with: `given`, else the one kept in `data/webhook-secret`, else a new one
/// written there (readable by the owner only). Returns it and whether it is new (to be shown once).
pub fn secret(given: Option<&str>, data: &Path) -> Result<(Signer, Option<String>)> {
    if let Some(s) = given.map(str::trim).filter(|s| !s.is_empty()) {
        return Ok((Signer::parse(s).context("--webhook-secret")?, None));
    }
    let path = data.join("webhook-secret");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok((Signer::parse(&text).with_context(|| format!("the webhook secret in {}", path.display()))?, None));
    }
    let text = Signer::generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).with_context(|| format!("writing the webhook secret to {}", path.display()))?;
    io::Write::write_all(&mut file, format!("{text}\n").as_bytes())?;
    Ok((Signer::parse(&text)?, Some(text)))
}

/// Whether a webhook may call `ip`: public addresses always; private, loopback, link-local and
/// the like only with `allow_private`. Never the unspecified, broadcast or multicast ones.
pub fn address_allowed(ip: IpAddr, allow_private: bool) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || o[0] == 0 || o[0] >= 240 {
                return false;
            }
            let private = v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space (RFC 6598)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || (o[0] == 198 && (18..20).contains(&o[1])); // benchmarking
            !private || allow_private
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_unspecified() || v6.is_multicast() {
                return false;
            }
            let private = v6.is_loopback()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || s[0] == 0x64 && s[1] == 0xff9b // NAT64: may reach any IPv4
                || s[0] == 0x2002; // 6to4: may reach any IPv4
            !private || allow_private
        }
    }
}

/// Checks a webhook URL when a request gives it: http or https, a host, no credentials, and a
/// literal address (or `localhost`) that [`address_allowed`]. Names are checked on their
/// addresses at each call.
pub fn check_url(text: &str, allow_private: bool) -> Result<url::Url, String> {
    if text.len() > 2048 {
        return Err("the webhook URL is longer than 2048 characters".into());
    }
    let url = url::Url::parse(text).map_err(|e| format!("the webhook is not a URL ({e}): give http(s)://HOST/PATH"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("the webhook must be an http or https URL, not {}:", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the webhook URL may not hold a user name or password".into());
    }
    let refused = |what: &str| {
        format!(
            "the webhook names {what}, a private, loopback or reserved address, which this server does not call \
             (a server listening on loopback, or started with --webhook-allow-private, does)"
        )
    };
    match url.host() {
        None => return Err("the webhook URL has no host".into()),
        Some(url::Host::Ipv4(v4)) if !address_allowed(IpAddr::V4(v4), allow_private) => {
            return Err(refused(&v4.to_string()))
        }
        Some(url::Host::Ipv6(v6)) if !address_allowed(IpAddr::V6(v6), allow_private) => {
            return Err(refused(&v6.to_string()))
        }
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if (d == "localhost" || d.ends_with(".localhost")) && !allow_private {
                return Err(refused(&d));
            }
        }
        _ => {}
    }
    Ok(url)
}

/// Resolves a name for a webhook call, refusing it when any of its addresses may not be called:
/// the addresses checked are the ones connected to.
struct CheckedResolver {
    allow_private: bool,
}

impl ureq::Resolver for CheckedResolver {
    fn resolve(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        if let Some(bad) = addrs.iter().find(|a| !address_allowed(a.ip(), self.allow_private)) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{netloc} resolves to {}, a private, loopback or reserved address", bad.ip()),
            ));
        }
        Ok(addrs)
    }
}

/// The webhook settings of a process, and what it remembers of the jobs it calls for.
pub struct Webhooks {
    /// Only the API process signs and delivers (`None` in worker processes, which only keep calls).
    pub signer: Option<Signer>,
    pub allow_private: bool,
    /// The first retry's wait; each next one doubles, up to an hour.
    pub retry_base: Duration,
    /// Calls are tried at most this many times.
    pub max_attempts: u32,
    /// Wakes the deliverer when a call is kept.
    pub wake: tokio::sync::Notify,
    /// Per job: its webhook (or none), and when its last `logs` call was kept.
    jobs: Mutex<HashMap<String, Known>>,
}

#[derive(Clone)]
struct Known {
    has_webhook: bool,
    last_logs: Option<Instant>,
}

impl Webhooks {
    pub fn new(signer: Option<Signer>, allow_private: bool, retry_base: Duration, max_attempts: u32) -> Self {
        Self {
            signer,
            allow_private,
            retry_base,
            max_attempts: max_attempts.max(1),
            wake: tokio::sync::Notify::new(),
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// Notes whether `job` has a webhook (known when it is queued or claimed): events of jobs
    /// without one then cost no read of the store.
    pub fn remember(&self, job: &Job) {
        let mut jobs = self.jobs.lock().expect("webhooks lock");
        // Jobs that end in another process are never told of here: forget all now and then (an
        // entry only saves a read).
        if jobs.len() > 10_000 {
            jobs.clear();
        }
        jobs.entry(job.id.clone()).or_insert(Known { has_webhook: job.meta.webhook.is_some(), last_logs: None });
    }

    /// When the call that failed its `attempt`-th time (1-based) is tried again.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        (self.retry_base * factor).min(Duration::from_secs(3600))
    }
}

/// Keeps the webhook calls `event` makes (called for every event this process publishes).
pub async fn on_event(shared: &Shared, event: &JobEvent) {
    let hooks = &shared.webhooks;
    let id = &event.id;
    let known = hooks.jobs.lock().expect("webhooks lock").get(id).cloned();
    if known.as_ref().is_some_and(|k| !k.has_webhook) {
        if event.is_last() {
            hooks.jobs.lock().expect("webhooks lock").remove(id);
        }
        return;
    }
    let wanted = match event.name {
        "queued" | "completed" | "failed" => true,
        // Throttled before the store is read.
        "progress" => known.as_ref().and_then(|k| k.last_logs).is_none_or(|t| t.elapsed() >= LOGS_EVERY),
        _ => false,
    };
    if !wanted && known.is_some() {
        return;
    }
    let job = match shared.store.get(id).await {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(e) => {
            eprintln!("t2v: reading {id} for its webhook: {e:#}");
            return;
        }
    };
    let Some(url) = job.meta.webhook.clone() else {
        if !event.is_last() {
            hooks.jobs.lock().expect("webhooks lock").insert(id.clone(), Known { has_webhook: false, last_logs: None });
        }
        return;
    };
    {
        let mut jobs = hooks.jobs.lock().expect("webhooks lock");
        if event.is_last() {
            jobs.remove(id);
        } else {
            let entry = jobs.entry(id.clone()).or_insert(Known { has_webhook: true, last_logs: None });
            if event.name == "progress" {
                if !wanted {
                    return;
                }
                entry.last_logs = Some(Instant::now());
            }
        }
    }
    for (name, body) in calls(shared, &job, event) {
        let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        if let Err(e) = shared.store.enqueue_delivery(&msg_id, id, name, &url, &body.to_string()).await {
            eprintln!("t2v: keeping the {name} webhook of {id}: {e:#}");
        }
    }
    hooks.wake.notify_one();
}

/// The calls an event makes: (event name, body).
fn calls(shared: &Shared, job: &Job, event: &JobEvent) -> Vec<(&'static str, Value)> {
    let wants = |name: &str| job.meta.webhook_events.as_ref().is_none_or(|f| f.iter().any(|e| e == name));
    let mut out = Vec::new();
    if job.meta.is_prediction() {
        let prediction = |job: &Job| crate::predictions::prediction_object(shared, job);
        match event.name {
            // Cog's `start` call is the prediction as it was queued (`starting`): a worker may
            // have claimed the job before this event's store read, which must not show here.
            "queued" if wants("start") => out.push(("start", prediction(&as_queued(job)))),
            "progress" if wants("logs") && job.status == JobStatus::InProgress => {
                let mut p = prediction(job);
                p["logs"] = Value::String(crate::predictions::logs(shared, job, Some(&event.data)));
                out.push(("logs", p));
            }
            "completed" | "failed" => {
                if job.status == JobStatus::Completed && wants("output") {
                    // The output, then the end (Cog's order), the first still `processing`.
                    let mut p = prediction(job);
                    p["status"] = json!("processing");
                    p["completed_at"] = Value::Null;
                    out.push(("output", p));
                }
                if wants("completed") {
                    out.push(("completed", prediction(job)));
                }
            }
            _ => {}
        }
    } else if matches!(event.name, "completed" | "failed") && job.status.is_terminal() {
        // OpenAI's webhook event, with the video object beside its `data`.
        let kind = if job.status == JobStatus::Completed { "video.completed" } else { "video.failed" };
        out.push((
            kind,
            json!({
                "id": format!("evt_{}", uuid::Uuid::new_v4().simple()),
                "object": "event",
                "created_at": now_ms() / 1000,
                "type": kind,
                "data": {"id": job.id},
                "video": crate::views::video_object(job, &shared.model),
            }),
        ));
    }
    out
}

/// `job` as it stood when it was queued: no worker, start, progress or end yet.
fn as_queued(job: &Job) -> Job {
    Job {
        status: JobStatus::Queued,
        progress: 0,
        started_at_ms: None,
        completed_at_ms: None,
        error: None,
        attempts: 0,
        cancel_requested: false,
        worker: None,
        ..job.clone()
    }
}

/// Delivers the kept calls until the process stops: those due, a batch at a time, each signed at
/// its attempt; failures wait their backoff (kept in the store), up to the most attempts.
pub async fn deliver(shared: Arc<Shared>) {
    let Some(signer) = shared.webhooks.signer.clone() else { return };
    let mut stop = shared.shutdown.subscribe();
    let agent = ureq::AgentBuilder::new()
        .resolver(CheckedResolver { allow_private: shared.webhooks.allow_private })
        .redirects(0)
        .timeout_connect(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .user_agent(concat!("t2v/", env!("CARGO_PKG_VERSION"), " (webhooks)"))
        .build();
    let mut last_prune = None::<Instant>;
    while !*stop.borrow() {
        if last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
            last_prune = Some(Instant::now());
            let _ = shared.store.prune_deliveries(now_ms() - KEEP_ENDED_MS).await;
        }
        let batch = match shared.store.claim_deliveries(BATCH, HOLD).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("t2v serve: reading the webhook calls: {e:#}");
                Vec::new()
            }
        };
        if !batch.is_empty() {
            let tasks: Vec<_> = batch
                .into_iter()
                .map(|d| {
                    let (agent, signer, allow) = (agent.clone(), signer.clone(), shared.webhooks.allow_private);
                    tokio::task::spawn_blocking(move || {
                        let result = call(&agent, &signer, allow, &d);
                        (d, result)
                    })
                })
                .collect();
            for task in tasks {
                let Ok((d, result)) = task.await else { continue };
                let attempt = d.attempts + 1;
                let outcome = match result {
                    Ok(()) => DeliveryOutcome::Delivered,
                    Err(Failure::Final(error)) => DeliveryOutcome::GaveUp { error },
                    Err(Failure::Again(error)) if attempt >= shared.webhooks.max_attempts => {
                        DeliveryOutcome::GaveUp { error: format!("{error} (attempt {attempt}, the last)") }
                    }
                    Err(Failure::Again(error)) => DeliveryOutcome::Retry {
                        at_ms: now_ms() + shared.webhooks.backoff(attempt).as_millis() as i64,
                        error,
                    },
                };
                match &outcome {
                    DeliveryOutcome::Delivered => {}
                    DeliveryOutcome::Retry { error, .. } => {
                        eprintln!(
                            "t2v serve: the {} webhook of {} (attempt {attempt}): {error}; trying again",
                            d.event, d.job_id
                        )
                    }
                    DeliveryOutcome::GaveUp { error } => {
                        eprintln!("t2v serve: the {} webhook of {} failed for good: {error}", d.event, d.job_id)
                    }
                }
                if let Err(e) = shared.store.finish_delivery(d.seq, &outcome).await {
                    eprintln!("t2v serve: recording a webhook call: {e:#}");
                }
            }
            continue;
        }
        // Nothing due: sleep until the next one is (at most a second: other processes keep calls too).
        let wait = match shared.store.next_delivery_ms().await {
            Ok(Some(at)) => Duration::from_millis((at - now_ms()).clamp(10, 1000) as u64),
            _ => Duration::from_secs(1),
        };
        tokio::select! {
            _ = stop.changed() => break,
            _ = shared.webhooks.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

enum Failure {
    /// Worth another attempt.
    Again(String),
    /// Never: a target that may not be called, or one that said it wants no more.
    Final(String),
}

/// One attempt at a call.
fn call(agent: &ureq::Agent, signer: &Signer, allow_private: bool, d: &crate::store::Delivery) -> Result<(), Failure> {
    let url = check_url(&d.url, allow_private).map_err(Failure::Final)?;
    // The addresses now (the resolver checks them again as it connects).
    let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']).to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    match (host.as_str(), port).to_socket_addrs() {
        Ok(addrs) => {
            if let Some(bad) = addrs.into_iter().find(|a| !address_allowed(a.ip(), allow_private)) {
                return Err(Failure::Final(format!(
                    "{host} resolves to {}, a private, loopback or reserved address, which this server does not call",
                    bad.ip()
                )));
            }
        }
        Err(e) => return Err(Failure::Again(format!("resolving {host}: {e}"))),
    }
    let timestamp = now_ms() / 1000;
    let signature = signer.sign(&d.msg_id, timestamp, &d.body);
    let result = agent
        .post(url.as_str())
        .set("Content-Type", "application/json")
        .set("webhook-id", &d.msg_id)
        .set("webhook-timestamp", &timestamp.to_string())
        .set("webhook-signature", &signature)
        .send_string(&d.body);
    match result {
        Ok(_) => Ok(()),
        // 410 Gone: the receiver wants no more (Standard Webhooks).
        Err(ureq::Error::Status(410, _)) => Err(Failure::Final("the receiver answered 410 Gone".into())),
        Err(ureq::Error::Status(code, _)) => Err(Failure::Again(format!("the receiver answered {code}"))),
        Err(e) => Err(Failure::Again(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker may claim a prediction before its `queued` event reads it from the store (the
    /// workers are woken first): the `start` call still shows it as queued, as Cog's does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_start_call_shows_the_prediction_as_queued() -> Result<()> {
        use crate::store::JobStore;
        let dir = tempfile::TempDir::new()?;
        let store = Arc::new(crate::store::SqliteStore::open(&dir.path().join("jobs.sqlite"))?);
        let shared = crate::shared(crate::Parts {
            store: store.clone(),
            model: crate::ModelInfo {
                spec: "/m/tiny".into(),
                name: "tiny".into(),
                native_width: 64,
                native_height: 64,
                vae_scale: 8,
                dtype: "f32".into(),
                video_to_video: false,
            },
            data: dir.path().to_path_buf(),
            api_key: None,
            limits: crate::Limits::none(),
            preview_every: 0,
            policy: crate::store::QueuePolicy { lease: Duration::from_secs(60), max_attempts: 2 },
            workers: 1,
            webhooks: Webhooks::new(None, true, Duration::from_secs(1), 2),
            loras: Default::default(),
            scheduler_config: None,
            upscale: None,
        })?;
        let params = t2v::pipeline::GenerationParams::new("a red ball", 1);
        let settings = t2v_settings::RunSettings::new("m", &params, 32, 32, 4, candle_core::DType::F32);
        let meta = crate::store::JobMeta {
            api: Some("prediction".into()),
            webhook: Some("http://127.0.0.1:9/hook".into()),
            ..Default::default()
        };
        let new = crate::store::NewJob {
            id: "video_1",
            settings: &settings,
            meta: &meta,
            prediction_id: Some("p1"),
            idempotency: None,
        };
        let crate::store::Inserted::New(_) = store.insert_new(new).await? else { panic!("a new job") };
        // Claimed before the event's store read.
        store.claim_next("host-w0", shared.policy).await?.expect("the job");
        let job = store.get("video_1").await?.unwrap();
        assert_eq!(job.status, JobStatus::InProgress);
        let made = calls(&shared, &job, &JobEvent::new("video_1", "queued", json!({})));
        assert_eq!(made.len(), 1);
        let (name, body) = &made[0];
        assert_eq!(*name, "start");
        assert_eq!((body["id"].as_str(), body["status"].as_str()), (Some("p1"), Some("starting")), "{body}");
        assert!(body["started_at"].is_null(), "{body}");
        assert_eq!(body["logs"].as_str().map(|l| l.lines().count()), Some(1), "only the queued line: {body}");
        Ok(())
    }

    /// The Standard Webhooks specification's own example: this secret, id, timestamp and body
    /// sign to this signature (its test vector).
    #[test]
    fn signs_as_the_specification_example() {
        let signer = Signer::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(Signer::parse("whsec_c2hvcnQ=").is_err(), "5 bytes are too few");
        assert!(Signer::parse("whsec_not base64!").is_err());
        assert!(Signer::parse(&Signer::generate()).is_ok());
    }

    /// Without a secret given, one is made once and kept (owner-only): a restart signs alike.
    #[test]
    fn a_secret_is_made_once_and_kept() {
        let dir = tempfile::TempDir::new().unwrap();
        let (first, new) = secret(None, dir.path()).unwrap();
        let text = new.expect("a new secret is shown once");
        assert!(text.starts_with("whsec_"));
        let (again, shown) = secret(None, dir.path()).unwrap();
        assert_eq!(shown, None);
        assert_eq!(first.sign("m", 1, "b"), again.sign("m", 1, "b"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("webhook-secret")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        let (given, shown) = secret(Some(&text), tempfile::TempDir::new().unwrap().path()).unwrap();
        assert_eq!((given.sign("m", 1, "b"), shown), (first.sign("m", 1, "b"), None));
        assert!(secret(Some("whsec_short"), dir.path()).is_err());
    }

    #[test]
    fn private_addresses_need_permission() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(!address_allowed(ip, false), "{bad}");
            assert!(address_allowed(ip, true), "{bad} with permission");
        }
        for never in ["0.0.0.0", "255.255.255.255", "224.0.0.1", "::", "ff02::1"] {
            assert!(!address_allowed(never.parse().unwrap(), true), "{never}");
        }
        for good in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(address_allowed(good.parse().unwrap(), false), "{good}");
        }
        assert!(check_url("http://127.0.0.1:9/x", false).is_err());
        assert!(check_url("http://[::1]/x", false).is_err());
        assert!(check_url("http://localhost/x", false).is_err());
        assert!(check_url("http://169.254.169.254/latest/meta-data", true).is_ok());
        assert!(check_url("ftp://example.org/x", true).is_err());
        assert!(check_url("http://user:pw@example.org/x", true).is_err());
        assert!(check_url("https://example.org/hook", false).is_ok());
    }

    /// Names are checked on the addresses they resolve to as the call connects (a name that
    /// passed the check on arrival and resolves to loopback later is refused then).
    #[test]
    fn resolved_addresses_are_checked() {
        use ureq::Resolver;
        let strict = CheckedResolver { allow_private: false };
        let e = strict.resolve("localhost:80").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("loopback"), "{e}");
        let lenient = CheckedResolver { allow_private: true };
        assert!(lenient.resolve("localhost:80").unwrap().iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let hooks = Webhooks::new(None, false, Duration::from_secs(5), 8);
        let waits: Vec<u64> = (1..=4).map(|a| hooks.backoff(a).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40]);
        assert_eq!(hooks.backoff(30), Duration::from_secs(3600));
    }
}
