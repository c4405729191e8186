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

use super::{
    interrupted_message, job_from_columns, now_ms, Counts, Delivery, DeliveryCounts, DeliveryOutcome, Inserted, Job,
    JobStatus, JobStore, Lease, NewJob, Order, Outcome, QueuePolicy, Recovery, Renewal, StoredEvent,
    CANCELLED_INTERRUPTED, IDEMPOTENCY_WINDOW_MS, SELECT,
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
    "
    ALTER TABLE jobs ADD COLUMN prediction_id TEXT;
    ALTER TABLE jobs ADD COLUMN meta TEXT;
    CREATE UNIQUE INDEX jobs_by_prediction ON jobs (prediction_id);
    CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        request_sha256 TEXT NOT NULL,
        job_id TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        msg_id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        event TEXT NOT NULL,
        url TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at_ms INTEGER NOT NULL,
        held_until_ms INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        created_at_ms INTEGER NOT NULL,
        ended_at_ms INTEGER
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at_ms);
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
        row.get(14)?,
        row.get::<_, Option<String>>(15)?.as_deref(),
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

    async fn insert_new(&self, new: NewJob<'_>) -> Result<Inserted> {
        let (id, settings) = (new.id.to_string(), serde_json::to_string(new.settings)?);
        let (meta, prediction_id) = (new.meta.stored(), new.prediction_id.map(str::to_string));
        let key = new.idempotency.map(|(k, h)| (k.to_string(), h.to_string()));
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some(pid) = &prediction_id {
                if let Some(job) = tx.query_row(&format!("{SELECT} WHERE prediction_id = ?1"), [pid], job_from_row).optional()? {
                    return Ok(Inserted::Existing(job));
                }
            }
            let now = now_ms();
            if let Some((key, hash)) = &key {
                let found: Option<(String, String, i64)> = tx
                    .query_row(
                        "SELECT request_sha256, job_id, created_at_ms FROM idempotency_keys WHERE key = ?1",
                        [key],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                if let Some((stored, job_id, at)) = found {
                    let job = get_job(&tx, &job_id)?;
                    match job {
                        // Within its window, and its job still there: the key is taken.
                        Some(job) if at > now - IDEMPOTENCY_WINDOW_MS => {
                            return Ok(if &stored == hash { Inserted::Existing(job) } else { Inserted::KeyReused });
                        }
                        _ => {
                            tx.execute("DELETE FROM idempotency_keys WHERE key = ?1", [key])?;
                        }
                    }
                }
                tx.execute(
                    "INSERT INTO idempotency_keys (key, request_sha256, job_id, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![key, hash, id, now],
                )?;
            }
            tx.execute(
                "INSERT INTO jobs (id, status, created_at_ms, settings, prediction_id, meta) VALUES (?1, 'queued', ?2, ?3, ?4, ?5)",
                params![id, now, settings, prediction_id, meta],
            )?;
            let job = get_job(&tx, &id)?.ok_or_else(|| anyhow!("job {id} vanished after its insertion"))?;
            tx.commit()?;
            Ok(Inserted::New(job))
        })
        .await
    }

    async fn get_prediction(&self, prediction_id: &str) -> Result<Option<Job>> {
        let pid = prediction_id.to_string();
        self.with(move |conn| {
            Ok(conn.query_row(&format!("{SELECT} WHERE prediction_id = ?1"), [pid], job_from_row).optional()?)
        })
        .await
    }

    async fn enqueue_delivery(&self, msg_id: &str, job_id: &str, event: &str, url: &str, body: &str) -> Result<()> {
        let row = [msg_id, job_id, event, url, body].map(str::to_string);
        self.with(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO webhook_deliveries (msg_id, job_id, event, url, body, next_attempt_at_ms, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![row[0], row[1], row[2], row[3], row[4], now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    async fn claim_deliveries(&self, limit: usize, hold: Duration) -> Result<Vec<Delivery>> {
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = now_ms();
            let due: Vec<Delivery> = {
                let mut stmt = tx.prepare(
                    "SELECT seq, msg_id, job_id, event, url, body, attempts FROM webhook_deliveries
                     WHERE state = 'pending' AND next_attempt_at_ms <= ?1 AND held_until_ms <= ?1
                     ORDER BY next_attempt_at_ms, seq LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![now, limit as i64], |r| {
                    Ok(Delivery {
                        seq: r.get(0)?,
                        msg_id: r.get(1)?,
                        job_id: r.get(2)?,
                        event: r.get(3)?,
                        url: r.get(4)?,
                        body: r.get(5)?,
                        attempts: r.get::<_, i64>(6)?.max(0) as u32,
                    })
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for d in &due {
                tx.execute(
                    "UPDATE webhook_deliveries SET held_until_ms = ?2 WHERE seq = ?1",
                    params![d.seq, now + hold.as_millis() as i64],
                )?;
            }
            tx.commit()?;
            Ok(due)
        })
        .await
    }

    async fn finish_delivery(&self, seq: i64, outcome: &DeliveryOutcome) -> Result<()> {
        let outcome = outcome.clone();
        self.with(move |conn| {
            let now = now_ms();
            match outcome {
                DeliveryOutcome::Delivered => conn.execute(
                    "UPDATE webhook_deliveries SET state = 'delivered', attempts = attempts + 1, held_until_ms = 0,
                        ended_at_ms = ?2, last_error = NULL WHERE seq = ?1",
                    params![seq, now],
                )?,
                DeliveryOutcome::Retry { at_ms, error } => conn.execute(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, held_until_ms = 0, next_attempt_at_ms = ?2,
                        last_error = ?3 WHERE seq = ?1",
                    params![seq, at_ms, error],
                )?,
                DeliveryOutcome::GaveUp { error } => conn.execute(
                    "UPDATE webhook_deliveries SET state = 'failed', attempts = attempts + 1, held_until_ms = 0,
                        ended_at_ms = ?2, last_error = ?3 WHERE seq = ?1",
                    params![seq, now, error],
                )?,
            };
            Ok(())
        })
        .await
    }

    async fn next_delivery_ms(&self) -> Result<Option<i64>> {
        self.with(|conn| {
            Ok(conn.query_row(
                "SELECT MIN(MAX(next_attempt_at_ms, held_until_ms)) FROM webhook_deliveries WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn delivery_counts(&self) -> Result<DeliveryCounts> {
        self.with(|conn| {
            let mut counts = DeliveryCounts::default();
            let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM webhook_deliveries GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            for row in rows {
                let (state, n) = row?;
                match state.as_str() {
                    "pending" => counts.pending = n,
                    "delivered" => counts.delivered = n,
                    _ => counts.failed += n,
                }
            }
            Ok(counts)
        })
        .await
    }

    async fn prune_deliveries(&self, before_ms: i64) -> Result<u64> {
        self.with(move |conn| {
            Ok(conn
                .execute("DELETE FROM webhook_deliveries WHERE state != 'pending' AND ended_at_ms < ?1", [before_ms])?
                as u64)
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
