//! Writing generated frames to disk: H.264 MP4, animated GIF, a folder of PNGs, or a raw `.npy` array.
//! Reading videos back in, for video-to-video, is [`input`].
//!
//! Input frames are `f32` in `(frames, height, width, 3)` row-major order with values in `[0, 1]`
//! (what the pipeline returns). Values outside `[0, 1]` are clamped (NaN becomes 0) for the 8-bit
//! formats; `.npy` stores the values exactly as given.
//!
//! Every writer is atomic: the output goes to a hidden temporary sibling
//! (`.NAME.partial-PID-N`) that is renamed onto the final path only once complete, and removed
//! on any error, so a failed or interrupted write never leaves a partial file behind.

pub(crate) mod atomic;
mod gif;
pub mod input;
mod mp4;
mod npy;
mod png;

use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};

pub use atomic::{check_replaceable_dir, remove_stale_partials, SetAside, Staged, PARTIAL_TAG};
pub use gif::gif_delay_cs;
pub use mp4::{mp4_dimensions, mp4_metadata_from, mp4_top_level_boxes, read_mp4_metadata, Mp4Encoder, Mp4Problem};
pub use npy::{npy_header, npy_header_of};

/// Frames per second used when none is given.
pub const DEFAULT_FPS: u32 = 8;

/// Output container/format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VideoFormat {
    /// H.264 (constrained baseline, yuv420p, `avc1`) in a fast-start MP4 (moov before mdat).
    Mp4,
    /// Animated GIF that loops forever; a palette of 256 colours per frame.
    Gif,
    /// A folder of numbered 8-bit RGB PNGs: `frame_0000.png`, `frame_0001.png`, ...
    PngFrames,
    /// A numpy array file: float32 little-endian, shape `(frames, height, width, 3)`.
    Npy,
}

impl VideoFormat {
    pub const ALL: [VideoFormat; 4] = [VideoFormat::Mp4, VideoFormat::Gif, VideoFormat::PngFrames, VideoFormat::Npy];

    /// Picks the format from the output path: `.mp4`, `.gif`, `.npy` (case-insensitive), or a
    /// path without an extension (or ending in a slash, or an existing folder with another
    /// extension) for a folder of PNG frames. A known extension decides even when a folder of
    /// that name exists, so that a folder is never silently written as another format.
    pub fn from_path(path: &Path) -> Result<Self> {
        // A trailing slash ("out/") means a folder.
        let s = path.as_os_str().to_string_lossy();
        if s.ends_with('/') || s.ends_with(std::path::MAIN_SEPARATOR) {
            return Ok(VideoFormat::PngFrames);
        }
        match path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()) {
            None => Ok(VideoFormat::PngFrames),
            Some(ext) => match ext.as_str() {
                "mp4" | "m4v" => Ok(VideoFormat::Mp4),
                "gif" => Ok(VideoFormat::Gif),
                "npy" => Ok(VideoFormat::Npy),
                _ if path.is_dir() => Ok(VideoFormat::PngFrames),
                _ => Err(Error::InvalidArgument(format!(
                    "cannot tell the video format of {} from its extension `.{ext}`: use .mp4, .gif, \
                     .npy, or a path without an extension for a folder of PNG frames",
                    path.display()
                ))),
            },
        }
    }

    /// The file extension this format is written with, without the dot; `""` for the PNG folder.
    pub fn extension(&self) -> &'static str {
        match self {
            VideoFormat::Mp4 => "mp4",
            VideoFormat::Gif => "gif",
            VideoFormat::PngFrames => "",
            VideoFormat::Npy => "npy",
        }
    }

    /// Short name, as accepted by [`FromStr`]: `mp4`, `gif`, `png`, `npy`.
    pub fn name(&self) -> &'static str {
        match self {
            VideoFormat::Mp4 => "mp4",
            VideoFormat::Gif => "gif",
            VideoFormat::PngFrames => "png",
            VideoFormat::Npy => "npy",
        }
    }
}

impl std::fmt::Display for VideoFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for VideoFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().trim_start_matches('.').to_ascii_lowercase().as_str() {
            "mp4" | "h264" => Ok(VideoFormat::Mp4),
            "gif" => Ok(VideoFormat::Gif),
            "png" | "pngs" | "png-frames" | "frames" => Ok(VideoFormat::PngFrames),
            "npy" => Ok(VideoFormat::Npy),
            other => Err(Error::InvalidArgument(format!(
                "unknown video format `{other}`: use mp4, gif, png (a folder of frames) or npy"
            ))),
        }
    }
}

/// H.264 quality. Lower QP = better quality and bigger files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// Constant quantiser for every frame (like x264's `-qp`), [`Quality::MIN_QP`]..=51.
    /// Each step of 6 halves/doubles the quantiser step size.
    Qp(u8),
}

impl Quality {
    /// The default QP. Visually lossless: on a smooth synthetic 256×256 clip the decoded luma
    /// PSNR is well above 40 dB, and above 38 dB even on uniform random noise frames.
    pub const DEFAULT_QP: u8 = 16;
    pub const VISUALLY_LOSSLESS: Quality = Quality::Qp(Self::DEFAULT_QP);
    /// The best QP openh264 allows with rate control on (it clamps lower values to 12).
    pub const MIN_QP: u8 = 12;
    pub const MAX_QP: u8 = 51;

    pub fn qp(&self) -> u8 {
        match *self {
            Quality::Qp(q) => q,
        }
    }
}

impl Default for Quality {
    fn default() -> Self {
        Quality::VISUALLY_LOSSLESS
    }
}

impl FromStr for Quality {
    type Err = Error;
    /// Parses `N`, `qp=N` or `qpN` with N in 12..=51.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let num = t.strip_prefix("qp").map(|r| r.trim_start_matches(['=', ':'])).unwrap_or(&t);
        match num.parse::<u8>() {
            Ok(q) if (Quality::MIN_QP..=Quality::MAX_QP).contains(&q) => Ok(Quality::Qp(q)),
            _ => Err(Error::InvalidArgument(format!(
                "invalid quality `{s}`: give an H.264 QP from {} (best, largest) to {} (worst); \
                 the default {} is visually lossless",
                Quality::MIN_QP,
                Quality::MAX_QP,
                Quality::DEFAULT_QP
            ))),
        }
    }
}

/// Options for [`write_video`].
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeOptions {
    /// Frames per second (MP4 timing, GIF frame delay). Must be at least 1.
    pub fps: u32,
    /// H.264 quality (MP4 only).
    pub quality: Quality,
    /// Free text (typically a JSON string of the generation settings) stored in the MP4 as its
    /// `comment` tag (`moov/udta/meta/ilst/©cmt`); read back with [`read_mp4_metadata`].
    /// MP4 only; the other formats ignore it.
    pub metadata: Option<String>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { fps: DEFAULT_FPS, quality: Quality::default(), metadata: None }
    }
}

/// A borrowed clip: `data` is `(frames, height, width, 3)` row-major RGB in `[0, 1]`.
#[derive(Debug, Clone, Copy)]
pub struct Frames<'a> {
    pub data: &'a [f32],
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl<'a> Frames<'a> {
    /// Wraps `data`, checking that its length is `frames * height * width * 3`.
    pub fn new(data: &'a [f32], frames: usize, height: usize, width: usize) -> Result<Self> {
        let f = Frames { data, frames, height, width };
        f.validate()?;
        Ok(f)
    }

    /// Checks the dimensions against the data length.
    pub fn validate(&self) -> Result<()> {
        if self.frames == 0 || self.height == 0 || self.width == 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot write a video of {} frames of {}x{} pixels: every dimension must be at least 1",
                self.frames, self.width, self.height
            )));
        }
        let expected =
            self.frames.checked_mul(self.height).and_then(|v| v.checked_mul(self.width)).and_then(|v| v.checked_mul(3));
        if expected != Some(self.data.len()) {
            return Err(Error::InvalidArgument(format!(
                "frame data has {} values, but {} frames of {}x{} RGB pixels need {}",
                self.data.len(),
                self.frames,
                self.width,
                self.height,
                expected.map_or_else(|| "more than usize::MAX".to_string(), |v| v.to_string())
            )));
        }
        Ok(())
    }

    /// Values of one frame, `height * width * 3` floats.
    pub fn frame(&self, i: usize) -> &'a [f32] {
        let n = self.height * self.width * 3;
        &self.data[i * n..(i + 1) * n]
    }

    /// One frame as 8-bit RGB (clamped to [0, 1], rounded; NaN becomes 0).
    pub fn frame_rgb8(&self, i: usize) -> Vec<u8> {
        self.frame(i).iter().map(|&v| to_u8(v)).collect()
    }
}

/// `[0, 1]` float to an 8-bit value: clamped, rounded to nearest; NaN becomes 0.
#[inline]
pub(crate) fn to_u8(v: f32) -> u8 {
    // `as u8` saturates and maps NaN to 0.
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Checks, before any frame exists, that `format` can hold `frames` frames of `width`×`height`
/// pixels at `fps`: what the encoders would otherwise refuse only after the whole generation.
pub fn check_encodable(format: VideoFormat, frames: usize, height: usize, width: usize, fps: u32) -> Result<()> {
    if frames == 0 || height == 0 || width == 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot write a video of {frames} frames of {width}x{height} pixels: every dimension must be at least 1"
        )));
    }
    if fps == 0 {
        return Err(Error::InvalidArgument("fps must be at least 1".to_string()));
    }
    match format {
        VideoFormat::Mp4 => mp4::check(width, height, fps),
        VideoFormat::Gif => gif::check(&Frames { data: &[], frames, height, width }),
        VideoFormat::Npy | VideoFormat::PngFrames => Ok(()),
    }
}

/// Writes `frames` in `format` under a temporary name beside `path`; [`Staged::publish`] then
/// makes it appear whole. On error, or when the [`Staged`] is dropped, nothing is left behind.
pub fn stage_video(frames: &Frames, format: VideoFormat, path: &Path, opts: &EncodeOptions) -> Result<Staged> {
    frames.validate()?;
    if opts.fps == 0 {
        return Err(Error::InvalidArgument("fps must be at least 1".to_string()));
    }
    match format {
        VideoFormat::Mp4 => {
            let bytes = mp4::encode_mp4(frames, opts, path)?;
            atomic::stage_file(path, |w| w.write_all(&bytes))
        }
        VideoFormat::Gif => {
            gif::check(frames)?;
            atomic::stage_file(path, |w| gif::write_gif(frames, opts.fps, w))
        }
        VideoFormat::Npy => atomic::stage_file(path, |w| npy::write_npy(frames, w)),
        VideoFormat::PngFrames => {
            // Refuse a folder holding other files before the frames are encoded.
            atomic::check_replaceable_dir(path)?;
            atomic::stage_dir(path, |dir| png::write_png_frames(frames, dir))
        }
    }
}

/// Writes `frames` to `path` in `format`, replacing what is there. The file (or, for
/// [`VideoFormat::PngFrames`], the folder) appears only once it is complete; on error nothing is
/// left behind. The parent folder must exist. An existing PNG folder is replaced only if it holds
/// nothing but `frame_NNNN.png` files.
pub fn write_video(frames: &Frames, format: VideoFormat, path: &Path, opts: &EncodeOptions) -> Result<()> {
    stage_video(frames, format, path, opts)?.publish(true)
}

/// [`write_video`] with the format picked by [`VideoFormat::from_path`].
pub fn write_video_auto(frames: &Frames, path: &Path, opts: &EncodeOptions) -> Result<VideoFormat> {
    let format = VideoFormat::from_path(path)?;
    write_video(frames, format, path, opts)?;
    Ok(format)
}

/// The MP4 that `encoder` holds, finished, under a temporary name beside `path`: the streamed
/// counterpart of [`stage_video`] with [`VideoFormat::Mp4`] (the same bytes for the same frames).
pub fn stage_mp4(encoder: Mp4Encoder, path: &Path) -> Result<Staged> {
    let bytes = encoder.finish()?;
    atomic::stage_file(path, |w| w.write_all(&bytes))
}

/// `text` under a temporary name beside `path`, to publish with [`Staged::publish`].
pub fn stage_text(path: &Path, text: &str) -> Result<Staged> {
    atomic::stage_file(path, |w| w.write_all(text.as_bytes()))
}

/// Writes `text` to `path`, replacing what is there, without ever leaving a partial file.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    stage_text(path, text)?.publish(true)
}

/// File name of PNG frame `i` in a [`VideoFormat::PngFrames`] folder.
pub fn png_frame_name(i: usize) -> String {
    format!("frame_{i:04}.png")
}
