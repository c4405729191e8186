// The t2v page: a form that queues jobs, the queue with live progress and previews, and the gallery.
// Plain JavaScript, no build step; talks only to this server's API.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const form = $("#form");
const jobs = new Map(); // id → video object
const queueItems = new Map(); // id → <li>
const galleryItems = new Map(); // id → <article>
const live = new Map(); // id → {progress event, preview event}
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

// With an API key, <video src> cannot send it: the file is fetched and given as a blob URL.
async function mediaUrl(id) {
  if (!apiKey()) return contentUrl(id);
  const response = await fetch(contentUrl(id), { headers: headers() });
  if (!response.ok) throw new Error(`${response.status}`);
  return URL.createObjectURL(await response.blob());
}

function setStatus(text, kind) {
  const el = $("#server-status");
  el.textContent = text;
  el.className = `pill ${kind || ""}`;
}

// ---------- form ----------
const FIELDS = ["prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "num_frames", "fps", "scheduler", "eta", "width", "height"];
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
    [snap(n * 16 / 12), snap(m * 9 / 12), "wide 16:9"],
    [snap(n / 2), snap(m / 2), "small"],
    [snap(n * 1.5), snap(m * 1.5), "large"],
  ];
  const select = $("#size-preset");
  select.replaceChildren();
  const seen = new Set();
  for (const [w, h, label] of presets) {
    if (seen.has(`${w}x${h}`)) continue;
    seen.add(`${w}x${h}`);
    select.append(new Option(`${w}×${h} (${label})`, `${w}x${h}`));
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
  form.scheduler.value = d.scheduler;
  form.eta.value = d.eta;
  if (form.strength && d.strength !== undefined) {
    form.strength.value = d.strength;
    $("#strength-value").value = form.strength.value;
  }
  form.width.value = d.width;
  form.height.value = d.height;
  form.width.step = form.height.step = info.model.vae_scale;
  form.width.min = form.height.min = info.model.vae_scale;
  syncPresetFromSize();
  syncEta();
}

function syncEta() { form.eta.disabled = form.scheduler.value !== "ddim"; }

function fillForm(settings) {
  const map = {
    prompt: settings.prompt, negative_prompt: settings.negative_prompt || "", seed: settings.seed,
    num_inference_steps: settings.steps, guidance_scale: settings.guidance_scale, num_frames: settings.num_frames,
    fps: settings.fps, scheduler: settings.scheduler, eta: settings.eta, width: settings.width, height: settings.height,
  };
  for (const [k, v] of Object.entries(map)) if (v !== undefined && v !== null) form[k].value = v;
  syncPresetFromSize();
  syncEta();
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
    let video;
    const file = form.input_reference.files?.[0];
    if (file && !$("#v2v").disabled) {
      const data = new FormData();
      for (const [k, v] of Object.entries(body)) data.append(k, v);
      for (const name of V2V_FIELDS) {
        const v = form[name].value.trim();
        if (v !== "") data.append(name, v);
      }
      data.append("input_reference", file);
      video = await api("/v1/videos", { method: "POST", body: data });
    } else {
      video = await api("/v1/videos", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    }
    upsert(video);
    document.documentElement.dataset.submitted = video.id;
    message(`Queued (seed ${video.settings.seed}).`);
    return video;
  } catch (err) {
    if (err.param && form[err.param]) {
      form[err.param].classList.add("field-error");
      form[err.param].focus();
    }
    if (err.status === 401) $("#settings").showModal();
    message(err.message, true);
    return null;
  } finally {
    $("#submit").disabled = false;
  }
}

// ---------- queue and gallery ----------
function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m}m ${s % 60}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
}

function upsert(video) {
  const before = jobs.get(video.id);
  // An older copy (from a list fetched before an event) must not undo a newer state.
  if (before && rank(before.status) > rank(video.status)) return;
  jobs.set(video.id, video);
  render(video.id);
}
function rank(status) { return { queued: 0, in_progress: 1, completed: 2, failed: 2 }[status] ?? 0; }

function remove(id) {
  jobs.delete(id);
  live.delete(id);
  queueItems.get(id)?.remove();
  queueItems.delete(id);
  galleryItems.get(id)?.remove();
  galleryItems.delete(id);
  renderCounts();
}

function render(id) {
  const video = jobs.get(id);
  if (!video) return;
  if (video.status === "queued" || video.status === "in_progress") renderQueued(video);
  else {
    queueItems.get(id)?.remove();
    queueItems.delete(id);
    renderFinished(video);
  }
  renderCounts();
}

function renderCounts() {
  const waiting = [...jobs.values()].filter((v) => v.status === "queued" || v.status === "in_progress");
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
  const meta = li.querySelector(".meta");
  if (video.status === "queued") {
    bar.removeAttribute("value");
    meta.textContent = video.queue_position ? `waiting · position ${video.queue_position}` : "waiting";
  } else {
    const p = state.progress;
    bar.value = p ? p.progress : video.progress;
    meta.textContent = p && p.step > 0
      ? `step ${p.step}/${p.total_steps} · ${p.step_s.toFixed(2)} s/step · about ${fmtDuration(p.eta_s)} left`
      : "starting…";
  }
  const img = li.querySelector(".preview");
  if (state.preview && $("#show-previews").checked) {
    img.src = state.preview.image;
    img.hidden = false;
  } else img.hidden = true;
  li.classList.toggle("running", video.status === "in_progress");
}

function settingsRows(s) {
  return [
    ["seed", s.seed], ["steps", s.steps], ["guidance", s.guidance_scale], ["scheduler", s.scheduler + (s.scheduler === "ddim" ? ` (eta ${s.eta})` : "")],
    ["frames", `${s.num_frames} at ${s.fps} fps`], ["size", `${s.width}×${s.height}`], ["negative", s.negative_prompt || "—"], ["model", s.model],
  ];
}

function renderFinished(video) {
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
    videoEl.poster = apiKey() ? "" : contentUrl(video.id, "thumbnail");
    videoEl.addEventListener("playing", () => {
      card.dataset.playing = "1";
      document.documentElement.dataset.played = video.id;
    });
    mediaUrl(video.id).then((url) => {
      videoEl.src = url;
      download.href = url;
      videoEl.play().catch(() => {});
    }).catch((err) => message(`loading ${video.id}: ${err.message}`, true));
    download.download = `${video.id}.mp4`;
  } else {
    videoEl.remove();
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

async function loadList() {
  let after = null;
  for (let page = 0; page < 10; page++) {
    const list = await api(`/v1/videos?limit=100${after ? `&after=${after}` : ""}`);
    for (const v of list.data) upsert(v);
    if (!list.has_more) break;
    after = list.last_id;
  }
  renderCounts();
}

// ---------- events ----------
function onEvent(name, data) {
  switch (name) {
    case "queued": upsert(data.video); break;
    case "progress": {
      const v = jobs.get(data.id);
      live.set(data.id, { ...(live.get(data.id) || {}), progress: data });
      if (v && v.status !== "completed" && v.status !== "failed") {
        v.status = "in_progress";
        v.progress = data.progress;
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
      upsert(data);
      break;
    case "deleted": remove(data.id); break;
    case "lagged": loadList(); break;
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
    await loadList().catch(() => {});
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
    form.num_frames.value = chosen ? "" : info.defaults.num_frames;
    form.num_frames.placeholder = chosen ? "all" : "";
  });
  form.addEventListener("submit", (e) => { e.preventDefault(); submitForm(); });

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
  if (info.model.video_to_video) {
    $("#v2v").disabled = false;
    $("#v2v-note").hidden = true;
  }
  followEvents();
  await loadList();

  // `?prompt=...&num_frames=4` fills the form (any field); only the visitor's click sends it: a
  // link from another site must not queue a job with the visitor's key.
  const query = new URLSearchParams(location.search);
  for (const name of FIELDS) if (query.has(name)) form[name].value = query.get(name);
  syncPresetFromSize();
  syncEta();
}

start();
