//! The events of workers in other processes, for this API process's event streams: read from the
//! store in the order they were stored (polled: it survives a database restart with nothing to
//! set up again), and the upkeep no single worker owns: failing the jobs whose worker died on
//! their last attempt, and forgetting old events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::events::JobEvent;
use crate::store::now_ms;
use crate::views::video_object;
use crate::Shared;

/// How often the store is read for new events.
const POLL: Duration = Duration::from_millis(200);
/// Events are kept this long (streams that open later read the job itself).
const KEEP_EVENTS: Duration = Duration::from_secs(600);
const BATCH: usize = 500;

/// The names events may have (the SSE event names of [`JobEvent`]).
fn event_name(name: &str) -> Option<&'static str> {
    ["queued", "progress", "preview", "completed", "failed", "deleted"].into_iter().find(|n| *n == name)
}

/// Relays until the process stops.
pub async fn run(shared: Arc<Shared>) {
    let mut stop = shared.shutdown.subscribe();
    // Only what happens from now on: streams that open replay a job's state from the store.
    let mut after = loop {
        match shared.store.last_event().await {
            Ok(seq) => break seq,
            Err(e) => {
                eprintln!("t2v serve: reading the queue's events: {e:#}");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let (mut last_reap, mut last_prune) = (None::<Instant>, Instant::now());
    let mut failing = false;
    while !*stop.borrow() {
        let mut full = false;
        match shared.store.events_after(after, BATCH).await {
            Ok(events) => {
                if failing {
                    eprintln!("t2v serve: the queue answers again");
                    failing = false;
                }
                full = events.len() == BATCH;
                for e in events {
                    after = e.seq;
                    if e.origin == shared.origin {
                        continue;
                    }
                    if let Some(name) = event_name(&e.name) {
                        shared.hub.send(Arc::new(JobEvent { id: e.job_id, name, data: e.data }));
                    }
                }
            }
            Err(e) => {
                if !failing {
                    eprintln!("t2v serve: reading the queue's events: {e:#}; trying again");
                    failing = true;
                }
            }
        }
        // With no idle worker, nobody else fails the jobs that ran out of attempts.
        if last_reap.is_none_or(|t| t.elapsed() >= shared.policy.heartbeat()) {
            last_reap = Some(Instant::now());
            if let Ok(failed) = shared.store.reap(shared.policy.max_attempts).await {
                for job in failed {
                    eprintln!("t2v serve: {} failed: its worker stopped on its last attempt", job.id);
                    shared.publish(JobEvent::new(&job.id, "failed", video_object(&job, &shared.model))).await;
                }
            }
        }
        if last_prune.elapsed() >= Duration::from_secs(60) {
            last_prune = Instant::now();
            let _ = shared.store.prune_events(now_ms() - KEEP_EVENTS.as_millis() as i64).await;
        }
        if !full {
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}
