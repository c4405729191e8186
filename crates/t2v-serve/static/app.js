// The t2v page: a form that queues jobs, the queue with live progress, previews and ETAs, and the
// gallery, read a page at a time. Plain JavaScript, no build step; talks only to this server's API.
// One file: the page has no build step, and one script keeps it one request.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const form = $("#form");
const jobs = new Map(); // id → video object
const queueItems = new Map(); // id → <li>
const galleryItems = new Map(); // id → <article>
const live = new Map(); // id → {progress event, preview event, at: when the progress came}
let info = null;

// ---------- API ----------
function apiKey() { return localStorage.getItem("t2v.apiKey") || ""; }
function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const err = new Error(body?.error?.message || `${response.status} ${response.statusText}`);
    err.status = response.status;
    err.param = body?.error?.param;
    throw err;
  }
  return body;
}
function contentUrl(id, variant = "video") { return `/v1/videos/${id}/content?variant=${variant}`; }

// With an API key, <video src> and <img src> cannot send it: the file is fetched and given as a
// blob URL.
async function mediaUrl(id, variant = "video") {
  if (!apiKey()) return contentUrl(id, variant);
  const response = await fetch(contentUrl(id, variant), { headers: headers() });
  if (!response.ok) throw new Error(`${response.status}`);
  return URL.createObjectURL(await response.blob());
}

function setStatus(text, kind) {
  const el = $("#server-status");
  el.textContent = text;
  el.className = `pill ${kind || ""}`;
}

const isWaiting = (v) => v.status === "queued" || v.status === "in_progress";

// ---------- form ----------
const FIELDS = [
  "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "num_frames", "fps", "scheduler", "eta",
  "width", "height", "context_length", "context_stride", "context_weighting",
];
// Sent with an input video only (multipart, with the file).
const V2V_FIELDS = ["strength", "video_fit", "video_start", "video_every"];

function snap(v) {
  const s = info?.model?.vae_scale || 8;
  return Math.max(s, Math.round(v / s) * s);
}

function fillSizePresets() {
  const n = info.model.native_width;
  const m = info.model.native_height;
  const presets = [
    [n, m, "native"],
    [snap(n * 4 / 3), snap(m * 3 / 4), "landscape"],
    [snap(n * 3 / 4), snap(m * 4 / 3), "portrait"],
    [snap(n * 16 / 12), snap(m * 9 / 12), "16:9"],
    [snap(n / 2), snap(m / 2), "small"],
    [snap(n * 1.5), snap(m * 1.5), "large"],
  ];
  const select = $("#size-preset");
  select.replaceChildren();
  const seen = new Set();
  for (const [w, h, label] of presets) {
    if (seen.has(`${w}x${h}`)) continue;
    seen.add(`${w}x${h}`);
    // Short: the numbers say the shape, and a phone's half-width cell shows them whole.
    const option = new Option(label === "native" ? `${w}×${h} native` : `${w}×${h}`, `${w}x${h}`);
    option.title = label;
    select.append(option);
  }
  select.append(new Option("custom", "custom"));
}

function syncPresetFromSize() {
  const value = `${form.width.value}x${form.height.value}`;
  const select = $("#size-preset");
  select.value = [...select.options].some((o) => o.value === value) ? value : "custom";
}

function applyDefaults() {
  const d = info.defaults;
  form.num_inference_steps.value = d.num_inference_steps;
  form.guidance_scale.value = d.guidance_scale;
  form.num_frames.value = d.num_frames;
  form.fps.value = d.fps;
  // The samplers this server runs (an older server lists fewer).
  if (Array.isArray(info.schedulers)) {
    for (const option of [...form.scheduler.options]) if (!info.schedulers.includes(option.value)) option.remove();
  }
  form.scheduler.value = d.scheduler;
  // The LoRAs the operator put in --lora-dir, chosen by name (the server never takes a path).
  const loras = Array.isArray(info.loras) ? info.loras : [];
  for (const name of loras) {
    if (![...form.lora.options].some((o) => o.value === name)) form.lora.add(new Option(name, name));
  }
  $("#lora-field").hidden = $("#lora-scale-field").hidden = loras.length === 0;
  form.eta.value = d.eta;
  if (form.strength && d.strength !== undefined) {
    form.strength.value = d.strength;
    $("#strength-value").value = form.strength.value;
  }
  form.width.value = d.width;
  form.height.value = d.height;
  form.width.step = form.height.step = info.model.vae_scale;
  form.width.min = form.height.min = info.model.vae_scale;
  const maxFrames = info.limits?.max_frames;
  if (maxFrames) form.num_frames.max = form.context_length.max = form.context_stride.max = maxFrames;
  syncPresetFromSize();
  syncEta();
  syncLong();
  drawTimeline();
}

// DDIM alone has an eta (diffusers' `DDIMScheduler.step(eta=...)`).
function syncEta() { form.eta.disabled = form.scheduler.value !== "ddim"; }

// The window's stride and weights apply to FreeNoise only: with it off they are not sent.
function syncLong() {
  const on = Number(form.context_length.value) > 0;
  form.context_stride.disabled = form.context_weighting.disabled = !on;
}

// "16: a blue cube" lines → {"16": "a blue cube"}; throws on a line that is not FRAME: prompt,
// naming the field (`prompts` or `negative_prompts`).
function keyframePrompts(text, param = "prompts") {
  const prompts = {};
  const what = param === "prompts" ? "keyframe prompts" : "keyframe negative prompts";
  for (const [i, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (!line) continue;
    const m = /^(\d+)\s*[:=]\s*(.+)$/.exec(line);
    if (!m) {
      const err = new Error(`${what}, line ${i + 1}: write FRAME: prompt, as "24: a blue cube"`);
      err.param = param;
      throw err;
    }
    prompts[String(Number(m[1]))] = m[2].trim();
  }
  return prompts;
}

// The keyframe timeline under the keyframe fields: frame 0 (the prompt and negative prompt
// fields) at the left, the last frame at the right, a marker at each keyframe; markers past the
// last frame are red (the server refuses them). Lines that do not parse are left out (submitting
// names them).
function drawTimeline() {
  const box = $("#timeline");
  if (!box) return;
  const frames = Math.max(1, Number(form.num_frames.value) || Number(form.num_frames.placeholder) || 16);
  const rows = [["prompt", form.prompt.value.trim() ? { 0: form.prompt.value.trim() } : {}]];
  rows.push(["negative", form.negative_prompt.value.trim() ? { 0: form.negative_prompt.value.trim() } : {}]);
  for (const [kind, name] of [["prompt", "prompts"], ["negative", "negative_prompts"]]) {
    try {
      Object.assign(rows.find(r => r[0] === kind)[1], keyframePrompts(form[name].value, name));
    } catch (_) { /* shown on submit */ }
  }
  box.replaceChildren();
  const place = (frame) => `${(Math.min(frame, frames - 1) / Math.max(1, frames - 1)) * 100}%`;
  for (const [kind, prompts] of rows) {
    for (const [frame, text] of Object.entries(prompts)) {
      const f = Number(frame);
      const mark = document.createElement("span");
      mark.className = `mark ${kind}` + (f >= frames ? " past" : "");
      mark.dataset.frame = frame;
      mark.style.left = place(f);
      mark.textContent = `${f}`;
      mark.title = f >= frames ? `frame ${f} is past the last frame (${frames - 1}): ${text}` : `frame ${f}: ${text}`;
      box.append(mark);
    }
  }
  const end = document.createElement("span");
  end.className = "mark end prompt";
  end.style.left = "100%";
  end.textContent = `${frames - 1}`;
  end.title = `the last frame (${frames - 1})`;
  if (!rows[0][1][String(frames - 1)]) box.append(end);
}

function fillForm(settings) {
  const map = {
    prompt: settings.prompt, negative_prompt: settings.negative_prompt || "", seed: settings.seed,
    num_inference_steps: settings.steps, guidance_scale: settings.guidance_scale, num_frames: settings.num_frames,
    fps: settings.fps, scheduler: settings.scheduler, eta: settings.eta, width: settings.width, height: settings.height,
    context_length: settings.context_length ?? "", context_stride: settings.context_stride ?? "",
    context_weighting: settings.context_weighting ?? "pyramid",
  };
  for (const [k, v] of Object.entries(map)) if (v !== undefined && v !== null) form[k].value = v;
  const keyframes = Object.entries(settings.prompts || {});
  form.prompts.value = keyframes.map(([frame, text]) => `${frame}: ${text}`).join("\n");
  const negatives = Object.entries(settings.negative_prompts || {});
  form.negative_prompts.value = negatives.map(([frame, text]) => `${frame}: ${text}`).join("\n");
  if (settings.context_length || keyframes.length || negatives.length) $("#long-section").open = true;
  drawTimeline();
  syncPresetFromSize();
  syncEta();
  syncLong();
}

function clearFieldErrors() {
  for (const el of form.querySelectorAll(".field-error")) el.classList.remove("field-error");
}

function message(text, isError) {
  const el = $("#form-message");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function submitForm() {
  clearFieldErrors();
  const body = {};
  for (const name of FIELDS) {
    const el = form[name];
    if (el.disabled) continue;
    const v = el.value.trim();
    if (v !== "") body[name] = v;
  }
  $("#submit").disabled = true;
  try {
    const prompts = keyframePrompts(form.prompts.value);
    if (Object.keys(prompts).length) body.prompts = prompts;
    const negatives = keyframePrompts(form.negative_prompts.value, "negative_prompts");
    if (Object.keys(negatives).length) body.negative_prompts = negatives;
    if (form.lora.value) {
      const scale = Number(form.lora_scale.value || 1);
      body.lora = { name: form.lora.value, scale };
    }
    let video;
    const file = form.input_reference.files?.[0];
    if (file && !$("#v2v").disabled) {
      const data = new FormData();
      // Multipart carries strings: the keyframes go as a JSON string (the API reads either).
      for (const [k, v] of Object.entries(body)) data.append(k, typeof v === "string" ? v : JSON.stringify(v));
      for (const name of V2V_FIELDS) {
        const v = form[name].value.trim();
        if (v !== "") data.append(name, v);
      }
      data.append("input_reference", file);
      video = await api("/v1/videos", { method: "POST", body: data });
    } else {
      video = await api("/v1/videos", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    }
    mine.add(video.id);
    upsert(video);
    document.documentElement.dataset.submitted = video.id;
    message(`Queued (seed ${video.settings.seed}).`);
    return video;
  } catch (err) {
    if (err.param && form[err.param]) {
      const field = form[err.param];
      field.classList.add("field-error");
      field.closest("details")?.setAttribute("open", "");
      field.focus();
    }
    if (err.status === 401) $("#settings").showModal();
    message(err.message, true);
    return null;
  } finally {
    $("#submit").disabled = false;
  }
}

// ---------- how long jobs take ----------
// A job's cost as the server counts it: frames × height × width × denoising steps run (video to
// video runs the last `strength` of the steps, as diffusers' `get_timesteps`).
function jobCost(s) {
  const steps = s.input ? Math.max(1, Math.floor(s.steps * s.input.strength)) : s.steps;
  return s.num_frames * s.width * s.height * steps;
}

// Seconds per unit of cost of the jobs that finished most recently.
const durations = new Map(); // id → {rate, at}
function recordDuration(video) {
  const t = video.timings;
  if (video.status !== "completed" || !t?.started_at_ms || !t.completed_at_ms || durations.has(video.id)) return;
  const seconds = (t.completed_at_ms - t.started_at_ms) / 1000;
  const cost = jobCost(video.settings);
  if (seconds > 0 && cost > 0) durations.set(video.id, { rate: seconds / cost, at: t.completed_at_ms });
}

function median(values) {
  const v = [...values].sort((a, b) => a - b);
  return v.length ? (v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2) : null;
}

// Seconds per unit of cost: the median of the last 10 finished jobs; else the running jobs' step
// times; else the server's mean step time (of any size).
function costRate() {
  const recent = [...durations.values()].sort((a, b) => b.at - a.at).slice(0, 10);
  if (recent.length) return median(recent.map((d) => d.rate));
  const running = [];
  for (const [id, state] of live) {
    const v = jobs.get(id);
    const p = state.progress;
    if (v && p?.step_s > 0) running.push(p.step_s / (v.settings.num_frames * v.settings.width * v.settings.height));
  }
  if (running.length) return median(running);
  const step = info?.stats?.mean_step_s;
  const d = info?.defaults;
  return step && d ? step / (d.num_frames * d.width * d.height) : null;
}

// Seconds until a waiting job ends (of a running one: what is left), or null when nothing is known.
function secondsLeft(video, rate) {
  const full = rate === null ? null : rate * jobCost(video.settings);
  if (video.status === "queued") return full;
  const state = live.get(video.id);
  const p = state?.progress;
  if (p && p.step > 0 && isFinite(p.eta_s)) return Math.max(0, p.eta_s - (Date.now() - state.at) / 1000);
  if (full === null) return null;
  const started = video.timings?.started_at_ms;
  return Math.max(0, full - (started ? Math.max(0, Date.now() - started) / 1000 : 0));
}

// When each queued job starts and ends: the running jobs first, then the queue in order, on as
// many workers as the server runs (one when they run elsewhere).
function queueTimes() {
  const rate = costRate();
  const workers = Math.max(1, info?.queue?.workers_in_process || 1);
  const waiting = [...jobs.values()].filter(isWaiting);
  const running = waiting.filter((v) => v.status === "in_progress");
  const queued = waiting.filter((v) => v.status === "queued")
    .sort((a, b) => a.timings.created_at_ms - b.timings.created_at_ms);
  const times = new Map();
  let ahead = 0;
  let known = true;
  for (const v of running) {
    const left = secondsLeft(v, rate);
    if (left === null) known = false;
    else ahead += left;
  }
  queued.forEach((v, i) => {
    const own = secondsLeft(v, rate);
    const start = known ? ahead / workers : null;
    times.set(v.id, { position: i + 1, start, end: start !== null && own !== null ? start + own : null });
    if (own === null) known = false;
    else ahead += own;
  });
  return times;
}

function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m}m ${s % 60}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
}

// The queue's lines of time, every second: the ETAs move with the clock.
function renderQueueTimes() {
  const times = queueTimes();
  for (const [id, li] of queueItems) {
    const video = jobs.get(id);
    if (!video) continue;
    const meta = li.querySelector(".meta");
    const eta = li.querySelector(".eta");
    if (video.status === "queued") {
      const t = times.get(id);
      meta.textContent = `waiting · position ${t?.position ?? video.queue_position ?? "?"}`;
      eta.textContent = t && t.end !== null
        ? `starts in about ${fmtDuration(t.start)} · done in about ${fmtDuration(t.end)}`
        : "time to wait: known once a job has run";
    } else {
      const p = live.get(id)?.progress;
      meta.textContent = p && p.step > 0
        ? `step ${p.step}/${p.total_steps} · ${p.step_s.toFixed(2)} s/step · about ${fmtDuration(secondsLeft(video, null))} left`
        : "starting…";
      eta.textContent = "";
    }
  }
}

// ---------- queue and gallery ----------
function upsert(video, fresh = false) {
  const before = jobs.get(video.id);
  // An older copy (from a list fetched before an event) must not undo a newer state.
  if (before && rank(before.status) > rank(video.status)) return;
  jobs.set(video.id, video);
  recordDuration(video);
  render(video.id, fresh);
}
function rank(status) { return { queued: 0, in_progress: 1, completed: 2, failed: 2 }[status] ?? 0; }

function remove(id) {
  jobs.delete(id);
  live.delete(id);
  queueItems.get(id)?.remove();
  queueItems.delete(id);
  const card = galleryItems.get(id);
  if (card) {
    near.unobserve(card);
    inView.unobserve(card);
    card.remove();
    // The files fetched with an API key, let go.
    const videoEl = card.querySelector("video");
    for (const url of [videoEl?.src, videoEl?.poster]) if (url?.startsWith("blob:")) URL.revokeObjectURL(url);
    if (autoplaying === card) autoplaying = null;
  }
  galleryItems.delete(id);
  if (listing.cursor === id) {
    // The next page starts after the oldest job still known.
    const oldest = [...jobs.values()].sort((a, b) => a.timings.created_at_ms - b.timings.created_at_ms)[0];
    listing.cursor = oldest?.id ?? null;
  }
  renderCounts();
}

function render(id, fresh = false) {
  const video = jobs.get(id);
  if (!video) return;
  if (isWaiting(video)) renderQueued(video);
  else {
    queueItems.get(id)?.remove();
    queueItems.delete(id);
    renderFinished(video, fresh);
  }
  renderCounts();
  renderQueueTimes();
}

function renderCounts() {
  const waiting = [...jobs.values()].filter(isWaiting);
  $("#queue-count").textContent = waiting.length ? `(${waiting.length})` : "";
  $("#queue-empty").hidden = waiting.length > 0;
  $("#gallery-empty").hidden = galleryItems.size > 0;
}

function renderQueued(video) {
  let li = queueItems.get(video.id);
  if (!li) {
    li = $("#queue-item").content.firstElementChild.cloneNode(true);
    li.dataset.id = video.id;
    li.querySelector(".prompt").textContent = video.prompt;
    li.querySelector(".prompt").title = video.prompt;
    li.querySelector(".cancel").addEventListener("click", async () => {
      try { upsert(await api(`/v1/videos/${video.id}/cancel`, { method: "POST" })); } catch (err) { message(err.message, true); }
    });
    queueItems.set(video.id, li);
    // In submission order: the queue list sorts by creation time.
    const after = [...queueItems.values()].find((o) => o !== li && jobs.get(o.dataset.id)?.timings.created_at_ms > video.timings.created_at_ms);
    $("#queue").insertBefore(li, after || null);
  }
  const state = live.get(video.id) || {};
  const bar = li.querySelector("progress");
  if (video.status === "queued") bar.removeAttribute("value");
  else bar.value = state.progress ? state.progress.progress : video.progress;
  const img = li.querySelector(".preview");
  if (state.preview && $("#show-previews").checked) {
    img.src = state.preview.image;
    img.hidden = false;
  } else img.hidden = true;
  li.classList.toggle("running", video.status === "in_progress");
}

function settingsRows(s) {
  const rows = [
    ["seed", s.seed], ["steps", s.steps], ["guidance", s.guidance_scale], ["sampler", s.scheduler + (s.scheduler === "ddim" ? ` (eta ${s.eta})` : "")],
    ["frames", `${s.num_frames} at ${s.fps} fps`], ["size", `${s.width}×${s.height}`], ["negative", s.negative_prompt || "—"],
  ];
  if (s.context_length) rows.push(["windows", `${s.context_length} frames, stride ${s.context_stride ?? 4}, ${s.context_weighting ?? "pyramid"}`]);
  for (const [frame, text] of Object.entries(s.prompts || {})) rows.push([`frame ${frame}`, text]);
  for (const [frame, text] of Object.entries(s.negative_prompts || {})) rows.push([`frame ${frame}, negative`, text]);
  if (s.input) rows.push(["input", `${s.input.path} at strength ${s.input.strength}`]);
  rows.push(["model", s.model]);
  return rows;
}

// Gallery videos load nothing until wanted: a card near the screen gets its poster (the
// thumbnail); its video is fetched when it plays: on hover, on the play button, or, for a job
// that finished while the page was open, when it is on screen. Off screen, videos pause.
const near = new IntersectionObserver((entries) => {
  for (const e of entries) if (e.isIntersecting) showPoster(e.target);
}, { rootMargin: "300px 0px" });
const inView = new IntersectionObserver((entries) => {
  for (const e of entries) {
    const card = e.target;
    const videoEl = card.querySelector("video");
    if (!videoEl) continue;
    if (e.isIntersecting && card.dataset.autoplay) playCard(card);
    else if (!e.isIntersecting && !videoEl.paused) videoEl.pause();
  }
}, { threshold: 0.5 });
// The one video playing by itself (a newer one takes its place).
let autoplaying = null;

async function showPoster(card) {
  if (card.dataset.poster) return;
  card.dataset.poster = "1";
  near.unobserve(card);
  try { card.querySelector("video").poster = await mediaUrl(card.dataset.id, "thumbnail"); } catch { /* no poster */ }
}

// The video's source, set once, when it is to play: with an API key the file is fetched first (as
// a blob).
function ensureSource(card) {
  if (!card.sourced) {
    const videoEl = card.querySelector("video");
    card.sourced = mediaUrl(card.dataset.id).then((url) => {
      if (videoEl.getAttribute("src") !== url) videoEl.src = url;
      card.querySelector(".download").href = url;
      return url;
    });
    card.sourced.catch((err) => {
      card.sourced = null;
      message(`loading ${card.dataset.id}: ${err.message}`, true);
    });
  }
  return card.sourced;
}

async function playCard(card) {
  const videoEl = card.querySelector("video");
  const button = card.querySelector(".play");
  if (button) {
    // From now on the video's own controls.
    button.remove();
    videoEl.controls = true;
  }
  try { await ensureSource(card); } catch { return; } // said on the page by ensureSource
  if (card.dataset.autoplay) {
    if (autoplaying && autoplaying !== card) {
      autoplaying.querySelector("video")?.pause();
      delete autoplaying.dataset.autoplay;
    }
    autoplaying = card;
  }
  videoEl.play().catch(() => {});
}

function renderFinished(video, fresh) {
  if (galleryItems.has(video.id)) return;
  const card = $("#gallery-item").content.firstElementChild.cloneNode(true);
  card.dataset.id = video.id;
  card.dataset.status = video.status;
  card.querySelector(".prompt").textContent = video.prompt;
  const dl = card.querySelector(".settings");
  for (const [k, v] of settingsRows(video.settings)) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
  const videoEl = card.querySelector("video");
  const download = card.querySelector(".download");
  if (video.status === "completed") {
    download.download = `${video.id}.mp4`;
    if (apiKey()) {
      // The link fetches the file with the key when it has none yet.
      download.addEventListener("click", (e) => {
        if (download.getAttribute("href")) return;
        e.preventDefault();
        ensureSource(card).then(() => download.click());
      });
    } else download.href = contentUrl(video.id);
    videoEl.addEventListener("playing", () => {
      card.dataset.playing = "1";
      document.documentElement.dataset.played = video.id;
    });
    videoEl.addEventListener("pause", () => delete card.dataset.playing);
    // No source (and no controls, which a browser shows disabled without one) until it plays:
    // from the play button, a hover, or on screen when fresh. The source is set then, and with
    // an API key fetched first.
    card.querySelector(".play").addEventListener("click", () => playCard(card));
    // A mouse over a card plays it; a touch screen has the play button.
    card.addEventListener("pointerenter", (e) => {
      if (e.pointerType !== "mouse" || !videoEl.paused) return;
      card.dataset.hover = "1";
      playCard(card);
    });
    card.addEventListener("pointerleave", () => {
      if (card.dataset.hover) videoEl.pause();
      delete card.dataset.hover;
    });
    if (fresh && mine.has(video.id)) card.dataset.autoplay = "1";
    near.observe(card);
    inView.observe(card);
  } else {
    card.querySelector(".media").remove();
    download.remove();
    const error = card.querySelector(".error");
    error.hidden = false;
    error.textContent = `Failed: ${video.error?.message || "unknown error"}`;
  }
  card.querySelector(".reuse").addEventListener("click", () => {
    fillForm(video.settings);
    form.prompt.focus();
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  card.querySelector(".delete").addEventListener("click", async () => {
    try {
      await api(`/v1/videos/${video.id}`, { method: "DELETE" });
      remove(video.id);
    } catch (err) { message(err.message, true); }
  });
  galleryItems.set(video.id, card);
  // Newest first.
  const after = [...galleryItems.values()].find((o) => o !== card && jobs.get(o.dataset.id)?.timings.created_at_ms < video.timings.created_at_ms);
  $("#gallery").insertBefore(card, after || null);
}

// ---------- reading the list a page at a time ----------
// Jobs the page queued: a job of this page that finishes while it is open plays by itself.
const mine = new Set();
const GALLERY_PAGE = 12;
const LIST_LIMIT = 24;
// Where the next page of older jobs starts, and whether there is one.
const listing = { cursor: null, more: true, busy: false };

// The next GALLERY_PAGE finished jobs (and every waiting job newer than them: the queue comes
// first in the list, newest first).
async function loadMore() {
  if (listing.busy || !listing.more) return;
  listing.busy = true;
  $("#load-more").disabled = true;
  try {
    let added = 0;
    for (let page = 0; page < 10 && listing.more && added < GALLERY_PAGE; page++) {
      const list = await api(`/v1/videos?limit=${LIST_LIMIT}${listing.cursor ? `&after=${listing.cursor}` : ""}`);
      for (const v of list.data) {
        if (!isWaiting(v) && !galleryItems.has(v.id)) added++;
        upsert(v);
      }
      listing.more = list.has_more;
      if (list.last_id) listing.cursor = list.last_id;
    }
  } finally {
    listing.busy = false;
    $("#load-more").disabled = false;
    $("#load-more").hidden = !listing.more;
    renderCounts();
  }
}

// After the event stream was lost: the newest jobs again, down to one the page already shows
// as finished below every job it has as waiting; a waiting job not seen on the way is asked for
// (it may have been deleted).
async function refreshTop() {
  const seen = new Set();
  let after = null;
  for (let page = 0; page < 10; page++) {
    const list = await api(`/v1/videos?limit=50${after ? `&after=${after}` : ""}`);
    for (const v of list.data) {
      seen.add(v.id);
      upsert(v);
    }
    const oldest = list.data.at(-1)?.timings.created_at_ms ?? 0;
    const reached = list.data.some((v) => !isWaiting(v) && galleryItems.has(v.id));
    const below = [...jobs.values()].some((v) => isWaiting(v) && v.timings.created_at_ms < oldest);
    if (!list.has_more || (reached && !below)) break;
    after = list.last_id;
  }
  for (const v of [...jobs.values()]) {
    if (!isWaiting(v) || seen.has(v.id)) continue;
    try { upsert(await api(`/v1/videos/${v.id}`)); } catch (err) { if (err.status === 404) remove(v.id); }
  }
  renderCounts();
}

// ---------- events ----------
function onEvent(name, data) {
  switch (name) {
    case "queued": upsert(data.video); break;
    case "progress": {
      const v = jobs.get(data.id);
      live.set(data.id, { ...(live.get(data.id) || {}), progress: data, at: Date.now() });
      if (v && isWaiting(v)) {
        v.status = "in_progress";
        v.progress = data.progress;
        if (!v.timings.started_at_ms) v.timings.started_at_ms = Date.now();
        render(data.id);
      }
      break;
    }
    case "preview":
      live.set(data.id, { ...(live.get(data.id) || {}), preview: data });
      if (jobs.has(data.id)) render(data.id);
      break;
    case "completed":
    case "failed":
      live.delete(data.id);
      upsert(data, true);
      break;
    case "deleted": remove(data.id); break;
    case "lagged": refreshTop().catch(() => {}); break;
  }
}

// EventSource cannot send an API key: the stream is read with fetch.
async function followEvents() {
  for (;;) {
    try {
      const response = await fetch("/v1/t2v/events", { headers: headers({ Accept: "text/event-stream" }) });
      if (!response.ok) throw new Error(`${response.status}`);
      setStatus("live", "ok");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let name = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) name = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          }
          if (data.length) onEvent(name, JSON.parse(data.join("\n")));
        }
      }
    } catch (err) {
      setStatus(err.message === "401" ? "API key needed" : "offline", "bad");
    }
    await new Promise((r) => setTimeout(r, 2000));
    await refreshTop().catch(() => {});
  }
}

// ---------- start ----------
async function start() {
  $("#api-key").value = apiKey();
  $("#show-previews").checked = localStorage.getItem("t2v.previews") !== "off";
  $("#open-settings").addEventListener("click", () => $("#settings").showModal());
  $("#settings").addEventListener("close", () => {
    localStorage.setItem("t2v.apiKey", $("#api-key").value.trim());
    localStorage.setItem("t2v.previews", $("#show-previews").checked ? "on" : "off");
    location.reload();
  });
  $("#dice").addEventListener("click", () => { form.seed.value = Math.floor(Math.random() * 2 ** 32); });
  form.scheduler.addEventListener("change", syncEta);
  form.context_length.addEventListener("input", syncLong);
  for (const name of ["prompt", "negative_prompt", "prompts", "negative_prompts", "num_frames"]) {
    form[name].addEventListener("input", drawTimeline);
  }
  drawTimeline();
  $("#size-preset").addEventListener("change", (e) => {
    if (e.target.value === "custom") return;
    const [w, h] = e.target.value.split("x");
    form.width.value = w;
    form.height.value = h;
  });
  form.width.addEventListener("input", syncPresetFromSize);
  form.height.addEventListener("input", syncPresetFromSize);
  form.strength.addEventListener("input", () => { $("#strength-value").value = form.strength.value; });
  // With an input video the frame count is what to read from it: empty reads them all.
  form.input_reference.addEventListener("change", () => {
    const chosen = form.input_reference.files?.length > 0;
    form.num_frames.value = chosen ? "" : info?.defaults?.num_frames ?? "";
    form.num_frames.placeholder = chosen ? "all" : "";
    drawTimeline();
  });
  form.addEventListener("submit", (e) => { e.preventDefault(); submitForm(); });
  $("#load-more").addEventListener("click", () => loadMore().catch((err) => message(err.message, true)));
  setInterval(renderQueueTimes, 1000);

  // Video to video shows as available until the server says otherwise (without the API key the
  // page cannot ask).
  try {
    info = await api("/v1/t2v/info");
  } catch (err) {
    setStatus(err.status === 401 ? "API key needed" : "offline", "bad");
    if (err.status === 401) $("#settings").showModal();
    return;
  }
  $("#model").textContent = info.model.name;
  setStatus(info.ready ? "ready" : "loading model", info.ready ? "ok" : "");
  fillSizePresets();
  applyDefaults();
  if (!info.model.video_to_video) {
    $("#v2v").disabled = true;
    $("#v2v-note").hidden = false;
  }
  followEvents();
  await loadMore().catch((err) => message(`reading the list: ${err.message}`, true));

  // `?prompt=...&num_frames=4` fills the form (any field); only the visitor's click sends it: a
  // link from another site must not queue a job with the visitor's key.
  const query = new URLSearchParams(location.search);
  for (const name of FIELDS) if (query.has(name)) form[name].value = query.get(name);
  syncPresetFromSize();
  syncEta();
  syncLong();
  drawTimeline();
}

start();
