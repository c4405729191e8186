//! The prediction API of Cog (and Replicate): `POST /predictions` (waits for the end, or answers
//! 202 at once with `Prefer: respond-async`), `PUT /predictions/{id}` (the same, idempotent: an id
//! seen before gives its prediction and runs nothing new), `GET /predictions/{id}` and
//! `POST /predictions/{id}/cancel`. A prediction is a job of the same queue and store as
//! `/v1/videos`; its `input` holds the fields of `/v1/videos`, its `output` is the URL of the MP4.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::api::{new_job_id, read_json_object, request_base_url, wait_until_ended};
use crate::error::ApiError;
use crate::events::JobEvent;
use crate::request::{self, Fields};
use crate::store::{Inserted, Job, JobMeta, JobStatus, NewJob};
use crate::webhook::{check_url, PREDICTION_EVENTS};
use crate::Shared;

type AppState = State<Arc<Shared>>;

/// Prediction ids are the client's: letters, digits, `-` and `_`, at most 128 (Cog's advice is
/// 26 base32 characters).
pub fn is_prediction_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A new prediction id as Cog advises: a UUIDv4 in base32, lower case, unpadded (26 characters).
fn new_prediction_id() -> String {
    base32_id(uuid::Uuid::new_v4().as_u128())
}

/// The 16 bytes of `value` (big-endian) in RFC 4648 base32, lower case, without padding: 25
/// characters of 5 bits, then the last 3 bits and 2 zero bits.
fn base32_id(value: u128) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out: String = (0..25).map(|i| ALPHABET[((value >> (123 - 5 * i)) & 31) as usize] as char).collect();
    out.push(ALPHABET[((value & 7) << 2) as usize] as char);
    out
}

/// Cog's status of a job.
pub fn status(job: &Job) -> &'static str {
    match job.status {
        JobStatus::Queued => "starting",
        JobStatus::InProgress => "processing",
        JobStatus::Completed => "succeeded",
        JobStatus::Failed if job.error.as_ref().is_some_and(|e| e.code == "cancelled") => "canceled",
        JobStatus::Failed => "failed",
    }
}

/// Milliseconds since 1970 as RFC 3339 in UTC (`2026-12-05T01:02:03.456Z`).
pub fn rfc3339(ms: i64) -> String {
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar, in 400-year eras).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", rest / 3600, rest / 60 % 60, rest % 60)
}

/// The job's progress as lines of text: queued, started, the step it is at (from `progress`, a
/// progress event's data, or the live state), and how it ended.
pub fn logs(shared: &Shared, job: &Job, progress: Option<&Value>) -> String {
    let mut lines = vec![format!("queued at {}", rfc3339(job.created_at_ms))];
    if let Some(started) = job.started_at_ms {
        lines.push(format!(
            "started at {} by {} (attempt {})",
            rfc3339(started),
            job.worker.as_deref().unwrap_or("a worker"),
            job.attempts
        ));
    }
    if job.status == JobStatus::InProgress {
        let live = progress.cloned().or_else(|| {
            shared
                .hub
                .live(Some(&job.id))
                .into_iter()
                .rev()
                .find(|e| e.event.name == "progress")
                .map(|e| e.event.data.clone())
        });
        match live {
            Some(p) if p["total_steps"].as_u64().is_some() => lines.push(format!(
                "denoising: step {} of {}{}",
                p["step"].as_u64().unwrap_or(0),
                p["total_steps"].as_u64().unwrap_or(0),
                p["eta_s"].as_f64().map(|s| format!(", about {s:.1} s left")).unwrap_or_default()
            )),
            _ => lines.push(format!("progress: {}%", job.progress)),
        }
    }
    match (job.status, &job.error) {
        (JobStatus::Completed, _) => lines.push(format!(
            "succeeded: {} frames of {}x{} in {:.2} s",
            job.settings.num_frames,
            job.settings.width,
            job.settings.height,
            predict_time(job).unwrap_or(0.0)
        )),
        (JobStatus::Failed, Some(e)) => lines.push(format!("{}: {}", status(job), e.message)),
        _ => {}
    }
    lines.join("\n") + "\n"
}

fn predict_time(job: &Job) -> Option<f64> {
    Some((job.completed_at_ms? - job.started_at_ms?).max(0) as f64 / 1000.0)
}

/// The base URL of the job's links: the one its client reached, else this server's.
fn base_url(shared: &Shared, job: &Job) -> String {
    job.meta.base_url.clone().unwrap_or_else(|| shared.listen_url.get().cloned().unwrap_or_default())
}

/// Cog's prediction object (`PredictionResponse`) of a job, with Replicate's `urls`.
pub fn prediction_object(shared: &Shared, job: &Job) -> Value {
    let base = base_url(shared, job);
    let id = job.prediction_id.clone().unwrap_or_else(|| job.id.clone());
    let output = (job.status == JobStatus::Completed).then(|| format!("{base}/v1/videos/{}/content", job.id));
    json!({
        "id": id,
        "model": shared.model.name,
        "version": env!("CARGO_PKG_VERSION"),
        "input": job.meta.input.clone().unwrap_or_else(|| json!({})),
        "output": output,
        "error": if job.status == JobStatus::Failed { job.error.as_ref().map(|e| Value::String(e.message.clone())) } else { None },
        "status": status(job),
        "logs": logs(shared, job, None),
        "metrics": match predict_time(job) {
            Some(t) if job.status.is_terminal() => json!({"predict_time": t}),
            _ => json!({}),
        },
        "created_at": rfc3339(job.created_at_ms),
        "started_at": job.started_at_ms.map(rfc3339),
        "completed_at": job.completed_at_ms.map(rfc3339),
        "webhook": job.meta.webhook,
        "webhook_events_filter": job.meta.webhook_events,
        "urls": {
            "get": format!("{base}/predictions/{id}"),
            "cancel": format!("{base}/predictions/{id}/cancel"),
            "stream": format!("{base}/v1/videos/{}/events", job.id),
        },
        "video_id": job.id,
    })
}

fn respond_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

pub async fn create(State(s): AppState, req: Request) -> Result<Response, ApiError> {
    submit(s, None, req).await
}

pub async fn put(State(s): AppState, Path(id): Path<String>, req: Request) -> Result<Response, ApiError> {
    if !is_prediction_id(&id) {
        return Err(ApiError::bad(
            "prediction_id",
            "a prediction id is 1 to 128 letters, digits, `-` or `_` (Cog advises a UUID in base32, 26 characters)",
        ));
    }
    submit(s, Some(id), req).await
}

async fn submit(s: Arc<Shared>, path_id: Option<String>, req: Request) -> Result<Response, ApiError> {
    let wait = !respond_async(req.headers());
    let base = request_base_url(req.headers());
    let body = read_json_object(&s, req).await?;
    let body_id = match body.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if is_prediction_id(id) => Some(id.clone()),
        Some(_) => return Err(ApiError::bad("id", "`id` must be 1 to 128 letters, digits, `-` or `_`")),
    };
    // The path's id is the one (Cog's PUT); a body id on POST names the prediction too.
    let prediction_id = path_id.or(body_id).unwrap_or_else(new_prediction_id);
    // A prediction seen before: its answer, whatever the body (Cog's idempotent PUT).
    if let Some(job) = s.store.get_prediction(&prediction_id).await? {
        return answer(&s, job, wait).await;
    }
    let input = match body.get("input") {
        Some(Value::Object(map)) => map.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::bad(
                "input",
                "`input` is required: the fields of the video, as {\"prompt\": \"a corgi\"}",
            ))
        }
        Some(_) => {
            return Err(ApiError::bad("input", "`input` must be an object of fields, as {\"prompt\": \"a corgi\"}"))
        }
    };
    let webhook = match body.get("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) if url.is_empty() => None,
        Some(Value::String(url)) => {
            Some(check_url(url, s.webhooks.allow_private).map_err(|m| ApiError::bad("webhook", m))?.to_string())
        }
        Some(_) => return Err(ApiError::bad("webhook", "`webhook` must be a URL string")),
    };
    let events = match body.get("webhook_events_filter") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => {
            let mut events = Vec::new();
            for e in list {
                match e.as_str() {
                    Some(name) if PREDICTION_EVENTS.contains(&name) => events.push(name.to_string()),
                    _ => {
                        return Err(ApiError::bad(
                            "webhook_events_filter",
                            format!(
                                "`webhook_events_filter` holds {e}: the events are start, output, logs and completed"
                            ),
                        ))
                    }
                }
            }
            Some(events)
        }
        Some(_) => {
            return Err(ApiError::bad(
                "webhook_events_filter",
                "`webhook_events_filter` must be a list, as [\"completed\"]",
            ))
        }
    };
    crate::api::queue_room(&s).await?;
    let map: BTreeMap<String, Value> = input.clone().into_iter().collect();
    let (fields, _ignored) = Fields::from_request(map)?;
    if fields.has("input_reference") {
        return Err(ApiError::bad(
            "input_reference",
            "video-to-video takes an uploaded file: send it to POST /v1/videos as multipart/form-data",
        ));
    }
    let settings = request::parse(&fields, &s.model, &s.limits, crate::api::random_seed())?;
    let settings = request::with_loras(&fields, settings, &s.loras)?;
    let settings = request::with_upscale(&fields, settings, s.upscale.as_ref(), &s.limits)?;
    request::check_schedule(&settings, s.scheduler_config.as_ref())?;
    let meta = JobMeta {
        api: Some("prediction".into()),
        input: Some(Value::Object(input)),
        webhook,
        webhook_events: events,
        base_url: base,
    };
    let id = new_job_id();
    let inserted = s
        .store
        .insert_new(NewJob {
            id: &id,
            settings: &settings,
            meta: &meta,
            prediction_id: Some(&prediction_id),
            idempotency: None,
        })
        .await?;
    match inserted {
        Inserted::New(job) => {
            s.wake.notify_one();
            s.webhooks.remember(&job);
            let video = crate::views::video_object(&job, &s.model);
            s.publish(JobEvent::new(
                &job.id,
                "queued",
                json!({"id": job.id, "position": job.queue_position, "video": video}),
            ))
            .await;
            answer(&s, job, wait).await
        }
        // Another request with this id won the race.
        Inserted::Existing(job) => answer(&s, job, wait).await,
        Inserted::KeyReused => Err(ApiError::internal("an idempotency key where none was given")),
    }
}

/// The answer to a creation: the prediction at its end (waiting for it), or 202 and its state now.
async fn answer(s: &Arc<Shared>, job: Job, wait: bool) -> Result<Response, ApiError> {
    if !wait {
        return Ok((StatusCode::ACCEPTED, Json(prediction_object(s, &job))).into_response());
    }
    let job = wait_until_ended(s, &job.id).await?;
    Ok(Json(prediction_object(s, &job)).into_response())
}

async fn find(s: &Shared, id: &str) -> Result<Job, ApiError> {
    let missing = || ApiError {
        param: Some("prediction_id".into()),
        code: Some("not_found"),
        ..ApiError::new(StatusCode::NOT_FOUND, format!("no prediction `{id}`"))
    };
    if !is_prediction_id(id) {
        return Err(missing());
    }
    s.store.get_prediction(id).await?.ok_or_else(missing)
}

pub async fn get(State(s): AppState, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let job = find(&s, &id).await?;
    Ok(Json(prediction_object(&s, &job)))
}

pub async fn cancel(State(s): AppState, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let before = find(&s, &id).await?;
    let job = s.store.request_cancel(&before.id).await?.ok_or_else(|| ApiError::not_found(&before.id))?;
    match (before.status, job.status) {
        (_, JobStatus::InProgress) => {
            s.cancels.lock().expect("cancels lock").insert(job.id.clone());
        }
        (JobStatus::Queued, JobStatus::Failed) => {
            s.publish(JobEvent::new(&job.id, "failed", crate::views::video_object(&job, &s.model))).await
        }
        _ => {}
    }
    Ok(Json(prediction_object(&s, &job)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_ids() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_614_265_330_000), "2021-02-25T15:02:10.000Z");
        assert_eq!(rfc3339(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
        // Python's b32encode(uuid.UUID(int=…).bytes), lowered, unpadded.
        assert_eq!(base32_id(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef), "aerukz4jvpg66ajdivtytk6n54");
        let id = new_prediction_id();
        assert_eq!(id.len(), 26, "{id}");
        assert!(is_prediction_id(&id) && id.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
        assert_ne!(new_prediction_id(), id);
        for bad in ["", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(!is_prediction_id(bad), "{bad}");
        }
    }
}
