//! `POST /v1/videos`: the request's fields (JSON values, or multipart strings) checked one by one
//! and turned into the settings of a run, each error naming its field.

use std::collections::BTreeMap;

use serde_json::Value;
use t2v::long_video::{ContextWeighting, ContextWindows, LongVideo};
use t2v::pipeline::{self, GenerationParams};
use t2v::schedulers::{strength_begin_index, SchedulerKind};
use t2v::video::input::{Fit, ReadOptions};
use t2v_settings::RunSettings;

use crate::error::ApiError;
use crate::ModelInfo;

/// What a request may ask for, at most.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limits {
    pub max_frames: usize,
    /// Pixels, either side.
    pub max_side: usize,
    pub max_steps: usize,
    pub max_prompt_chars: usize,
    /// Bytes of a JSON body.
    pub max_json_bytes: usize,
    /// Bytes of a multipart body (with the uploaded video).
    pub max_upload_bytes: usize,
    /// The most a job may cost: frames × height × width × denoising steps run.
    pub max_job_cost: u64,
    /// The most jobs waiting in the queue.
    pub max_queued: u64,
    /// Pixels a frame of an uploaded video may declare.
    pub max_source_pixels: usize,
    /// Frames an uploaded video may declare.
    pub max_source_frames: usize,
}

impl Limits {
    /// The limits of a process that takes no requests (a worker process): nothing may be asked;
    /// the upload budgets stay the defaults, as the jobs it runs were checked against them.
    pub fn none() -> Self {
        Limits {
            max_frames: 0,
            max_side: 0,
            max_steps: 0,
            max_prompt_chars: 0,
            max_json_bytes: 0,
            max_upload_bytes: 0,
            max_job_cost: 0,
            max_queued: 0,
            max_source_pixels: MAX_SOURCE_PIXELS,
            max_source_frames: MAX_SOURCE_FRAMES,
        }
    }
}

/// The pixel budget of an uploaded video's frames (4096×4096: a 4K video fits; a GIF's screen
/// is then at most 64 MiB as RGBA).
pub const MAX_SOURCE_PIXELS: usize = 4096 * 4096;

/// The frame budget of an uploaded video.
pub const MAX_SOURCE_FRAMES: usize = 4096;

/// `read` with the upload budget of `limits`: the declared frame size and frame count a file may
/// have before anything of it is decoded.
pub fn budgeted(read: &ReadOptions, limits: &Limits) -> ReadOptions {
    ReadOptions {
        max_source_pixels: limits.max_source_pixels,
        max_source_frames: limits.max_source_frames,
        ..read.clone()
    }
}

/// What a run of `frames` frames of `height` × `width` for `steps` denoising steps costs.
pub fn job_cost(frames: usize, height: usize, width: usize, steps: usize) -> u128 {
    frames as u128 * height as u128 * width as u128 * steps as u128
}

/// Refuses a run that costs more than `limits.max_job_cost`, saying the limit and what to lower.
pub fn check_cost(settings: &RunSettings, strength: Option<f64>, limits: &Limits) -> Result<(), ApiError> {
    // Video-to-video runs the last `strength` of the steps (diffusers' `get_timesteps`).
    let steps = match strength {
        Some(s) => ((settings.steps as f64 * s) as usize).clamp(1, settings.steps.max(1)),
        None => settings.steps,
    };
    let cost = job_cost(settings.num_frames, settings.height, settings.width, steps);
    if cost > limits.max_job_cost as u128 {
        let param = if settings.input.is_some() { "num_frames" } else { "num_inference_steps" };
        return Err(ApiError {
            code: Some("job_too_large"),
            ..ApiError::bad(
                param,
                format!(
                    "this job costs {} frames × {}x{} pixels × {steps} steps = {cost}, more than the {} one job may \
                     cost on this server (--max-job-cost): ask for fewer frames, steps or pixels",
                    settings.num_frames, settings.width, settings.height, limits.max_job_cost
                ),
            )
        });
    }
    Ok(())
}

/// Every field `POST /v1/videos` knows.
pub const FIELDS: &[&str] = &[
    "prompt",
    "model",
    "size",
    "seconds",
    "negative_prompt",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "num_frames",
    "height",
    "width",
    "fps",
    "scheduler",
    "eta",
    "input_reference",
    "strength",
    "video_start",
    "video_every",
    "video_fit",
    "context_length",
    "context_stride",
    "context_weighting",
    "prompts",
    "negative_prompts",
    "lora",
    "upscale",
];

/// Fields other servers of this API send that fill in t2v's (vLLM-Omni's and SGLang's): their
/// values are merged as t2v's fields, a field given at the top level winning.
const NESTED: &[&str] = &["extra_params", "video_params"];

/// The fields that apply to video-to-video only.
const VIDEO_FIELDS: &[&str] = &["strength", "video_start", "video_every", "video_fit"];

/// The library's defaults (the model card's recipe), the same for every door.
pub use t2v::params::{
    DEFAULT_GUIDANCE_SCALE as DEFAULT_GUIDANCE, DEFAULT_NUM_FRAMES as DEFAULT_FRAMES, DEFAULT_STEPS, DEFAULT_STRENGTH,
};

/// The fields of a request: JSON values as sent, multipart fields as strings. Empty strings count
/// as absent (what an empty form field sends).
pub struct Fields(BTreeMap<String, Value>);

impl Fields {
    pub fn new(map: BTreeMap<String, Value>) -> Result<Self, ApiError> {
        if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(ApiError::bad(
                unknown,
                format!("unknown field `{unknown}`; the fields are: {}", FIELDS.join(", ")),
            ));
        }
        let map = map.into_iter().filter(|(_, v)| !matches!(v, Value::Null) && v.as_str() != Some("")).collect();
        Ok(Self(map))
    }

    /// The fields of a request as other servers of this API read them (vLLM-Omni, SGLang):
    /// `extra_params` and `video_params` (objects, or JSON strings of one in multipart) merged
    /// in, and fields this server does not know ignored, as those servers do: returned by name.
    pub fn from_request(mut map: BTreeMap<String, Value>) -> Result<(Self, Vec<String>), ApiError> {
        for nested in NESTED {
            let Some(value) = map.remove(*nested) else { continue };
            let object = match value {
                Value::Null => continue,
                Value::Object(o) => o,
                Value::String(t) if t.trim().is_empty() => continue,
                Value::String(t) => match serde_json::from_str::<Value>(&t) {
                    Ok(Value::Object(o)) => o,
                    _ => return Err(ApiError::bad(nested, format!("`{nested}` must be an object of fields"))),
                },
                _ => return Err(ApiError::bad(nested, format!("`{nested}` must be an object of fields"))),
            };
            for (k, v) in object {
                map.entry(k).or_insert(v);
            }
        }
        let mut ignored = Vec::new();
        map.retain(|k, _| {
            let known = FIELDS.contains(&k.as_str());
            if !known {
                ignored.push(k.clone());
            }
            known
        });
        Ok((Self::new(map)?, ignored))
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ApiError::bad(name, format!("`{name}` must be a string, got {other}"))),
        }
    }

    /// A number given as a JSON number or as a string (multipart sends strings).
    fn number(&self, name: &str, what: &str) -> Result<Option<f64>, ApiError> {
        let v = match self.0.get(name) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(_) => None,
        };
        match v {
            Some(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(ApiError::bad(name, format!("`{name}` must be {what}, got {}", self.0[name]))),
        }
    }

    fn whole(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let what = format!("a whole number from {min} to {max}");
        // Integers beyond 2^53 (seeds) are read exactly, not through f64.
        let exact = match self.0.get(name) {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        let v = match exact {
            Some(v) => v,
            None => match self.number(name, &what)? {
                None => return Ok(None),
                // `u64::MAX as f64` is 2^64 itself, one past the largest: strictly below it.
                Some(f) if f.fract() == 0.0 && f >= 0.0 && f < u64::MAX as f64 => f as u64,
                Some(_) => return Err(ApiError::bad(name, format!("`{name}` must be {what}, got {}", self.0[name]))),
            },
        };
        if v < min || v > max {
            return Err(ApiError::bad(name, format!("`{name}` must be {what}, got {v}")));
        }
        Ok(Some(v))
    }

    fn real(&self, name: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        let what = format!("a number from {min} to {max}");
        match self.number(name, &what)? {
            Some(v) if v < min || v > max => Err(ApiError::bad(name, format!("`{name}` must be {what}, got {v}"))),
            v => Ok(v),
        }
    }
}

/// How a video-to-video request reads its input video.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoRequest {
    pub strength: f64,
    /// Frames chosen, and their size: the run's width and height.
    pub read: ReadOptions,
}

/// The video-to-video options of a request whose run is `settings` (from [`parse`]); `None`
/// without `input_reference`. The frames read are resized to the run's size; the number asked
/// (`num_frames` or `seconds`) is read exactly, else all the frames chosen up to the library's
/// default limit.
pub fn video_request(fields: &Fields, settings: &RunSettings) -> Result<Option<VideoRequest>, ApiError> {
    if !fields.has("input_reference") {
        return Ok(None);
    }
    let strength = match fields.number("strength", "a number above 0, up to 1")? {
        None => DEFAULT_STRENGTH,
        Some(s) if s > 0.0 && s <= 1.0 => s,
        Some(s) => {
            return Err(ApiError::bad(
                "strength",
                format!("`strength` must be above 0 and at most 1 (how much of the input video is replaced), got {s}"),
            ))
        }
    };
    // A strength that runs no step is refused now, with the smallest that runs one.
    strength_begin_index(settings.steps, strength).map_err(|e| ApiError::bad("strength", e.to_string()))?;
    let fit = match fields.string("video_fit")? {
        None => Fit::default(),
        Some(f) => Fit::parse(&f).map_err(|_| {
            ApiError::bad("video_fit", format!("`video_fit` must be `resize`, `crop` or `pad`, got `{f}`"))
        })?,
    };
    let start_frame = fields.whole("video_start", 0, u32::MAX as u64)?.map_or(0, |v| v as usize);
    let every = fields.whole("video_every", 1, 1000)?.map_or(1, |v| v as usize);
    let asked = fields.has("num_frames") || fields.has("seconds");
    let read = ReadOptions {
        size: Some((settings.width, settings.height)),
        fit,
        start_frame,
        every,
        num_frames: asked.then_some(settings.num_frames),
        ..ReadOptions::default()
    };
    Ok(Some(VideoRequest { strength, read }))
}

/// The long-video fields: FreeNoise's `context_length` (0 or absent: off), `context_stride`
/// (default 4) and `context_weighting`, and `prompts`, an object of keyframe → text (a JSON
/// string of one in multipart) for the keyframes after frame 0, whose prompt is `prompt`.
fn long_video(fields: &Fields, num_frames: usize, limits: &Limits) -> Result<LongVideo, ApiError> {
    let length = fields.whole("context_length", 0, limits.max_frames as u64)?.unwrap_or(0) as usize;
    let stride = fields.whole("context_stride", 1, limits.max_frames as u64)?;
    let weighting = match fields.string("context_weighting")? {
        None => None,
        Some(w) => Some(w.parse::<ContextWeighting>().map_err(|e| ApiError::bad("context_weighting", e.to_string()))?),
    };
    if length == 0 {
        if let Some(name) = ["context_stride", "context_weighting"].into_iter().find(|f| fields.has(f)) {
            return Err(ApiError::bad(name, format!("`{name}` applies to FreeNoise: give `context_length` too")));
        }
    }
    let context = (length > 0).then(|| {
        ContextWindows::new(
            length,
            stride.map_or(ContextWindows::DEFAULT_STRIDE, |s| s as usize),
            weighting.unwrap_or_default(),
        )
    });
    if let Some(c) = &context {
        c.validate(num_frames).map_err(|e| ApiError::bad("context_length", e.to_string()))?;
    }
    let prompts = keyframes(fields, "prompts", "prompt", num_frames, limits)?;
    let negative_prompts = keyframes(fields, "negative_prompts", "negative_prompt", num_frames, limits)?;
    Ok(LongVideo { context, prompts, negative_prompts })
}

/// A keyframe field (`prompts`, `negative_prompts`): an object of frame → text (a JSON string of
/// one in multipart) for the keyframes after frame 0, whose text is the `frame0` field's.
fn keyframes(
    fields: &Fields,
    name: &str,
    frame0: &str,
    num_frames: usize,
    limits: &Limits,
) -> Result<BTreeMap<usize, String>, ApiError> {
    let shape = || {
        ApiError::bad(
            name,
            format!("`{name}` must be an object of keyframe → prompt, as {{\"16\": \"a red car\"}} (frames 0-based)"),
        )
    };
    let object = match fields.0.get(name) {
        None => serde_json::Map::new(),
        Some(Value::Object(map)) => map.clone(),
        // Multipart sends the object as a JSON string.
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            _ => return Err(shape()),
        },
        Some(_) => return Err(shape()),
    };
    let mut prompts = BTreeMap::new();
    for (key, text) in &object {
        let bad = |m: String| ApiError::bad(name, m);
        let frame = key.trim().parse::<usize>().map_err(|_| shape())?;
        let Value::String(text) = text else {
            return Err(bad(format!("`{name}` at frame {frame} must be a string")));
        };
        if frame == 0 {
            return Err(bad(format!("frame 0's text is `{frame0}`: give keyframes from frame 1 on")));
        }
        if frame >= num_frames {
            return Err(bad(format!(
                "the keyframe {frame} is past the last frame ({}): keyframes are 0-based",
                num_frames - 1
            )));
        }
        if text.chars().count() > limits.max_prompt_chars {
            return Err(bad(format!(
                "the text at frame {frame} of `{name}` is longer than {} characters",
                limits.max_prompt_chars
            )));
        }
        prompts.insert(frame, text.clone());
    }
    Ok(prompts)
}

/// The LoRAs a request picks (`lora`, as vLLM-Omni spells it: a name, an object
/// `{"name", "scale"}` with its other spellings `lora_name`/`adapter` and `lora_scale`, or a list
/// of them) from the server's `--lora-dir`, recorded in `settings` (path, SHA-256, weight).
pub fn with_loras(
    fields: &Fields,
    mut settings: RunSettings,
    available: &BTreeMap<String, std::path::PathBuf>,
) -> Result<RunSettings, ApiError> {
    let Some(value) = fields.0.get("lora") else { return Ok(settings) };
    let bad = |m: String| ApiError::bad("lora", m);
    let names = || {
        if available.is_empty() {
            "this server has none (start it with --lora-dir DIR)".to_string()
        } else {
            format!("this server has: {}", available.keys().cloned().collect::<Vec<_>>().join(", "))
        }
    };
    let parsed = match value {
        // Multipart: a name, or the JSON of an object or a list.
        Value::String(t) if t.trim_start().starts_with(['{', '[']) => {
            serde_json::from_str::<Value>(t).map_err(|e| bad(format!("`lora` is not valid JSON: {e}")))?
        }
        other => other.clone(),
    };
    let items = match parsed {
        Value::Array(list) => list,
        one => vec![one],
    };
    if items.len() > 8 {
        return Err(bad("at most 8 LoRAs a job".into()));
    }
    for item in items {
        let (name, scale) = match &item {
            Value::String(name) => (name.clone(), 1.0),
            Value::Object(o) => {
                let pick = |keys: &[&str]| keys.iter().find_map(|k| o.get(*k).filter(|v| !v.is_null()));
                if pick(&["path", "lora_path", "local_path"]).is_some() {
                    return Err(bad(format!(
                        "this server loads LoRAs by name, not by path: give `name` ({})",
                        names()
                    )));
                }
                let name = match pick(&["name", "lora_name", "adapter"]) {
                    Some(Value::String(n)) => n.clone(),
                    _ => return Err(bad(format!("`lora` needs a `name` ({})", names()))),
                };
                let scale = match pick(&["scale", "lora_scale"]) {
                    None => 1.0,
                    Some(v) => v
                        .as_f64()
                        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                        .filter(|s| s.is_finite() && s.abs() <= 10.0)
                        .ok_or_else(|| bad(format!("the LoRA scale must be a number from -10 to 10, got {v}")))?,
                };
                (name, scale)
            }
            other => return Err(bad(format!("`lora` must be a name or an object with `name`, got {other}"))),
        };
        let path = available.get(&name).ok_or_else(|| bad(format!("no LoRA `{name}`: {}", names())))?;
        let spec = t2v::lora::LoraSpec::new(path, scale);
        let lora = t2v_settings::LoraSettings::of(&spec)
            .map_err(|e| ApiError::internal(format!("reading the LoRA {name}: {e:#}")))?;
        settings.loras.push(lora);
    }
    Ok(settings)
}

/// The second pass of zeroscope's recipe, when the request asks for it: `upscale` as `true`, or
/// an object with `size` ("WxH") or `width`/`height` (default: the upscale model's native size),
/// `strength` (default [`t2v::params::DEFAULT_UPSCALE_STRENGTH`]) and `num_inference_steps`
/// (default the first pass's). Checked against the `--upscale-model` here, as the worker runs it
/// (its sizes, the strength against the steps, the cost cap).
pub fn with_upscale(
    fields: &Fields,
    mut settings: RunSettings,
    upscale: Option<&(std::path::PathBuf, ModelInfo)>,
    limits: &Limits,
) -> Result<RunSettings, ApiError> {
    let bad = |m: String| ApiError::bad("upscale", m);
    let parsed = match fields.0.get("upscale") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(settings),
        Some(Value::Bool(true)) => Value::Object(Default::default()),
        Some(Value::String(t)) => match t.trim() {
            "" | "false" => return Ok(settings),
            "true" => Value::Object(Default::default()),
            json if json.starts_with('{') => {
                serde_json::from_str(json).map_err(|e| bad(format!("`upscale` is not valid JSON: {e}")))?
            }
            other => return Err(bad(format!("`upscale` must be true or an object, got `{other}`"))),
        },
        Some(other) => other.clone(),
    };
    let Value::Object(options) = parsed else {
        return Err(bad(format!("`upscale` must be true or an object, got {parsed}")));
    };
    let Some((folder, model)) = upscale else {
        return Err(bad("this server has no upscale model: its operator starts it with --upscale-model MODEL".into()));
    };
    if let Some(unknown) =
        options.keys().find(|k| !["size", "width", "height", "strength", "num_inference_steps"].contains(&k.as_str()))
    {
        return Err(bad(format!(
            "unknown `upscale` field `{unknown}`: give size (WxH), width, height, strength, num_inference_steps"
        )));
    }
    let inner = Fields(options.into_iter().collect());
    let (mut width, mut height) = (model.native_width, model.native_height);
    if let Some(size) = inner.string("size").map_err(|e| bad(e.message))? {
        (width, height) = parse_size(&size).ok_or_else(|| bad(format!("`upscale.size` must be WxH, got `{size}`")))?;
    }
    let side =
        |name: &str| inner.whole(name, 1, limits.max_side as u64).map_err(|e| bad(format!("upscale.{}", e.message)));
    width = side("width")?.map_or(width, |v| v as usize);
    height = side("height")?.map_or(height, |v| v as usize);
    let strength = inner
        .real("strength", 0.0, 1.0)
        .map_err(|e| bad(format!("upscale.{}", e.message)))?
        .unwrap_or(t2v::params::DEFAULT_UPSCALE_STRENGTH);
    let steps = inner
        .whole("num_inference_steps", 1, limits.max_steps as u64)
        .map_err(|e| bad(format!("upscale.{}", e.message)))?
        .map_or(settings.steps, |v| v as usize);
    strength_begin_index(steps, strength).map_err(|e| bad(format!("upscale.strength: {e}")))?;
    // The second pass as the worker runs it, checked against the upscale model's configs.
    let mut second = t2v::pipeline::GenerationParams::new(settings.prompt.clone(), settings.seed);
    settings.apply_to(&mut second).map_err(|e| bad(e.to_string()))?;
    second.num_inference_steps = steps;
    (second.height, second.width) = (Some(height), Some(width));
    t2v::pipeline::check_params(folder, &second).map_err(|e| {
        bad(format!(
            "the upscale model cannot run it: {}",
            e.to_string().replace(&folder.display().to_string(), &model.name)
        ))
    })?;
    let run = steps - strength_begin_index(steps, strength).unwrap_or(0);
    let cost = job_cost(settings.num_frames, height, width, run);
    if cost > limits.max_job_cost as u128 {
        return Err(bad(format!(
            "the second pass ({} frames of {width}x{height}, {run} steps) costs {cost}, over this server's limit of {} \
             (frames × height × width × steps): ask for a smaller size, fewer steps or frames",
            settings.num_frames, limits.max_job_cost
        )));
    }
    settings.upscale =
        Some(t2v_settings::UpscaleSettings { model: model.name.clone(), height, width, strength, steps });
    Ok(settings)
}

/// Refuses a run the worker's scheduler would refuse (too many steps for DPM-Solver's schedule
/// on this checkpoint, say): the scheduler of the run built from the model's own config, as the
/// worker builds it.
pub fn check_schedule(settings: &RunSettings, config: Option<&(Value, std::path::PathBuf)>) -> Result<(), ApiError> {
    let Some((json, path)) = config else { return Ok(()) };
    let kind = settings.scheduler.parse::<SchedulerKind>().map_err(|e| ApiError::bad("scheduler", e.to_string()))?;
    t2v::schedulers::build_scheduler(kind, json, path, settings.steps, settings.eta).map(|_| ()).map_err(|e| {
        let message = e.to_string().replace(&path.display().to_string(), "scheduler_config.json");
        ApiError::bad(
            "num_inference_steps",
            format!("the {} scheduler cannot run {} steps on this model: {message}", kind.name(), settings.steps),
        )
    })
}

/// "WxH" → (width, height).
fn parse_size(s: &str) -> Option<(usize, usize)> {
    let (w, h) = s.trim().split_once(['x', 'X', '×'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

/// `seconds` as the API writes it: "2", "1.5".
pub fn seconds_string(frames: usize, fps: u32) -> String {
    let s = frames as f64 / fps.max(1) as f64;
    let text = format!("{s:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The settings of the run a request asks for, the seed filled in (`random_seed` when absent).
pub fn parse(fields: &Fields, model: &ModelInfo, limits: &Limits, random_seed: u64) -> Result<RunSettings, ApiError> {
    let prompt = fields.string("prompt")?.unwrap_or_default();
    if prompt.trim().is_empty() {
        return Err(ApiError::bad("prompt", "`prompt` is required: say what the video shows"));
    }
    if prompt.chars().count() > limits.max_prompt_chars {
        return Err(ApiError::bad("prompt", format!("`prompt` is longer than {} characters", limits.max_prompt_chars)));
    }
    if let Some(m) = fields.string("model")? {
        if m != model.name && m != model.spec && m != "t2v" {
            return Err(ApiError::bad(
                "model",
                format!("this server runs the model `{}`, not `{m}` (or leave `model` out)", model.name),
            ));
        }
    }
    let video_field = VIDEO_FIELDS.iter().find(|f| fields.has(f));
    if fields.has("input_reference") || video_field.is_some() {
        if !model.video_to_video {
            let param = if fields.has("input_reference") { "input_reference" } else { video_field.unwrap() };
            return Err(ApiError::unprocessable(
                param,
                "video-to-video is not available on this server: leave out `input_reference` and `strength`",
            ));
        }
        if let (false, Some(name)) = (fields.has("input_reference"), video_field) {
            return Err(ApiError::bad(
                name,
                format!("`{name}` applies to video-to-video: give the input video in `input_reference` too"),
            ));
        }
    }
    let negative_prompt = fields.string("negative_prompt")?;
    let seed = fields.whole("seed", 0, u64::MAX)?.unwrap_or(random_seed);
    let steps = fields.whole("num_inference_steps", 1, limits.max_steps as u64)?.map_or(DEFAULT_STEPS, |v| v as usize);
    let guidance_scale = fields.real("guidance_scale", 0.0, 100.0)?.unwrap_or(DEFAULT_GUIDANCE);
    let scheduler = match fields.string("scheduler")? {
        None => SchedulerKind::DpmSolverMultistep,
        Some(s) => SchedulerKind::parse(&s).map_err(|_| {
            ApiError::bad(
                "scheduler",
                format!("`scheduler` must be `dpm`, `ddim`, `lcm`, `unipc`, `euler` or `euler_a`, got `{s}`"),
            )
        })?,
    };
    if !scheduler.guides_with_negative() {
        // T2V-Turbo's sampler needs its UNet loaded with the guidance embedding (`cond_proj`);
        // the service loads the model as published.
        return Err(ApiError::bad(
            "scheduler",
            "the t2v-turbo sampler needs T2V-Turbo's UNet (its guidance embedding): run it with `t2v generate \
             --scheduler t2v-turbo --lora unet_lora.pt`; this server runs dpm, ddim, lcm, unipc, euler and euler_a",
        ));
    }
    let eta = fields.real("eta", 0.0, 1.0)?.unwrap_or(0.0);
    let fps = fields.whole("fps", 1, 60)?.map_or(t2v::video::DEFAULT_FPS, |v| v as u32);

    let (mut width, mut height) = (model.native_width, model.native_height);
    if let Some(size) = fields.string("size")? {
        (width, height) = parse_size(&size).ok_or_else(|| {
            ApiError::bad(
                "size",
                format!(
                    "`size` must be WIDTHxHEIGHT in pixels, as \"{}x{}\", got \"{size}\"",
                    model.native_width, model.native_height
                ),
            )
        })?;
    }
    let scale = model.vae_scale as u64;
    let side = |name: &str, v: usize| -> Result<usize, ApiError> {
        if v == 0 || !(v as u64).is_multiple_of(scale) || v > limits.max_side {
            let param = if fields.has(name) { name } else { "size" };
            return Err(ApiError::bad(
                param,
                format!(
                    "the {name} must be a multiple of {scale} (the model's VAE scale) from {scale} to {}, got {v}",
                    limits.max_side
                ),
            ));
        }
        Ok(v)
    };
    width = side("width", fields.whole("width", 0, u32::MAX as u64)?.map_or(width, |v| v as usize))?;
    height = side("height", fields.whole("height", 0, u32::MAX as u64)?.map_or(height, |v| v as usize))?;

    let seconds = fields.real("seconds", 0.0, 3600.0)?;
    let num_frames = match (fields.whole("num_frames", 1, limits.max_frames as u64)?, seconds) {
        (Some(n), _) => n as usize,
        (None, Some(s)) => {
            let n = (s * fps as f64).round() as usize;
            if n == 0 || n > limits.max_frames {
                return Err(ApiError::bad(
                    "seconds",
                    format!(
                        "`seconds` × fps ({s} × {fps}) gives {n} frames; from 1 to {} are possible",
                        limits.max_frames
                    ),
                ));
            }
            n
        }
        (None, None) => DEFAULT_FRAMES,
    };
    let long = long_video(fields, num_frames, limits)?;

    let params = GenerationParams {
        prompt,
        negative_prompt,
        seed,
        num_inference_steps: steps,
        guidance_scale,
        scheduler,
        eta,
        num_frames,
        height: Some(height),
        width: Some(width),
        long,
    };
    // The library's own checks, last: what they refuse is a bad request too.
    pipeline::validate_params(&params, height, width, model.vae_scale)
        .map_err(|e| ApiError::bad_request(None, e.to_string()))?;
    let mut settings = RunSettings::new(&model.spec, &params, height, width, fps, candle_core::DType::F32);
    settings.dtype = model.dtype.clone();
    if !fields.has("input_reference") {
        check_cost(&settings, None, limits)?;
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelInfo {
        ModelInfo {
            spec: "/m/tiny".into(),
            name: "tiny".into(),
            native_width: 256,
            native_height: 256,
            vae_scale: 8,
            dtype: "f32".into(),
            video_to_video: false,
        }
    }

    fn limits() -> Limits {
        Limits {
            max_frames: 64,
            max_side: 1024,
            max_steps: 200,
            max_prompt_chars: 100,
            max_json_bytes: 1 << 20,
            max_upload_bytes: 1 << 20,
            max_job_cost: 1 << 40,
            max_queued: 100,
            max_source_pixels: MAX_SOURCE_PIXELS,
            max_source_frames: MAX_SOURCE_FRAMES,
        }
    }

    fn fields(v: Value) -> Result<Fields, ApiError> {
        Fields::new(serde_json::from_value(v).unwrap())
    }

    fn parse_json(v: Value) -> Result<RunSettings, ApiError> {
        parse(&fields(v)?, &model(), &limits(), 42)
    }

    #[test]
    fn strings_and_numbers_and_defaults() {
        // Multipart sends every field as a string.
        let s = parse_json(serde_json::json!({"prompt": "a corgi", "size": "320x192", "seconds": "1.5", "seed": "18446744073709551615", "fps": "10"})).unwrap();
        assert_eq!((s.width, s.height, s.num_frames, s.fps, s.seed), (320, 192, 15, 10, u64::MAX));
        assert_eq!((s.steps, s.guidance_scale, s.scheduler.as_str()), (DEFAULT_STEPS, DEFAULT_GUIDANCE, "dpm"));
        let s = parse_json(serde_json::json!({"prompt": "x", "num_frames": 8, "seconds": 9, "width": 128, "guidance_scale": 7.5, "scheduler": "ddim", "eta": 0.5, "negative_prompt": ""})).unwrap();
        assert_eq!((s.width, s.height, s.num_frames, s.seed, s.guidance_scale, s.eta), (128, 256, 8, 42, 7.5, 0.5));
        assert_eq!(s.negative_prompt, None);
        assert_eq!(seconds_string(15, 10), "1.5");
        assert_eq!(seconds_string(16, 8), "2");
    }

    #[test]
    fn each_error_names_its_field() {
        let param = |v: Value| parse_json(v).err().map(|e| (e.status.as_u16(), e.param.unwrap_or_default()));
        assert_eq!(param(serde_json::json!({"prompt": ""})), Some((400, "prompt".into())));
        assert_eq!(param(serde_json::json!({"prompt": "x", "size": "big"})), Some((400, "size".into())));
        assert_eq!(param(serde_json::json!({"prompt": "x", "size": "100x64"})), Some((400, "size".into())));
        assert_eq!(param(serde_json::json!({"prompt": "x", "width": 100})), Some((400, "width".into())));
        assert_eq!(
            param(serde_json::json!({"prompt": "x", "num_inference_steps": 0})),
            Some((400, "num_inference_steps".into()))
        );
        assert_eq!(param(serde_json::json!({"prompt": "x", "num_frames": "2.5"})), Some((400, "num_frames".into())));
        assert_eq!(
            param(serde_json::json!({"prompt": "x", "guidance_scale": "-1"})),
            Some((400, "guidance_scale".into()))
        );
        assert_eq!(param(serde_json::json!({"prompt": "x", "scheduler": "heun"})), Some((400, "scheduler".into())));
        assert_eq!(param(serde_json::json!({"prompt": "x", "seconds": 100})), Some((400, "seconds".into())));
        assert_eq!(param(serde_json::json!({"prompt": "x", "model": "sora-2"})), Some((400, "model".into())));
        assert_eq!(param(serde_json::json!({"prompt": "x", "colour": "red"})), Some((400, "colour".into())));
        // As other servers read a request: unknown fields ignored, nested ones merged.
        let map = serde_json::from_value(serde_json::json!({"prompt": "x", "colour": "red", "seconds": 2,
            "extra_params": {"num_inference_steps": 3, "seed": 9, "guidance_scale": 1.0, "shift": 5},
            "video_params": {"fps": 4, "width": 64}, "guidance_scale": 7.0}))
        .unwrap();
        let (f, mut ignored) = Fields::from_request(map).unwrap();
        ignored.sort();
        assert_eq!(ignored, ["colour", "shift"]);
        let s = parse(&f, &model(), &limits(), 42).unwrap();
        assert_eq!((s.steps, s.seed, s.guidance_scale, s.fps, s.num_frames, s.width), (3, 9, 7.0, 4, 8, 64));
        let map = serde_json::from_value(serde_json::json!({"prompt": "x", "extra_params": "[1]"})).unwrap();
        assert_eq!(Fields::from_request(map).err().and_then(|e| e.param), Some("extra_params".into()));
        assert_eq!(param(serde_json::json!({"prompt": 3})), Some((400, "prompt".into())));
        assert_eq!(param(serde_json::json!({"prompt": "x", "strength": 0.5})), Some((422, "strength".into())));
        assert!(parse_json(serde_json::json!({"prompt": "x", "model": "tiny"})).is_ok());
        // 2^64 is one past the largest seed, as a number or a string.
        let over: Value = serde_json::from_str(r#"{"prompt": "x", "seed": 18446744073709551616}"#).unwrap();
        assert_eq!(param(over), Some((400, "seed".into())));
        assert_eq!(
            param(serde_json::json!({"prompt": "x", "seed": "18446744073709551616"})),
            Some((400, "seed".into()))
        );
        assert_eq!(param(serde_json::json!({"prompt": "x", "seed": -1})), Some((400, "seed".into())));
    }

    #[test]
    fn the_cost_cap_says_its_limit() {
        let limits = Limits { max_job_cost: 256 * 256 * 16 * 25, ..limits() };
        let f = |v: Value| parse(&fields(v).unwrap(), &model(), &limits, 42);
        assert!(f(serde_json::json!({"prompt": "x"})).is_ok());
        let e = f(serde_json::json!({"prompt": "x", "num_inference_steps": 26})).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, Some("job_too_large")));
        assert!(e.message.contains(&limits.max_job_cost.to_string()), "{}", e.message);
    }

    #[test]
    fn long_video_fields() {
        let s = parse_json(serde_json::json!({"prompt": "a red ball", "num_frames": 32, "context_length": 16,
            "context_weighting": "flat", "prompts": {"20": "a blue cube"}}))
        .unwrap();
        assert_eq!(
            (s.context_length, s.context_stride, s.context_weighting.as_deref()),
            (Some(16), Some(4), Some("flat"))
        );
        assert_eq!(s.prompts.get(&20).map(String::as_str), Some("a blue cube"));
        let s = parse_json(serde_json::json!({"prompt": "a red ball", "num_frames": 32, "context_length": 16,
            "negative_prompts": {"12": "blurry"}}))
        .unwrap();
        assert_eq!(s.negative_prompts.get(&12).map(String::as_str), Some("blurry"));
        // Multipart: strings, the keyframes as a JSON string.
        let s = parse_json(serde_json::json!({"prompt": "x", "num_frames": "24", "context_length": "8",
            "context_stride": "2", "prompts": "{\"8\": \"y\"}"}))
        .unwrap();
        assert_eq!((s.context_length, s.context_stride), (Some(8), Some(2)));
        assert_eq!(s.prompts.len(), 1);
        let off = parse_json(serde_json::json!({"prompt": "x", "context_length": 0})).unwrap();
        assert_eq!(off.context_length, None);
        let param = |v: Value| parse_json(v).err().map(|e| (e.status.as_u16(), e.param.unwrap_or_default()));
        let bad = [
            (serde_json::json!({"prompt": "x", "num_frames": 8, "context_length": 16}), "context_length"),
            (
                serde_json::json!({"prompt": "x", "num_frames": 8, "context_length": 4, "context_stride": 5}),
                "context_length",
            ),
            (serde_json::json!({"prompt": "x", "context_stride": 2}), "context_stride"),
            (serde_json::json!({"prompt": "x", "context_length": 8, "context_weighting": "ramp"}), "context_weighting"),
            (serde_json::json!({"prompt": "x", "num_frames": 8, "prompts": {"8": "y"}}), "prompts"),
            (serde_json::json!({"prompt": "x", "num_frames": 8, "negative_prompts": {"0": "y"}}), "negative_prompts"),
            (serde_json::json!({"prompt": "x", "num_frames": 8, "negative_prompts": ["y"]}), "negative_prompts"),
            (serde_json::json!({"prompt": "x", "prompts": {"0": "y"}}), "prompts"),
            (serde_json::json!({"prompt": "x", "prompts": {"a": "y"}}), "prompts"),
            (serde_json::json!({"prompt": "x", "prompts": ["y"]}), "prompts"),
            (serde_json::json!({"prompt": "x", "prompts": {"3": 4}}), "prompts"),
        ];
        for (v, field) in bad {
            assert_eq!(param(v.clone()), Some((400, field.into())), "{v}");
        }
    }

    #[test]
    fn video_to_video_options() {
        let model = ModelInfo { video_to_video: true, ..model() };
        let request = |v: Value| -> Result<Option<VideoRequest>, ApiError> {
            let f = fields(v)?;
            let settings = parse(&f, &model, &limits(), 42)?;
            video_request(&f, &settings)
        };
        assert_eq!(request(serde_json::json!({"prompt": "x"})).unwrap(), None);
        let v =
            request(serde_json::json!({"prompt": "x", "input_reference": "a.mp4", "size": "64x32"})).unwrap().unwrap();
        assert_eq!(
            (v.strength, v.read.size, v.read.num_frames, v.read.fit),
            (DEFAULT_STRENGTH, Some((64, 32)), None, Fit::Resize)
        );
        let v = request(serde_json::json!({"prompt": "x", "input_reference": "a.mp4", "strength": "1", "seconds": "1",
            "video_start": "3", "video_every": "2", "video_fit": "pad"}))
        .unwrap()
        .unwrap();
        assert_eq!(
            (v.strength, v.read.num_frames, v.read.start_frame, v.read.every, v.read.fit),
            (1.0, Some(8), 3, 2, Fit::Pad)
        );
        let param = |v: Value| request(v).err().map(|e| (e.status.as_u16(), e.param.unwrap_or_default()));
        for s in ["0", "1.01", "x"] {
            let v = serde_json::json!({"prompt": "x", "input_reference": "a.mp4", "strength": s});
            assert_eq!(param(v), Some((400, "strength".into())), "{s}");
        }
        // int(25 × 0.03) = 0 steps would run.
        let v = serde_json::json!({"prompt": "x", "input_reference": "a.mp4", "strength": 0.03});
        assert_eq!(param(v), Some((400, "strength".into())));
        assert_eq!(param(serde_json::json!({"prompt": "x", "video_every": 2})), Some((400, "video_every".into())));
        let v = serde_json::json!({"prompt": "x", "input_reference": "a.mp4", "video_fit": "zoom"});
        assert_eq!(param(v), Some((400, "video_fit".into())));
    }
}
