//! The job store: the queue and the history of videos. [`JobStore`] is the interface the API and
//! the workers use, with two backends of one schema: [`SqliteStore`] (embedded, in the data folder:
//! one process, its workers in-process) and [`PostgresStore`] (a server that the API and any number
//! of worker processes on any number of machines share). [`open`] picks one from a URL.
//!
//! Semantics every backend keeps:
//! - jobs run in submission order (`seq`), each claimed by exactly one worker at a time;
//! - a claim is a lease: the worker renews it while it runs the job ([`JobStore::renew`]); every
//!   write of the worker names the lease (job, worker, attempt) and does nothing once the lease is
//!   lost, so a worker that was given up on can never complete or overwrite a job;
//! - a job whose lease expired (its worker died) is claimed again, keeping its place in the queue,
//!   until it has been tried `max_attempts` times; then [`JobStore::reap`] fails it with the reason;
//! - a job found `in_progress` under this process's workers at start ([`JobStore::recover`]) was
//!   interrupted (its process died): it is settled at once instead of after its lease;
//! - a completed job never runs again.

pub mod postgres;
pub mod sqlite;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use t2v_settings::RunSettings;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    InProgress,
    Completed,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "queued" => JobStatus::Queued,
            "in_progress" => JobStatus::InProgress,
            "completed" => JobStatus::Completed,
            "failed" => JobStatus::Failed,
            other => return Err(anyhow!("unknown job status `{other}` in the job store")),
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed)
    }
}

/// Why a job failed: a machine-readable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct Job {
    /// Submission order: jobs run in increasing `seq`.
    pub seq: i64,
    pub id: String,
    pub status: JobStatus,
    /// 0–100.
    pub progress: u8,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub completed_at_ms: Option<i64>,
    pub settings: RunSettings,
    pub error: Option<JobError>,
    /// How many times a worker has started this job.
    pub attempts: u32,
    pub cancel_requested: bool,
    /// The worker that ran (or runs) it.
    pub worker: Option<String>,
    /// For a queued job, 1 for the next to run; 0 for the running one; `None` once finished.
    pub queue_position: Option<u64>,
    /// The id a client gave the job through the prediction API (Cog's), if it came that way.
    pub prediction_id: Option<String>,
    /// How the job came and whom it tells of its events.
    pub meta: JobMeta,
}

/// What a job carries beside its settings: the API it came through, its webhook, and what that
/// API shows of it (the prediction's `input` as sent, the base URL the client reached).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobMeta {
    /// `prediction` (Cog's API) or `video` (absent: `video`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The prediction's `input`, as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// Where the job's events are posted (Standard Webhooks signed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Cog's `webhook_events_filter`: the events sent (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_events: Option<Vec<String>>,
    /// The server's URL as the client reached it (`http://HOST`), for the output's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

impl JobMeta {
    pub fn is_prediction(&self) -> bool {
        self.api.as_deref() == Some("prediction")
    }

    pub(crate) fn stored(&self) -> Option<String> {
        (self != &JobMeta::default()).then(|| serde_json::to_string(self).unwrap_or_default())
    }
}

/// A job to add: [`JobStore::insert_new`].
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub id: &'a str,
    pub settings: &'a RunSettings,
    pub meta: &'a JobMeta,
    /// A prediction id: when a job has it already, that job is the answer and nothing is added.
    pub prediction_id: Option<&'a str>,
    /// An `Idempotency-Key` and the SHA-256 of the request it came with: within
    /// [`IDEMPOTENCY_WINDOW_MS`] the same key and request give the job it made, the same key with
    /// another request [`Inserted::KeyReused`].
    pub idempotency: Option<(&'a str, &'a str)>,
}

/// How long an `Idempotency-Key` names its job: 24 hours.
pub const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// What [`JobStore::insert_new`] did.
#[derive(Debug, Clone)]
pub enum Inserted {
    New(Job),
    /// The prediction id or idempotency key named a job already: that job, unchanged.
    Existing(Job),
    /// The idempotency key came with another request within its window.
    KeyReused,
}

/// A webhook call to make: kept in the store until it is delivered or given up, so that retries
/// survive a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub seq: i64,
    /// The `webhook-id`: the same on every attempt (receivers drop duplicates by it).
    pub msg_id: String,
    pub job_id: String,
    pub event: String,
    pub url: String,
    pub body: String,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// How an attempt at a [`Delivery`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    Delivered,
    /// Failed: try again at this time.
    Retry {
        at_ms: i64,
        error: String,
    },
    /// Failed for good (out of attempts, or a target that may not be called).
    GaveUp {
        error: String,
    },
}

/// Deliveries by state, for `/v1/t2v/info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeliveryCounts {
    pub pending: u64,
    pub delivered: u64,
    pub failed: u64,
}

/// A worker's hold on the job it claimed: every write of the worker names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub worker: String,
    /// The attempt the claim counted: a later claim of the same job counts another.
    pub attempt: u32,
}

impl Lease {
    /// The lease of a job just claimed.
    pub fn of(job: &Job) -> Result<Self> {
        let worker = job.worker.clone().ok_or_else(|| anyhow!("job {} was claimed without a worker", job.id))?;
        Ok(Self { id: job.id.clone(), worker, attempt: job.attempts })
    }
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, for another lease period; `cancel_requested` asks the worker to stop.
    Held { cancel_requested: bool },
    /// Another worker took the job, or it was deleted or settled: drop it, write nothing.
    Lost,
}

/// How a claimed job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed,
    Failed(JobError),
    /// Interrupted by a clean shutdown: back to the queue, the attempt not counted.
    Released,
}

/// The queue's rules, per process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueuePolicy {
    /// How long a claim lasts without a heartbeat.
    pub lease: Duration,
    /// A job is started at most this many times.
    pub max_attempts: u32,
}

impl QueuePolicy {
    /// How often a worker renews its lease: six chances before it expires.
    pub fn heartbeat(&self) -> Duration {
        (self.lease / 6).max(Duration::from_millis(100))
    }
}

/// What [`JobStore::recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub requeued: Vec<String>,
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub queued: u64,
    pub in_progress: u64,
    pub completed: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Newest first.
    Desc,
    Asc,
}

/// A job event kept in the store for the API processes to relay (progress, previews and ends of
/// jobs that run in other processes).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Increasing in the order events were stored.
    pub seq: i64,
    /// The process that stored it.
    pub origin: String,
    pub job_id: String,
    pub name: String,
    pub data: Value,
}

/// The queue and the history. Async so that a networked database fits behind it; every method is
/// one short transaction.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Adds a queued job; `id` is new and `settings` has every value filled in.
    async fn insert(&self, id: &str, settings: &RunSettings) -> Result<Job> {
        let meta = JobMeta::default();
        match self.insert_new(NewJob { id, settings, meta: &meta, prediction_id: None, idempotency: None }).await? {
            Inserted::New(job) | Inserted::Existing(job) => Ok(job),
            Inserted::KeyReused => Err(anyhow!("job {id}: an idempotency key without a key")),
        }
    }
    /// Adds a queued job, unless its prediction id or idempotency key names one already (one
    /// transaction: two requests racing with the same id make one job).
    async fn insert_new(&self, new: NewJob<'_>) -> Result<Inserted>;
    /// The job a client made through the prediction API under `prediction_id`.
    async fn get_prediction(&self, prediction_id: &str) -> Result<Option<Job>>;
    /// Keeps a webhook call to make (at once); a `msg_id` kept already is not added again.
    async fn enqueue_delivery(&self, msg_id: &str, job_id: &str, event: &str, url: &str, body: &str) -> Result<()>;
    /// Up to `limit` deliveries due now that no one holds, held for `hold` (a process that dies
    /// mid-call leaves them to another attempt after it).
    async fn claim_deliveries(&self, limit: usize, hold: Duration) -> Result<Vec<Delivery>>;
    /// Records how an attempt at delivery `seq` ended (counting the attempt).
    async fn finish_delivery(&self, seq: i64, outcome: &DeliveryOutcome) -> Result<()>;
    /// The earliest time a pending delivery is due (ms), if any.
    async fn next_delivery_ms(&self) -> Result<Option<i64>>;
    async fn delivery_counts(&self) -> Result<DeliveryCounts>;
    /// Forgets deliveries that ended before `before_ms`.
    async fn prune_deliveries(&self, before_ms: i64) -> Result<u64>;
    async fn get(&self, id: &str) -> Result<Option<Job>>;
    /// A page of jobs in `order`, starting after the job `after` (exclusive); and whether more follow.
    async fn list(&self, limit: usize, after: Option<&str>, order: Order) -> Result<(Vec<Job>, bool)>;
    /// Takes the oldest job that is queued, or in progress under an expired lease with attempts
    /// left, for `worker`: marks it in progress under a new lease and counts the attempt.
    async fn claim_next(&self, worker: &str, policy: QueuePolicy) -> Result<Option<Job>>;
    /// Extends the lease by `lease` from now, if it is still held.
    async fn renew(&self, lease: &Lease, lease_for: Duration) -> Result<Renewal>;
    async fn set_progress(&self, lease: &Lease, progress: u8) -> Result<()>;
    /// Records how a claimed job ended; false when the lease was lost (the job was deleted, or
    /// settled or taken by another worker).
    async fn finish(&self, lease: &Lease, outcome: Outcome) -> Result<bool>;
    /// Cancels a queued job at once (failed, code `cancelled`); flags a running one for its worker.
    /// `None` when there is no such job.
    async fn request_cancel(&self, id: &str) -> Result<Option<Job>>;
    /// Removes a job; returns it as it was.
    async fn delete(&self, id: &str) -> Result<Option<Job>>;
    /// Fails the jobs whose lease expired and that may not run again (out of attempts, or
    /// cancelled); returns them as they are now.
    async fn reap(&self, max_attempts: u32) -> Result<Vec<Job>>;
    /// Run at start, before this process's workers claim anything: settles the jobs left in
    /// progress by workers whose names start with `workers` (a dead earlier run of this process),
    /// or by any worker when `None` (a store only this process uses).
    async fn recover(&self, max_attempts: u32, workers: Option<&str>) -> Result<Recovery>;
    async fn counts(&self) -> Result<Counts>;
    /// Keeps an event for the API processes to relay.
    async fn push_event(&self, origin: &str, job_id: &str, name: &str, data: &Value) -> Result<()>;
    /// Up to `limit` events stored after `after` (a [`StoredEvent::seq`]), oldest first.
    async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>>;
    /// The `seq` of the newest event (0 when none).
    async fn last_event(&self) -> Result<i64>;
    /// Forgets events stored before `before_ms`.
    async fn prune_events(&self, before_ms: i64) -> Result<u64>;
}

/// Opens the store a `--queue` value names: `None` or `sqlite:` for `jobs.sqlite` in `data`,
/// `sqlite:PATH`, or `postgres://…` (also `postgresql://…`). Migrations run before it returns.
pub async fn open(url: Option<&str>, data: &Path) -> Result<Arc<dyn JobStore>> {
    let url = url.map(str::trim).filter(|u| !u.is_empty());
    match url {
        None => Ok(Arc::new(SqliteStore::open(&data.join("jobs.sqlite"))?)),
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            Ok(Arc::new(PostgresStore::connect(u).await?))
        }
        Some(u) if u.starts_with("sqlite:") => {
            let path = u.trim_start_matches("sqlite:").trim_start_matches("//");
            let path = if path.is_empty() { data.join("jobs.sqlite") } else { Path::new(path).to_path_buf() };
            Ok(Arc::new(SqliteStore::open(&path)?))
        }
        Some(u) => {
            let scheme = u.split(':').next().unwrap_or(u);
            bail!("unknown queue `{scheme}:…`: use sqlite:PATH (the default, in the data folder) or postgres://USER:PASSWORD@HOST:PORT/DATABASE")
        }
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The failure of a job whose worker died (the process was killed, or crashed) on its last
/// allowed attempt: what is known, not a guess at why.
pub fn interrupted_message(attempts: i64, max_attempts: u32) -> String {
    format!(
        "interrupted (attempt {attempts} of {max_attempts}): the worker running this job stopped before it finished \
         (its process was killed or crashed), and the job may not start again"
    )
}

/// The failure of a job cancelled while its worker died.
pub const CANCELLED_INTERRUPTED: &str = "cancelled; its worker stopped before the job did";

/// The columns every query reads, in this order, with the queue position computed in place.
pub(crate) const SELECT: &str =
    "SELECT seq, id, status, progress, created_at_ms, started_at_ms, completed_at_ms, settings,
    error_code, error_message, attempts, cancel_requested, worker,
    CASE status
        WHEN 'queued' THEN (SELECT COUNT(*) FROM jobs q WHERE q.status = 'queued' AND q.seq <= jobs.seq)
        WHEN 'in_progress' THEN 0
        ELSE NULL END AS queue_position,
    prediction_id, meta
    FROM jobs";

/// A job from the columns of [`SELECT`], read by each backend.
#[allow(clippy::too_many_arguments)]
pub(crate) fn job_from_columns(
    seq: i64,
    id: String,
    status: &str,
    progress: i64,
    created_at_ms: i64,
    started_at_ms: Option<i64>,
    completed_at_ms: Option<i64>,
    settings: &str,
    error_code: Option<String>,
    error_message: Option<String>,
    attempts: i64,
    cancel_requested: bool,
    worker: Option<String>,
    queue_position: Option<i64>,
    prediction_id: Option<String>,
    meta: Option<&str>,
) -> Result<Job> {
    let meta = match meta {
        Some(m) => serde_json::from_str(m).map_err(|e| anyhow!("the metadata of job {id}: {e}"))?,
        None => JobMeta::default(),
    };
    Ok(Job {
        prediction_id,
        meta,
        seq,
        status: JobStatus::parse(status)?,
        progress: progress.clamp(0, 100) as u8,
        created_at_ms,
        started_at_ms,
        completed_at_ms,
        settings: serde_json::from_str(settings).map_err(|e| anyhow!("the settings of job {id}: {e}"))?,
        error: error_code.map(|code| JobError { code, message: error_message.unwrap_or_default() }),
        attempts: attempts.max(0) as u32,
        cancel_requested,
        worker,
        queue_position: queue_position.map(|p| p.max(0) as u64),
        id,
    })
}

#[cfg(test)]
#[path = "../../../t2v-cli/tests/support/postgres.rs"]
mod test_postgres;

/// The semantics of the module's header, run against each backend.
#[cfg(test)]
mod conformance {
    use super::*;

    fn settings(prompt: &str) -> RunSettings {
        let params = t2v::pipeline::GenerationParams::new(prompt, 1);
        RunSettings::new("m", &params, 32, 32, 8, candle_core::DType::F32)
    }

    const LONG: QueuePolicy = QueuePolicy { lease: Duration::from_secs(60), max_attempts: 2 };
    const SHORT: QueuePolicy = QueuePolicy { lease: Duration::from_millis(1), max_attempts: 2 };

    fn ids(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|j| j.id.as_str()).collect()
    }

    async fn queue_leases_and_recovery(store: &dyn JobStore) -> Result<()> {
        for i in 0..5 {
            let job = store.insert(&format!("video_{i}"), &settings(&format!("p{i}"))).await?;
            assert_eq!((job.status, job.queue_position, job.attempts), (JobStatus::Queued, Some(i + 1), 0));
        }
        let first = store.claim_next("host-1-w0", LONG).await?.expect("a queued job");
        assert_eq!((first.id.as_str(), first.attempts, first.queue_position), ("video_0", 1, Some(0)));
        assert_eq!(first.worker.as_deref(), Some("host-1-w0"));
        assert_eq!(store.get("video_3").await?.unwrap().queue_position, Some(3));
        let lease0 = Lease::of(&first)?;
        store.set_progress(&lease0, 40).await?;
        assert_eq!(store.get("video_0").await?.unwrap().progress, 40);
        assert!(store.finish(&lease0, Outcome::Completed).await?);
        assert!(!store.finish(&lease0, Outcome::Completed).await?, "a completed job cannot finish twice");
        assert_eq!(store.renew(&lease0, LONG.lease).await?, Renewal::Lost, "nor be renewed");

        // Cancelling a queued job fails it at once; the positions behind it move up.
        let cancelled = store.request_cancel("video_2").await?.unwrap();
        assert_eq!((cancelled.status, cancelled.error.unwrap().code.as_str()), (JobStatus::Failed, "cancelled"));
        assert_eq!(store.get("video_3").await?.unwrap().queue_position, Some(2));

        // A lease that expires is taken over by another worker, keeping the job's place; the first
        // worker can then write nothing.
        let stale = Lease::of(&store.claim_next("host-1-w0", SHORT).await?.unwrap())?;
        assert_eq!((stale.id.as_str(), stale.attempt), ("video_1", 1));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let taken = store.claim_next("host-2-w0", SHORT).await?.unwrap();
        assert_eq!((taken.id.as_str(), taken.attempts, taken.worker.as_deref()), ("video_1", 2, Some("host-2-w0")));
        assert_eq!(store.renew(&stale, LONG.lease).await?, Renewal::Lost);
        store.set_progress(&stale, 90).await?;
        assert!(!store.finish(&stale, Outcome::Completed).await?, "a lost lease cannot complete the job");
        let taken = Lease::of(&taken)?;
        assert_eq!(store.renew(&taken, Duration::from_millis(1)).await?, Renewal::Held { cancel_requested: false });
        let now = store.get("video_1").await?.unwrap();
        assert_eq!((now.status, now.progress), (JobStatus::InProgress, 0));

        // Out of attempts once that lease expires too: not claimed again, failed by the reaper.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let next = store.claim_next("host-3-w0", LONG).await?.unwrap();
        assert_eq!(next.id, "video_3");
        let reaped = store.reap(2).await?;
        assert_eq!(ids(&reaped), ["video_1"]);
        let error = reaped[0].error.clone().unwrap();
        assert_eq!((reaped[0].status, error.code.as_str()), (JobStatus::Failed, "interrupted"));
        assert!(error.message.contains("interrupted (attempt 2 of 2)"), "{}", error.message);
        assert!(store.reap(2).await?.is_empty());

        // A cancel reaches the running job's worker through its heartbeat.
        let running = store.request_cancel("video_3").await?.unwrap();
        assert_eq!((running.status, running.cancel_requested), (JobStatus::InProgress, true));
        let lease3 = Lease::of(&next)?;
        assert_eq!(store.renew(&lease3, LONG.lease).await?, Renewal::Held { cancel_requested: true });
        let cancel = JobError { code: "cancelled".into(), message: "cancelled while it ran".into() };
        assert!(store.finish(&lease3, Outcome::Failed(cancel)).await?);

        // Recovery at start settles only this process's workers' jobs.
        let mine = store.claim_next("host-9-w1", LONG).await?.unwrap();
        assert_eq!(mine.id, "video_4");
        assert_eq!(store.recover(2, Some("host-8-")).await?, Recovery::default());
        assert_eq!(
            store.recover(2, Some("host-9-")).await?,
            Recovery { requeued: vec!["video_4".into()], failed: vec![] }
        );
        let again = store.claim_next("host-9-w0", LONG).await?.unwrap();
        assert_eq!((again.id.as_str(), again.attempts), ("video_4", 2));
        assert_eq!(
            store.recover(2, Some("host-9-")).await?,
            Recovery { requeued: vec![], failed: vec!["video_4".into()] }
        );
        assert_eq!(store.get("video_4").await?.unwrap().error.unwrap().code, "interrupted");

        // A clean stop puts the job back without counting the attempt.
        store.insert("video_5", &settings("p5")).await?;
        let released = Lease::of(&store.claim_next("host-9-w0", LONG).await?.unwrap())?;
        assert!(store.finish(&released, Outcome::Released).await?);
        let back = store.get("video_5").await?.unwrap();
        assert_eq!((back.status, back.attempts, back.queue_position), (JobStatus::Queued, 0, Some(1)));

        let (page, more) = store.list(2, None, Order::Desc).await?;
        assert_eq!(ids(&page), ["video_5", "video_4"]);
        assert!(more);
        let (page, more) = store.list(10, Some("video_4"), Order::Desc).await?;
        assert_eq!(ids(&page), ["video_3", "video_2", "video_1", "video_0"]);
        assert!(!more);
        let (page, _) = store.list(2, Some("video_0"), Order::Asc).await?;
        assert_eq!(ids(&page), ["video_1", "video_2"]);
        assert_eq!(store.counts().await?, Counts { queued: 1, in_progress: 0, completed: 1, failed: 4 });
        assert_eq!(store.delete("video_5").await?.map(|j| j.id), Some("video_5".to_string()));
        assert!(store.get("video_5").await?.is_none());
        assert!(store.delete("video_5").await?.is_none());
        Ok(())
    }

    /// Prediction ids and idempotency keys name one job each; webhook calls wait their turn.
    async fn predictions_keys_and_deliveries(store: &dyn JobStore) -> Result<()> {
        let s = settings("p");
        let meta = JobMeta { api: Some("prediction".into()), webhook: Some("http://h/x".into()), ..JobMeta::default() };
        let new = |id: &'static str, pid: Option<&'static str>, key: Option<(&'static str, &'static str)>| NewJob {
            id,
            settings: &s,
            meta: &meta,
            prediction_id: pid,
            idempotency: key,
        };
        let Inserted::New(first) = store.insert_new(new("video_p1", Some("pred-1"), None)).await? else {
            panic!("new")
        };
        assert_eq!(
            (first.prediction_id.as_deref(), first.meta.webhook.as_deref()),
            (Some("pred-1"), Some("http://h/x"))
        );
        let Inserted::Existing(again) = store.insert_new(new("video_p2", Some("pred-1"), None)).await? else {
            panic!("the same prediction id gives its job")
        };
        assert_eq!(again.id, "video_p1");
        assert!(store.get("video_p2").await?.is_none(), "and makes none");
        assert_eq!(store.get_prediction("pred-1").await?.map(|j| j.id), Some("video_p1".into()));
        assert!(store.get_prediction("pred-2").await?.is_none());

        assert!(matches!(store.insert_new(new("video_k1", None, Some(("key", "h1")))).await?, Inserted::New(_)));
        let Inserted::Existing(same) = store.insert_new(new("video_k2", None, Some(("key", "h1")))).await? else {
            panic!("same key, same request")
        };
        assert_eq!(same.id, "video_k1");
        assert!(matches!(store.insert_new(new("video_k3", None, Some(("key", "h2")))).await?, Inserted::KeyReused));
        // A key whose job is gone is free again.
        store.delete("video_k1").await?;
        assert!(matches!(store.insert_new(new("video_k4", None, Some(("key", "h2")))).await?, Inserted::New(_)));

        store.enqueue_delivery("msg_1", "video_p1", "start", "http://h/x", "{}").await?;
        store.enqueue_delivery("msg_1", "video_p1", "start", "http://h/x", "{}").await?;
        store.enqueue_delivery("msg_2", "video_p1", "completed", "http://h/x", "{\"a\":1}").await?;
        let hold = Duration::from_secs(60);
        let due = store.claim_deliveries(10, hold).await?;
        assert_eq!(
            due.iter().map(|d| (d.msg_id.as_str(), d.attempts)).collect::<Vec<_>>(),
            [("msg_1", 0), ("msg_2", 0)]
        );
        assert!(store.claim_deliveries(10, hold).await?.is_empty(), "held calls are not claimed twice");
        store.finish_delivery(due[0].seq, &DeliveryOutcome::Delivered).await?;
        let later = now_ms() + 60_000;
        store.finish_delivery(due[1].seq, &DeliveryOutcome::Retry { at_ms: later, error: "503".into() }).await?;
        assert!(store.claim_deliveries(10, hold).await?.is_empty(), "a retry waits its time");
        assert_eq!(store.next_delivery_ms().await?, Some(later));
        assert_eq!(store.delivery_counts().await?, DeliveryCounts { pending: 1, delivered: 1, failed: 0 });
        store.finish_delivery(due[1].seq, &DeliveryOutcome::Retry { at_ms: 0, error: "503".into() }).await?;
        let again = store.claim_deliveries(10, hold).await?;
        assert_eq!((again.len(), again[0].attempts, again[0].body.as_str()), (1, 2, "{\"a\":1}"));
        store.finish_delivery(again[0].seq, &DeliveryOutcome::GaveUp { error: "gone".into() }).await?;
        assert_eq!(store.delivery_counts().await?, DeliveryCounts { pending: 0, delivered: 1, failed: 1 });
        assert_eq!(store.prune_deliveries(now_ms() + 1).await?, 2);
        for id in ["video_p1", "video_k4"] {
            store.delete(id).await?;
        }
        Ok(())
    }

    async fn events_in_order(store: &dyn JobStore) -> Result<()> {
        assert_eq!(store.last_event().await?, 0);
        for (i, origin) in ["a", "b", "a"].into_iter().enumerate() {
            store.push_event(origin, "video_0", "progress", &serde_json::json!({"step": i})).await?;
        }
        let first = store.events_after(0, 2).await?;
        assert_eq!(
            first.iter().map(|e| (e.origin.as_str(), e.data["step"].as_u64())).collect::<Vec<_>>(),
            [("a", Some(0)), ("b", Some(1))]
        );
        let rest = store.events_after(first[1].seq, 10).await?;
        assert_eq!((rest.len(), rest[0].name.as_str(), rest[0].job_id.as_str()), (1, "progress", "video_0"));
        assert_eq!(store.last_event().await?, rest[0].seq);
        assert_eq!(store.prune_events(now_ms() + 1).await?, 3);
        assert!(store.events_after(0, 10).await?.is_empty());
        Ok(())
    }

    /// Workers racing for jobs: each job is claimed once.
    async fn racing_claims(store: Arc<dyn JobStore>) -> Result<()> {
        for i in 0..24 {
            store.insert(&format!("race_{i}"), &settings("r")).await?;
        }
        let tasks: Vec<_> = (0..6)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    while let Some(job) = store.claim_next(&format!("racer-{w}"), LONG).await? {
                        store.finish(&Lease::of(&job)?, Outcome::Completed).await?;
                        mine.push(job.id);
                    }
                    anyhow::Ok(mine)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        all.sort();
        let mut expected: Vec<String> = (0..24).map(|i| format!("race_{i}")).collect();
        expected.sort();
        assert_eq!(all, expected);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() -> Result<()> {
        let dir = tempfile::TempDir::new()?;
        let store = SqliteStore::open(&dir.path().join("jobs.sqlite"))?;
        queue_leases_and_recovery(&store).await?;
        events_in_order(&store).await?;
        predictions_keys_and_deliveries(&SqliteStore::open(&dir.path().join("keys.sqlite"))?).await?;
        racing_claims(Arc::new(SqliteStore::open(&dir.path().join("race.sqlite"))?)).await?;
        // The file keeps everything across a reopen; recovery without a name settles every job
        // left in progress (no other process uses the file).
        store.insert("video_9", &settings("p9")).await?;
        store.claim_next("host-1-w0", LONG).await?.unwrap();
        drop(store);
        let store = SqliteStore::open(&dir.path().join("jobs.sqlite"))?;
        assert_eq!(store.recover(2, None).await?, Recovery { requeued: vec!["video_9".into()], failed: vec![] });
        assert_eq!(store.counts().await?.queued, 1);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() -> Result<()> {
        let Some(cluster) = super::test_postgres::cluster_or_skip() else { return Ok(()) };
        let store = PostgresStore::connect(&cluster.url).await?;
        // Migrations run once: a second process connecting finds the schema current.
        let again = PostgresStore::connect(&cluster.url).await?;
        queue_leases_and_recovery(&store).await?;
        events_in_order(&again).await?;
        predictions_keys_and_deliveries(&again).await?;
        racing_claims(Arc::new(again)).await?;

        // KEDA's scaler (deploy/kubernetes/keda.yaml) counts the jobs waiting or running.
        let keda = include_str!("../../../../deploy/kubernetes/keda.yaml");
        let query = keda.lines().find_map(|l| l.trim().strip_prefix("query: ")).expect("the scaler's query");
        let query = query.trim_matches('"');
        for i in 0..3 {
            store.insert(&format!("depth_{i}"), &settings("d")).await?;
        }
        store.claim_next("host-1-w0", LONG).await?.unwrap();
        let (client, connection) = tokio_postgres::connect(&cluster.url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let depth: i64 = client.query_one(query, &[]).await?.get(0);
        assert_eq!(depth, 3, "{query}");
        Ok(())
    }
}
