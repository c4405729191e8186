//! MP4 (or MOV) files with H.264 video: demuxed with `re_mp4`, the SPS read with `h264-reader`
//! (colour matrix, range, bit depth, interlacing), decoded with OpenH264 (bundled, built from
//! source), turned to RGB here and rotated by the track's display matrix.
//!
//! One file: demuxing, the SPS, decoding and colour conversion of one format share the track's state.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use h264_reader::nal::sps::{FrameMbsFlags, SeqParameterSet};
use openh264::decoder::{DecodedYUV, Decoder, DecoderConfig, Flush};
use openh264::formats::YUVSource;
use openh264::OpenH264API;
use re_mp4::{Mp4, StsdBoxContent, TrackKind};

use super::{Collector, Want};
use crate::error::{Error, Result};

/// How a decoded picture turns into RGB: BT.601/709/2020 weights, limited or full range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ColourMatrix {
    kr: f32,
    kb: f32,
    full_range: bool,
}

impl ColourMatrix {
    /// From the SPS's VUI `matrix_coefficients` and `video_full_range_flag`; unspecified
    /// matrices are BT.601, as ffmpeg's converter takes them.
    fn from_sps(sps: &SeqParameterSet) -> Self {
        let signal = sps.vui_parameters.as_ref().and_then(|v| v.video_signal_type.as_ref());
        let full_range = signal.is_some_and(|s| s.video_full_range_flag);
        let matrix = signal.and_then(|s| s.colour_description.as_ref()).map(|d| d.matrix_coefficients);
        let (kr, kb) = match matrix {
            Some(1) => (0.2126, 0.0722),
            Some(9 | 10) => (0.2627, 0.0593),
            _ => (0.299, 0.114),
        };
        Self { kr, kb, full_range }
    }
}

/// Clockwise quarter turns that the display matrix asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotation {
    None,
    Cw90,
    Cw180,
    Cw270,
}

impl Rotation {
    /// The tkhd matrix [a b u; c d v; x y w] maps a pixel (p, q) to (a·p + c·q, b·p + d·q):
    /// a = 0, b = 1, c = −1, d = 0 (what phones write for a portrait video) turns the image 90°
    /// clockwise on screen, as ffmpeg's autorotate does.
    fn from_matrix(a: i32, b: i32, c: i32, d: i32) -> Option<Self> {
        match (a.signum(), b.signum(), c.signum(), d.signum()) {
            (1, 0, 0, 1) => Some(Rotation::None),
            (0, 1, -1, 0) => Some(Rotation::Cw90),
            (-1, 0, 0, -1) => Some(Rotation::Cw180),
            (0, -1, 1, 0) => Some(Rotation::Cw270),
            _ => None,
        }
    }

    fn degrees(self) -> u32 {
        match self {
            Rotation::None => 0,
            Rotation::Cw90 => 90,
            Rotation::Cw180 => 180,
            Rotation::Cw270 => 270,
        }
    }
}

pub(super) fn read_mp4(path: &Path, c: &mut Collector) -> Result<Option<f64>> {
    let file = crate::files::open_regular(path, crate::files::FileKind::Video)?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let (mp4, index) = read_index(&mut reader, file_len, c)?;
    let Some(track) = mp4.tracks().values().find(|t| t.kind == Some(TrackKind::Video)) else {
        return Err(match other_codec(&index) {
            Some(codec) => codec_error(codec, c),
            None => {
                c.error("it has no video track (or one in a format that is not read): give an MP4 with H.264 video")
            }
        });
    };
    let trak = track.trak(&mp4);
    let avcc = match &trak.mdia.minf.stbl.stsd.contents {
        StsdBoxContent::Avc1(avc1) => &avc1.avcc.contents,
        StsdBoxContent::Hev1(_) | StsdBoxContent::Hvc1(_) => return Err(codec_error("HEVC (H.265)", c)),
        StsdBoxContent::Av01(_) => return Err(codec_error("AV1", c)),
        StsdBoxContent::Vp08(_) => return Err(codec_error("VP8", c)),
        StsdBoxContent::Vp09(_) => return Err(codec_error("VP9", c)),
        _ => return Err(codec_error("not H.264", c)),
    };
    let m = &trak.tkhd.matrix;
    let rotation = Rotation::from_matrix(m.a, m.b, m.c, m.d).ok_or_else(|| {
        c.error(format!(
            "its display matrix ({} {} {} {}) is not a rotation by a multiple of 90 degrees (it mirrors or skews): \
             re-encode it with the transformation applied",
            m.a, m.b, m.c, m.d
        ))
    })?;
    if rotation != Rotation::None {
        c.warn(format!(
            "the video's display matrix turns it {}° clockwise: its frames were rotated to stand as it plays",
            rotation.degrees()
        ));
    }

    let sps_nal = avcc.sequence_parameter_sets.first().ok_or_else(|| {
        c.error("its H.264 configuration (avcC) has no sequence parameter set: the file is corrupt; export it again")
    })?;
    let sps = parse_sps(&sps_nal.bytes)
        .map_err(|e| c.error(format!("its H.264 sequence parameter set is unreadable ({e}): the file is corrupt")))?;
    check_supported(&sps, c)?;
    // The decoder allocates pictures of the size the SPS declares: checked against the budget.
    let (sps_w, sps_h) = sps
        .pixel_dimensions()
        .map_err(|e| c.error(format!("its H.264 frame size is unreadable ({e:?}): the file is corrupt")))?;
    c.check_declared_size(sps_w as usize, sps_h as usize, "its H.264 frame size")?;
    let colour = ColourMatrix::from_sps(&sps);
    let length_size = avcc.length_size_minus_one as usize + 1;
    if ![1, 2, 4].contains(&length_size) {
        return Err(c.error(format!("its NAL length size is {length_size} bytes: the file is corrupt")));
    }
    let mut header = Vec::new();
    for nal in avcc.sequence_parameter_sets.iter().chain(&avcc.picture_parameter_sets) {
        header.extend_from_slice(&[0, 0, 0, 1]);
        header.extend_from_slice(&nal.bytes);
    }

    let samples = &track.samples;
    if samples.is_empty() {
        return Err(c.error("its video track holds no frames: give a video with at least one frame"));
    }
    frame_rate_warning(track.timescale, samples, c);

    // Decode order differs from display order when the stream has B-frames: frames are
    // reordered by composition time as they come out of the decoder.
    let mut display_rank: Vec<(i64, usize)> =
        samples.iter().enumerate().map(|(i, s)| (s.composition_timestamp, i)).collect();
    display_rank.sort();
    let mut pending: std::collections::BTreeMap<i64, Picture> = Default::default();
    let mut display_times = display_rank.iter().map(|&(t, _)| t);
    let mut next_display = display_times.next();

    let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
    let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| c.error(format!("the H.264 decoder cannot start: {e}")))?;
    let mut packet = Vec::new();
    let mut data = Vec::new();
    // The composition times of the samples fed but not yet out of the decoder, in decode order.
    let mut in_flight: std::collections::VecDeque<i64> = Default::default();
    let mut stop = false;
    let mut produced = 0usize;
    for (i, sample) in samples.iter().enumerate() {
        if stop {
            break;
        }
        let end = sample.offset.checked_add(sample.size);
        if end.is_none_or(|end| end > file_len) {
            return Err(c.error(format!(
                "it is truncated: frame {} of {} lies past its end ({file_len} bytes): download or export it again, \
                 or ask for frames from its beginning",
                i + 1,
                samples.len()
            )));
        }
        data.resize(sample.size as usize, 0);
        reader
            .seek(SeekFrom::Start(sample.offset))
            .and_then(|_| reader.read_exact(&mut data))
            .map_err(|e| Error::io(path, e))?;
        packet.clear();
        if i == 0 {
            packet.extend_from_slice(&header);
        }
        to_annex_b(&data, length_size, &mut packet)
            .map_err(|e| c.error(format!("frame {} is corrupt ({e}): export the video again", i + 1)))?;
        in_flight.push_back(sample.composition_timestamp);
        let decoded = decoder.decode(&packet).map_err(|e| {
            c.error(format!("frame {} cannot be decoded ({e}): the file is corrupt; export it again", i + 1))
        })?;
        if let Some(yuv) = decoded {
            let picture = Picture::from_yuv(&yuv);
            let time = take_output_time(&mut in_flight);
            pending.insert(time, picture);
            produced += 1;
        }
        stop = drain(&mut pending, &mut next_display, &mut display_times, colour, rotation, c)?;
    }
    if !stop {
        for yuv in decoder
            .flush_remaining()
            .map_err(|e| c.error(format!("the last frames cannot be decoded ({e}): the file is corrupt")))?
        {
            let picture = Picture::from_yuv(&yuv);
            let time = take_output_time(&mut in_flight);
            pending.insert(time, picture);
            produced += 1;
        }
        let stopped = drain(&mut pending, &mut next_display, &mut display_times, colour, rotation, c)?;
        if !stopped && produced < samples.len() {
            return Err(c.error(format!(
                "only {produced} of its {} frames could be decoded: the file is corrupt; export it again",
                samples.len()
            )));
        }
    }
    // The last sample's duration comes from the track's duration and edit list: leave it out.
    let timed = if samples.len() > 1 { &samples[..samples.len() - 1] } else { &samples[..] };
    let mean = timed.iter().map(|s| s.duration as f64).sum::<f64>() / timed.len() as f64;
    Ok((mean > 0.0 && track.timescale > 0).then(|| track.timescale as f64 / mean))
}

fn codec_error(codec: &str, c: &Collector) -> Error {
    c.error(format!(
        "its video is {codec}; only H.264 video is read: convert it to H.264 \
         (for example `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`) or to a folder of PNG frames"
    ))
}

/// The video codec other than H.264 that a sample description of the index names, if any: how
/// to tell the user why a file that parses as MP4 gives no frames.
fn other_codec(index: &[u8]) -> Option<&'static str> {
    let mut from = 0;
    while let Some(at) = index[from..].windows(4).position(|w| w == b"stsd").map(|p| p + from) {
        // 'stsd', version and flags, entry count, the first entry's size, then its type.
        if let Some(kind) = index.get(at + 16..at + 20) {
            match kind {
                b"hvc1" | b"hev1" => return Some("HEVC (H.265)"),
                b"av01" => return Some("AV1"),
                b"vp09" => return Some("VP9"),
                b"vp08" => return Some("VP8"),
                b"mp4v" => return Some("MPEG-4 Part 2"),
                b"apcn" | b"apch" | b"apcs" | b"apco" | b"ap4h" => return Some("Apple ProRes"),
                _ => {}
            }
        }
        from = at + 4;
    }
    None
}

/// Parses the MP4's index (`ftyp` and `moov`) without its media data, so that a file cut short
/// inside `mdat` still gives the frames it holds (a fragmented MP4 is parsed whole).
fn read_index(reader: &mut BufReader<File>, file_len: u64, c: &Collector) -> Result<(Mp4, Vec<u8>)> {
    let unreadable = |e: &dyn std::fmt::Display| {
        c.error(format!(
            "it is not a readable MP4 ({e}): the file is corrupt, truncated or not an MP4; export it again"
        ))
    };
    let io = |e: std::io::Error| unreadable(&e);
    let mut index = Vec::new();
    let (mut pos, mut fragmented, mut has_moov) = (0u64, false, false);
    while pos + 8 <= file_len {
        reader.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut head = [0u8; 16];
        reader.read_exact(&mut head[..8]).map_err(io)?;
        let kind = [head[4], head[5], head[6], head[7]];
        let (size, header) = match u32::from_be_bytes([head[0], head[1], head[2], head[3]]) {
            0 => (file_len - pos, 8),
            1 => {
                reader.read_exact(&mut head[8..16]).map_err(io)?;
                (u64::from_be_bytes(head[8..16].try_into().expect("8 bytes")), 16)
            }
            n => (n as u64, 8),
        };
        if size < header || !kind.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            return Err(unreadable(&format!("a box at byte {pos} is malformed")));
        }
        let end = pos.saturating_add(size);
        match &kind {
            b"moov" | b"ftyp" => {
                if end > file_len {
                    return Err(c.error(format!(
                        "it is truncated: its `{}` box needs {size} bytes but only {} remain: download or export it again",
                        String::from_utf8_lossy(&kind),
                        file_len - pos
                    )));
                }
                has_moov |= &kind == b"moov";
                let start = index.len();
                index.resize(start + size as usize, 0);
                reader.seek(SeekFrom::Start(pos)).and_then(|_| reader.read_exact(&mut index[start..])).map_err(io)?;
            }
            b"moof" => fragmented = true,
            _ => {}
        }
        pos = end;
    }
    if !has_moov {
        return Err(c.error(
            "it has no `moov` box (the index of its frames): the recording was not finished or the file is \
             truncated or not an MP4; export it again",
        ));
    }
    // The sample tables are expanded into one entry a frame by the parser: the frames they
    // declare are counted first (a 20-byte `stsz` can declare four billion).
    c.check_declared_frames(declared_samples(&index))?;
    if fragmented {
        c.check_declared_frames(fragment_samples(reader, file_len, c)?)?;
    }
    let parsed = if fragmented {
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        Mp4::read(reader, file_len)
    } else {
        Mp4::read_bytes(&index)
    };
    match parsed {
        Ok(mp4) => Ok((mp4, index)),
        Err(e) => Err(match other_codec(&index) {
            Some(codec) => codec_error(codec, c),
            None => unreadable(&e),
        }),
    }
}

/// The boxes that hold the boxes with sample counts.
const CONTAINERS: &[&[u8; 4]] = &[b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"];

/// The frames the `stsz` and `trun` boxes in `bytes` (a run of boxes) declare, summed.
pub fn declared_samples(bytes: &[u8]) -> u64 {
    let mut total = 0u64;
    let mut pos = 0usize;
    while pos + 8 <= bytes.len() {
        let size = u32::from_be_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let kind: &[u8; 4] = bytes[pos + 4..pos + 8].try_into().expect("4 bytes");
        let (size, header) = match size {
            0 => (bytes.len() - pos, 8),
            1 if pos + 16 <= bytes.len() => {
                let big = u64::from_be_bytes(bytes[pos + 8..pos + 16].try_into().expect("8 bytes"));
                (usize::try_from(big).unwrap_or(usize::MAX), 16)
            }
            n => (n, 8),
        };
        if size < header {
            break;
        }
        let end = pos.saturating_add(size).min(bytes.len());
        let body = &bytes[pos + header..end];
        let count_at =
            |at: usize| body.get(at..at + 4).map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4")) as u64);
        match kind {
            // version and flags, sample size, sample count
            b"stsz" => total = total.saturating_add(count_at(8)),
            // version and flags, sample count
            b"trun" => total = total.saturating_add(count_at(4)),
            k if CONTAINERS.contains(&k) => total = total.saturating_add(declared_samples(body)),
            _ => {}
        }
        pos = end;
    }
    total
}

/// The frames the fragments (`moof` boxes) of the file declare.
fn fragment_samples(reader: &mut BufReader<File>, file_len: u64, c: &Collector) -> Result<u64> {
    let io = |e: std::io::Error| c.error(format!("it is not a readable MP4 ({e}): export it again"));
    let (mut pos, mut total) = (0u64, 0u64);
    while pos + 8 <= file_len {
        reader.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut head = [0u8; 16];
        reader.read_exact(&mut head[..8]).map_err(io)?;
        let (size, header) = match u32::from_be_bytes([head[0], head[1], head[2], head[3]]) {
            0 => (file_len - pos, 8),
            1 => {
                reader.read_exact(&mut head[8..16]).map_err(io)?;
                (u64::from_be_bytes(head[8..16].try_into().expect("8 bytes")), 16)
            }
            n => (n as u64, 8),
        };
        if size < header {
            break;
        }
        if &head[4..8] == b"moof" {
            let len = size.min(file_len - pos) as usize;
            let mut bytes = vec![0u8; len];
            reader.seek(SeekFrom::Start(pos)).and_then(|_| reader.read_exact(&mut bytes)).map_err(io)?;
            total = total.saturating_add(declared_samples(&bytes));
        }
        pos = pos.saturating_add(size);
    }
    Ok(total)
}

/// The composition time of the picture the decoder just gave: the decoder outputs pictures in
/// display order, so it is the earliest of those fed and not yet given.
fn take_output_time(in_flight: &mut std::collections::VecDeque<i64>) -> i64 {
    let Some((k, _)) = in_flight.iter().enumerate().min_by_key(|(_, &t)| t) else {
        return i64::MAX;
    };
    in_flight.remove(k).unwrap_or(i64::MAX)
}

/// Hands the decoded pictures over in display order as far as they are complete. Returns
/// whether the collector wants no more.
fn drain(
    pending: &mut std::collections::BTreeMap<i64, Picture>,
    next: &mut Option<i64>,
    times: &mut impl Iterator<Item = i64>,
    colour: ColourMatrix,
    rotation: Rotation,
    c: &mut Collector,
) -> Result<bool> {
    while let Some(t) = *next {
        let Some(picture) = pending.remove(&t) else { break };
        *next = times.next();
        match c.offer() {
            Want::Stop => return Ok(true),
            Want::Skip => {}
            Want::Take => {
                let (rgb, w, h) = picture.to_rgb(colour, rotation);
                let what = format!("frame {}", c.offered() - 1);
                c.push_u8(&rgb, w, h, &what)?;
            }
        }
    }
    Ok(c.satisfied())
}

/// A decoded 4:2:0 picture, copied out of the decoder's buffers.
struct Picture {
    width: usize,
    height: usize,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

impl Picture {
    fn from_yuv(yuv: &DecodedYUV) -> Self {
        let (width, height) = yuv.dimensions();
        let (ys, us, vs) = yuv.strides();
        let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
        let plane = |data: &[u8], stride: usize, w: usize, h: usize| -> Vec<u8> {
            let mut out = Vec::with_capacity(w * h);
            for row in 0..h {
                let start = row * stride;
                match data.get(start..start + w) {
                    Some(line) => out.extend_from_slice(line),
                    // The decoder's chroma planes of an odd height can lack the last row
                    // (openh264 hands out height / 2 rows): repeat the one above.
                    None if row > 0 => out.extend_from_within((row - 1) * w..row * w),
                    None => out.resize(w, 0),
                }
            }
            out
        };
        Self {
            width,
            height,
            y: plane(yuv.y(), ys, width, height),
            u: plane(yuv.u(), us, cw, ch),
            v: plane(yuv.v(), vs, cw, ch),
        }
    }

    /// RGB with the chroma upsampled bilinearly from its H.264 default siting (co-sited with the
    /// even luma columns, midway between luma rows), then rotated.
    fn to_rgb(&self, m: ColourMatrix, rotation: Rotation) -> (Vec<u8>, usize, usize) {
        let (w, h) = (self.width, self.height);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let (y_off, y_scale, c_scale) =
            if m.full_range { (0.0, 1.0 / 255.0, 1.0 / 255.0) } else { (16.0, 1.0 / 219.0, 1.0 / 224.0) };
        let kg = 1.0 - m.kr - m.kb;
        let mut rgb = vec![0u8; w * h * 3];
        let chroma = |plane: &[u8], x: usize, y: usize| -> f32 {
            // Horizontal: luma column x sits at chroma column x / 2. Vertical: luma row y sits at
            // chroma row (y − 0.5) / 2.
            let fx = x as f32 / 2.0;
            let fy = ((y as f32 - 0.5) / 2.0).max(0.0);
            let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(cw - 1), (y0 + 1).min(ch - 1));
            let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
            let at = |xx: usize, yy: usize| plane[yy * cw + xx] as f32;
            let top = at(x0, y0) * (1.0 - ax) + at(x1, y0) * ax;
            let bottom = at(x0, y1) * (1.0 - ax) + at(x1, y1) * ax;
            top * (1.0 - ay) + bottom * ay
        };
        let to_u8 = |v: f32| (v * 255.0).round().clamp(0.0, 255.0) as u8;
        for y in 0..h {
            for x in 0..w {
                let luma = (self.y[y * w + x] as f32 - y_off) * y_scale;
                let pb = (chroma(&self.u, x, y) - 128.0) * c_scale;
                let pr = (chroma(&self.v, x, y) - 128.0) * c_scale;
                let r = luma + 2.0 * (1.0 - m.kr) * pr;
                let b = luma + 2.0 * (1.0 - m.kb) * pb;
                let g = (luma - m.kr * r - m.kb * b) / kg;
                let o = (y * w + x) * 3;
                rgb[o] = to_u8(r);
                rgb[o + 1] = to_u8(g);
                rgb[o + 2] = to_u8(b);
            }
        }
        rotate(rgb, w, h, rotation)
    }
}

/// Rotates a packed RGB image clockwise; returns it with its new width and height.
fn rotate(rgb: Vec<u8>, w: usize, h: usize, rotation: Rotation) -> (Vec<u8>, usize, usize) {
    if rotation == Rotation::None {
        return (rgb, w, h);
    }
    let (ow, oh) = if rotation == Rotation::Cw180 { (w, h) } else { (h, w) };
    let mut out = vec![0u8; rgb.len()];
    for oy in 0..oh {
        for ox in 0..ow {
            let (sx, sy) = match rotation {
                Rotation::Cw90 => (oy, h - 1 - ox),
                Rotation::Cw180 => (w - 1 - ox, h - 1 - oy),
                Rotation::Cw270 => (w - 1 - oy, ox),
                Rotation::None => unreachable!(),
            };
            let (s, d) = ((sy * w + sx) * 3, (oy * ow + ox) * 3);
            out[d..d + 3].copy_from_slice(&rgb[s..s + 3]);
        }
    }
    (out, ow, oh)
}

fn parse_sps(nal: &[u8]) -> std::result::Result<SeqParameterSet, String> {
    if nal.first().map(|b| b & 0x1f) != Some(7) {
        return Err("the first parameter set is not an SPS".into());
    }
    let rbsp = h264_reader::rbsp::decode_nal(nal).map_err(|e| e.to_string())?;
    SeqParameterSet::from_bits(h264_reader::rbsp::BitReader::new(&*rbsp)).map_err(|e| format!("{e:?}"))
}

/// Refuses the H.264 features OpenH264 does not decode: interlaced coding, more than 8 bits,
/// chroma other than 4:2:0.
fn check_supported(sps: &SeqParameterSet, c: &Collector) -> Result<()> {
    let convert = "convert it to 8-bit 4:2:0 progressive H.264 (for example `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`) or to a folder of PNG frames";
    if !matches!(sps.frame_mbs_flags, FrameMbsFlags::Frames) {
        return Err(c.error(format!("its H.264 video is interlaced, which the decoder cannot read: {convert}")));
    }
    let info = &sps.chroma_info;
    if info.bit_depth_luma_minus8 != 0 || info.bit_depth_chroma_minus8 != 0 {
        return Err(c.error(format!(
            "its H.264 video has {} bits a sample, which the decoder cannot read: {convert}",
            8 + info.bit_depth_luma_minus8
        )));
    }
    if info.chroma_format != h264_reader::nal::sps::ChromaFormat::YUV420 {
        return Err(c.error(format!(
            "its H.264 video has {:?} chroma, which the decoder cannot read: {convert}",
            info.chroma_format
        )));
    }
    Ok(())
}

/// Length-prefixed NAL units (the MP4 layout) → Annex B start codes (what OpenH264 reads).
fn to_annex_b(data: &[u8], length_size: usize, out: &mut Vec<u8>) -> std::result::Result<(), String> {
    let mut p = 0;
    while p < data.len() {
        let Some(len_bytes) = data.get(p..p + length_size) else {
            return Err("a NAL length runs past the frame's end".into());
        };
        let len = len_bytes.iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        p += length_size;
        let Some(nal) = data.get(p..p + len) else {
            return Err(format!("a NAL unit of {len} bytes runs past the frame's end"));
        };
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
        p += len;
    }
    Ok(())
}

/// Warns when the frames do not all last the same (a variable frame rate): frames are chosen by
/// number, so every n-th frame is not a fixed interval of time.
fn frame_rate_warning(timescale: u64, samples: &[re_mp4::Sample], c: &mut Collector) {
    if samples.len() < 3 || timescale == 0 {
        return;
    }
    // The last sample's duration is often cut by the edit list; leave it out.
    let durations = samples[..samples.len() - 1].iter().map(|s| s.duration);
    let (lo, hi) = durations.fold((u64::MAX, 0), |(lo, hi), d| (lo.min(d), hi.max(d)));
    if hi > lo + lo / 100 + 1 {
        let ms = |d: u64| d as f64 * 1000.0 / timescale as f64;
        c.warn(format!(
            "the video has a variable frame rate (frames last {:.1} to {:.1} ms): frames are taken by their number, not by time",
            ms(lo),
            ms(hi)
        ));
    }
}
