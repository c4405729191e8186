//! H.264 MP4: openh264 (bundled C source) encodes, muxide muxes a fast-start MP4 (moov before
//! mdat), and a small post-processing step adds `moov/udta/meta/ilst` with the `©cmt` comment
//! (the generation settings) and `©too` (encoder) tags, shifting the chunk offsets to match.
//!
//! Colour: RGB is converted to Y'CbCr with the BT.601 matrix in limited ("TV", 16-235/240) range,
//! which is what players assume for untagged SD content, and the SPS VUI says so explicitly
//! (matrix_coefficients = 6 / smpte170m, video_full_range_flag = 0). Primaries and transfer are
//! left "unspecified" (the frames are sRGB; tagging them BT.601/SMPTE-C primaries would make
//! colour-managed players shift the gamut). Chroma is the 2×2 box average (yuv420p; that is
//! centre-sited, H.264's default is left-sited: a quarter-chroma-pixel shift nobody will see).

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use openh264::encoder::{
    BitRate, ColorPrimaries, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod,
    MatrixCoefficients, QpRange, RateControlMode, TransferCharacteristics, VuiConfig,
};
use openh264::formats::YUVSlices;
use openh264::OpenH264API;

use super::{EncodeOptions, Frames, Quality};
use crate::error::{Error, Result};

/// muxide's media timescale (ticks per second in mdhd/stts).
const MEDIA_TIMESCALE: u64 = 90_000;
/// muxide's movie timescale (mvhd/tkhd/elst).
const MOVIE_TIMESCALE: u64 = 1_000;
/// Maximum bytes per slice NAL unit (see the encoder configuration).
const MAX_SLICE_BYTES: u32 = 32_000;
/// Encoder name stored in the `©too` tag.
const ENCODER_TAG: &str = concat!("t2v ", env!("CARGO_PKG_VERSION"), " (openh264)");

fn encode_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::io(path, io::Error::other(format!("MP4 encoding failed: {msg}")))
}

/// Padded (even) size used for the H.264 stream: odd widths/heights are padded by one row/column
/// replicating the edge, because 4:2:0 cannot represent odd sizes.
pub fn mp4_dimensions(width: usize, height: usize) -> (usize, usize) {
    (width + (width & 1), height + (height & 1))
}

/// A padded 4:2:0 picture (`pw` x `ph`, both even).
struct I420 {
    pw: usize,
    ph: usize,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

impl I420 {
    fn new(pw: usize, ph: usize) -> Self {
        I420 { pw, ph, y: vec![0; pw * ph], u: vec![0; pw * ph / 4], v: vec![0; pw * ph / 4] }
    }

    /// BT.601 limited-range conversion of one `w` x `h` frame (f32 RGB in [0,1], HWC), padding
    /// by edge replication.
    fn fill(&mut self, rgb: &[f32], w: usize, h: usize) {
        let (pw, ph) = (self.pw, self.ph);
        rgb_to_i420(rgb, w, h, pw, ph, &mut self.y, &mut self.u, &mut self.v);
    }

    fn source(&self) -> YUVSlices<'_> {
        YUVSlices::new((&self.y, &self.u, &self.v), (self.pw, self.ph), (self.pw, self.pw / 2, self.pw / 2))
    }
}

#[allow(clippy::too_many_arguments)]
fn rgb_to_i420(rgb: &[f32], w: usize, h: usize, pw: usize, ph: usize, y: &mut [u8], u: &mut [u8], v: &mut [u8]) {
    const KR: f32 = 0.299;
    const KB: f32 = 0.114;
    const KG: f32 = 1.0 - KR - KB;
    let px = |yy: usize, xx: usize| -> (f32, f32, f32) {
        let i = (yy.min(h - 1) * w + xx.min(w - 1)) * 3;
        let c = |x: f32| if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
        (c(rgb[i]), c(rgb[i + 1]), c(rgb[i + 2]))
    };
    let q = |x: f32| x.round().clamp(0.0, 255.0) as u8;
    for yy in 0..ph {
        for xx in 0..pw {
            let (r, g, b) = px(yy, xx);
            y[yy * pw + xx] = q(16.0 + 219.0 * (KR * r + KG * g + KB * b));
        }
    }
    let cw = pw / 2;
    for cy in 0..ph / 2 {
        for cx in 0..cw {
            let (mut r, mut g, mut b) = (0.0, 0.0, 0.0);
            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let p = px(2 * cy + dy, 2 * cx + dx);
                r += p.0;
                g += p.1;
                b += p.2;
            }
            let (r, g, b) = (r * 0.25, g * 0.25, b * 0.25);
            let luma = KR * r + KG * g + KB * b;
            u[cy * cw + cx] = q(128.0 + 224.0 * (b - luma) / (2.0 * (1.0 - KB)));
            v[cy * cw + cx] = q(128.0 + 224.0 * (r - luma) / (2.0 * (1.0 - KR)));
        }
    }
}

/// The highest frame rate written: a frame must last at least one tick of the media timescale, and
/// openh264 takes rates up to this.
pub const MAX_FPS: u32 = 240;

/// Whether the encoder and the container can take `w`×`h` frames at `fps`.
pub(super) fn check(w: usize, h: usize, fps: u32) -> Result<()> {
    let (pw, ph) = mp4_dimensions(w, h);
    if w < 16 || h < 16 {
        return Err(Error::InvalidArgument(format!(
            "{w}x{h} is too small for the H.264 encoder (openh264 needs at least 16x16): write .gif, .npy or PNG frames instead"
        )));
    }
    if pw.max(ph) > 3840 || pw.min(ph) > 2160 {
        return Err(Error::InvalidArgument(format!(
            "{w}x{h} is too large for the H.264 encoder (at most 3840x2160 or 2160x3840): write PNG frames or .npy instead"
        )));
    }
    if !(1..=MAX_FPS).contains(&fps) {
        return Err(Error::InvalidArgument(format!("an MP4 takes 1 to {MAX_FPS} frames per second, not {fps}")));
    }
    Ok(())
}

/// Encodes the clip to a complete MP4 file in memory. `path` is only used in error messages.
pub(super) fn encode_mp4(frames: &Frames, opts: &EncodeOptions, path: &Path) -> Result<Vec<u8>> {
    let mut encoder = Mp4Encoder::new(frames.width, frames.height, opts, path)?;
    for i in 0..frames.frames {
        encoder.push(frames.frame(i))?;
    }
    encoder.finish()
}

/// An MP4 encoded frame by frame as the frames come: each is converted, encoded and muxed when
/// pushed, so that only the compressed stream is kept, never the clip. [`Mp4Encoder::finish`]
/// gives the same bytes as encoding the whole clip at once.
pub struct Mp4Encoder {
    encoder: Encoder,
    muxer: muxide::api::Muxer<Vec<u8>>,
    pic: I420,
    nal: Vec<u8>,
    width: usize,
    height: usize,
    fps: u32,
    metadata: Option<String>,
    frames: usize,
    path: std::path::PathBuf,
}

impl Mp4Encoder {
    /// An encoder for `width`×`height` frames with `opts`; `path` is only used in error messages.
    pub fn new(width: usize, height: usize, opts: &EncodeOptions, path: &Path) -> Result<Self> {
        let (w, h) = (width, height);
        let (pw, ph) = mp4_dimensions(w, h);
        check(w, h, opts.fps)?;
        let qp = opts.quality.qp();
        if !(Quality::MIN_QP..=Quality::MAX_QP).contains(&qp) {
            return Err(Error::InvalidArgument(format!(
                "H.264 QP must be {}..={}, not {qp}",
                Quality::MIN_QP,
                Quality::MAX_QP
            )));
        }

        // T2V_H264_DEBUG=1 turns on openh264's detailed log on stderr (diagnosing encoder errors).
        let debug = std::env::var_os("T2V_H264_DEBUG").is_some();
        let config = EncoderConfig::new()
            // Constant QP: quality-mode rate control with the QP range pinned to one value.
            .rate_control_mode(RateControlMode::Quality)
            .qp(QpRange::new(qp, qp))
            // Only a rate-control target: with the QP pinned and frame skipping off it limits
            // nothing. (openh264 rejects targets above the level's maximum.)
            .bitrate(BitRate::from_bps(10_000_000))
            .skip_frames(false)
            .adaptive_quantization(false)
            .background_detection(false)
            .scene_change_detect(false)
            .max_frame_rate(FrameRate::from_hz(opts.fps as f32))
            .complexity(Complexity::High)
            .intra_frame_period(IntraFramePeriod::from_num_frames(opts.fps.saturating_mul(4).max(1)))
            .num_threads(1)
            // Size-limited slices: openh264 sizes its output buffer for about 1 byte per luma pixel per
            // NAL unit (it needs 1.5x the payload free), which high-quality noise exceeds with a single
            // slice ("Native:3" memory error); with <= 32 kB slices the frame may use ~2x that.
            .max_slice_len(MAX_SLICE_BYTES)
            .debug(debug)
            .vui(
                VuiConfig::bt601()
                    .color_primaries(ColorPrimaries::Unspecified)
                    .transfer_characteristics(TransferCharacteristics::Unspecified)
                    .matrix_coefficients(MatrixCoefficients::Smpte170M)
                    .full_range(false),
            );
        let mut encoder =
            Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| encode_err(path, e))?;
        // openh264 logs warnings to stderr while it initialises (before the wrapper applies the
        // configured trace level), e.g. about frame skipping being off. Silence it up front.
        let mut level = if debug { openh264_sys2::WELS_LOG_DETAIL } else { openh264_sys2::WELS_LOG_QUIET } as u32;
        // SAFETY: TRACE_LEVEL is explicitly allowed before initialisation; openh264 reads one u32
        // from the pointer, which is valid for the duration of the call.
        unsafe {
            encoder.raw_api().set_option(openh264_sys2::ENCODER_OPTION_TRACE_LEVEL, (&raw mut level).cast());
        }

        let muxer = muxide::api::MuxerBuilder::new(Vec::<u8>::new())
            .video(muxide::api::VideoCodec::H264, pw as u32, ph as u32, opts.fps as f64)
            .with_fast_start(true)
            .build()
            .map_err(|e| encode_err(path, e))?;
        Ok(Self {
            encoder,
            muxer,
            pic: I420::new(pw, ph),
            nal: Vec::new(),
            width: w,
            height: h,
            fps: opts.fps,
            metadata: opts.metadata.clone(),
            frames: 0,
            path: path.to_path_buf(),
        })
    }

    /// Frames pushed so far.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Encodes the next frame: `rgb` is `height·width·3` floats, (H, W, 3) row-major in [0, 1].
    pub fn push(&mut self, rgb: &[f32]) -> Result<()> {
        let (w, h, i) = (self.width, self.height, self.frames);
        if rgb.len() != w * h * 3 {
            return Err(Error::InvalidArgument(format!(
                "frame {i} has {} values, but a {w}x{h} RGB frame needs {}",
                rgb.len(),
                w * h * 3
            )));
        }
        let path = &self.path;
        self.pic.fill(rgb, w, h);
        let bs = self.encoder.encode(&self.pic.source()).map_err(|e| encode_err(path, e))?;
        let ftype = bs.frame_type();
        self.nal.clear();
        bs.write_vec(&mut self.nal);
        if self.nal.is_empty() || matches!(ftype, FrameType::Skip | FrameType::Invalid) {
            return Err(encode_err(path, format!("the encoder produced no data for frame {i} ({ftype:?})")));
        }
        let keyframe = matches!(ftype, FrameType::IDR);
        let pts = i as f64 / self.fps as f64;
        self.muxer.write_video(pts, &self.nal, keyframe).map_err(|e| encode_err(path, e))?;
        self.frames += 1;
        Ok(())
    }

    /// The complete MP4 file of the frames pushed (at least one).
    pub fn finish(mut self) -> Result<Vec<u8>> {
        let path = &self.path;
        if self.frames == 0 {
            return Err(Error::InvalidArgument(format!("{}: an MP4 needs at least one frame", path.display())));
        }
        self.muxer.finish_in_place().map_err(|e| encode_err(path, e))?;
        let mp4 = self.muxer.into_writer();
        let frame_ticks = (MEDIA_TIMESCALE as f64 / self.fps as f64).round().max(1.0) as u64;
        postprocess(mp4, self.metadata.as_deref(), self.frames, frame_ticks).map_err(|e| encode_err(path, e))
    }
}

// ---------------------------------------------------------------------------------------------
// ISO-BMFF box helpers
// ---------------------------------------------------------------------------------------------

/// A box inside a buffer: `start..end` is the whole box, payload starts at `start + header`.
#[derive(Debug, Clone, Copy)]
struct BoxRef {
    typ: [u8; 4],
    start: usize,
    header: usize,
    end: usize,
}

impl BoxRef {
    fn payload(&self) -> std::ops::Range<usize> {
        self.start + self.header..self.end
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The boxes directly inside `buf[range]`.
fn child_boxes(buf: &[u8], range: std::ops::Range<usize>) -> std::result::Result<Vec<BoxRef>, String> {
    let mut out = Vec::new();
    let mut pos = range.start;
    while pos < range.end {
        if range.end - pos < 8 {
            return Err(format!("truncated box header at byte {pos}"));
        }
        let size32 = be32(buf, pos) as u64;
        let typ: [u8; 4] = buf[pos + 4..pos + 8].try_into().unwrap();
        let (size, header) = match size32 {
            0 => ((range.end - pos) as u64, 8),
            1 => {
                if range.end - pos < 16 {
                    return Err(format!("truncated large box header at byte {pos}"));
                }
                (be64(buf, pos + 8), 16)
            }
            s => (s, 8),
        };
        if size < header as u64 || size > (range.end - pos) as u64 {
            return Err(format!(
                "box `{}` at byte {pos} has size {size}, which does not fit its parent",
                String::from_utf8_lossy(&typ)
            ));
        }
        out.push(BoxRef { typ, start: pos, header, end: pos + size as usize });
        pos += size as usize;
    }
    Ok(out)
}

fn make_box(typ: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + payload.len());
    b.extend_from_slice(&((8 + payload.len()) as u32).to_be_bytes());
    b.extend_from_slice(typ);
    b.extend_from_slice(payload);
    b
}

/// `udta { meta { hdlr(mdir), ilst { ©cmt, ©too } } }` in the iTunes style ffmpeg reads.
fn build_udta(comment: Option<&str>) -> Vec<u8> {
    fn item(typ: &[u8; 4], text: &str) -> Vec<u8> {
        let mut data = vec![0, 0, 0, 1, 0, 0, 0, 0]; // type 1 = UTF-8, locale 0
        data.extend_from_slice(text.as_bytes());
        make_box(typ, &make_box(b"data", &data))
    }
    let mut ilst = Vec::new();
    if let Some(c) = comment {
        ilst.extend(item(b"\xa9cmt", c));
    }
    ilst.extend(item(b"\xa9too", ENCODER_TAG));
    let mut hdlr = vec![0u8; 8]; // version/flags, pre_defined
    hdlr.extend_from_slice(b"mdirappl");
    hdlr.extend_from_slice(&[0u8; 8]);
    hdlr.push(0);
    let mut meta = vec![0u8; 4]; // full box: version 0, flags 0
    meta.extend(make_box(b"hdlr", &hdlr));
    meta.extend(make_box(b"ilst", &ilst));
    make_box(b"udta", &make_box(b"meta", &meta))
}

const CONTAINERS: [&[u8; 4]; 8] = [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"mvex", b"dinf"];

/// Calls `f` on every box in the tree under `range` (descending into the usual containers).
fn walk(buf: &[u8], range: std::ops::Range<usize>, f: &mut dyn FnMut(&BoxRef)) -> std::result::Result<(), String> {
    for b in child_boxes(buf, range)? {
        f(&b);
        if CONTAINERS.contains(&&b.typ) {
            walk(buf, b.payload(), f)?;
        }
    }
    Ok(())
}

/// Adds the udta metadata to moov (shifting stco/co64 chunk offsets by its size) and, for a
/// one-frame clip, gives the frame a real duration (muxide can only infer sample durations from
/// the next timestamp and would give it 1/90000 s).
fn postprocess(
    mut mp4: Vec<u8>,
    comment: Option<&str>,
    n_frames: usize,
    frame_ticks: u64,
) -> std::result::Result<Vec<u8>, String> {
    let top = child_boxes(&mp4, 0..mp4.len())?;
    let moov = *top.iter().find(|b| &b.typ == b"moov").ok_or("muxide wrote no moov box")?;
    let mdat = top.iter().find(|b| &b.typ == b"mdat").ok_or("muxide wrote no mdat box")?;
    if moov.start > mdat.start {
        return Err("muxide wrote mdat before moov (not fast-start)".into());
    }
    if moov.header != 8 {
        return Err("unexpected 64-bit moov size".into());
    }
    if child_boxes(&mp4, moov.payload())?.iter().any(|b| &b.typ == b"udta") {
        return Err("muxide already wrote a udta box".into());
    }

    if n_frames == 1 {
        fix_single_frame_duration(&mut mp4, moov, frame_ticks)?;
    }

    let udta = build_udta(comment);
    let delta = udta.len();
    // Shift chunk offsets that point past moov (into mdat).
    let mut patches: Vec<(usize, bool)> = Vec::new(); // (entry table start, 64-bit)
    walk(&mp4, moov.payload(), &mut |b| {
        if &b.typ == b"stco" || &b.typ == b"co64" {
            patches.push((b.start + b.header, &b.typ == b"co64"));
        }
    })?;
    for (p, is64) in patches {
        let count = be32(&mp4, p + 4) as usize;
        for k in 0..count {
            if is64 {
                let at = p + 8 + 8 * k;
                let v = be64(&mp4, at);
                if v >= moov.end as u64 {
                    mp4[at..at + 8].copy_from_slice(&(v + delta as u64).to_be_bytes());
                }
            } else {
                let at = p + 8 + 4 * k;
                let v = be32(&mp4, at) as u64;
                if v >= moov.end as u64 {
                    let nv = u32::try_from(v + delta as u64).map_err(|_| "chunk offset overflow")?;
                    mp4[at..at + 4].copy_from_slice(&nv.to_be_bytes());
                }
            }
        }
    }
    let new_size = u32::try_from(moov.end - moov.start + delta).map_err(|_| "moov too large")?;
    mp4[moov.start..moov.start + 4].copy_from_slice(&new_size.to_be_bytes());
    mp4.splice(moov.end..moov.end, udta);
    Ok(mp4)
}

fn fix_single_frame_duration(mp4: &mut [u8], moov: BoxRef, ticks: u64) -> std::result::Result<(), String> {
    let movie = (ticks * MOVIE_TIMESCALE).div_ceil(MEDIA_TIMESCALE);
    let mut found = Vec::new();
    walk(mp4, moov.payload(), &mut |b| found.push(*b))?;
    for b in found {
        let p = b.start + b.header;
        let version = mp4[p];
        // (offset of the duration field, is it 64-bit, value)
        let field = match &b.typ {
            b"mvhd" => Some(if version == 1 { (p + 4 + 8 + 8 + 4, true) } else { (p + 4 + 4 + 4 + 4, false) })
                .map(|(o, l)| (o, l, movie)),
            b"tkhd" => Some(if version == 1 { (p + 4 + 8 + 8 + 4 + 4, true) } else { (p + 4 + 4 + 4 + 4 + 4, false) })
                .map(|(o, l)| (o, l, movie)),
            b"mdhd" => Some(if version == 1 { (p + 4 + 8 + 8 + 4, true) } else { (p + 4 + 4 + 4 + 4, false) })
                .map(|(o, l)| (o, l, ticks)),
            b"stts" => {
                if be32(mp4, p + 4) != 1 || be32(mp4, p + 8) != 1 {
                    return Err("unexpected stts for a one-frame clip".into());
                }
                Some((p + 12, false, ticks))
            }
            b"elst" => {
                if be32(mp4, p + 4) != 1 {
                    return Err("unexpected edit list".into());
                }
                Some((p + 8, version == 1, movie))
            }
            _ => None,
        };
        if let Some((at, is64, value)) = field {
            if is64 {
                mp4[at..at + 8].copy_from_slice(&value.to_be_bytes());
            } else {
                let v = u32::try_from(value).map_err(|_| "duration overflow")?;
                mp4[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reading the metadata back
// ---------------------------------------------------------------------------------------------

/// Reads the `comment` tag (`moov/udta/meta/ilst/©cmt`) that [`super::write_video`] stores from
/// [`EncodeOptions::metadata`]. `Ok(None)` for an MP4 without one; an error if the file cannot
/// be read or is not an MP4. Reads only the box headers and the moov box, not the media data.
pub fn read_mp4_metadata(path: &Path) -> Result<Option<String>> {
    let mut f = crate::files::open_regular(path, crate::files::FileKind::Video)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    mp4_metadata_from(&mut f, len).map_err(|e| match e {
        Mp4Problem::Io(e) => Error::io(path, e),
        Mp4Problem::Invalid(why) => {
            Error::InvalidArgument(format!("{} is not a readable MP4 file: {why}", path.display()))
        }
    })
}

/// Why [`mp4_metadata_from`] found no answer.
#[derive(Debug)]
pub enum Mp4Problem {
    Io(std::io::Error),
    /// Not an MP4, or a damaged one.
    Invalid(String),
}

/// [`read_mp4_metadata`] over any reader of `len` bytes.
pub fn mp4_metadata_from<R: Read + Seek>(f: &mut R, len: u64) -> std::result::Result<Option<String>, Mp4Problem> {
    let invalid = Mp4Problem::Invalid;
    let mut pos = 0u64;
    let mut first = true;
    while pos < len {
        let mut hdr = [0u8; 16];
        f.seek(SeekFrom::Start(pos)).map_err(Mp4Problem::Io)?;
        let avail = (len - pos).min(16) as usize;
        f.read_exact(&mut hdr[..avail]).map_err(Mp4Problem::Io)?;
        if avail < 8 {
            return Err(invalid(format!("truncated box header at byte {pos}")));
        }
        let typ: [u8; 4] = hdr[4..8].try_into().unwrap();
        if first && &typ != b"ftyp" {
            return Err(invalid("it does not start with an ftyp box".into()));
        }
        first = false;
        let (size, header) = match be32(&hdr, 0) {
            0 => (len - pos, 8u64),
            1 if avail == 16 => (be64(&hdr, 8), 16),
            1 => return Err(invalid(format!("truncated box header at byte {pos}"))),
            s => (s as u64, 8),
        };
        if size < header || size > len - pos {
            return Err(invalid(format!("box at byte {pos} has an impossible size {size}")));
        }
        if &typ == b"moov" {
            if size > 256 << 20 {
                return Err(invalid("moov box larger than 256 MiB".into()));
            }
            let mut moov = vec![0u8; (size - header) as usize];
            f.seek(SeekFrom::Start(pos + header)).map_err(Mp4Problem::Io)?;
            f.read_exact(&mut moov).map_err(Mp4Problem::Io)?;
            return find_comment(&moov).map_err(invalid);
        }
        pos += size;
    }
    Err(invalid("it has no moov box".into()))
}

/// Finds `udta/meta/ilst/©cmt/data` in a moov payload.
fn find_comment(moov: &[u8]) -> std::result::Result<Option<String>, String> {
    for udta in child_boxes(moov, 0..moov.len())?.iter().filter(|b| &b.typ == b"udta") {
        for meta in child_boxes(moov, udta.payload())?.iter().filter(|b| &b.typ == b"meta") {
            let mut r = meta.payload();
            // ISO meta is a full box (4 bytes version/flags); old QuickTime meta is not.
            if r.len() >= 8 && &moov[r.start + 4..r.start + 8] != b"hdlr" {
                r.start += 4;
            }
            for ilst in child_boxes(moov, r)?.iter().filter(|b| &b.typ == b"ilst") {
                for item in child_boxes(moov, ilst.payload())?.iter().filter(|b| &b.typ == b"\xa9cmt") {
                    if let Some(data) = child_boxes(moov, item.payload())?.iter().find(|b| &b.typ == b"data") {
                        let p = data.payload();
                        if p.len() < 8 {
                            return Err("truncated ©cmt data box".into());
                        }
                        let text = &moov[p.start + 8..p.end];
                        return String::from_utf8(text.to_vec())
                            .map(Some)
                            .map_err(|_| "the ©cmt comment is not UTF-8".to_string());
                    }
                }
            }
        }
    }
    Ok(None)
}

/// The top-level box types of an MP4 file in order, with their offsets and sizes
/// (for checking the fast-start layout).
pub fn mp4_top_level_boxes(path: &Path) -> Result<Vec<(String, u64, u64)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let boxes =
        child_boxes(&bytes, 0..bytes.len()).map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    Ok(boxes
        .iter()
        .map(|b| (String::from_utf8_lossy(&b.typ).into_owned(), b.start as u64, (b.end - b.start) as u64))
        .collect())
}
