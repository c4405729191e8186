//! The job store in SQLite: one file in the data folder, for one process (the API and its
//! in-process workers). Leases work as in every backend; at start every job left in progress was
//! interrupted, as no other process uses the file.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::Value;
use t2v_settings::RunSettings;

use super::{
    interrupted_message, job_from_columns, now_ms, Counts, Job, JobStatus, JobStore, Lease, Order, Outcome,
    QueuePolicy, Recovery, Renewal, StoredEvent, CANCELLED_INTERRUPTED, SELECT,
};

/// The schema, one entry per version (`PRAGMA user_version`); applied in order at open. The
/// PostgreSQL backend keeps the same versions (`postgres.rs`).
const MIGRATIONS: &[&str] = &[
    "
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
",
    "
    ALTER TABLE jobs ADD COLUMN lease_expires_at_ms INTEGER;
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        origin TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    CREATE INDEX job_events_by_time ON job_events (created_at_ms);
",
];

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
        conn.busy_timeout(Duration::from_secs(10))?;
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
    job_from_columns(
        row.get(0)?,
        row.get(1)?,
        &status,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        &settings,
        row.get(8)?,
        row.get(9)?,
        row.get(10)?,
        row.get::<_, i64>(11)? != 0,
        row.get(12)?,
        row.get(13)?,
    )
    .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
}

fn get_job(conn: &Connection, id: &str) -> Result<Option<Job>> {
    Ok(conn.query_row(&format!("{SELECT} WHERE id = ?1"), [id], job_from_row).optional()?)
}

/// The condition that a lease (?1 id, ?2 worker, ?3 attempt) is still held.
const HELD: &str = "id = ?1 AND status = 'in_progress' AND worker = ?2 AND attempts = ?3";

#[async_trait]
impl JobStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

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

    async fn claim_next(&self, worker: &str, policy: QueuePolicy) -> Result<Option<Job>> {
        let worker = worker.to_string();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = now_ms();
            let id: Option<String> = tx
                .query_row(
                    "SELECT id FROM jobs WHERE status = 'queued'
                        OR (status = 'in_progress' AND lease_expires_at_ms < ?1 AND attempts < ?2 AND cancel_requested = 0)
                     ORDER BY seq LIMIT 1",
                    params![now, policy.max_attempts],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(id) = id else { return Ok(None) };
            tx.execute(
                "UPDATE jobs SET status = 'in_progress', progress = 0, started_at_ms = ?2, attempts = attempts + 1,
                    worker = ?3, lease_expires_at_ms = ?4
                 WHERE id = ?1",
                params![id, now, worker, now + policy.lease.as_millis() as i64],
            )?;
            let job = get_job(&tx, &id)?;
            tx.commit()?;
            Ok(job)
        })
        .await
    }

    async fn renew(&self, lease: &Lease, lease_for: Duration) -> Result<Renewal> {
        let lease = lease.clone();
        self.with(move |conn| {
            let cancel: Option<i64> = conn
                .query_row(
                    &format!("UPDATE jobs SET lease_expires_at_ms = ?4 WHERE {HELD} RETURNING cancel_requested"),
                    params![lease.id, lease.worker, lease.attempt, now_ms() + lease_for.as_millis() as i64],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(match cancel {
                Some(c) => Renewal::Held { cancel_requested: c != 0 },
                None => Renewal::Lost,
            })
        })
        .await
    }

    async fn set_progress(&self, lease: &Lease, progress: u8) -> Result<()> {
        let lease = lease.clone();
        self.with(move |conn| {
            conn.execute(
                &format!("UPDATE jobs SET progress = ?4 WHERE {HELD}"),
                params![lease.id, lease.worker, lease.attempt, progress.min(100)],
            )?;
            Ok(())
        })
        .await
    }

    async fn finish(&self, lease: &Lease, outcome: Outcome) -> Result<bool> {
        let lease = lease.clone();
        self.with(move |conn| {
            let held = params![lease.id, lease.worker, lease.attempt];
            let changed = match outcome {
                Outcome::Completed => conn.execute(
                    &format!(
                        "UPDATE jobs SET status = 'completed', progress = 100, completed_at_ms = {}, lease_expires_at_ms = NULL
                         WHERE {HELD}",
                        now_ms()
                    ),
                    held,
                )?,
                Outcome::Failed(e) => conn.execute(
                    &format!(
                        "UPDATE jobs SET status = 'failed', completed_at_ms = ?4, error_code = ?5, error_message = ?6,
                            lease_expires_at_ms = NULL
                         WHERE {HELD}"
                    ),
                    params![lease.id, lease.worker, lease.attempt, now_ms(), e.code, e.message],
                )?,
                Outcome::Released => conn.execute(
                    &format!(
                        "UPDATE jobs SET status = 'queued', progress = 0, started_at_ms = NULL,
                            attempts = MAX(attempts - 1, 0), lease_expires_at_ms = NULL
                         WHERE {HELD}"
                    ),
                    held,
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

    async fn reap(&self, max_attempts: u32) -> Result<Vec<Job>> {
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let expired: Vec<(String, i64, bool)> = {
                let mut stmt = tx.prepare(
                    "SELECT id, attempts, cancel_requested FROM jobs
                     WHERE status = 'in_progress' AND lease_expires_at_ms < ?1 AND (attempts >= ?2 OR cancel_requested != 0)
                     ORDER BY seq",
                )?;
                let rows = stmt
                    .query_map(params![now_ms(), max_attempts], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut failed = Vec::new();
            for (id, attempts, cancelled) in expired {
                settle_interrupted(&tx, &id, attempts, max_attempts, cancelled)?;
                failed.extend(get_job(&tx, &id)?);
            }
            tx.commit()?;
            Ok(failed)
        })
        .await
    }

    async fn recover(&self, max_attempts: u32, workers: Option<&str>) -> Result<Recovery> {
        let workers = workers.map(str::to_string);
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let interrupted: Vec<(String, i64, bool)> = {
                let mut stmt = tx.prepare(
                    "SELECT id, attempts, cancel_requested FROM jobs WHERE status = 'in_progress'
                        AND (?1 IS NULL OR substr(worker, 1, length(?1)) = ?1) ORDER BY seq",
                )?;
                let rows =
                    stmt.query_map(params![workers], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut report = Recovery::default();
            for (id, attempts, cancelled) in interrupted {
                if !cancelled && (attempts as u32) < max_attempts {
                    // Back to its place in the queue: `seq` keeps the submission order.
                    tx.execute(
                        "UPDATE jobs SET status = 'queued', progress = 0, started_at_ms = NULL, lease_expires_at_ms = NULL
                         WHERE id = ?1",
                        [&id],
                    )?;
                    report.requeued.push(id);
                } else {
                    settle_interrupted(&tx, &id, attempts, max_attempts, cancelled)?;
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

    async fn push_event(&self, origin: &str, job_id: &str, name: &str, data: &Value) -> Result<()> {
        let (origin, job_id, name, data) = (origin.to_string(), job_id.to_string(), name.to_string(), data.to_string());
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO job_events (job_id, name, data, origin, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![job_id, name, data, origin, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>> {
        self.with(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT seq, origin, job_id, name, data FROM job_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get::<_, String>(4)?))
            })?;
            rows.map(|row| {
                let (seq, origin, job_id, name, data) = row?;
                Ok(StoredEvent { seq, origin, job_id, name, data: serde_json::from_str(&data)? })
            })
            .collect()
        })
        .await
    }

    async fn last_event(&self) -> Result<i64> {
        self.with(|conn| Ok(conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM job_events", [], |r| r.get(0))?)).await
    }

    async fn prune_events(&self, before_ms: i64) -> Result<u64> {
        self.with(move |conn| Ok(conn.execute("DELETE FROM job_events WHERE created_at_ms < ?1", [before_ms])? as u64))
            .await
    }
}

/// Fails an interrupted job that may not run again.
fn settle_interrupted(conn: &Connection, id: &str, attempts: i64, max_attempts: u32, cancelled: bool) -> Result<()> {
    let (code, message) = if cancelled {
        ("cancelled", CANCELLED_INTERRUPTED.to_string())
    } else {
        ("interrupted", interrupted_message(attempts, max_attempts))
    };
    conn.execute(
        "UPDATE jobs SET status = 'failed', completed_at_ms = ?2, error_code = ?3, error_message = ?4,
            lease_expires_at_ms = NULL
         WHERE id = ?1",
        params![id, now_ms(), code, message],
    )?;
    Ok(())
}
