//! The settings of a run, as they travel with the video: written as JSON beside every output and
//! stored in the MP4's metadata, so that `t2v generate --from` can repeat the run.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pipeline::GenerationParams;
use crate::schedulers::SchedulerKind;

/// Everything that decides the frames, plus how they were written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub t2v_version: String,
    /// The model as given: a folder or a Hugging Face repo id.
    pub model: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    /// `ddim` or `dpm`.
    pub scheduler: String,
    pub guidance_scale: f64,
    #[serde(default)]
    pub eta: f64,
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
    #[serde(default = "default_fps")]
    pub fps: u32,
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_fps() -> u32 {
    8
}

fn default_dtype() -> String {
    "f32".into()
}

/// The command line's name of a scheduler.
pub fn scheduler_name(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Ddim => "ddim",
        SchedulerKind::DpmSolverMultistep => "dpm",
    }
}

impl RunSettings {
    pub fn new(model: &str, params: &GenerationParams, height: usize, width: usize, fps: u32) -> Self {
        Self {
            t2v_version: env!("CARGO_PKG_VERSION").to_string(),
            model: model.to_string(),
            prompt: params.prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            seed: params.seed,
            steps: params.num_inference_steps,
            scheduler: scheduler_name(params.scheduler).to_string(),
            guidance_scale: params.guidance_scale,
            eta: params.eta,
            num_frames: params.num_frames,
            height,
            width,
            fps,
            dtype: default_dtype(),
        }
    }

    pub fn to_params(&self) -> Result<GenerationParams> {
        Ok(GenerationParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            num_inference_steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: SchedulerKind::parse(&self.scheduler)?,
            eta: self.eta,
            num_frames: self.num_frames,
            height: Some(self.height),
            width: Some(self.width),
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("settings serialize")
    }

    pub fn from_json(text: &str, source: &Path) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Config { path: source.to_path_buf(), reason: e.to_string() })
    }

    /// Reads settings from a `.json` file that t2v wrote, or from the metadata of an MP4 it made.
    pub fn read(path: &Path) -> Result<Self> {
        let is_mp4 = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("mp4"));
        let text = if is_mp4 {
            crate::video::read_mp4_metadata(path)?.ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                reason: "this MP4 carries no t2v settings (it was not made by t2v, or its metadata was stripped)".into(),
            })?
        } else {
            std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?
        };
        Self::from_json(&text, path)
    }
}

/// Where the settings of an output are written: the output's name with `.json`.
pub fn settings_path(output: &Path) -> std::path::PathBuf {
    output.with_extension("json")
}
