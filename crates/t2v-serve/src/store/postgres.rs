//! The job store in PostgreSQL, shared by the API and any number of worker processes: claims skip
//! the rows other workers hold (`FOR UPDATE SKIP LOCKED`), leases run on the database's clock (one
//! clock for every machine), and migrations run under an advisory lock at connect, so processes
//! starting together apply each version once.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::Value;
use tokio_postgres::{NoTls, Row};

use super::{
    interrupted_message, job_from_columns, now_ms, Counts, Delivery, DeliveryCounts, DeliveryOutcome, Inserted, Job,
    JobStatus, JobStore, Lease, NewJob, Order, Outcome, QueuePolicy, Recovery, Renewal, StoredEvent,
    CANCELLED_INTERRUPTED, IDEMPOTENCY_WINDOW_MS, SELECT,
};

/// The schema, one entry per version, the same as SQLite's (`sqlite.rs`) in PostgreSQL's types.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE jobs (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        progress INTEGER NOT NULL DEFAULT 0,
        created_at_ms BIGINT NOT NULL,
        started_at_ms BIGINT,
        completed_at_ms BIGINT,
        settings TEXT NOT NULL,
        error_code TEXT,
        error_message TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        worker TEXT
    );
    CREATE INDEX jobs_by_status ON jobs (status, seq);
",
    "
    ALTER TABLE jobs ADD COLUMN lease_expires_at_ms BIGINT;
    CREATE TABLE job_events (
        seq BIGSERIAL PRIMARY KEY,
        job_id TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        origin TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL
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
        created_at_ms BIGINT NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        seq BIGSERIAL PRIMARY KEY,
        msg_id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        event TEXT NOT NULL,
        url TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at_ms BIGINT NOT NULL,
        held_until_ms BIGINT NOT NULL DEFAULT 0,
        last_error TEXT,
        created_at_ms BIGINT NOT NULL,
        ended_at_ms BIGINT
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at_ms);
",
];

/// Advisory lock keys: migrations, and the order of stored events.
const MIGRATION_LOCK: i64 = 0x0074_3276_5f6d_6967;
const EVENT_LOCK: i64 = 0x0074_3276_5f65_7674;
/// Inserting jobs with a prediction id or an idempotency key: one at a time, so that two requests
/// with the same one make one job.
const INSERT_LOCK: i64 = 0x0074_3276_5f69_6e73;

/// The database's clock in milliseconds: leases of workers on different machines compare on it.
const DB_NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// A pool of connections; a connection the server dropped (a restart) is replaced on next use.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`) and brings the schema up
    /// to date.
    pub async fn connect(url: &str) -> Result<Self> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| anyhow!("the queue URL: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("t2v");
        }
        let manager =
            Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Verified });
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(5)))
            .wait_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .context("setting up the PostgreSQL connection pool")?;
        let store = Self { pool };
        store.migrate().await.with_context(|| format!("opening the queue at {}", redact(url)))?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| anyhow!("connecting to PostgreSQL: {e}"))
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS t2v_schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
        )
        .await?;
        let version: i32 =
            tx.query_one("SELECT COALESCE(MAX(version), 0) FROM t2v_schema_migrations", &[]).await?.get(0);
        let version = version.max(0) as usize;
        if version > MIGRATIONS.len() {
            return Err(anyhow!(
                "the queue has schema version {version}, newer than this t2v knows ({}): use a newer t2v",
                MIGRATIONS.len()
            ));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.batch_execute(sql).await.with_context(|| format!("schema version {}", i + 1))?;
            tx.execute(
                "INSERT INTO t2v_schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
                &[&((i + 1) as i32), &now_ms()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_by(&self, column: &str, value: &(dyn tokio_postgres::types::ToSql + Sync)) -> Result<Option<Job>> {
        let client = self.client().await?;
        let row = client.query_opt(&format!("{SELECT} WHERE {column} = $1"), &[value]).await?;
        row.map(|r| job_from_row(&r)).transpose()
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn job_from_row(row: &Row) -> Result<Job> {
    job_from_columns(
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get::<_, &str>(2)?,
        row.try_get::<_, i32>(3)? as i64,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
        row.try_get::<_, &str>(7)?,
        row.try_get(8)?,
        row.try_get(9)?,
        row.try_get::<_, i32>(10)? as i64,
        row.try_get(11)?,
        row.try_get(12)?,
        row.try_get(13)?,
        row.try_get(14)?,
        row.try_get::<_, Option<&str>>(15)?,
    )
}

/// The condition that a lease ($1 id, $2 worker, $3 attempt) is still held.
const HELD: &str = "id = $1 AND status = 'in_progress' AND worker = $2 AND attempts = $3";

#[async_trait]
impl JobStore for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn insert_new(&self, new: NewJob<'_>) -> Result<Inserted> {
        let settings = serde_json::to_string(new.settings)?;
        let meta = new.meta.stored();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if new.prediction_id.is_some() || new.idempotency.is_some() {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INSERT_LOCK]).await?;
        }
        if let Some(pid) = new.prediction_id {
            if let Some(row) = tx.query_opt(&format!("{SELECT} WHERE prediction_id = $1"), &[&pid]).await? {
                return Ok(Inserted::Existing(job_from_row(&row)?));
            }
        }
        let now = now_ms();
        if let Some((key, hash)) = new.idempotency {
            let found = tx
                .query_opt("SELECT request_sha256, job_id, created_at_ms FROM idempotency_keys WHERE key = $1", &[&key])
                .await?;
            if let Some(row) = found {
                let (stored, job_id, at): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
                let job = tx.query_opt(&format!("{SELECT} WHERE id = $1"), &[&job_id]).await?;
                match job {
                    Some(job) if at > now - IDEMPOTENCY_WINDOW_MS => {
                        return Ok(if stored == hash {
                            Inserted::Existing(job_from_row(&job)?)
                        } else {
                            Inserted::KeyReused
                        });
                    }
                    _ => {
                        tx.execute("DELETE FROM idempotency_keys WHERE key = $1", &[&key]).await?;
                    }
                }
            }
            tx.execute(
                "INSERT INTO idempotency_keys (key, request_sha256, job_id, created_at_ms) VALUES ($1, $2, $3, $4)",
                &[&key, &hash, &new.id, &now],
            )
            .await?;
        }
        tx.execute(
            "INSERT INTO jobs (id, status, created_at_ms, settings, prediction_id, meta) VALUES ($1, 'queued', $2, $3, $4, $5)",
            &[&new.id, &now, &settings, &new.prediction_id, &meta],
        )
        .await?;
        let row = tx.query_one(&format!("{SELECT} WHERE id = $1"), &[&new.id]).await?;
        let job = job_from_row(&row)?;
        tx.commit().await?;
        Ok(Inserted::New(job))
    }

    async fn get_prediction(&self, prediction_id: &str) -> Result<Option<Job>> {
        self.get_by("prediction_id", &prediction_id).await
    }

    async fn enqueue_delivery(&self, msg_id: &str, job_id: &str, event: &str, url: &str, body: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO webhook_deliveries (msg_id, job_id, event, url, body, next_attempt_at_ms, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (msg_id) DO NOTHING",
                &[&msg_id, &job_id, &event, &url, &body, &now_ms()],
            )
            .await?;
        Ok(())
    }

    async fn claim_deliveries(&self, limit: usize, hold: Duration) -> Result<Vec<Delivery>> {
        let now = now_ms();
        let rows = self
            .client()
            .await?
            .query(
                "UPDATE webhook_deliveries SET held_until_ms = $2
                 WHERE seq IN (
                    SELECT seq FROM webhook_deliveries
                    WHERE state = 'pending' AND next_attempt_at_ms <= $1 AND held_until_ms <= $1
                    ORDER BY next_attempt_at_ms, seq LIMIT $3
                    FOR UPDATE SKIP LOCKED)
                 RETURNING seq, msg_id, job_id, event, url, body, attempts",
                &[&now, &(now + hold.as_millis() as i64), &(limit as i64)],
            )
            .await?;
        let mut out: Vec<Delivery> = rows
            .iter()
            .map(|r| Delivery {
                seq: r.get(0),
                msg_id: r.get(1),
                job_id: r.get(2),
                event: r.get(3),
                url: r.get(4),
                body: r.get(5),
                attempts: r.get::<_, i32>(6).max(0) as u32,
            })
            .collect();
        out.sort_by_key(|d| d.seq);
        Ok(out)
    }

    async fn finish_delivery(&self, seq: i64, outcome: &DeliveryOutcome) -> Result<()> {
        let client = self.client().await?;
        let now = now_ms();
        match outcome {
            DeliveryOutcome::Delivered => {
                client
                    .execute(
                        "UPDATE webhook_deliveries SET state = 'delivered', attempts = attempts + 1, held_until_ms = 0,
                            ended_at_ms = $2, last_error = NULL WHERE seq = $1",
                        &[&seq, &now],
                    )
                    .await?
            }
            DeliveryOutcome::Retry { at_ms, error } => client
                .execute(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, held_until_ms = 0, next_attempt_at_ms = $2,
                            last_error = $3 WHERE seq = $1",
                    &[&seq, at_ms, error],
                )
                .await?,
            DeliveryOutcome::GaveUp { error } => {
                client
                    .execute(
                        "UPDATE webhook_deliveries SET state = 'failed', attempts = attempts + 1, held_until_ms = 0,
                            ended_at_ms = $2, last_error = $3 WHERE seq = $1",
                        &[&seq, &now, error],
                    )
                    .await?
            }
        };
        Ok(())
    }

    async fn next_delivery_ms(&self) -> Result<Option<i64>> {
        Ok(self
            .client()
            .await?
            .query_one(
                "SELECT MIN(GREATEST(next_attempt_at_ms, held_until_ms)) FROM webhook_deliveries WHERE state = 'pending'",
                &[],
            )
            .await?
            .get(0))
    }

    async fn delivery_counts(&self) -> Result<DeliveryCounts> {
        let rows =
            self.client().await?.query("SELECT state, COUNT(*) FROM webhook_deliveries GROUP BY state", &[]).await?;
        let mut counts = DeliveryCounts::default();
        for row in rows {
            let n = row.get::<_, i64>(1) as u64;
            match row.get::<_, &str>(0) {
                "pending" => counts.pending = n,
                "delivered" => counts.delivered = n,
                _ => counts.failed += n,
            }
        }
        Ok(counts)
    }

    async fn prune_deliveries(&self, before_ms: i64) -> Result<u64> {
        Ok(self
            .client()
            .await?
            .execute("DELETE FROM webhook_deliveries WHERE state != 'pending' AND ended_at_ms < $1", &[&before_ms])
            .await?)
    }

    async fn get(&self, id: &str) -> Result<Option<Job>> {
        self.get_by("id", &id).await
    }

    async fn list(&self, limit: usize, after: Option<&str>, order: Order) -> Result<(Vec<Job>, bool)> {
        let client = self.client().await?;
        let (cmp, dir) = match order {
            Order::Desc => ("<", "DESC"),
            Order::Asc => (">", "ASC"),
        };
        let rows = match after {
            Some(id) => {
                let cursor: i64 = client
                    .query_opt("SELECT seq FROM jobs WHERE id = $1", &[&id])
                    .await?
                    .ok_or_else(|| anyhow!("no video {id}"))?
                    .get(0);
                client
                    .query(
                        &format!("{SELECT} WHERE seq {cmp} $1 ORDER BY seq {dir} LIMIT $2"),
                        &[&cursor, &((limit + 1) as i64)],
                    )
                    .await?
            }
            None => client.query(&format!("{SELECT} ORDER BY seq {dir} LIMIT $1"), &[&((limit + 1) as i64)]).await?,
        };
        let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        Ok((jobs, more))
    }

    async fn claim_next(&self, worker: &str, policy: QueuePolicy) -> Result<Option<Job>> {
        let lease_ms = policy.lease.as_millis() as i64;
        let max_attempts = policy.max_attempts as i32;
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "UPDATE jobs SET status = 'in_progress', progress = 0, started_at_ms = $2, attempts = attempts + 1,
                        worker = $1, lease_expires_at_ms = {DB_NOW_MS} + $3
                     WHERE seq = (
                        SELECT seq FROM jobs
                        WHERE status = 'queued'
                           OR (status = 'in_progress' AND lease_expires_at_ms < {DB_NOW_MS} AND attempts < $4
                               AND NOT cancel_requested)
                        ORDER BY seq LIMIT 1
                        FOR UPDATE SKIP LOCKED)
                     RETURNING seq"
                ),
                &[&worker, &now_ms(), &lease_ms, &max_attempts],
            )
            .await?;
        match row {
            Some(row) => self.get_by("seq", &row.get::<_, i64>(0)).await,
            None => Ok(None),
        }
    }

    async fn renew(&self, lease: &Lease, lease_for: Duration) -> Result<Renewal> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "UPDATE jobs SET lease_expires_at_ms = {DB_NOW_MS} + $4 WHERE {HELD} RETURNING cancel_requested"
                ),
                &[&lease.id, &lease.worker, &(lease.attempt as i32), &(lease_for.as_millis() as i64)],
            )
            .await?;
        Ok(match row {
            Some(row) => Renewal::Held { cancel_requested: row.get(0) },
            None => Renewal::Lost,
        })
    }

    async fn set_progress(&self, lease: &Lease, progress: u8) -> Result<()> {
        self.client()
            .await?
            .execute(
                &format!("UPDATE jobs SET progress = $4 WHERE {HELD}"),
                &[&lease.id, &lease.worker, &(lease.attempt as i32), &(progress.min(100) as i32)],
            )
            .await?;
        Ok(())
    }

    async fn finish(&self, lease: &Lease, outcome: Outcome) -> Result<bool> {
        let client = self.client().await?;
        let attempt = lease.attempt as i32;
        let changed = match outcome {
            Outcome::Completed => {
                client
                    .execute(
                        &format!(
                            "UPDATE jobs SET status = 'completed', progress = 100, completed_at_ms = $4,
                                lease_expires_at_ms = NULL
                             WHERE {HELD}"
                        ),
                        &[&lease.id, &lease.worker, &attempt, &now_ms()],
                    )
                    .await?
            }
            Outcome::Failed(e) => {
                client
                    .execute(
                        &format!(
                        "UPDATE jobs SET status = 'failed', completed_at_ms = $4, error_code = $5, error_message = $6,
                                lease_expires_at_ms = NULL
                             WHERE {HELD}"
                    ),
                        &[&lease.id, &lease.worker, &attempt, &now_ms(), &e.code, &e.message],
                    )
                    .await?
            }
            Outcome::Released => {
                client
                    .execute(
                        &format!(
                            "UPDATE jobs SET status = 'queued', progress = 0, started_at_ms = NULL,
                                attempts = GREATEST(attempts - 1, 0), lease_expires_at_ms = NULL
                             WHERE {HELD}"
                        ),
                        &[&lease.id, &lease.worker, &attempt],
                    )
                    .await?
            }
        };
        Ok(changed == 1)
    }

    async fn request_cancel(&self, id: &str) -> Result<Option<Job>> {
        // One statement: a queued job fails at once, a running one is flagged for its worker.
        self.client()
            .await?
            .execute(
                "UPDATE jobs SET cancel_requested = TRUE,
                    status = CASE WHEN status = 'queued' THEN 'failed' ELSE status END,
                    completed_at_ms = CASE WHEN status = 'queued' THEN $2 ELSE completed_at_ms END,
                    error_code = CASE WHEN status = 'queued' THEN 'cancelled' ELSE error_code END,
                    error_message = CASE WHEN status = 'queued' THEN 'cancelled before it started' ELSE error_message END
                 WHERE id = $1 AND status IN ('queued', 'in_progress')",
                &[&id, &now_ms()],
            )
            .await?;
        self.get(id).await
    }

    async fn delete(&self, id: &str) -> Result<Option<Job>> {
        let job = self.get(id).await?;
        self.client().await?.execute("DELETE FROM jobs WHERE id = $1", &[&id]).await?;
        Ok(job)
    }

    async fn reap(&self, max_attempts: u32) -> Result<Vec<Job>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "UPDATE jobs SET status = 'failed', completed_at_ms = $2, lease_expires_at_ms = NULL,
                        error_code = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'interrupted' END,
                        error_message = CASE WHEN cancel_requested THEN $3 ELSE NULL END
                     WHERE status = 'in_progress' AND lease_expires_at_ms < {DB_NOW_MS}
                        AND (attempts >= $1 OR cancel_requested)
                     RETURNING id, attempts"
                ),
                &[&(max_attempts as i32), &now_ms(), &CANCELLED_INTERRUPTED],
            )
            .await?;
        let mut failed = Vec::new();
        for row in rows {
            let (id, attempts): (String, i32) = (row.get(0), row.get(1));
            self.client()
                .await?
                .execute(
                    "UPDATE jobs SET error_message = $2 WHERE id = $1 AND error_message IS NULL",
                    &[&id, &interrupted_message(attempts as i64, max_attempts)],
                )
                .await?;
            failed.extend(self.get(&id).await?);
        }
        Ok(failed)
    }

    async fn recover(&self, max_attempts: u32, workers: Option<&str>) -> Result<Recovery> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT id, attempts, cancel_requested FROM jobs WHERE status = 'in_progress'
                    AND ($1::TEXT IS NULL OR substr(worker, 1, length($1::TEXT)) = $1::TEXT)
                 ORDER BY seq FOR UPDATE",
                &[&workers],
            )
            .await?;
        let mut report = Recovery::default();
        for row in rows {
            let (id, attempts, cancelled): (String, i32, bool) = (row.get(0), row.get(1), row.get(2));
            if !cancelled && (attempts as u32) < max_attempts {
                tx.execute(
                    "UPDATE jobs SET status = 'queued', progress = 0, started_at_ms = NULL, lease_expires_at_ms = NULL
                     WHERE id = $1",
                    &[&id],
                )
                .await?;
                report.requeued.push(id);
            } else {
                let (code, message) = if cancelled {
                    ("cancelled", CANCELLED_INTERRUPTED.to_string())
                } else {
                    ("interrupted", interrupted_message(attempts as i64, max_attempts))
                };
                tx.execute(
                    "UPDATE jobs SET status = 'failed', completed_at_ms = $2, error_code = $3, error_message = $4,
                        lease_expires_at_ms = NULL
                     WHERE id = $1",
                    &[&id, &now_ms(), &code, &message],
                )
                .await?;
                report.failed.push(id);
            }
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn counts(&self) -> Result<Counts> {
        let rows = self.client().await?.query("SELECT status, COUNT(*) FROM jobs GROUP BY status", &[]).await?;
        let mut counts = Counts::default();
        for row in rows {
            let n = row.get::<_, i64>(1) as u64;
            match JobStatus::parse(row.get(0))? {
                JobStatus::Queued => counts.queued = n,
                JobStatus::InProgress => counts.in_progress = n,
                JobStatus::Completed => counts.completed = n,
                JobStatus::Failed => counts.failed = n,
            }
        }
        Ok(counts)
    }

    async fn push_event(&self, origin: &str, job_id: &str, name: &str, data: &Value) -> Result<()> {
        // Under a transaction lock, events commit in the order of their `seq`: a reader that has
        // seen one has seen every one before it.
        self.client()
            .await?
            .execute(
                "WITH turn AS (SELECT pg_advisory_xact_lock($6::BIGINT))
                 INSERT INTO job_events (job_id, name, data, origin, created_at_ms)
                 SELECT $1::TEXT, $2::TEXT, $3::TEXT, $4::TEXT, $5::BIGINT FROM turn",
                &[&job_id, &name, &data.to_string(), &origin, &now_ms(), &EVENT_LOCK],
            )
            .await?;
        Ok(())
    }

    async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT seq, origin, job_id, name, data FROM job_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &(limit as i64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredEvent {
                    seq: r.get(0),
                    origin: r.get(1),
                    job_id: r.get(2),
                    name: r.get(3),
                    data: serde_json::from_str(r.get(4))?,
                })
            })
            .collect()
    }

    async fn last_event(&self) -> Result<i64> {
        Ok(self.client().await?.query_one("SELECT COALESCE(MAX(seq), 0) FROM job_events", &[]).await?.get(0))
    }

    async fn prune_events(&self, before_ms: i64) -> Result<u64> {
        Ok(self.client().await?.execute("DELETE FROM job_events WHERE created_at_ms < $1", &[&before_ms]).await?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(super::redact("postgres://t2v:s3cret@db:5432/t2v"), "postgres://t2v@db:5432/t2v");
        assert_eq!(super::redact("postgres://db/t2v"), "postgres://db/t2v");
    }
}
