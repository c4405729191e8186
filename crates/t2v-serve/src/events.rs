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

#[derive(Default)]
struct Live {
    progress: Option<Arc<JobEvent>>,
    preview: Option<Arc<JobEvent>>,
}

pub struct Hub {
    tx: broadcast::Sender<Arc<JobEvent>>,
    live: Mutex<HashMap<String, Live>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self { tx, live: Mutex::new(HashMap::new()) }
    }

    pub fn send(&self, event: Arc<JobEvent>) {
        {
            let mut live = self.live.lock().expect("event hub lock");
            match event.name {
                "progress" => live.entry(event.id.clone()).or_default().progress = Some(event.clone()),
                "preview" => live.entry(event.id.clone()).or_default().preview = Some(event.clone()),
                _ if event.is_last() => {
                    live.remove(&event.id);
                }
                _ => {}
            }
        }
        // No receiver is fine: nobody is watching.
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<JobEvent>> {
        self.tx.subscribe()
    }

    /// The latest progress and preview of a running job (`id`), or of every running job.
    pub fn live(&self, id: Option<&str>) -> Vec<Arc<JobEvent>> {
        let live = self.live.lock().expect("event hub lock");
        live.iter()
            .filter(|(k, _)| id.is_none_or(|id| id == k.as_str()))
            .flat_map(|(_, l)| l.progress.iter().chain(l.preview.iter()).cloned())
            .collect()
    }
}
