//! The job store: the queue and the history of videos. [`JobStore`] is the interface the API and
//! the workers use; [`SqliteStore`] keeps it in an embedded SQLite database in the data folder.
//!
//! Semantics every backend keeps:
//! - jobs run in submission order (`seq`), each claimed by exactly one worker at a time;
//! - a job found `in_progress` when the store is opened ([`JobStore::recover`]) was interrupted
//!   (its process died): it is queued again until it has been tried `max_attempts` times, then
//!   failed with the reason;
//! - a completed job never runs again.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use t2v_settings::RunSettings;

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
}

/// How a claimed job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed,
    Failed(JobError),
    /// Interrupted by a clean shutdown: back to the queue, the attempt not counted.
    Released,
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

/// The queue and the history. Async so that a networked database fits behind it; every method is
/// one short transaction.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Adds a queued job; `id` is new and `settings` has every value filled in.
    async fn insert(&self, id: &str, settings: &RunSettings) -> Result<Job>;
    async fn get(&self, id: &str) -> Result<Option<Job>>;
    /// A page of jobs in `order`, starting after the job `after` (exclusive); and whether more follow.
    async fn list(&self, limit: usize, after: Option<&str>, order: Order) -> Result<(Vec<Job>, bool)>;
    /// Takes the oldest queued job for `worker`: marks it in progress and counts the attempt.
    async fn claim_next(&self, worker: &str) -> Result<Option<Job>>;
    async fn set_progress(&self, id: &str, progress: u8) -> Result<()>;
    /// Records how a claimed job ended; false when the job is gone (deleted while it ran) or was
    /// not in progress.
    async fn finish(&self, id: &str, outcome: Outcome) -> Result<bool>;
    /// Cancels a queued job at once (failed, code `cancelled`); flags a running one for its worker.
    /// `None` when there is no such job.
    async fn request_cancel(&self, id: &str) -> Result<Option<Job>>;
    /// Removes a job; returns it as it was.
    async fn delete(&self, id: &str) -> Result<Option<Job>>;
    /// Run once at start, before any worker: settles the jobs a dead process left in progress.
    async fn recover(&self, max_attempts: u32) -> Result<Recovery>;
    async fn counts(&self) -> Result<Counts>;
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The schema, one entry per version (`PRAGMA user_version`); applied in order at open.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        progress INTEGER NOT NULL DEFAULT 0,
        created_at_ms INTEGER NOT NULL,
        started_at_ms INTEGER,
        completed_at_ms INTEGER,
        settings TEXT NOT NULL,
        error_code TEXT,
        error_message TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        worker TEXT
    );
    CREATE INDEX jobs_by_status ON jobs (status, seq);
"];

/// The columns every query reads, with the queue position computed in place.
const SELECT: &str = "SELECT seq, id, status, progress, created_at_ms, started_at_ms, completed_at_ms, settings,
    error_code, error_message, attempts, cancel_requested, worker,
    CASE status
        WHEN 'queued' THEN (SELECT COUNT(*) FROM jobs q WHERE q.status = 'queued' AND q.seq <= jobs.seq)
        WHEN 'in_progress' THEN 0
        ELSE NULL END
    FROM jobs";

/// SQLite in one file. A connection behind a mutex: every operation is a short transaction, run on
/// tokio's blocking pool.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path).with_context(|| format!("opening the job store {}", path.display()))?;
        // WAL: readers never wait for the worker's writes. FULL: a committed job survives power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&mut conn).with_context(|| format!("updating the schema of {}", path.display()))?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().map_err(|_| anyhow!("the job store's connection was poisoned by a panic"))?;
            f(&mut conn)
        })
        .await?
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(anyhow!(
            "the job store has schema version {version}, newer than this t2v knows ({}): use a newer t2v or another data folder",
            MIGRATIONS.len()
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn job_from_row(row: &Row) -> rusqlite::Result<Job> {
    let status: String = row.get(2)?;
    let settings: String = row.get(7)?;
    let to_sql_err =
        |e: anyhow::Error| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into());
    let error_code: Option<String> = row.get(8)?;
    let error_message: Option<String> = row.get(9)?;
    Ok(Job {
        seq: row.get(0)?,
        id: row.get(1)?,
        status: JobStatus::parse(&status).map_err(to_sql_err)?,
        progress: row.get::<_, i64>(3)?.clamp(0, 100) as u8,
        created_at_ms: row.get(4)?,
        started_at_ms: row.get(5)?,
        completed_at_ms: row.get(6)?,
        settings: serde_json::from_str(&settings).map_err(|e| to_sql_err(e.into()))?,
        error: error_code.map(|code| JobError { code, message: error_message.unwrap_or_default() }),
        attempts: row.get::<_, i64>(10)? as u32,
        cancel_requested: row.get::<_, i64>(11)? != 0,
        worker: row.get(12)?,
        queue_position: row.get::<_, Option<i64>>(13)?.map(|p| p as u64),
    })
}

fn get_job(conn: &Connection, id: &str) -> Result<Option<Job>> {
    Ok(conn.query_row(&format!("{SELECT} WHERE id = ?1"), [id], job_from_row).optional()?)
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert(&self, id: &str, settings: &RunSettings) -> Result<Job> {
        let (id, settings) = (id.to_string(), serde_json::to_string(settings)?);
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO jobs (id, status, created_at_ms, settings) VALUES (?1, 'queued', ?2, ?3)",
                params![id, now_ms(), settings],
            )?;
            get_job(conn, &id)?.ok_or_else(|| anyhow!("job {id} vanished after its insertion"))
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<Job>> {
        let id = id.to_string();
        self.with(move |conn| get_job(conn, &id)).await
    }

    async fn list(&self, limit: usize, after: Option<&str>, order: Order) -> Result<(Vec<Job>, bool)> {
        let after = after.map(str::to_string);
        self.with(move |conn| {
            let cursor: Option<i64> = match &after {
                Some(id) => Some(
                    conn.query_row("SELECT seq FROM jobs WHERE id = ?1", [id], |r| r.get(0))
                        .optional()?
                        .ok_or_else(|| anyhow!("no video {id}"))?,
                ),
                None => None,
            };
            let (cmp, dir) = match order {
                Order::Desc => ("<", "DESC"),
                Order::Asc => (">", "ASC"),
            };
            let sql = match cursor {
                Some(_) => format!("{SELECT} WHERE seq {cmp} ?1 ORDER BY seq {dir} LIMIT ?2"),
                None => format!("{SELECT} WHERE ?1 IS NULL ORDER BY seq {dir} LIMIT ?2"),
            };
            let mut stmt = conn.prepare(&sql)?;
            let mut jobs = stmt
                .query_map(params![cursor, (limit + 1) as i64], job_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let more = jobs.len() > limit;
            jobs.truncate(limit);
            Ok((jobs, more))
        })
        .await
    }

    async fn claim_next(&self, worker: &str) -> Result<Option<Job>> {
        let worker = worker.to_string();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let id: Option<String> = tx
                .query_row("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1", [], |r| r.get(0))
                .optional()?;
            let Some(id) = id else { return Ok(None) };
            tx.execute(
                "UPDATE jobs SET status = 'in_progress', progress = 0, started_at_ms = ?2, attempts = attempts + 1, worker = ?3
                 WHERE id = ?1",
                params![id, now_ms(), worker],
            )?;
            let job = get_job(&tx, &id)?;
            tx.commit()?;
            Ok(job)
        })
        .await
    }

    async fn set_progress(&self, id: &str, progress: u8) -> Result<()> {
        let id = id.to_string();
        self.with(move |conn| {
            conn.execute(
                "UPDATE jobs SET progress = ?2 WHERE id = ?1 AND status = 'in_progress'",
                params![id, progress.min(100)],
            )?;
            Ok(())
        })
        .await
    }

    async fn finish(&self, id: &str, outcome: Outcome) -> Result<bool> {
        let id = id.to_string();
        self.with(move |conn| {
            let changed = match outcome {
                Outcome::Completed => conn.execute(
                    "UPDATE jobs SET status = 'completed', progress = 100, completed_at_ms = ?2
                     WHERE id = ?1 AND status = 'in_progress'",
                    params![id, now_ms()],
                )?,
                Outcome::Failed(e) => conn.execute(
                    "UPDATE jobs SET status = 'failed', completed_at_ms = ?2, error_code = ?3, error_message = ?4
                     WHERE id = ?1 AND status = 'in_progress'",
                    params![id, now_ms(), e.code, e.message],
                )?,
                Outcome::Released => conn.execute(
                    "UPDATE jobs SET status = 'queued', progress = 0, started_at_ms = NULL, attempts = MAX(attempts - 1, 0)
                     WHERE id = ?1 AND status = 'in_progress'",
                    params![id],
                )?,
            };
            Ok(changed == 1)
        })
        .await
    }

    async fn request_cancel(&self, id: &str) -> Result<Option<Job>> {
        let id = id.to_string();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE jobs SET status = 'failed', completed_at_ms = ?2, error_code = 'cancelled',
                    error_message = 'cancelled before it started', cancel_requested = 1
                 WHERE id = ?1 AND status = 'queued'",
                params![id, now_ms()],
            )?;
            tx.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1 AND status = 'in_progress'", [&id])?;
            let job = get_job(&tx, &id)?;
            tx.commit()?;
            Ok(job)
        })
        .await
    }

    async fn delete(&self, id: &str) -> Result<Option<Job>> {
        let id = id.to_string();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let job = get_job(&tx, &id)?;
            tx.execute("DELETE FROM jobs WHERE id = ?1", [&id])?;
            tx.commit()?;
            Ok(job)
        })
        .await
    }

    async fn recover(&self, max_attempts: u32) -> Result<Recovery> {
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let interrupted: Vec<(String, i64, bool)> = {
                let mut stmt = tx.prepare("SELECT id, attempts, cancel_requested FROM jobs WHERE status = 'in_progress' ORDER BY seq")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut report = Recovery::default();
            for (id, attempts, cancelled) in interrupted {
                if cancelled {
                    tx.execute(
                        "UPDATE jobs SET status = 'failed', completed_at_ms = ?2, error_code = 'cancelled',
                            error_message = 'cancelled; the server stopped before the job did' WHERE id = ?1",
                        params![id, now_ms()],
                    )?;
                    report.failed.push(id);
                } else if (attempts as u32) < max_attempts {
                    // Back to its place in the queue: `seq` keeps the submission order.
                    tx.execute("UPDATE jobs SET status = 'queued', progress = 0, started_at_ms = NULL WHERE id = ?1", [&id])?;
                    report.requeued.push(id);
                } else {
                    let message = format!(
                        "the server stopped while this job ran ({attempts} attempt{}, the most allowed): it may be too large for this machine",
                        if attempts == 1 { "" } else { "s" }
                    );
                    tx.execute(
                        "UPDATE jobs SET status = 'failed', completed_at_ms = ?2, error_code = 'interrupted', error_message = ?3
                         WHERE id = ?1",
                        params![id, now_ms(), message],
                    )?;
                    report.failed.push(id);
                }
            }
            tx.commit()?;
            Ok(report)
        })
        .await
    }

    async fn counts(&self) -> Result<Counts> {
        self.with(|conn| {
            let mut counts = Counts::default();
            let mut stmt = conn.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            for row in rows {
                let (status, n) = row?;
                match JobStatus::parse(&status)? {
                    JobStatus::Queued => counts.queued = n,
                    JobStatus::InProgress => counts.in_progress = n,
                    JobStatus::Completed => counts.completed = n,
                    JobStatus::Failed => counts.failed = n,
                }
            }
            Ok(counts)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(prompt: &str) -> RunSettings {
        let params = t2v::pipeline::GenerationParams::new(prompt, 1);
        RunSettings::new("m", &params, 32, 32, 8, candle_core::DType::F32)
    }

    #[tokio::test]
    async fn queue_order_claims_recovery_and_pages() -> Result<()> {
        let dir = tempfile::TempDir::new()?;
        let path = dir.path().join("jobs.sqlite");
        let store = SqliteStore::open(&path)?;
        for i in 0..5 {
            let job = store.insert(&format!("video_{i}"), &settings(&format!("p{i}"))).await?;
            assert_eq!(job.status, JobStatus::Queued);
            assert_eq!(job.queue_position, Some(i + 1));
        }
        let first = store.claim_next("w").await?.expect("a queued job");
        assert_eq!((first.id.as_str(), first.attempts, first.queue_position), ("video_0", 1, Some(0)));
        assert_eq!(store.get("video_3").await?.unwrap().queue_position, Some(3));
        assert!(store.finish("video_0", Outcome::Completed).await?);
        assert!(!store.finish("video_0", Outcome::Completed).await?, "a completed job cannot finish twice");

        // Cancelling a queued job fails it at once; the positions behind it move up.
        let cancelled = store.request_cancel("video_2").await?.unwrap();
        assert_eq!((cancelled.status, cancelled.error.unwrap().code.as_str()), (JobStatus::Failed, "cancelled"));
        assert_eq!(store.get("video_3").await?.unwrap().queue_position, Some(2));

        // A job in progress when the process dies is queued again, then failed after max attempts.
        assert_eq!(store.claim_next("w").await?.unwrap().id, "video_1");
        drop(store);
        let store = SqliteStore::open(&path)?;
        assert_eq!(store.recover(2).await?, Recovery { requeued: vec!["video_1".into()], failed: vec![] });
        assert_eq!(store.claim_next("w").await?.unwrap().attempts, 2);
        assert_eq!(store.recover(2).await?, Recovery { requeued: vec![], failed: vec!["video_1".into()] });
        assert_eq!(store.get("video_1").await?.unwrap().error.unwrap().code, "interrupted");

        let (page, more) = store.list(2, None, Order::Desc).await?;
        assert_eq!(page.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["video_4", "video_3"]);
        assert!(more);
        let (page, more) = store.list(10, Some("video_3"), Order::Desc).await?;
        assert_eq!(page.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["video_2", "video_1", "video_0"]);
        assert!(!more);
        assert_eq!(store.counts().await?, Counts { queued: 2, in_progress: 0, completed: 1, failed: 2 });
        assert!(store.delete("video_4").await?.is_some());
        assert!(store.get("video_4").await?.is_none());
        Ok(())
    }
}
