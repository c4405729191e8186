//! Job events (`queued`, `progress`, `preview`, `completed`, `failed`, `deleted`) from the worker
//! and the API to every open event stream, and the latest progress and preview of each running
//! job for streams that open mid-run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::response::sse::Event;
use serde_json::Value;
use tokio::sync::broadcast;

#[derive(Debug, Clone)]
pub struct JobEvent {
    pub id: String,
    /// The SSE event name.
    pub name: &'static str,
    pub data: Value,
}

impl JobEvent {
    pub fn new(id: &str, name: &'static str, data: Value) -> Arc<Self> {
        Arc::new(Self { id: id.to_string(), name, data })
    }

    /// After this event the job's stream has nothing more to say.
    pub fn is_last(&self) -> bool {
        matches!(self.name, "completed" | "failed" | "deleted")
    }

    /// A job left the queue (it started, or ended or went away): the positions behind it moved.
    pub fn moves_queue(&self) -> bool {
        self.is_last() || (self.name == "progress" && self.data.get("step").and_then(Value::as_u64) == Some(0))
    }

    pub fn to_sse(&self) -> Event {
        Event::default().event(self.name).data(self.data.to_string())
    }
}

/// An event with its place in the order the hub sent them: a stream that replays a job's live
/// state skips what its subscription also delivered from before that state.
#[derive(Debug, Clone)]
pub struct Stamped {
    pub seq: u64,
    pub event: Arc<JobEvent>,
}

#[derive(Default)]
struct Live {
    progress: Option<Stamped>,
    preview: Option<Stamped>,
}

#[derive(Default)]
struct State {
    /// The stamp of the last event sent.
    seq: u64,
    live: HashMap<String, Live>,
}

pub struct Hub {
    tx: broadcast::Sender<Stamped>,
    state: Mutex<State>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self { tx, state: Mutex::new(State::default()) }
    }

    pub fn send(&self, event: Arc<JobEvent>) {
        // Stamped and broadcast under the lock: subscribers receive events in stamp order, and a
        // snapshot of the live state holds exactly the events stamped before it.
        let mut state = self.state.lock().expect("event hub lock");
        state.seq += 1;
        let stamped = Stamped { seq: state.seq, event };
        let id = &stamped.event.id;
        match stamped.event.name {
            "progress" => state.live.entry(id.clone()).or_default().progress = Some(stamped.clone()),
            "preview" => state.live.entry(id.clone()).or_default().preview = Some(stamped.clone()),
            _ if stamped.event.is_last() => {
                state.live.remove(id);
            }
            _ => {}
        }
        // No receiver is fine: nobody is watching.
        let _ = self.tx.send(stamped);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Stamped> {
        self.tx.subscribe()
    }

    /// The latest progress and preview of a running job (`id`), or of every running job, in the
    /// order they were sent.
    pub fn live(&self, id: Option<&str>) -> Vec<Stamped> {
        let state = self.state.lock().expect("event hub lock");
        let mut events: Vec<Stamped> = state
            .live
            .iter()
            .filter(|(k, _)| id.is_none_or(|id| id == k.as_str()))
            .flat_map(|(_, l)| l.progress.iter().chain(l.preview.iter()).cloned())
            .collect();
        events.sort_by_key(|e| e.seq);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A stream that subscribes, then replays the live state, must be able to tell which of the
    /// subscription's events the replay already covers (the race behind steps told out of order).
    #[test]
    fn the_live_state_is_stamped_in_the_order_events_were_sent() {
        let hub = Hub::new();
        let mut rx = hub.subscribe();
        for step in 0..3 {
            hub.send(JobEvent::new("a", "progress", json!({ "step": step })));
        }
        hub.send(JobEvent::new("a", "preview", json!({ "step": 2 })));
        hub.send(JobEvent::new("b", "progress", json!({ "step": 0 })));
        let live = hub.live(Some("a"));
        assert_eq!(live.iter().map(|e| (e.seq, e.event.name)).collect::<Vec<_>>(), [(3, "progress"), (4, "preview")]);
        let received: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| e.seq).collect();
        assert_eq!(received, [1, 2, 3, 4, 5], "delivered in stamp order");
        assert_eq!(hub.live(None).len(), 3);
        hub.send(JobEvent::new("a", "completed", json!({})));
        assert!(hub.live(Some("a")).is_empty(), "an ended job has no live state");
        assert_eq!(rx.try_recv().unwrap().seq, 6);
    }
}
