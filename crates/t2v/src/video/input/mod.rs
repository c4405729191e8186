//! Reading input videos for video-to-video: an MP4 with H.264 video, an animated GIF, a folder of
//! PNG or JPEG frames, or a `.npy` array (float in [0, 1] or uint8, shape (F, H, W, 3)).
//!
//! Frames are chosen while they are read (a start frame, every n-th frame, a number of frames)
//! and each chosen frame is resized at once to the asked size, so a long or large clip never
//! sits in memory whole. [`InputVideo::to_model_input`] turns them into what the reference's
//! `VideoProcessor.preprocess_video` makes of PIL frames: uint8 → /255 → 2x − 1.

mod gif;
pub(crate) mod h264;
pub(crate) mod images;
mod npy;
mod resize;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub use resize::{Fit, ResizeFilter};

/// How many frames are read when no number of frames is asked: a clip longer than this gives its
/// first `DEFAULT_MAX_FRAMES` chosen frames and a warning. (zeroscope's recipe is 24 frames; every
/// frame costs UNet memory and time.)
pub const DEFAULT_MAX_FRAMES: usize = 64;

/// The largest frame side accepted from a file, so that a corrupt header cannot ask for an
/// enormous allocation.
pub const MAX_SIDE: usize = 16384;

/// The most pixels one frame of a file may declare by default (8192×8192): a header asking for
/// more is refused before anything is allocated (a GIF's screen is drawn as RGBA, 4 bytes a
/// pixel). A server lowers it with [`ReadOptions::max_source_pixels`].
pub const DEFAULT_MAX_SOURCE_PIXELS: usize = 8192 * 8192;

/// The most frames a file may declare (an MP4's sample tables) or offer by default.
pub const DEFAULT_MAX_SOURCE_FRAMES: usize = 100_000;

/// Which frames to read and at what size.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadOptions {
    /// (width, height) of the frames returned; `None` keeps the clip's own size.
    pub size: Option<(usize, usize)>,
    /// How a clip of another size is brought to `size`.
    pub fit: Fit,
    pub filter: ResizeFilter,
    /// The first frame read (0-based, in display order).
    pub start_frame: usize,
    /// Take every n-th frame from `start_frame` (1: every frame; 3 turns 24 fps into 8 fps).
    pub every: usize,
    /// Exactly this many frames; a clip that has fewer is refused. `None`: all the frames the
    /// clip has, up to [`DEFAULT_MAX_FRAMES`].
    pub num_frames: Option<usize>,
    /// The budget of a file's declared frame size, in pixels a frame (width × height): a larger
    /// one is refused from its header, before any decoding or allocation.
    pub max_source_pixels: usize,
    /// The budget of a file's frames, declared (an MP4's sample tables, a `.npy` shape) or
    /// offered while reading (a GIF): more are refused.
    pub max_source_frames: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            size: None,
            fit: Fit::Resize,
            filter: ResizeFilter::Lanczos3,
            start_frame: 0,
            every: 1,
            num_frames: None,
            max_source_pixels: DEFAULT_MAX_SOURCE_PIXELS,
            max_source_frames: DEFAULT_MAX_SOURCE_FRAMES,
        }
    }
}

/// The pixels of the chosen frames, (frames, height, width, 3) row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameData {
    /// 8-bit RGB (every format but a float `.npy`).
    U8(Vec<u8>),
    /// RGB in [0, 1] (a float `.npy`).
    F32(Vec<f32>),
}

/// Frames read from a file, as the pipeline takes them.
#[derive(Debug, Clone)]
pub struct InputVideo {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub data: FrameData,
    /// The clip's own frame size (after its rotation, if any), before any resize.
    pub source_size: (usize, usize),
    /// Frames per second of the source where the format records it (MP4, GIF).
    pub fps: Option<f64>,
    /// What was done to the clip that the caller should know: a resize, a rotation, frames left
    /// out, a variable frame rate.
    pub warnings: Vec<String>,
}

impl InputVideo {
    /// (frames, 3, height, width) in [-1, 1], as the reference preprocesses PIL frames: each 8-bit
    /// value v becomes v / 255 (float32) and then 2x − 1. Float frames skip the first step.
    pub fn to_model_input(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let values: Vec<f32> = match &self.data {
            FrameData::U8(d) => d.iter().map(|&v| 2.0f32 * (v as f32 / 255.0f32) - 1.0f32).collect(),
            FrameData::F32(d) => d.iter().map(|&v| 2.0f32 * v - 1.0f32).collect(),
        };
        let t = Tensor::from_vec(values, (self.frames, self.height, self.width, 3), device)?;
        Ok(t.permute((0, 3, 1, 2))?.contiguous()?.to_dtype(dtype)?)
    }

    /// The frames as 8-bit RGB, (frames, height, width, 3); float frames are rounded.
    pub fn to_rgb8(&self) -> Vec<u8> {
        match &self.data {
            FrameData::U8(d) => d.clone(),
            FrameData::F32(d) => d.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect(),
        }
    }
}

/// The kinds of input this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Mp4,
    Gif,
    /// A folder of PNG or JPEG frames, in the order of their names.
    ImageFolder,
    Npy,
}

impl InputFormat {
    /// The format of `path`: a folder of frames, or by extension (`.mp4`, `.m4v`, `.mov`, `.gif`,
    /// `.npy`, case-insensitive).
    pub fn of_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(InputFormat::ImageFolder);
        }
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("mp4" | "m4v" | "mov") => Ok(InputFormat::Mp4),
            Some("gif") => Ok(InputFormat::Gif),
            Some("npy") => Ok(InputFormat::Npy),
            _ if !path.exists() => Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound))),
            _ => Err(input_error(
                path,
                "its format is unknown: give an .mp4 (H.264), a .gif, a .npy array, or a folder of PNG or JPEG frames",
            )),
        }
    }
}

/// Reads the frames of the video at `path` that `options` choose, resized to `options.size`.
pub fn read_video(path: impl AsRef<Path>, options: &ReadOptions) -> Result<InputVideo> {
    let path = path.as_ref();
    check_options(options)?;
    let format = InputFormat::of_path(path)?;
    let mut collector = Collector::new(path, options);
    let read = catch_quietly(|| match format {
        InputFormat::Mp4 => h264::read_mp4(path, &mut collector),
        InputFormat::Gif => gif::read_gif(path, &mut collector),
        InputFormat::ImageFolder => images::read_folder(path, &mut collector).map(|()| None),
        InputFormat::Npy => npy::read_npy(path, &mut collector).map(|()| None),
    });
    let fps = match read {
        Ok(result) => result?,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            return Err(input_error(
                path,
                format!("the file is corrupt (its reader failed: {what}): export it again or convert it to a folder of PNG frames"),
            ));
        }
    };
    collector.finish(fps)
}

/// Frames already in memory handed on as 8-bit images ([`crate::video::Frames::frame_rgb8`]: clamped, rounded)
/// and resized to `size` (width, height) as [`read_video`] resizes a file's: the same frames as
/// writing them as PNG and reading those back at that size, without the files. zeroscope's second
/// pass takes the first's frames this way ([`crate::pipeline::upscale`]).
pub fn frames_to_input(
    frames: &crate::video::Frames,
    size: (usize, usize),
    fit: Fit,
    filter: ResizeFilter,
) -> Result<InputVideo> {
    let options =
        ReadOptions { size: Some(size), fit, filter, num_frames: Some(frames.frames), ..ReadOptions::default() };
    check_options(&options)?;
    let path = Path::new("(frames in memory)");
    let mut collector = Collector::new(path, &options);
    for i in 0..frames.frames {
        if collector.offer() != Want::Take {
            break;
        }
        collector.push_u8(&frames.frame_rgb8(i), frames.width, frames.height, &format!("frame {i}"))?;
    }
    collector.finish(None)
}

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a format reader, turning a panic inside it into an error: the parsers of malformed
/// files can panic (re_mp4 indexes its sample tables unchecked), and a bad input must give an
/// error, never a crash. While it runs, the panic message is not printed on this thread; the
/// process's own panic hook still serves every other panic.
fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(false));
    result
}

fn check_options(options: &ReadOptions) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if options.every == 0 {
        return bad("the frame step must be at least 1 (1 takes every frame)".into());
    }
    if options.num_frames == Some(0) {
        return bad("the number of frames to read must be at least 1".into());
    }
    if let Some((w, h)) = options.size {
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return bad(format!("the frame size must be between 1 and {MAX_SIDE} pixels a side, got {w}x{h}"));
        }
    }
    Ok(())
}

/// An error about the input file at `path`; `reason` says what is wrong and what to do.
pub(crate) fn input_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::VideoInput { path: path.to_path_buf(), reason: reason.into() }
}

/// What the reader of a format does with the next frame of the clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// Hand it over with [`Collector::push_u8`] / [`Collector::push_f32`].
    Take,
    /// Not chosen: go on to the next one (without converting its pixels).
    Skip,
    /// Enough frames: stop reading.
    Stop,
}

/// Chooses frames as the format readers offer them one by one, resizing each chosen frame.
pub(crate) struct Collector<'a> {
    path: PathBuf,
    options: &'a ReadOptions,
    /// The index of the next frame the reader offers.
    next: usize,
    limit: usize,
    frames: usize,
    data: Option<FrameData>,
    source_size: Option<(usize, usize)>,
    out_size: (usize, usize),
    /// Another chosen frame existed past the default limit.
    truncated: bool,
    /// The file offered more frames than [`ReadOptions::max_source_frames`].
    over_frame_budget: bool,
    warnings: Vec<String>,
    resizer: resize::FrameResizer,
}

impl<'a> Collector<'a> {
    fn new(path: &Path, options: &'a ReadOptions) -> Self {
        Self {
            path: path.to_path_buf(),
            options,
            next: 0,
            limit: options.num_frames.unwrap_or(DEFAULT_MAX_FRAMES),
            frames: 0,
            data: None,
            source_size: None,
            out_size: (0, 0),
            truncated: false,
            over_frame_budget: false,
            warnings: Vec::new(),
            resizer: resize::FrameResizer::new(options.fit, options.filter),
        }
    }

    pub(crate) fn error(&self, reason: impl Into<String>) -> Error {
        input_error(&self.path, reason)
    }

    pub(crate) fn warn(&mut self, warning: String) {
        self.warnings.push(warning);
    }

    /// Whether frame number `i` (0-based) is one of the chosen.
    fn chosen(&self, i: usize) -> bool {
        i >= self.options.start_frame && (i - self.options.start_frame).is_multiple_of(self.options.every)
    }

    /// Asks what to do with the next frame of the clip; every call but one answered `Stop`
    /// stands for one frame (call the push method after `Take`).
    pub(crate) fn offer(&mut self) -> Want {
        if self.options.num_frames.is_some() && self.frames >= self.limit {
            return Want::Stop;
        }
        if self.next >= self.options.max_source_frames {
            self.over_frame_budget = true;
            return Want::Stop;
        }
        if !self.chosen(self.next) {
            self.next += 1;
            return Want::Skip;
        }
        if self.frames >= self.limit {
            // A chosen frame past the default limit: the clip was cut.
            self.truncated = true;
            return Want::Stop;
        }
        self.next += 1;
        Want::Take
    }

    /// Whether an asked number of frames has been taken (no further frame can change the result).
    pub(crate) fn satisfied(&self) -> bool {
        self.options.num_frames.is_some_and(|n| self.frames >= n)
    }

    /// The pixel budget of one source frame.
    pub(crate) fn max_source_pixels(&self) -> usize {
        self.options.max_source_pixels
    }

    /// How many frames the clip has offered so far.
    pub(crate) fn offered(&self) -> usize {
        self.next
    }

    /// Checks a frame size a file declares against the pixel budget, before anything of that
    /// size is allocated. `what` names it in the error ("its screen", "frame 3").
    pub(crate) fn check_declared_size(&self, width: usize, height: usize, what: &str) -> Result<()> {
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(self.error(format!(
                "{what} is {width}x{height} pixels; frames must be between 1 and {MAX_SIDE} pixels a side"
            )));
        }
        let budget = self.options.max_source_pixels;
        if width.saturating_mul(height) > budget {
            return Err(self.error(format!(
                "{what} is {width}x{height} pixels, more than the {budget} pixels a frame this reader accepts \
                 (about {side}x{side}): scale the video down first",
                side = (budget as f64).sqrt() as usize
            )));
        }
        Ok(())
    }

    /// Checks a number of frames a file declares against the frame budget.
    pub(crate) fn check_declared_frames(&self, frames: u64) -> Result<()> {
        let budget = self.options.max_source_frames;
        if frames > budget as u64 {
            return Err(self.error(format!(
                "it declares {frames} frames, more than the {budget} a video this reader accepts may have: \
                 cut it shorter first"
            )));
        }
        Ok(())
    }

    fn accept_size(&mut self, width: usize, height: usize, what: &str) -> Result<()> {
        self.check_declared_size(width, height, what)?;
        match self.source_size {
            None => {
                self.source_size = Some((width, height));
                self.out_size = self.options.size.unwrap_or((width, height));
                if self.out_size != (width, height) {
                    let (ow, oh) = self.out_size;
                    let how = match self.options.fit {
                        Fit::Resize if width * oh != height * ow => {
                            " (stretched: the aspect ratio changes; choose cropping or padding to keep it)".to_string()
                        }
                        Fit::Resize => String::new(),
                        Fit::Crop => {
                            " after scaling it to cover that size and cutting the overflow off both sides".into()
                        }
                        Fit::Pad => " after scaling it to fit inside that size and filling the rest with black".into(),
                    };
                    self.warnings.push(format!(
                        "the video is {width}x{height}: its frames were resized to {ow}x{oh} with the {} filter{how}",
                        self.options.filter.name()
                    ));
                }
                Ok(())
            }
            Some((w, h)) if (w, h) == (width, height) => Ok(()),
            Some((w, h)) => Err(self.error(format!(
                "{what} is {width}x{height} but the first frame is {w}x{h}: all frames must have one size"
            ))),
        }
    }

    /// The taken frame as 8-bit RGB, `width`×`height`, rows packed. `what` names it in errors.
    pub(crate) fn push_u8(&mut self, rgb: &[u8], width: usize, height: usize, what: &str) -> Result<()> {
        self.accept_size(width, height, what)?;
        let (ow, oh) = self.out_size;
        let resized = self.resizer.resize_u8(rgb, width, height, ow, oh).map_err(|e| self.error(e))?;
        match self.data.get_or_insert_with(|| FrameData::U8(Vec::new())) {
            FrameData::U8(d) => d.extend_from_slice(&resized),
            FrameData::F32(_) => return Err(self.error("mixes 8-bit and float frames")),
        }
        self.frames += 1;
        Ok(())
    }

    /// The taken frame as float RGB in [0, 1].
    pub(crate) fn push_f32(&mut self, rgb: &[f32], width: usize, height: usize, what: &str) -> Result<()> {
        self.accept_size(width, height, what)?;
        let (ow, oh) = self.out_size;
        let resized = self.resizer.resize_f32(rgb, width, height, ow, oh).map_err(|e| self.error(e))?;
        match self.data.get_or_insert_with(|| FrameData::F32(Vec::new())) {
            FrameData::F32(d) => d.extend_from_slice(&resized),
            FrameData::U8(_) => return Err(self.error("mixes 8-bit and float frames")),
        }
        self.frames += 1;
        Ok(())
    }

    /// Checks the frames read against the request and assembles the video. `fps` is the
    /// source's frame rate where known.
    fn finish(mut self, fps: Option<f64>) -> Result<InputVideo> {
        let total = self.next;
        let o = self.options;
        if self.over_frame_budget {
            return Err(self.error(format!(
                "it has more than the {} frames a video this reader accepts may have: cut it shorter first",
                o.max_source_frames
            )));
        }
        let choice = describe_choice(o);
        if self.frames == 0 {
            return Err(if total == 0 {
                self.error("it holds no frames: give a video with at least one frame")
            } else {
                self.error(format!(
                    "it has {total} frames, so starting at frame {} leaves none: choose a start frame below {total}",
                    o.start_frame
                ))
            });
        }
        if let Some(n) = o.num_frames {
            if self.frames < n {
                return Err(self.error(format!(
                    "{n} frames were asked ({choice}) but the clip gives only {}: ask for {} frames or fewer, \
                     an earlier start frame or a smaller step",
                    self.frames, self.frames
                )));
            }
        }
        if self.truncated {
            self.warnings.push(format!(
                "the clip has more than {DEFAULT_MAX_FRAMES} frames ({choice}); only the first {DEFAULT_MAX_FRAMES} \
                 were read: ask for a number of frames to read more, or choose a start frame and a step"
            ));
        }
        let (width, height) = self.out_size;
        Ok(InputVideo {
            frames: self.frames,
            height,
            width,
            data: self.data.take().expect("frames were pushed"),
            source_size: self.source_size.expect("frames were pushed"),
            fps,
            warnings: self.warnings,
        })
    }
}

fn describe_choice(o: &ReadOptions) -> String {
    match o.every {
        1 => format!("from frame {}", o.start_frame),
        n => format!("every {n}th frame from frame {}", o.start_frame),
    }
}
