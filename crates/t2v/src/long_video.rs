//! Long videos: FreeNoise (Qiu et al. 2023, arXiv 2310.15169) and prompt travel, exactly as
//! diffusers' own parts compute them (`FreeNoiseTransformerBlock` in `models/attention.py`, the
//! noise and prompt rules of `AnimateDiffFreeNoiseMixin` in `pipelines/free_noise_utils.py`),
//! applied to the text-to-video UNet:
//!
//! * the initial noise of the first window is reused, shuffled, for every later stride of frames
//!   ([`shuffle_context`]);
//! * every temporal transformer block attends within windows of `length` frames, `stride` apart,
//!   and the windows' outputs are fused with per-frame weights ([`WindowPlan`]);
//! * a prompt per keyframe, the text embeddings interpolated per frame ([`interpolate_keyframes`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::noise::TorchGenerator;

/// How the overlapping windows' outputs are weighted per frame when fused (diffusers'
/// `weighting_scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContextWeighting {
    /// 1, 2, …, up to the middle and back down: frames near a window's centre count most.
    #[default]
    Pyramid,
    /// Every frame of every window counts the same.
    Flat,
    /// 0.01 for the first half (less one frame), then the middle value down to 1.
    DelayedReverseSawtooth,
}

impl ContextWeighting {
    pub const ALL: [ContextWeighting; 3] =
        [ContextWeighting::Pyramid, ContextWeighting::Flat, ContextWeighting::DelayedReverseSawtooth];

    pub fn as_str(self) -> &'static str {
        match self {
            ContextWeighting::Pyramid => "pyramid",
            ContextWeighting::Flat => "flat",
            ContextWeighting::DelayedReverseSawtooth => "delayed_reverse_sawtooth",
        }
    }

    /// `FreeNoiseTransformerBlock._get_frame_weights(length, scheme)`, as float32. `None` where
    /// diffusers' list does not have `length` entries (the sawtooth of an odd length has one
    /// more, which its broadcast then refuses).
    pub fn weights(self, length: usize) -> Option<Vec<f32>> {
        let w: Vec<f64> = match self {
            ContextWeighting::Flat => vec![1.0; length],
            ContextWeighting::Pyramid => {
                if length.is_multiple_of(2) {
                    let half: Vec<f64> = (1..=length / 2).map(|v| v as f64).collect();
                    half.iter().chain(half.iter().rev()).copied().collect()
                } else {
                    let mid = length.div_ceil(2);
                    let half: Vec<f64> = (1..mid).map(|v| v as f64).collect();
                    half.iter().copied().chain([mid as f64]).chain(half.iter().rev().copied()).collect()
                }
            }
            ContextWeighting::DelayedReverseSawtooth => {
                if length.is_multiple_of(2) {
                    let mid = length / 2;
                    let mut w = vec![0.01; mid.saturating_sub(1)];
                    w.push(mid as f64);
                    w.extend((1..=mid).rev().map(|v| v as f64));
                    w
                } else {
                    let mid = length.div_ceil(2);
                    let mut w = vec![0.01; mid];
                    w.extend((1..=mid).rev().map(|v| v as f64));
                    w
                }
            }
        };
        (w.len() == length).then(|| w.into_iter().map(|v| v as f32).collect())
    }
}

impl fmt::Display for ContextWeighting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ContextWeighting {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase().replace('-', "_");
        ContextWeighting::ALL.into_iter().find(|w| w.as_str() == s).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown context weighting `{s}`: use pyramid, flat or delayed_reverse_sawtooth"
            ))
        })
    }
}

/// FreeNoise's sliding windows: the temporal attention sees `length` frames at a time, the
/// windows start `stride` frames apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextWindows {
    pub length: usize,
    pub stride: usize,
    pub weighting: ContextWeighting,
}

impl ContextWindows {
    /// diffusers' `enable_free_noise` defaults: 16 frames, stride 4, pyramid weights.
    pub const DEFAULT_LENGTH: usize = 16;
    pub const DEFAULT_STRIDE: usize = 4;

    pub fn new(length: usize, stride: usize, weighting: ContextWeighting) -> Self {
        Self { length, stride, weighting }
    }

    /// Checks the windows against a video of `frames` frames, saying what fits.
    pub fn validate(&self, frames: usize) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.length == 0 {
            return bad("the context length must be at least 1 frame".into());
        }
        if self.length > frames {
            return bad(format!(
                "the context length ({}) is longer than the video ({frames} frames): use a context length of at most {frames}, or more frames",
                self.length
            ));
        }
        if self.stride == 0 {
            return bad(format!(
                "the context stride must be at least 1 frame (at most the context length, {})",
                self.length
            ));
        }
        // Frames between windows would be in none (diffusers leaves them zero).
        if self.stride > self.length {
            return bad(format!(
                "the context stride ({}) is larger than the context length ({}): windows would skip frames; use a stride of 1 to {}",
                self.stride, self.length, self.length
            ));
        }
        if self.weighting.weights(self.length).is_none() {
            return bad(format!(
                "the {} weighting needs an even context length (diffusers' weights for {} frames have {} entries): use {} or {}",
                self.weighting,
                self.length,
                self.length + 1,
                self.length - 1,
                self.length + 1
            ));
        }
        Ok(())
    }

    /// The windows of a `frames`-frame video and their weights; see [`WindowPlan`].
    pub fn plan(&self, frames: usize) -> Result<WindowPlan> {
        self.validate(frames)?;
        WindowPlan::new(frames, self)
    }
}

/// One window of a [`WindowPlan`]: frames `[start, start + length)` run through the attentions;
/// frames from `start + skip` on are accumulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub skip: usize,
}

/// Where the windows of a video lie and how their outputs are fused, as
/// `FreeNoiseTransformerBlock.forward` does: windows at 0, S, 2S, … while they fit, then a tail
/// window ending at the last frame when the last one does not. diffusers' quirk is kept: of the
/// tail window only the frames past the last full window are accumulated, and their weight sums
/// grow by the single weight `weights[length − L]` (L those frames' count), not each frame's own.
#[derive(Debug, Clone)]
pub struct WindowPlan {
    pub frames: usize,
    pub length: usize,
    pub windows: Vec<Window>,
    /// Per frame of a window, the weight of its output.
    pub weights: Vec<f32>,
    /// Per frame of the video, the sum its weighted outputs are divided by.
    pub weight_sums: Vec<f32>,
    /// Per frame of the video, the sum of the weights its outputs were multiplied by: equal to
    /// `weight_sums` except on the tail window's frames (the quirk above).
    pub applied_sums: Vec<f32>,
}

impl WindowPlan {
    fn new(frames: usize, windows: &ContextWindows) -> Result<Self> {
        let (length, stride) = (windows.length, windows.stride);
        let weights = windows.weighting.weights(length).ok_or_else(|| {
            Error::InvalidArgument(format!("no {} weights for a context length of {length}", windows.weighting))
        })?;
        let mut list: Vec<Window> =
            (0..=frames - length).step_by(stride).map(|start| Window { start, skip: 0 }).collect();
        let mut sums = vec![0f32; frames];
        for w in &list {
            for (j, &wt) in weights.iter().enumerate() {
                sums[w.start + j] += wt;
            }
        }
        let mut applied = sums.clone();
        let covered = list.last().map_or(0, |w| w.start + length);
        if covered < frames {
            let tail = frames - covered;
            let skip = length - tail;
            list.push(Window { start: frames - length, skip });
            for s in &mut sums[covered..] {
                *s += weights[skip];
            }
            for (a, &wt) in applied[covered..].iter_mut().zip(&weights[skip..]) {
                *a += wt;
            }
        }
        Ok(Self { frames, length, windows: list, weights, weight_sums: sums, applied_sums: applied })
    }
}

/// The settings of a long video: FreeNoise's windows and the keyframe prompts. The default is
/// off: one prompt for all frames and temporal attention over the whole video.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LongVideo {
    /// FreeNoise: the shuffled noise and the windowed temporal attention.
    pub context: Option<ContextWindows>,
    /// Prompt travel: the prompts of keyframes after frame 0 (frame 0's is the prompt).
    pub prompts: BTreeMap<usize, String>,
    /// The negative prompts of keyframes after frame 0 (frame 0's is the negative prompt).
    pub negative_prompts: BTreeMap<usize, String>,
}

impl LongVideo {
    pub fn is_off(&self) -> bool {
        self.context.is_none() && !self.travels()
    }

    /// Whether the prompt or the negative prompt changes along the video.
    pub fn travels(&self) -> bool {
        !self.prompts.is_empty() || !self.negative_prompts.is_empty()
    }

    /// Checks everything against a video of `frames` frames before any work.
    pub fn validate(&self, frames: usize) -> Result<()> {
        if let Some(c) = &self.context {
            c.validate(frames)?;
        }
        for (what, map) in [("prompt", &self.prompts), ("negative prompt", &self.negative_prompts)] {
            if map.contains_key(&0) {
                return Err(Error::InvalidArgument(format!(
                    "a keyframe {what} at frame 0: frame 0's {what} is the {what} itself; give keyframes from frame 1 on"
                )));
            }
            if let Some((&last, _)) = map.iter().next_back() {
                if last >= frames {
                    return Err(Error::InvalidArgument(format!(
                        "a keyframe {what} at frame {last} is past the last frame ({}): keyframes are 0-based, 1 to {}",
                        frames.saturating_sub(1),
                        frames.saturating_sub(1)
                    )));
                }
            }
        }
        Ok(())
    }
}

/// FreeNoise's `shuffle_context` noise (`_prepare_latents_free_noise`): for `i` in
/// `range(length, frames, stride)`, the frames `[i − length, min(frames, i − length + stride))`
/// (n of them), permuted by `torch.randperm(n, generator)`, are copied to `[i, min(frames, i + n))`
/// (the permutation's first frames when they do not all fit). `latents`: (batch, C, frames, h, w).
pub fn shuffle_context(latents: &Tensor, generator: &mut TorchGenerator, windows: &ContextWindows) -> Result<Tensor> {
    let (b, c, frames, h, w) = latents.dims5()?;
    let (length, stride) = (windows.length, windows.stride);
    if length == 0 || stride == 0 || length >= frames {
        return Ok(latents.clone());
    }
    let dtype = latents.dtype();
    let device = latents.device().clone();
    let plane = h * w;
    let mut data = latents.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let frame_at = |bi: usize, ci: usize, f: usize| ((bi * c + ci) * frames + f) * plane;
    let mut i = length;
    while i < frames {
        let start = i - length;
        let end = frames.min(start + stride);
        let n = end - start;
        let perm = generator.randperm(n);
        let count = frames.min(i + n) - i;
        // The reference gathers all sources before writing.
        let sources: Vec<usize> = perm[..count].iter().map(|&p| start + p).collect();
        for bi in 0..b {
            for ci in 0..c {
                let gathered: Vec<f32> = sources
                    .iter()
                    .flat_map(|&s| data[frame_at(bi, ci, s)..frame_at(bi, ci, s) + plane].to_vec())
                    .collect();
                let to = frame_at(bi, ci, i);
                data[to..to + count * plane].copy_from_slice(&gathered);
            }
        }
        i += stride;
    }
    Ok(Tensor::from_vec(data, (b, c, frames, h, w), &Device::Cpu)?.to_device(&device)?.to_dtype(dtype)?)
}

/// The keyframes' text embeddings interpolated per frame, as `_encode_prompt_free_noise` with its
/// default `_lerp`: `keyframes` maps frames (0 first) to (1, tokens, D) embeddings; the last one
/// is repeated at `frames − 1`; between neighbouring keyframes a and b (both included) frame
/// a + i gets `(1 − α)·E_a + α·E_b` with α = i / (b − a). Returns (frames, tokens, D).
pub fn interpolate_keyframes(keyframes: &BTreeMap<usize, Tensor>, frames: usize) -> Result<Tensor> {
    if frames == 0 {
        return Err(Error::InvalidArgument("the number of frames must be at least 1".into()));
    }
    let mut keys: Vec<(usize, &Tensor)> = keyframes.iter().map(|(&k, t)| (k, t)).collect();
    match keys.first() {
        Some(&(0, _)) => {}
        _ => return Err(Error::InvalidArgument("prompt travel needs a prompt at frame 0".into())),
    }
    let &(last_frame, last) = keys.last().expect("non-empty");
    if last_frame >= frames {
        return Err(Error::InvalidArgument(format!(
            "a keyframe at {last_frame} is past the last frame ({})",
            frames - 1
        )));
    }
    if last_frame != frames - 1 {
        keys.push((frames - 1, last));
    }
    if keys.len() == 1 {
        // A one-frame video: the reference's loop never runs and leaves its zeros; t2v refuses
        // nothing here and returns the prompt's embedding.
        return Ok(keys[0].1.clone());
    }
    let mut rows: Vec<Tensor> = Vec::with_capacity(frames);
    for (seg, pair) in keys.windows(2).enumerate() {
        let ((a, ea), (b, eb)) = (pair[0], pair[1]);
        let n = b - a + 1;
        // Each segment rewrites its first frame, which the previous one ended on.
        if seg > 0 {
            rows.pop();
        }
        for i in 0..n {
            let alpha = i as f64 / (n - 1) as f64;
            // torch casts the Python floats to the tensor's float32 before multiplying.
            let (wa, wb) = ((1.0 - alpha) as f32 as f64, alpha as f32 as f64);
            rows.push(((ea * wa)? + (eb * wb)?)?);
        }
    }
    Ok(Tensor::cat(&rows, 0)?)
}
