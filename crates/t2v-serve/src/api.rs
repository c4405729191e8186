//! The routes: the videos API in OpenAI's shape under `/v1`, t2v's own additions under `/v1/t2v`,
//! the page at `/`, `/health` and `/openapi.json`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tower::ServiceExt;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::services::ServeFile;

use crate::error::ApiError;
use crate::events::{JobEvent, Stamped};
use crate::request::{self, Fields};
use crate::storage::{input_path, remove_files, thumbnail_path, video_path};
use crate::store::{Inserted, Job, JobMeta, JobStatus, NewJob, Order};
use crate::views::video_object;
use crate::{ModelInfo, Shared};
use t2v::video::input::read_video;

type AppState = State<Arc<Shared>>;

const POLL_HEADER: &str = "openai-poll-after-ms";

pub fn router(shared: Arc<Shared>, cors: &[String], policy: crate::guard::Policy) -> anyhow::Result<Router> {
    let api = Router::new()
        .route("/v1/videos", post(create_video).get(list_videos))
        .route("/v1/videos/sync", post(create_video_sync))
        .route("/v1/loras", get(list_loras))
        .route("/predictions", post(crate::predictions::create))
        .route("/predictions/{prediction_id}", put(crate::predictions::put).get(crate::predictions::get))
        .route("/predictions/{prediction_id}/cancel", post(crate::predictions::cancel))
        .route("/v1/videos/{id}", get(get_video).delete(delete_video))
        .route("/v1/videos/{id}/content", get(video_content))
        .route("/v1/videos/{id}/cancel", post(cancel_video))
        .route("/v1/videos/{id}/events", get(video_events))
        .route("/v1/t2v/events", get(all_events))
        .route("/v1/t2v/info", get(info))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    let mut app = Router::new()
        .route("/", get(|| async { page(include_str!("../static/index.html"), "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { page(include_str!("../static/app.js"), "text/javascript; charset=utf-8") }))
        .route("/app.css", get(|| async { page(include_str!("../static/app.css"), "text/css; charset=utf-8") }))
        .route("/health", get(health))
        .route("/openapi.json", get(|| async { Json(crate::openapi::spec()) }))
        .merge(api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route: see /openapi.json") })
        // Bodies are read with their own limits (`read_body`).
        .layer(DefaultBodyLimit::disable())
        .with_state(shared);
    if !cors.is_empty() {
        let origins = if cors.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            let list = cors
                .iter()
                .map(|o| {
                    HeaderValue::from_str(o.trim_end_matches('/'))
                        .map_err(|_| anyhow::anyhow!("--cors {o} is not an origin"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            AllowOrigin::list(list)
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    HeaderName::from_static("idempotency-key"),
                    HeaderName::from_static("prefer"),
                ])
                .expose_headers([HeaderName::from_static(POLL_HEADER)]),
        );
    }
    // Outermost: the Host and origin checks come before anything (CORS preflights included),
    // and every 4xx leaves in the JSON shape.
    Ok(app.layer(middleware::from_fn_with_state(Arc::new(policy), crate::guard::guard)))
}

/// `/health` alone, for a worker process's probes.
pub fn health_router(shared: Arc<Shared>) -> Router {
    Router::new().route("/health", get(health)).with_state(shared)
}

/// The page's files, with a policy that lets them load nothing from other hosts.
fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn authenticate(State(s): AppState, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
        if !given.is_some_and(|g| keys_match(g, key)) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// The token of an `Authorization: Bearer TOKEN` header; the scheme's case does not matter
/// (RFC 9110, 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares the SHA-256 digests of the two keys in constant time: neither the position of the
/// first difference nor the key's length shows in the time taken.
fn keys_match(given: &str, key: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(key.as_bytes()));
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Job ids are `video_` and 32 hex digits: nothing else can reach the store or name a file.
pub fn is_job_id(id: &str) -> bool {
    id.strip_prefix("video_")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

pub(crate) fn new_job_id() -> String {
    format!("video_{}", uuid::Uuid::new_v4().simple())
}

pub(crate) fn random_seed() -> u64 {
    // 32 bits keep seeds short enough to retype, as the command line's.
    (uuid::Uuid::new_v4().as_u128() % (1 << 32)) as u64
}

/// How long clients should wait before polling again: about one denoising step.
fn poll_after_ms(s: &Shared) -> u64 {
    let step = s.stats.lock().expect("stats lock").mean_step_s();
    step.map_or(1000, |t| ((t * 1000.0) as u64).clamp(200, 5000))
}

fn video_response(s: &Shared, job: &Job) -> Response {
    let mut response = Json(video_object(job, &s.model)).into_response();
    if !job.status.is_terminal() {
        response.headers_mut().insert(POLL_HEADER, HeaderValue::from(poll_after_ms(s)));
    }
    response
}

async fn find(s: &Shared, id: &str) -> Result<Job, ApiError> {
    if !is_job_id(id) {
        return Err(ApiError::not_found(id));
    }
    s.store.get(id).await?.ok_or_else(|| ApiError::not_found(id))
}

async fn health(State(s): AppState) -> Response {
    if s.ready.load(Ordering::SeqCst) {
        Json(json!({"status": "ok", "model": s.model.name})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading", "model": s.model.name}))).into_response()
    }
}

async fn info(State(s): AppState) -> Result<Json<Value>, ApiError> {
    let stats = *s.stats.lock().expect("stats lock");
    Ok(Json(json!({
        "model": s.model,
        "ready": s.ready.load(Ordering::SeqCst),
        "defaults": {
            "num_inference_steps": request::DEFAULT_STEPS,
            "guidance_scale": request::DEFAULT_GUIDANCE,
            "num_frames": request::DEFAULT_FRAMES,
            "fps": t2v::video::DEFAULT_FPS,
            "strength": request::DEFAULT_STRENGTH,
            "scheduler": "dpm",
            "eta": 0.0,
            "width": s.model.native_width,
            "height": s.model.native_height,
        },
        // Every sampler a request may name, and FreeNoise's window weightings (for the page's form).
        // The samplers this server runs (T2V-Turbo's needs a UNet loaded for it: the command line's).
        "schedulers": t2v::schedulers::SchedulerKind::ALL.iter().filter(|k| k.guides_with_negative()).map(|k| k.name()).collect::<Vec<_>>(),
        "context_weightings": t2v::long_video::ContextWeighting::ALL.map(|w| w.as_str()),
        "limits": s.limits,
        "preview_every": s.preview_every,
        "queue": {
            "backend": s.store.backend(),
            "workers_in_process": s.workers,
            "lease_s": s.policy.lease.as_secs_f64(),
            "max_attempts": s.policy.max_attempts,
        },
        "jobs": s.store.counts().await?,
        "webhooks": s.store.delivery_counts().await?,
        "loras": s.loras.keys().collect::<Vec<_>>(),
        "upscale": s.upscale.as_ref().map(|(_, m)| json!({"model": m.name, "native_width": m.native_width,
            "native_height": m.native_height})),
        "stats": {
            "jobs_run": stats.jobs_run,
            "steps": stats.steps,
            "mean_step_s": stats.mean_step_s(),
            "previews": stats.previews,
            "mean_preview_s": stats.mean_preview_s(),
            "preview_share_of_step": stats.mean_preview_s().zip(stats.mean_step_s()).map(|(p, st)| p / st),
        },
    })))
}

/// A job made by `POST /v1/videos` (or `/sync`): the job, whether an `Idempotency-Key` gave it
/// from before, and the fields ignored.
async fn create_job(s: &Arc<Shared>, req: Request) -> Result<(Job, bool, Vec<String>), ApiError> {
    let content_type =
        req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let is_multipart = content_type.starts_with("multipart/form-data");
    // Only these two: a page of another site can send neither without the browser asking this
    // server first (text/plain and form-urlencoded bodies, or none, it can).
    if !is_multipart && !content_type.starts_with("application/json") {
        let given = if content_type.is_empty() { "no Content-Type".to_string() } else { content_type.clone() };
        return Err(ApiError {
            code: Some("unsupported_media_type"),
            ..ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("send the fields as application/json or multipart/form-data, not {given}"),
            )
        });
    }
    queue_room(s).await?;
    let limit = if is_multipart { s.limits.max_upload_bytes } else { s.limits.max_json_bytes };
    let (parts, body) = req.into_parts();
    let idempotency_key = match parts.headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str().map(str::trim) {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Some(k.to_string()),
            _ => {
                return Err(ApiError::bad_request(
                    Some("Idempotency-Key"),
                    "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
                ))
            }
        },
    };
    let base = request_base_url(&parts.headers);
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit + DRAIN_BYTES) {
        return Err(ApiError::too_large(limit));
    }
    let id = new_job_id();
    let (map, upload): (BTreeMap<String, Value>, Option<Upload>) = if is_multipart {
        let over = Arc::new(AtomicBool::new(false));
        let body = limited(body, limit, over.clone());
        match read_multipart(Request::from_parts(parts, body), &s.videos_dir, &id).await {
            Ok(read) => read,
            Err(_) if over.load(Ordering::SeqCst) => return Err(ApiError::too_large(limit)),
            Err(e) => return Err(e),
        }
    } else {
        let bytes = read_body(body, limit).await?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) if map.contains_key("input_reference") => {
                return Err(ApiError::bad(
                    "input_reference",
                    "`input_reference` is a video file, which JSON cannot carry: send the request as \
                     multipart/form-data with the file in the `input_reference` field (as the OpenAI SDK does)",
                ))
            }
            Ok(Value::Object(map)) => (map.into_iter().collect(), None),
            Ok(_) => {
                return Err(ApiError {
                    code: Some("unprocessable"),
                    ..ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "the body must be a JSON object of fields, as {\"prompt\": \"a corgi\"}",
                    )
                })
            }
            Err(e) => return Err(ApiError::bad_request(None, format!("the body is not valid JSON: {e}"))),
        }
    };
    let mut map = map;
    let webhook = match map.remove("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) if url.is_empty() => None,
        Some(Value::String(url)) => Some(
            crate::webhook::check_url(&url, s.webhooks.allow_private)
                .map_err(|m| ApiError::bad("webhook", m))?
                .to_string(),
        ),
        Some(_) => return Err(ApiError::bad("webhook", "`webhook` must be a URL string")),
    };
    // The request as the key remembers it: its fields (sorted), webhook and uploaded bytes.
    let request_hash = match &idempotency_key {
        None => None,
        Some(_) => {
            use sha2::{Digest, Sha256};
            let mut hash = Sha256::new();
            hash.update(serde_json::to_vec(&map).map_err(ApiError::internal)?);
            hash.update(webhook.as_deref().unwrap_or("").as_bytes());
            if let Some(u) = &upload {
                let path = u.partial.path().to_path_buf();
                let digest = tokio::task::spawn_blocking(move || t2v_settings::input_sha256(&path))
                    .await
                    .map_err(ApiError::internal)?
                    .map_err(ApiError::internal)?;
                hash.update(digest.as_bytes());
            }
            Some(format!("{:x}", hash.finalize()))
        }
    };
    let (fields, ignored) = Fields::from_request(map)?;
    let mut settings = request::parse(&fields, &s.model, &s.limits, random_seed())?;
    settings = request::with_loras(&fields, settings, &s.loras)?;
    settings = request::with_upscale(&fields, settings, s.upscale.as_ref(), &s.limits)?;
    request::check_schedule(&settings, s.scheduler_config.as_ref())?;
    if let Some(video) = request::video_request(&fields, &settings)? {
        let upload = upload.ok_or_else(|| ApiError::bad("input_reference", "`input_reference` holds no file"))?;
        // The pre-check of the cost with the frames asked (or the most a clip gives by default).
        let mut asked = settings.clone();
        asked.num_frames = video.read.num_frames.unwrap_or(settings.num_frames);
        asked.input = Some(placeholder_input());
        request::check_cost(&asked, Some(video.strength), &s.limits)?;
        // A few decodes at a time: each may hold a frame budget's worth of memory.
        let _permit = s.decodes.acquire().await.map_err(ApiError::internal)?;
        let (dir, limits) = (s.videos_dir.clone(), s.limits.clone());
        let (job_id, input) = (id.clone(), settings.clone());
        settings = tokio::task::spawn_blocking(move || store_input(&dir, &job_id, upload, video, input, &limits))
            .await
            .map_err(ApiError::internal)??;
    }
    let meta = JobMeta { api: None, input: None, webhook, webhook_events: None, base_url: base };
    let idempotency = idempotency_key.as_deref().zip(request_hash.as_deref());
    let inserted = s
        .store
        .insert_new(NewJob { id: &id, settings: &settings, meta: &meta, prediction_id: None, idempotency })
        .await;
    let job = match inserted {
        Ok(Inserted::New(job)) => job,
        Ok(Inserted::Existing(job)) => {
            remove_files(&s.videos_dir, &id);
            return Ok((job, true, ignored));
        }
        Ok(Inserted::KeyReused) => {
            remove_files(&s.videos_dir, &id);
            return Err(ApiError {
                code: Some("idempotency_key_reused"),
                param: Some("Idempotency-Key".into()),
                ..ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "this Idempotency-Key came with another request in the last 24 hours: send the same request \
                     to get its video, or use a new key for a new one",
                )
            });
        }
        Err(e) => {
            remove_files(&s.videos_dir, &id);
            return Err(e.into());
        }
    };
    s.wake.notify_one();
    s.webhooks.remember(&job);
    let video = video_object(&job, &s.model);
    s.publish(JobEvent::new(&job.id, "queued", json!({"id": job.id, "position": job.queue_position, "video": video})))
        .await;
    Ok((job, false, ignored))
}

/// Marks an answer with what the request did not use and whether a key replayed it.
fn annotate(mut response: Response, replayed: bool, ignored: &[String]) -> Response {
    if replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if !ignored.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&ignored.join(", ")) {
            response.headers_mut().insert("t2v-ignored-fields", v);
        }
    }
    response
}

async fn create_video(State(s): AppState, req: Request) -> Result<Response, ApiError> {
    let (job, replayed, ignored) = create_job(&s, req).await?;
    Ok(annotate(video_response(&s, &job), replayed, &ignored))
}

/// `POST /v1/videos/sync` (vLLM-Omni's and SGLang's): the same request, answered with the MP4
/// once the job ends (the error, in the usual shape, when it fails).
async fn create_video_sync(State(s): AppState, req: Request) -> Result<Response, ApiError> {
    let (job, replayed, ignored) = create_job(&s, req).await?;
    let job = wait_until_ended(&s, &job.id).await?;
    if job.status != JobStatus::Completed {
        let e = job.error.clone().unwrap_or(crate::store::JobError { code: "failed".into(), message: "failed".into() });
        let status = if e.code == "cancelled" { StatusCode::CONFLICT } else { StatusCode::INTERNAL_SERVER_ERROR };
        let mut response =
            ApiError { code: Some("generation_failed"), ..ApiError::new(status, e.message) }.into_response();
        response.headers_mut().insert("t2v-video-id", HeaderValue::from_str(&job.id).map_err(ApiError::internal)?);
        return Ok(response);
    }
    let bytes = tokio::fs::read(video_path(&s.videos_dir, &job.id))
        .await
        .map_err(|e| ApiError::internal(format!("reading the video: {e}")))?;
    let mut response = ([(header::CONTENT_TYPE, "video/mp4")], bytes).into_response();
    let headers = response.headers_mut();
    headers.insert("t2v-video-id", HeaderValue::from_str(&job.id).map_err(ApiError::internal)?);
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!("inline; filename=\"{}.mp4\"", job.id)).map_err(ApiError::internal)?,
    );
    Ok(annotate(response, replayed, &ignored))
}

/// Waits for a job to end (completed or failed): woken by its events, and reading the store at
/// least every second (a worker in another process may end it). Ends with the process.
pub(crate) async fn wait_until_ended(s: &Shared, id: &str) -> Result<Job, ApiError> {
    let mut rx = s.hub.subscribe();
    let mut stop = s.shutdown.subscribe();
    loop {
        let job = s.store.get(id).await?.ok_or_else(|| ApiError::not_found(id))?;
        if job.status.is_terminal() {
            return Ok(job);
        }
        if *stop.borrow() {
            return Err(ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the server is stopping; `{id}` stays queued"))
            });
        }
        let deadline = tokio::time::sleep(std::time::Duration::from_secs(1));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = stop.changed() => break,
                r = rx.recv() => match r {
                    Ok(e) if e.event.id == id && e.event.is_last() => break,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => break,
                },
            }
        }
    }
}

/// The server's URL as the client reached it, from `Host` and `X-Forwarded-Proto` (for the links
/// of answers and webhooks).
pub(crate) fn request_base_url(headers: &axum::http::HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?.trim();
    let plain = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    // Behind a TLS proxy the client reached https (the proxy says so); the links follow.
    let scheme = match headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).map(str::trim) {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        _ => "http",
    };
    plain.then(|| format!("{scheme}://{host}"))
}

/// A JSON object body (prediction requests): its content type, size limit and shape checked.
pub(crate) async fn read_json_object(s: &Shared, req: Request) -> Result<serde_json::Map<String, Value>, ApiError> {
    let content_type =
        req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if !content_type.starts_with("application/json") {
        return Err(ApiError {
            code: Some("unsupported_media_type"),
            ..ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send the request as application/json")
        });
    }
    let bytes = read_body(req.into_body(), s.limits.max_json_bytes).await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            None,
            "the body must be a JSON object, as {\"input\": {\"prompt\": \"a corgi\"}}",
        )),
        Err(e) => Err(ApiError::bad_request(None, format!("the body is not valid JSON: {e}"))),
    }
}

/// `GET /v1/loras`: the LoRAs a request may pick by name (`lora`), from `--lora-dir`.
async fn list_loras(State(s): AppState) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": s.loras.keys().map(|name| json!({"id": name, "object": "lora"})).collect::<Vec<_>>(),
    }))
}

/// An input record standing for the one an upload gets (for the cost check before reading it).
fn placeholder_input() -> t2v_settings::InputSettings {
    t2v_settings::InputSettings {
        path: Default::default(),
        sha256: String::new(),
        strength: 1.0,
        start_frame: 0,
        every: 1,
        fit: String::new(),
    }
}

/// 429 with `Retry-After` when the queue holds its most jobs.
pub(crate) async fn queue_room(s: &Shared) -> Result<(), ApiError> {
    let queued = s.store.counts().await?.queued;
    if queued >= s.limits.max_queued {
        return Err(ApiError {
            code: Some("queue_full"),
            retry_after: Some(poll_after_ms(s).div_ceil(1000).clamp(1, 60) * 5),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue holds {queued} jobs, the most this server takes (--max-queued {}): try again later",
                    s.limits.max_queued
                ),
            )
        });
    }
    Ok(())
}

/// Reads a JSON body of at most `limit` bytes. A larger one is read on (up to [`DRAIN_BYTES`]
/// more) and dropped before the 413: a client still sending then reads the answer instead of a
/// reset connection.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let (mut kept, mut total) = (Vec::new(), 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(None, format!("reading the request body: {e}")))?;
        total += chunk.len();
        if total <= limit {
            kept.extend_from_slice(&chunk);
        } else if total > limit + DRAIN_BYTES {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(kept.into())
}

/// `body` cut at `limit` bytes: past it, up to [`DRAIN_BYTES`] more are read and dropped (so
/// that the client reads the 413), `over` is set, and the stream ends in an error.
fn limited(body: Body, limit: usize, over: Arc<AtomicBool>) -> Body {
    let stream = async_stream::stream! {
        let mut data = body.into_data_stream();
        let mut total = 0usize;
        while let Some(chunk) = data.next().await {
            match chunk {
                Err(e) => { yield Err(e); return; }
                Ok(chunk) => {
                    total += chunk.len();
                    if total > limit {
                        over.store(true, Ordering::SeqCst);
                        while total <= limit + DRAIN_BYTES {
                            match data.next().await {
                                Some(Ok(c)) => total += c.len(),
                                _ => break,
                            }
                        }
                        yield Err(axum::Error::new(std::io::Error::other("the body is over its limit")));
                        return;
                    }
                    yield Ok(chunk);
                }
            }
        }
    };
    Body::from_stream(stream)
}

const DRAIN_BYTES: usize = 64 << 20;

/// An uploaded input video, as received: streamed to a hidden file of the data folder, never
/// held whole in memory.
struct Upload {
    /// The name the client gave the file (only its extension is used, when the content does not
    /// tell the format).
    file_name: String,
    /// The file it was written to; removed when the upload is dropped unused.
    partial: PartialFile,
    /// Its first bytes (for its format).
    head: Vec<u8>,
    len: u64,
}

/// A file removed when dropped, unless kept.
struct PartialFile(Option<std::path::PathBuf>);

impl PartialFile {
    fn path(&self) -> &std::path::Path {
        self.0.as_deref().expect("not yet kept")
    }

    /// Moves the file to `to`; it is then no longer removed.
    fn keep_as(mut self, to: &std::path::Path) -> std::io::Result<()> {
        let from = self.0.take().expect("not yet kept");
        std::fs::rename(&from, to).inspect_err(|_| {
            let _ = std::fs::remove_file(&from);
        })
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The format of an uploaded video, by its content (MP4/MOV's `ftyp` box, GIF's and NumPy's
/// signatures), else by the extension of its name; as one of [`crate::storage::INPUT_EXTENSIONS`].
fn upload_format(upload: &Upload) -> Option<&'static str> {
    let b = &upload.head[..];
    if b.len() >= 8 && &b[4..8] == b"ftyp" {
        return Some("mp4");
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        return Some("gif");
    }
    if b.starts_with(b"\x93NUMPY") {
        return Some("npy");
    }
    let ext = std::path::Path::new(&upload.file_name).extension()?.to_string_lossy().to_ascii_lowercase();
    match ext.as_str() {
        "mp4" | "m4v" | "mov" => Some("mp4"),
        "gif" => Some("gif"),
        "npy" => Some("npy"),
        _ => None,
    }
}

/// Stores the input video of job `id` in `dir` and reads it as the worker will (so that a bad
/// file fails now, with a 400), within the upload budget of `limits`: returns `settings` with
/// the input recorded and the frame count read. Nothing stays behind when it fails.
fn store_input(
    dir: &std::path::Path,
    id: &str,
    upload: Upload,
    video: request::VideoRequest,
    mut settings: t2v_settings::RunSettings,
    limits: &request::Limits,
) -> Result<t2v_settings::RunSettings, ApiError> {
    let bad = |m: String| ApiError::bad("input_reference", m);
    if upload.len == 0 {
        return Err(bad("`input_reference` is empty: attach the video file".into()));
    }
    let ext = upload_format(&upload).ok_or_else(|| {
        bad("`input_reference` is not a video this server reads: give an MP4 (H.264), a GIF or a .npy array \
             (frames, height, width, 3)"
            .into())
    })?;
    let path = input_path(dir, id, ext);
    upload.partial.keep_as(&path).map_err(|e| ApiError::internal(format!("storing the input video: {e}")))?;
    let checked = (|| {
        let read = request::budgeted(&video.read, limits);
        let clip = read_video(&path, &read).map_err(|e| match e {
            // The reason alone: the path is the server's.
            t2v::Error::VideoInput { reason, .. } => bad(format!("`input_reference` cannot be read: {reason}")),
            other => bad(format!("`input_reference` cannot be read: {other}")),
        })?;
        if clip.frames > limits.max_frames {
            return Err(ApiError::bad(
                "num_frames",
                format!(
                    "the input video gives {} frames, more than the {} a job may have: ask for fewer with \
                     `num_frames`, or choose frames with `video_start` and `video_every`",
                    clip.frames, limits.max_frames
                ),
            ));
        }
        let absolute = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        settings.num_frames = clip.frames;
        settings.input = Some(t2v_settings::InputSettings {
            sha256: t2v_settings::input_sha256(&path).map_err(ApiError::internal)?,
            path: absolute,
            strength: video.strength,
            start_frame: video.read.start_frame,
            every: video.read.every,
            fit: video.read.fit.name().to_string(),
        });
        request::check_cost(&settings, Some(video.strength), limits)?;
        Ok(settings)
    })();
    if checked.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    checked
}

async fn read_multipart(
    req: Request,
    dir: &std::path::Path,
    id: &str,
) -> Result<(BTreeMap<String, Value>, Option<Upload>), ApiError> {
    let mut multipart =
        Multipart::from_request(req, &()).await.map_err(|e| ApiError::bad_request(None, e.body_text()))?;
    let mut map = BTreeMap::new();
    let mut upload = None;
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(ApiError::bad_request(None, e.body_text())),
        };
        let name = field.name().unwrap_or_default().to_string();
        let value = if name == "input_reference" {
            if upload.is_some() {
                return Err(ApiError::bad(&name, format!("`{name}` is given twice")));
            }
            // The file itself goes to disk as it arrives; the field records that there is one.
            let file_name = field.file_name().unwrap_or("upload").to_string();
            let path = dir.join(format!(".upload.{id}.partial"));
            let partial = PartialFile(Some(path));
            // Plain writes: a chunk goes to the page cache in microseconds, and the runtime has
            // no file-system feature.
            let mut file = std::fs::File::create(partial.path())
                .map_err(|e| ApiError::internal(format!("storing the upload: {e}")))?;
            let (mut head, mut len) = (Vec::new(), 0u64);
            loop {
                let chunk = match field.chunk().await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => return Err(ApiError::bad("input_reference", e.body_text())),
                };
                if head.len() < 16 {
                    head.extend_from_slice(&chunk[..chunk.len().min(16 - head.len())]);
                }
                len += chunk.len() as u64;
                std::io::Write::write_all(&mut file, &chunk)
                    .map_err(|e| ApiError::internal(format!("storing the upload: {e}")))?;
            }
            drop(file);
            upload = Some(Upload { file_name: file_name.clone(), partial, head, len });
            Value::String(file_name)
        } else {
            // Fields other than the file are short: bounded as a JSON body's.
            let text = field.text().await.map_err(|e| ApiError::bad(&name, e.body_text()))?;
            Value::String(text)
        };
        if map.insert(name.clone(), value).is_some() {
            return Err(ApiError::bad(&name, format!("`{name}` is given twice")));
        }
    }
    Ok((map, upload))
}

async fn list_videos(State(s): AppState, Query(q): Query<HashMap<String, String>>) -> Result<Json<Value>, ApiError> {
    for key in q.keys() {
        if !["limit", "after", "order"].contains(&key.as_str()) {
            return Err(ApiError::bad(key, format!("unknown parameter `{key}`: use limit, after and order")));
        }
    }
    let limit = match q.get("limit") {
        None => 20,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::bad("limit", format!("`limit` must be from 1 to 100, got `{v}`")))?,
    };
    let order = match q.get("order").map(String::as_str) {
        None | Some("desc") => Order::Desc,
        Some("asc") => Order::Asc,
        Some(other) => return Err(ApiError::bad("order", format!("`order` must be `asc` or `desc`, got `{other}`"))),
    };
    let after = q.get("after").map(String::as_str);
    if let Some(a) = after {
        if !is_job_id(a) || s.store.get(a).await?.is_none() {
            return Err(ApiError::bad("after", format!("`after` must be the id of a video, got `{a}`")));
        }
    }
    let (jobs, has_more) = s.store.list(limit, after, order).await?;
    Ok(Json(json!({
        "object": "list",
        "data": jobs.iter().map(|j| video_object(j, &s.model)).collect::<Vec<_>>(),
        "first_id": jobs.first().map(|j| &j.id),
        "last_id": jobs.last().map(|j| &j.id),
        "has_more": has_more,
    })))
}

async fn get_video(State(s): AppState, Path(id): Path<String>) -> Result<Response, ApiError> {
    let job = find(&s, &id).await?;
    Ok(video_response(&s, &job))
}

async fn delete_video(State(s): AppState, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let job = find(&s, &id).await?;
    if job.status == JobStatus::InProgress {
        s.cancels.lock().expect("cancels lock").insert(id.clone());
    }
    s.store.delete(&id).await?;
    remove_files(&s.videos_dir, &id);
    s.publish(JobEvent::new(&id, "deleted", json!({"id": id}))).await;
    Ok(Json(json!({"id": id, "object": "video.deleted", "deleted": true})))
}

async fn cancel_video(State(s): AppState, Path(id): Path<String>) -> Result<Response, ApiError> {
    let before = find(&s, &id).await?;
    let job = s.store.request_cancel(&id).await?.ok_or_else(|| ApiError::not_found(&id))?;
    match (before.status, job.status) {
        // The worker stops at the end of the step it is in.
        (_, JobStatus::InProgress) => {
            s.cancels.lock().expect("cancels lock").insert(id.clone());
        }
        (JobStatus::Queued, JobStatus::Failed) => {
            s.publish(JobEvent::new(&id, "failed", video_object(&job, &s.model))).await
        }
        _ => {}
    }
    Ok(video_response(&s, &job))
}

async fn video_content(
    State(s): AppState,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Result<Response, ApiError> {
    let job = find(&s, &id).await?;
    let variant = q.get("variant").map(String::as_str).unwrap_or("video");
    let (path, ext) = match variant {
        "video" => (video_path(&s.videos_dir, &id), "mp4"),
        "thumbnail" => (thumbnail_path(&s.videos_dir, &id), "png"),
        other => {
            return Err(ApiError::bad("variant", format!("`variant` must be `video` or `thumbnail`, got `{other}`")))
        }
    };
    if job.status != JobStatus::Completed || !path.is_file() {
        return Err(ApiError {
            code: Some("not_ready"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!("video `{id}` has no content: it is {}", job.status.as_str()),
            )
        });
    }
    // ServeFile answers Range requests, which browsers' <video> sends.
    let mut response = ServeFile::new(path).oneshot(req).await.map_err(ApiError::internal)?.map(Body::new);
    let disposition = format!("inline; filename=\"{id}.{ext}\"");
    response
        .headers_mut()
        .insert(header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).map_err(ApiError::internal)?);
    Ok(response)
}

/// `queued` (with the position, again whenever it moves), `progress`, `preview`, then `completed`
/// or `failed` and the end of the stream.
async fn video_events(State(s): AppState, Path(id): Path<String>) -> Result<Response, ApiError> {
    // Subscribe before reading the state: nothing between the two is missed.
    let mut rx = s.hub.subscribe();
    let job = find(&s, &id).await?;
    let mut stop = s.shutdown.subscribe();
    let stream = async_stream::stream! {
        // The stamp of the newest event replayed: what the subscription delivered up to it is
        // already told (the replay is the state after it).
        let mut replayed = 0;
        match job.status {
            JobStatus::Completed => { yield Ok(Event::default().event("completed").data(video_object(&job, &s.model).to_string())); return; }
            JobStatus::Failed => { yield Ok(Event::default().event("failed").data(video_object(&job, &s.model).to_string())); return; }
            JobStatus::Queued => yield Ok(queued_event(&job, &s.model)),
            JobStatus::InProgress => for e in s.hub.live(Some(&id)) {
                replayed = replayed.max(e.seq);
                yield Ok(e.event.to_sse())
            },
        }
        let mut position = job.queue_position;
        loop {
            if *stop.borrow() { break; }
            let received = tokio::select! {
                _ = stop.changed() => break,
                r = rx.recv() => r,
            };
            match received {
                Ok(Stamped { seq, event: e }) if e.id == id => {
                    if seq <= replayed {
                        continue;
                    }
                    yield Ok(e.to_sse());
                    if e.is_last() { break; }
                }
                Ok(Stamped { event: e, .. }) => {
                    if position.is_some_and(|p| p > 0) && e.moves_queue() {
                        if let Ok(Some(now)) = s.store.get(&id).await {
                            if now.status == JobStatus::Queued && now.queue_position != position {
                                position = now.queue_position;
                                yield Ok(queued_event(&now, &s.model));
                            }
                        }
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    // Too slow a reader: catch up from the store.
                    match s.store.get(&id).await {
                        Ok(Some(now)) if now.status.is_terminal() => {
                            let name = if now.status == JobStatus::Completed { "completed" } else { "failed" };
                            yield Ok(Event::default().event(name).data(video_object(&now, &s.model).to_string()));
                            break;
                        }
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
                Err(RecvError::Closed) => break,
            }
        }
    };
    Ok(sse(stream))
}

fn queued_event(job: &Job, model: &ModelInfo) -> Event {
    Event::default()
        .event("queued")
        .data(json!({"id": job.id, "position": job.queue_position, "video": video_object(job, model)}).to_string())
}

/// Every job's events, for the page: the running job's latest progress and preview first.
async fn all_events(State(s): AppState) -> Response {
    let mut rx = s.hub.subscribe();
    let mut stop = s.shutdown.subscribe();
    let stream = async_stream::stream! {
        // Events the subscription delivered from before the replayed state are not sent again.
        let mut replayed: HashMap<String, u64> = HashMap::new();
        for e in s.hub.live(None) {
            let newest = replayed.entry(e.event.id.clone()).or_default();
            *newest = (*newest).max(e.seq);
            yield Ok(e.event.to_sse())
        }
        loop {
            if *stop.borrow() { break; }
            let received = tokio::select! {
                _ = stop.changed() => break,
                r = rx.recv() => r,
            };
            match received {
                Ok(e) if replayed.get(&e.event.id).is_some_and(|&newest| e.seq <= newest) => {}
                Ok(e) => yield Ok(e.event.to_sse()),
                // The page reloads its list when told it missed events.
                Err(RecvError::Lagged(n)) => yield Ok(Event::default().event("lagged").data(json!({"missed": n}).to_string())),
                Err(RecvError::Closed) => break,
            }
        }
    };
    sse(stream)
}

fn sse(stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_cannot_name_paths() {
        assert!(is_job_id(&new_job_id()));
        for bad in [
            "video_../../etc/passwd",
            "video_",
            "../video_0123456789abcdef0123456789abcdef",
            "video_0123456789ABCDEF0123456789ABCDEF",
            "video_0123456789abcdef0123456789abcde/",
            "video_0123456789abcdef0123456789abcdef0",
        ] {
            assert!(!is_job_id(bad), "{bad}");
        }
    }

    #[test]
    fn keys_compare_whole() {
        assert!(keys_match("secret", "secret"));
        assert!(!keys_match("secreT", "secret"));
        assert!(!keys_match("secret2", "secret"));
        assert!(!keys_match("", "secret"));
        for header in ["Bearer k", "bearer k", "BEARER k", "BeArEr   k "] {
            assert_eq!(bearer_token(header), Some("k"), "{header}");
        }
        for header in ["Basic k", "Bearerk", "k"] {
            assert_eq!(bearer_token(header), None, "{header}");
        }
    }
}
