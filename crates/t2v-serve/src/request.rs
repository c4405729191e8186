//! `POST /v1/videos`: the request's fields (JSON values, or multipart strings) checked one by one
//! and turned into the settings of a run, each error naming its field.

use std::collections::BTreeMap;

use serde_json::Value;
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
];

/// The fields that apply to video-to-video only.
const VIDEO_FIELDS: &[&str] = &["strength", "video_start", "video_every", "video_fit"];

/// diffusers' `VideoToVideoSDPipeline.__call__` default, as the command line's.
pub const DEFAULT_STRENGTH: f64 = 0.6;

pub const DEFAULT_STEPS: usize = 25;
pub const DEFAULT_GUIDANCE: f64 = 9.0;
pub const DEFAULT_FRAMES: usize = 16;

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
                Some(f) if f.fract() == 0.0 && f >= 0.0 && f <= u64::MAX as f64 => f as u64,
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
    };
    // The library's own checks, last: what they refuse is a bad request too.
    pipeline::validate_params(&params, height, width, model.vae_scale)
        .map_err(|e| ApiError::bad_request(None, e.to_string()))?;
    let mut settings = RunSettings::new(&model.spec, &params, height, width, fps, candle_core::DType::F32);
    settings.dtype = model.dtype.clone();
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
        assert_eq!(param(serde_json::json!({"prompt": 3})), Some((400, "prompt".into())));
        assert_eq!(param(serde_json::json!({"prompt": "x", "strength": 0.5})), Some((422, "strength".into())));
        assert!(parse_json(serde_json::json!({"prompt": "x", "model": "tiny"})).is_ok());
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
