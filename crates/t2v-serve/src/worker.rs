//! The workers: the checkpoint loaded once, then one thread per worker taking jobs from the queue
//! under a lease renewed by a heartbeat, reporting progress and previews after each step (to this
//! process's event streams, and through the store to the API processes), and writing the MP4 and
//! its thumbnail, published only while the lease is still held. A job with an input video
//! (video-to-video) reads it from the data folder, where it stays until the job is deleted.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use t2v::pipeline::upscale::{self, UpscaleParams};
use t2v::pipeline::{Control, LoadOptions, StepProgress, TextToVideo};
use t2v::schedulers::strength_begin_index;
use t2v::video::input::{read_video, Fit, ReadOptions};
use t2v::video::{self, EncodeOptions, Frames, Quality, VideoFormat};
use t2v_settings::input_sha256;
use tokio::runtime::Handle;

use crate::events::JobEvent;
use crate::preview::Previewer;
use crate::storage::{find_input, remove_files, remove_outputs, StagedResult};
use crate::store::{Job, JobError, Lease, Outcome, Renewal};
use crate::views::video_object;
use crate::Shared;

/// A preview may cost at most this share of the denoising time.
const PREVIEW_BUDGET: f64 = 0.02;

/// Progress goes to other processes (through the store) at most this often.
const RELAY_EVERY: Duration = Duration::from_millis(250);

/// Loads the model, reports the outcome through `loaded`, then runs one worker a name in `names`
/// (threads sharing the loaded model) until the process stops.
pub fn run(
    shared: Arc<Shared>,
    handle: Handle,
    folder: PathBuf,
    options: LoadOptions,
    loaded: tokio::sync::oneshot::Sender<Result<()>>,
    names: Vec<String>,
) {
    let started = Instant::now();
    let pipe = match TextToVideo::load(&folder, &options)
        .with_context(|| format!("loading the model {}", shared.model.spec))
    {
        Ok(pipe) => pipe,
        Err(e) => {
            let _ = loaded.send(Err(e));
            return;
        }
    };
    let config_path = pipe.folder().component_dir("scheduler").join("scheduler_config.json");
    let previewer = match Previewer::new(pipe.scheduler_config(), &config_path) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("t2v: no live previews for this model: {e:#}");
            None
        }
    };
    shared.ready.store(true, Ordering::SeqCst);
    eprintln!("t2v: loaded {} in {:.1}s", shared.model.spec, started.elapsed().as_secs_f64());
    let _ = loaded.send(Ok(()));

    std::thread::scope(|scope| {
        for name in &names {
            let (shared, handle, pipe, previewer, options) = (&shared, &handle, &pipe, previewer.as_ref(), &options);
            std::thread::Builder::new()
                .name(format!("t2v-{name}"))
                .spawn_scoped(scope, move || work(shared, handle, pipe, previewer, options, name))
                .expect("starting a worker thread");
        }
    });
}

/// One worker: claims the oldest runnable job, runs it under its lease, and again.
fn work(
    shared: &Arc<Shared>,
    handle: &Handle,
    pipe: &TextToVideo,
    previewer: Option<&Previewer>,
    options: &LoadOptions,
    name: &str,
) {
    eprintln!("t2v: worker {name} waiting for jobs");
    while !shared.stopping.load(Ordering::SeqCst) {
        // Jobs whose worker died on their last attempt: failed, and said so.
        match handle.block_on(shared.store.reap(shared.policy.max_attempts)) {
            Ok(failed) => {
                for job in failed {
                    eprintln!("t2v: {} failed: {}", job.id, job.error.as_ref().map_or("", |e| e.message.as_str()));
                    handle.block_on(shared.publish(JobEvent::new(
                        &job.id,
                        "failed",
                        video_object(&job, &shared.model),
                    )));
                }
            }
            Err(e) => eprintln!("t2v: reading the queue: {e:#}"),
        }
        match handle.block_on(shared.store.claim_next(name, shared.policy)) {
            Ok(Some(job)) => run_job(shared, handle, pipe, previewer, options, job),
            Ok(None) => {
                handle.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_millis(500), shared.wake.notified()).await;
                });
            }
            Err(e) => {
                eprintln!("t2v: reading the queue: {e:#}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// What the heartbeat learned about a running job's lease.
#[derive(Default)]
struct LeaseWatch {
    cancel: AtomicBool,
    /// Lost, or not renewed for a whole lease period (another worker may have it by now).
    lost: AtomicBool,
}

/// Renews `lease` every heartbeat until `done`; records cancels and a lost lease in `watch`.
async fn heartbeat(
    shared: Arc<Shared>,
    lease: Lease,
    watch: Arc<LeaseWatch>,
    mut done: tokio::sync::oneshot::Receiver<()>,
) {
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = &mut done => return,
            _ = tokio::time::sleep(shared.policy.heartbeat()) => {}
        }
        match shared.store.renew(&lease, shared.policy.lease).await {
            Ok(Renewal::Held { cancel_requested }) => {
                renewed = Instant::now();
                if cancel_requested {
                    watch.cancel.store(true, Ordering::SeqCst);
                }
            }
            Ok(Renewal::Lost) => {
                watch.lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                eprintln!("t2v: renewing the lease of {}: {e:#}", lease.id);
                if renewed.elapsed() >= shared.policy.lease {
                    watch.lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

/// Retries a store operation for up to a lease period: a database restarting is back by then.
fn retry<T>(handle: &Handle, shared: &Shared, what: &str, mut op: impl FnMut() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < shared.policy.lease.max(Duration::from_secs(10)) => {
                eprintln!("t2v: {what}: {e:#}; trying again");
                handle.block_on(async { tokio::time::sleep(Duration::from_millis(500)).await });
            }
            Err(e) => return Err(e),
        }
    }
}

fn run_job(
    shared: &Arc<Shared>,
    handle: &Handle,
    pipe: &TextToVideo,
    previewer: Option<&Previewer>,
    options: &LoadOptions,
    job: Job,
) {
    let id = job.id.clone();
    let lease = match Lease::of(&job) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("t2v: {e:#}");
            return;
        }
    };
    if job.cancel_requested {
        shared.cancels.lock().expect("cancels lock").insert(id.clone());
    }
    shared.webhooks.remember(&job);
    let watch = Arc::new(LeaseWatch::default());
    let (done, done_rx) = tokio::sync::oneshot::channel();
    let beat = handle.spawn(heartbeat(shared.clone(), lease.clone(), watch.clone(), done_rx));
    // Video-to-video runs the last int(steps × strength) steps.
    let total_steps = match &job.settings.input {
        Some(input) => strength_begin_index(job.settings.steps, input.strength)
            .map_or(job.settings.steps, |begin| job.settings.steps - begin),
        None => job.settings.steps,
    };
    handle.block_on(shared.publish(JobEvent::new(
        &id,
        "progress",
        json!({"id": id, "step": 0, "total_steps": total_steps, "progress": 0, "elapsed_s": 0.0, "eta_s": null,
               "worker": lease.worker, "attempt": lease.attempt}),
    )));
    eprintln!("t2v: {id} started by {} (attempt {})", lease.worker, lease.attempt);
    let started = Instant::now();

    let cancelled = || {
        shared.cancels.lock().expect("cancels lock").contains(&id)
            || watch.cancel.load(Ordering::SeqCst)
            || watch.lost.load(Ordering::SeqCst)
    };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        generate(shared, handle, pipe, previewer, options, &job, &lease, &cancelled)
    }));
    let lost = || watch.lost.load(Ordering::SeqCst);
    let outcome = match result {
        Ok(Ok(staged)) => {
            // Published only while the lease is held: a worker given up on never overwrites the
            // result of the one that took its job over.
            match retry(handle, shared, &format!("confirming the lease of {id}"), || {
                handle.block_on(shared.store.renew(&lease, shared.policy.lease))
            }) {
                Ok(Renewal::Held { .. }) => match shared.results.publish(staged, &id) {
                    Ok(()) => Some(Outcome::Completed),
                    Err(e) => Some(Outcome::Failed(JobError {
                        code: "generation_failed".into(),
                        message: format!("writing the video: {e:#}"),
                    })),
                },
                Ok(Renewal::Lost) | Err(_) => None,
            }
        }
        Ok(Err(_)) if lost() => None,
        Ok(Err(e)) if matches!(e.downcast_ref::<t2v::Error>(), Some(t2v::Error::Cancelled)) => {
            if cancelled() {
                Some(Outcome::Failed(JobError { code: "cancelled".into(), message: "cancelled while it ran".into() }))
            } else {
                // The process is stopping: the job waits for the next worker.
                Some(Outcome::Released)
            }
        }
        // The reason without the server's paths: it is shown to clients.
        Ok(Err(e)) => Some(Outcome::Failed(JobError {
            code: "generation_failed".into(),
            message: shared.redact(&format!("{e:#}")),
        })),
        Err(panic) => {
            let what =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Some(Outcome::Failed(JobError {
                code: "internal_error".into(),
                message: format!("t2v failed: {}", what.unwrap_or_default()),
            }))
        }
    };
    let _ = done.send(());
    let _ = handle.block_on(beat);
    shared.cancels.lock().expect("cancels lock").remove(&id);
    shared.stats.lock().expect("stats lock").jobs_run += 1;
    let Some(outcome) = outcome else {
        eprintln!(
            "t2v: {id} lost its lease after {:.1}s: another worker takes it over; nothing of this attempt is kept",
            started.elapsed().as_secs_f64()
        );
        return;
    };
    let completed = matches!(outcome, Outcome::Completed);
    let label = match &outcome {
        Outcome::Completed => "completed".to_string(),
        Outcome::Failed(e) => format!("failed: {}", e.message),
        Outcome::Released => "returned to the queue".to_string(),
    };
    let released = matches!(outcome, Outcome::Released);
    match retry(handle, shared, &format!("recording the end of {id}"), || {
        handle.block_on(shared.store.finish(&lease, outcome.clone()))
    }) {
        Ok(true) => {
            if !completed && !released {
                remove_outputs(&shared.videos_dir, &id);
            }
        }
        // Deleted while it ran: nothing of it stays. (Taken over: the files are the other worker's.)
        Ok(false) => {
            if handle.block_on(shared.store.get(&id)).is_ok_and(|j| j.is_none()) {
                remove_files(&shared.videos_dir, &id);
            }
        }
        Err(e) => eprintln!("t2v: recording the end of {id}: {e:#}"),
    }
    eprintln!("t2v: {id} {label} in {:.1}s by {}", started.elapsed().as_secs_f64(), lease.worker);
    if !released {
        if let Ok(Some(job)) = handle.block_on(shared.store.get(&id)) {
            if job.status.is_terminal() {
                let name = if job.status == crate::store::JobStatus::Completed { "completed" } else { "failed" };
                handle.block_on(shared.publish(JobEvent::new(&id, name, video_object(&job, &shared.model))));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn generate(
    shared: &Shared,
    handle: &Handle,
    pipe: &TextToVideo,
    previewer: Option<&Previewer>,
    options: &LoadOptions,
    job: &Job,
    lease: &Lease,
    cancelled: &dyn Fn() -> bool,
) -> Result<StagedResult> {
    let id = &job.id;
    let settings = &job.settings;
    // A job with LoRAs (picked from --lora-dir) runs on the model with them merged, loaded for it
    // (LoRAs change the weights at load; the shared model stays as it is). Each file is checked
    // against the SHA-256 recorded when the job was queued.
    let with_loras;
    let pipe = if settings.loras.is_empty() {
        pipe
    } else {
        let loras = settings.loras.iter().map(|l| l.check()).collect::<Result<Vec<_>>>()?;
        let options = LoadOptions { loras, ..options.clone() };
        with_loras =
            TextToVideo::load(pipe.folder().root(), &options).context("loading the model with the job's LoRAs")?;
        &with_loras
    };
    let mut params = t2v::pipeline::GenerationParams::new(String::new(), 0);
    settings.apply_to(&mut params)?;
    // With a second pass (zeroscope's upscale) the bar is shared: the first pass's steps fill its
    // first half, the second's the rest.
    let passes = if settings.upscale.is_some() { 2 } else { 1 };
    let pass = std::cell::Cell::new(0usize);
    let mut last_saved = (0u8, Instant::now());
    let mut last_preview_step = 0usize;
    let mut preview_cost = Duration::ZERO;
    let mut previous = Duration::ZERO;
    // Other processes see progress through the store: every step on a GPU would be many writes.
    let mut last_relayed: Option<Instant> = None;
    let mut on_step = |p: &StepProgress| -> Control {
        let per_step = p.elapsed.as_secs_f64() / p.step as f64;
        // Denoising is 95% of the bar; decoding and writing the rest.
        let progress = ((pass.get() * p.total_steps + p.step) * 95 / (passes * p.total_steps)) as u8;
        let eta = per_step * (p.total_steps - p.step) as f64;
        let event = JobEvent::new(
            id,
            "progress",
            json!({"id": id, "step": p.step, "total_steps": p.total_steps, "progress": progress,
                   "elapsed_s": p.elapsed.as_secs_f64(), "step_s": per_step, "eta_s": eta}),
        );
        if last_relayed.is_none_or(|t| t.elapsed() >= RELAY_EVERY) || p.step == p.total_steps {
            last_relayed = Some(Instant::now());
            handle.block_on(shared.publish(event));
        } else {
            shared.hub.send(event);
        }
        shared
            .stats
            .lock()
            .expect("stats lock")
            .record_step(p.elapsed.checked_sub(previous).unwrap_or(p.elapsed).as_secs_f64());
        previous = p.elapsed;
        // Previews show the first pass (the second's latents are of another model and size).
        if let Some(previewer) = previewer.filter(|_| pass.get() == 0) {
            // Every `preview_every` steps at least, and never more often than the budget allows.
            let budget_steps = (preview_cost.as_secs_f64() / (PREVIEW_BUDGET * per_step.max(1e-9))).ceil() as usize;
            let every = shared.preview_every.max(budget_steps);
            if shared.preview_every > 0 && (p.step - last_preview_step >= every || p.step == p.total_steps) {
                last_preview_step = p.step;
                match previewer.render(p) {
                    Ok(preview) => {
                        preview_cost = preview.cost;
                        shared.stats.lock().expect("stats lock").record_preview(preview.cost.as_secs_f64());
                        handle.block_on(shared.publish(JobEvent::new(
                            id,
                            "preview",
                            json!({"id": id, "step": p.step, "image": preview.data_url, "width": preview.width,
                                   "height": preview.height, "cost_ms": preview.cost.as_secs_f64() * 1e3}),
                        )));
                    }
                    Err(e) => eprintln!("t2v serve: preview of {id}: {e:#}"),
                }
            }
        }
        // The stored progress is for readers that poll: once a second is enough.
        if progress != last_saved.0 && (last_saved.1.elapsed() >= Duration::from_secs(1) || p.step == p.total_steps) {
            last_saved = (progress, Instant::now());
            if let Err(e) = handle.block_on(shared.store.set_progress(lease, progress)) {
                eprintln!("t2v serve: saving the progress of {id}: {e:#}");
            }
        }
        if cancelled() || shared.stopping.load(Ordering::SeqCst) {
            Control::Cancel
        } else {
            Control::Continue
        }
    };
    let (latents, _timings) = match &settings.input {
        None => pipe.denoise(&params, &mut on_step)?,
        Some(input) => {
            let path = find_input(&shared.videos_dir, id)
                .with_context(|| format!("the input video of {id} is missing from {}", shared.videos_dir.display()))?;
            if input_sha256(&path)? != input.sha256 {
                anyhow::bail!("the input video of {id} has changed since it was uploaded");
            }
            let read = ReadOptions {
                size: Some((settings.width, settings.height)),
                fit: Fit::parse(&input.fit)?,
                start_frame: input.start_frame,
                every: input.every,
                num_frames: Some(settings.num_frames),
                ..ReadOptions::default()
            };
            let clip = read_video(&path, &crate::request::budgeted(&read, &shared.limits))?;
            let video = clip.to_model_input(&candle_core::Device::Cpu, candle_core::DType::F32)?;
            pipe.denoise_video(&params, &video, input.strength, &mut on_step)?
        }
    };
    let mut frames = pipe.decode_latents(&latents)?;
    let (mut height, mut width) = (settings.height, settings.width);
    if let Some(up) = &settings.upscale {
        // zeroscope's second pass, as the library runs it: the frames handed on 8-bit and resized,
        // then video-to-video with the upscale model (loaded for the job) at its size.
        let (folder, _) =
            shared.upscale.as_ref().context("the job asks for an upscale but this worker has no --upscale-model")?;
        let second =
            UpscaleParams { height: up.height, width: up.width, strength: up.strength, num_inference_steps: up.steps };
        let second_params = second.second_pass(&params);
        let config = upscale::scheduler_config_for(folder, &second_params, &[])?;
        let input = upscale::first_pass_frames(&frames, up.height, up.width)?
            .to_model_input(&candle_core::Device::Cpu, candle_core::DType::F32)?;
        let up_pipe = TextToVideo::load(folder, options).context("loading the upscale model")?;
        pass.set(1);
        let video =
            up_pipe.video_to_video_with_scheduler(&second_params, &config, &input, up.strength, &mut on_step)?;
        frames = video.frames;
        (height, width) = (up.height, up.width);
    }
    let data = frames.flatten_all()?.to_vec1::<f32>()?;
    let clip = Frames::new(&data, settings.num_frames, height, width)?;
    // The settings as the API shows them: the file is served to clients.
    let public = crate::views::public_settings(settings, &shared.model);
    let encode = EncodeOptions { fps: settings.fps, quality: Quality::default(), metadata: Some(public.to_json()) };
    // Staged beside the results under names of this attempt; published once the lease is confirmed.
    let staged = StagedResult::new(&shared.videos_dir, lease);
    video::write_video(&clip, VideoFormat::Mp4, &staged.video, &encode)?;
    let thumbnail = crate::preview::encode_png(&clip.frame_rgb8(clip.frames / 2), clip.width, clip.height)?;
    std::fs::write(&staged.thumbnail, thumbnail).context("writing the thumbnail")?;
    Ok(staged)
}
