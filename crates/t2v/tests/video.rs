//! Output-format tests. Checks that need ffprobe/ffmpeg/chromium say SKIPPED without them (and fail
//! in CI, which installs Debian's `ffmpeg chromium`: t2v-testkit's rule).
//!
//! One file: each file under tests/ is a binary of its own to link; every output format shares one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::http::{Response, Server};
use t2v::video::{
    gif_delay_cs, mp4_top_level_boxes, read_mp4_metadata, write_video, write_video_auto, EncodeOptions, Frames,
    Quality, VideoFormat,
};

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A fresh, empty folder for one test (removed when dropped, unless `T2V_KEEP_TEST_FILES` is set).
struct TmpDir(tempfile::TempDir);
impl TmpDir {
    fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("t2v-video-test-{name}-"))
            .disable_cleanup(std::env::var_os("T2V_KEEP_TEST_FILES").is_some())
            .tempdir()
            .unwrap();
        TmpDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    /// Names of everything in the folder, sorted.
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.0.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// Smooth synthetic clip: diagonal gradients plus a moving disc and a moving square.
fn smooth_clip(f: usize, h: usize, w: usize) -> Vec<f32> {
    let mut d = Vec::with_capacity(f * h * w * 3);
    for t in 0..f {
        let tt = t as f32 / f.max(1) as f32;
        let (cx, cy, r) = (w as f32 * (0.2 + 0.6 * tt), h as f32 * 0.4, w.min(h) as f32 * 0.15);
        let (sx, sy, s) = (w as f32 * (0.8 - 0.5 * tt), h as f32 * 0.7, w.min(h) as f32 * 0.12);
        for y in 0..h {
            for x in 0..w {
                let (xf, yf) = (x as f32 / w as f32, y as f32 / h as f32);
                let mut px = [xf, yf, 0.5 + 0.5 * ((xf + yf) * 3.0 + tt * std::f32::consts::TAU).sin() * 0.8];
                let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                if dx * dx + dy * dy < r * r {
                    px = [0.9, 0.2, 0.1];
                }
                if (x as f32 - sx).abs() < s && (y as f32 - sy).abs() < s {
                    px = [0.1, 0.3, 0.9];
                }
                d.extend_from_slice(&px);
            }
        }
    }
    d
}

/// Uniform random values in [0, 1) (like the fixture model's output).
fn noise_clip(f: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..f * h * w * 3)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

fn skip_without(tool: &str) -> bool {
    t2v_testkit::ffmpeg_tool(tool).is_none()
}

fn ffprobe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "ffprobe failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Decodes the MP4 with ffmpeg to raw yuv420p and returns each frame's Y plane expanded from
/// limited to full range (0..255 floats), plus the frame count.
fn decode_luma(path: &Path, w: usize, h: usize) -> Vec<Vec<f32>> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "yuv420p", "-"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ffmpeg decode failed: {}", String::from_utf8_lossy(&out.stderr));
    let fsize = w * h * 3 / 2;
    assert_eq!(out.stdout.len() % fsize, 0, "decoded size is not a whole number of {w}x{h} frames");
    out.stdout.chunks(fsize).map(|f| f[..w * h].iter().map(|&y| (y as f32 - 16.0) * 255.0 / 219.0).collect()).collect()
}

/// Decodes the MP4 with ffmpeg to rgb24 (ffmpeg's own colour conversion, from the VUI tags).
fn decode_rgb(path: &Path) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ffmpeg decode failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// BT.601 luma (0..255) of the input frames (clamped to [0,1]).
fn input_luma(data: &[f32], f: usize, h: usize, w: usize) -> Vec<Vec<f32>> {
    (0..f)
        .map(|t| {
            (0..h * w)
                .map(|p| {
                    let i = (t * h * w + p) * 3;
                    let c = |v: f32| v.clamp(0.0, 1.0);
                    255.0 * (0.299 * c(data[i]) + 0.587 * c(data[i + 1]) + 0.114 * c(data[i + 2]))
                })
                .collect()
        })
        .collect()
}

/// Luma PSNR over the whole clip; `decoded` frames are `dw` wide (possibly padded), compared on
/// the top-left `w`x`h`.
fn luma_psnr(input: &[Vec<f32>], decoded: &[Vec<f32>], h: usize, w: usize, dw: usize) -> f64 {
    assert_eq!(input.len(), decoded.len(), "frame count differs");
    let mut se = 0f64;
    for (a, b) in input.iter().zip(decoded) {
        for y in 0..h {
            for x in 0..w {
                let d = (a[y * w + x] - b[y * dw + x]) as f64;
                se += d * d;
            }
        }
    }
    let mse = se / (input.len() * h * w) as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

fn opts_with(meta: Option<&str>) -> EncodeOptions {
    EncodeOptions { metadata: meta.map(str::to_string), ..Default::default() }
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Encodes, decodes and returns (luma PSNR, file size).
fn mp4_roundtrip_psnr(dir: &TmpDir, name: &str, data: &[f32], f: usize, h: usize, w: usize, q: Quality) -> (f64, u64) {
    let path = dir.path(name);
    let frames = Frames::new(data, f, h, w).unwrap();
    let opts = EncodeOptions { quality: q, ..Default::default() };
    write_video(&frames, VideoFormat::Mp4, &path, &opts).unwrap();
    let decoded = decode_luma(&path, w + (w & 1), h + (h & 1));
    let psnr = luma_psnr(&input_luma(data, f, h, w), &decoded, h, w, w + (w & 1));
    (psnr, file_size(&path))
}

// ---------------------------------------------------------------------------------------------
// format selection and options
// ---------------------------------------------------------------------------------------------

#[test]
fn format_from_path_and_name() {
    assert_eq!(VideoFormat::from_path(Path::new("a/b.mp4")).unwrap(), VideoFormat::Mp4);
    assert_eq!(VideoFormat::from_path(Path::new("b.MP4")).unwrap(), VideoFormat::Mp4);
    assert_eq!(VideoFormat::from_path(Path::new("b.gif")).unwrap(), VideoFormat::Gif);
    assert_eq!(VideoFormat::from_path(Path::new("b.npy")).unwrap(), VideoFormat::Npy);
    assert_eq!(VideoFormat::from_path(Path::new("frames")).unwrap(), VideoFormat::PngFrames);
    assert_eq!(VideoFormat::from_path(Path::new("out.d/")).unwrap(), VideoFormat::PngFrames);
    let err = VideoFormat::from_path(Path::new("b.avi")).unwrap_err().to_string();
    assert!(err.contains(".avi") && err.contains(".mp4"), "{err}");
    for f in VideoFormat::ALL {
        assert_eq!(f.name().parse::<VideoFormat>().unwrap(), f);
    }
    assert_eq!(VideoFormat::Mp4.extension(), "mp4");
    assert!("webm".parse::<VideoFormat>().is_err());
    assert_eq!("20".parse::<Quality>().unwrap(), Quality::Qp(20));
    assert_eq!("qp=12".parse::<Quality>().unwrap(), Quality::Qp(12));
    assert!("52".parse::<Quality>().is_err());
    assert!("11".parse::<Quality>().is_err(), "openh264 cannot go below QP 12");
    assert_eq!(Quality::default(), Quality::Qp(Quality::DEFAULT_QP));
    assert_eq!(EncodeOptions::default().fps, 8);
}

#[test]
fn invalid_frames_are_rejected() {
    let dir = TmpDir::new("invalid");
    let data = vec![0.5f32; 2 * 4 * 4 * 3];
    assert!(Frames::new(&data, 2, 4, 5).is_err());
    assert!(Frames::new(&data, 0, 4, 4).is_err());
    let frames = Frames { data: &data, frames: 3, height: 4, width: 4 };
    for f in VideoFormat::ALL {
        let e = write_video(&frames, f, &dir.path("x"), &EncodeOptions::default()).unwrap_err();
        assert!(e.to_string().contains("need"), "{e}");
    }
    let frames = Frames::new(&data, 2, 4, 4).unwrap();
    let e = write_video(&frames, VideoFormat::Mp4, &dir.path("x.mp4"), &EncodeOptions { fps: 0, ..Default::default() });
    assert!(e.is_err());
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
}

// ---------------------------------------------------------------------------------------------
// MP4
// ---------------------------------------------------------------------------------------------

const META: &str = r#"{"prompt":"a cat surfing a wave, \"quoted\" ünïcödé","seed":42,"steps":25,"guidance_scale":9.0}"#;

#[test]
fn mp4_layout_and_metadata_without_tools() {
    let dir = TmpDir::new("mp4-layout");
    let data = smooth_clip(4, 64, 48);
    let frames = Frames::new(&data, 4, 64, 48).unwrap();
    let path = dir.path("clip.mp4");
    write_video(&frames, VideoFormat::Mp4, &path, &opts_with(Some(META))).unwrap();
    let boxes = mp4_top_level_boxes(&path).unwrap();
    let names: Vec<&str> = boxes.iter().map(|b| b.0.as_str()).collect();
    assert_eq!(names, ["ftyp", "moov", "mdat"], "fast start: moov must come before mdat");
    assert_eq!(read_mp4_metadata(&path).unwrap().as_deref(), Some(META));
    // The whole file is there and nothing else was left in the folder.
    assert_eq!(boxes.iter().map(|b| b.2).sum::<u64>(), file_size(&path));
    assert_eq!(dir.entries(), ["clip.mp4"]);

    // Without metadata: Ok(None).
    let path2 = dir.path("plain.mp4");
    write_video(&frames, VideoFormat::Mp4, &path2, &EncodeOptions::default()).unwrap();
    assert_eq!(read_mp4_metadata(&path2).unwrap(), None);
    // Not an MP4: an error, not None.
    std::fs::write(dir.path("junk.mp4"), b"definitely not an mp4 file").unwrap();
    assert!(read_mp4_metadata(&dir.path("junk.mp4")).is_err());
    assert!(read_mp4_metadata(&dir.path("missing.mp4")).is_err());
}

#[test]
fn mp4_ffprobe_smooth_clip() {
    if skip_without("ffprobe") || skip_without("ffmpeg") {
        return;
    }
    let dir = TmpDir::new("mp4-ffprobe");
    let (f, h, w) = (16, 256, 256);
    let data = smooth_clip(f, h, w);
    let frames = Frames::new(&data, f, h, w).unwrap();
    let path = dir.path("smooth.mp4");
    write_video(&frames, VideoFormat::Mp4, &path, &opts_with(Some(META))).unwrap();

    let j = ffprobe(&path);
    let s = &j["streams"][0];
    eprintln!(
        "ffprobe: codec={} profile={} pix_fmt={} tag={} {}x{} frames={} r={} avg={} duration={} color_space={} color_range={} size={}B",
        s["codec_name"], s["profile"], s["pix_fmt"], s["codec_tag_string"], s["width"], s["height"], s["nb_read_frames"],
        s["r_frame_rate"], s["avg_frame_rate"], j["format"]["duration"], s["color_space"], s["color_range"], file_size(&path)
    );
    assert_eq!(j["streams"].as_array().unwrap().len(), 1);
    assert_eq!(s["codec_name"], "h264");
    assert_eq!(s["pix_fmt"], "yuv420p");
    assert_eq!(s["codec_tag_string"], "avc1");
    assert_eq!(s["width"], 256);
    assert_eq!(s["height"], 256);
    assert_eq!(s["nb_read_frames"], "16");
    assert_eq!(s["nb_frames"], "16");
    assert_eq!(s["r_frame_rate"], "8/1");
    assert_eq!(s["avg_frame_rate"], "8/1");
    assert_eq!(s["color_space"], "smpte170m");
    assert_eq!(s["color_range"], "tv");
    let dur: f64 = j["format"]["duration"].as_str().unwrap().parse().unwrap();
    assert!((dur - 2.0).abs() < 1e-3, "duration {dur}");
    let sdur: f64 = s["duration"].as_str().unwrap().parse().unwrap();
    assert!((sdur - 2.0).abs() < 1e-3, "stream duration {sdur}");
    assert_eq!(j["format"]["tags"]["comment"], META, "ffprobe should show the metadata as `comment`");
    assert_eq!(read_mp4_metadata(&path).unwrap().as_deref(), Some(META));
    let names: Vec<String> = mp4_top_level_boxes(&path).unwrap().into_iter().map(|b| b.0).collect();
    assert_eq!(names, ["ftyp", "moov", "mdat"]);

    // A full decode must be clean (no warnings / errors from the decoder).
    let out =
        Command::new("ffmpeg").args(["-v", "warning", "-i"]).arg(&path).args(["-f", "null", "-"]).output().unwrap();
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "ffmpeg complained: {}", String::from_utf8_lossy(&out.stderr));

    let decoded = decode_luma(&path, w, h);
    assert_eq!(decoded.len(), f);
    let psnr = luma_psnr(&input_luma(&data, f, h, w), &decoded, h, w, w);
    eprintln!("smooth 16x256x256 default quality: luma PSNR {psnr:.2} dB, {} bytes", file_size(&path));
    assert!(psnr >= 40.0, "luma PSNR {psnr:.2} dB < 40 dB on the smooth clip");
}

#[test]
fn mp4_noise_psnr_at_default_quality() {
    if skip_without("ffmpeg") {
        return;
    }
    let dir = TmpDir::new("mp4-noise");
    for (h, w) in [(32, 32), (256, 256)] {
        let data = noise_clip(16, h, w, 7);
        let (psnr, size) = mp4_roundtrip_psnr(&dir, &format!("noise{w}.mp4"), &data, 16, h, w, Quality::default());
        eprintln!("noise 16x{h}x{w} default quality: luma PSNR {psnr:.2} dB, {size} bytes");
        // Multi-slice frames must decode cleanly.
        let out = Command::new("ffmpeg")
            .args(["-v", "warning", "-i"])
            .arg(dir.path(&format!("noise{w}.mp4")))
            .args(["-f", "null", "-"])
            .output()
            .unwrap();
        assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(psnr >= 38.0, "luma PSNR {psnr:.2} dB < 38 dB on {w}x{h} noise");
    }
}

#[test]
fn mp4_quality_is_monotonic() {
    if skip_without("ffmpeg") {
        return;
    }
    let dir = TmpDir::new("mp4-quality");
    let data = smooth_clip(8, 64, 64);
    let mut last = (f64::INFINITY, u64::MAX);
    for qp in [12u8, 20, 28, 40] {
        let (psnr, size) = mp4_roundtrip_psnr(&dir, &format!("q{qp}.mp4"), &data, 8, 64, 64, Quality::Qp(qp));
        eprintln!("smooth 8x64x64 qp {qp}: luma PSNR {psnr:.2} dB, {size} bytes");
        assert!(psnr < last.0 && size < last.1, "qp {qp}: quality/size should fall as QP rises");
        last = (psnr, size);
    }
}

#[test]
fn mp4_odd_size_is_padded() {
    if skip_without("ffprobe") || skip_without("ffmpeg") {
        return;
    }
    let dir = TmpDir::new("mp4-odd");
    let (f, h, w) = (3, 19, 33);
    let data = smooth_clip(f, h, w);
    let (psnr, _) = mp4_roundtrip_psnr(&dir, "odd.mp4", &data, f, h, w, Quality::default());
    let j = ffprobe(&dir.path("odd.mp4"));
    assert_eq!(j["streams"][0]["width"], 34);
    assert_eq!(j["streams"][0]["height"], 20);
    eprintln!("odd 33x19 -> 34x20: luma PSNR {psnr:.2} dB");
    assert!(psnr >= 38.0, "{psnr}");
    // openh264 needs at least 16x16: a clear error, and no file.
    let data = smooth_clip(2, 8, 16);
    let frames = Frames::new(&data, 2, 8, 16).unwrap();
    let e = write_video(&frames, VideoFormat::Mp4, &dir.path("tiny.mp4"), &EncodeOptions::default()).unwrap_err();
    assert!(e.to_string().contains("at least 16x16"), "{e}");
    assert_eq!(dir.entries(), ["odd.mp4"]);
}

#[test]
fn mp4_single_frame_and_other_fps() {
    if skip_without("ffprobe") {
        return;
    }
    let dir = TmpDir::new("mp4-fps");
    let data = smooth_clip(1, 32, 32);
    let frames = Frames::new(&data, 1, 32, 32).unwrap();
    let path = dir.path("one.mp4");
    write_video(&frames, VideoFormat::Mp4, &path, &opts_with(Some("{}"))).unwrap();
    let j = ffprobe(&path);
    assert_eq!(j["streams"][0]["nb_read_frames"], "1");
    let dur: f64 = j["format"]["duration"].as_str().unwrap().parse().unwrap();
    assert!((dur - 0.125).abs() < 1e-3, "one frame at 8 fps should last 0.125 s, not {dur}");
    assert_eq!(read_mp4_metadata(&path).unwrap().as_deref(), Some("{}"));

    let data = smooth_clip(10, 32, 32);
    let frames = Frames::new(&data, 10, 32, 32).unwrap();
    let path = dir.path("24fps.mp4");
    write_video(&frames, VideoFormat::Mp4, &path, &EncodeOptions { fps: 24, ..Default::default() }).unwrap();
    let j = ffprobe(&path);
    assert_eq!(j["streams"][0]["r_frame_rate"], "24/1");
    assert_eq!(j["streams"][0]["nb_read_frames"], "10");
    let dur: f64 = j["format"]["duration"].as_str().unwrap().parse().unwrap();
    assert!((dur - 10.0 / 24.0).abs() < 2e-3, "{dur}");
}

/// Colours survive the trip: ffmpeg's own yuv→rgb conversion (driven by the VUI tags) gives back
/// the input colours of flat patches.
#[test]
fn mp4_colours_roundtrip_through_ffmpeg() {
    if skip_without("ffmpeg") {
        return;
    }
    let dir = TmpDir::new("mp4-colour");
    let colours: [[f32; 3]; 6] =
        [[0.8, 0.2, 0.4], [0.1, 0.7, 0.3], [0.2, 0.3, 0.9], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]];
    let (h, w) = (32, 32);
    let mut data = Vec::new();
    for c in colours {
        for _ in 0..h * w {
            data.extend_from_slice(&c);
        }
    }
    let frames = Frames::new(&data, colours.len(), h, w).unwrap();
    let path = dir.path("colours.mp4");
    write_video(&frames, VideoFormat::Mp4, &path, &EncodeOptions::default()).unwrap();
    let rgb = decode_rgb(&path);
    assert_eq!(rgb.len(), colours.len() * h * w * 3);
    for (i, c) in colours.iter().enumerate() {
        let p = (i * h * w + (h / 2) * w + w / 2) * 3;
        let got = &rgb[p..p + 3];
        for k in 0..3 {
            let want = c[k] * 255.0;
            assert!((got[k] as f32 - want).abs() <= 3.0, "colour {i}: got {got:?}, want {c:?}*255");
        }
    }
}

/// The page for [`chromium_report`]: loads the video, seeks to the end, reads a pixel of the
/// shown frame through a canvas, and sends what happened to `/report`. A software-decoding
/// Chromium may hand the canvas a blank frame for a moment after `seeked` (seen on CI's Xeon),
/// so the pixel is read again, at most 40 times 50 ms apart, until the frame is there. The
/// `<img src="/hold">` keeps the page's load event (and so chromium's `--dump-dom` exit) pending
/// until the report has arrived.
const CHROMIUM_PAGE: &str = r#"<!doctype html><html><body><pre id="out">PENDING</pre>
<video id="v" src="/clip.mp4" muted playsinline preload="auto"></video>
<script>
const v = document.getElementById('v'), out = document.getElementById('out');
let done = false;
const say = (s, final) => {
  out.textContent = s;
  if (final && !done) { done = true; fetch('/report?' + encodeURIComponent(s)); }
};
const pixel = () => {
  try {
    const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
    const g = c.getContext('2d'); g.drawImage(v, 0, 0);
    const d = g.getImageData(8, 8, 1, 1).data;
    return { blank: d[3] === 0 || (d[0] + d[1] + d[2]) === 0, text: Array.from(d.slice(0, 3)).join(',') };
  } catch (e) { return { blank: false, text: 'canvas:' + e.name }; }
};
v.addEventListener('error', () => say('ERROR ' + (v.error ? v.error.code + ' ' + v.error.message : '?'), true));
v.addEventListener('loadeddata', () => {
  const first = 'OK ' + v.videoWidth + 'x' + v.videoHeight + ' ' + v.duration;
  say(first + ' seeking', false);
  v.addEventListener('seeked', () => {
    const seeked = ' seeked=' + v.currentTime.toFixed(3);
    let tries = 0;
    const sample = () => {
      const p = pixel();
      tries += 1;
      if (p.blank && tries < 40) { setTimeout(sample, 50); return; }
      say(first + ' px=' + p.text + ' tries=' + tries + seeked, true);
    };
    sample();
  }, { once: true });
  v.currentTime = v.duration - 0.01;
});
setTimeout(() => say(out.textContent + ' TIMEOUT', true), 20000);
</script><img src="/hold" alt=""></body></html>"#;

/// Serves `mp4` and [`CHROMIUM_PAGE`] on a loopback port, opens the page in headless Chromium,
/// and returns what the page reported: `OK WxH DURATION px=R,G,B tries=N seeked=T` or `ERROR ...`.
fn chromium_report(chrome: &Path, dir: &TmpDir, mp4: &Path) -> String {
    use std::sync::{mpsc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    let video = std::fs::read(mp4).unwrap();
    let report: (Mutex<Option<String>>, Condvar) = (Mutex::new(None), Condvar::new());
    let (tx, rx) = mpsc::channel::<String>();
    let server = Server::start(move |request| {
        let target = request.target.as_str();
        let response = if target == "/" || target == "/index.html" {
            Response::new("200 OK", CHROMIUM_PAGE).header("Content-Type", "text/html")
        } else if target == "/clip.mp4" {
            let range = request.header("range").and_then(|r| {
                r.to_ascii_lowercase().strip_prefix("bytes=").map(|r| {
                    let (a, b) = r.trim().split_once('-').unwrap_or(("0", ""));
                    let start: usize = a.parse().unwrap_or(0);
                    let end: usize = b.parse().unwrap_or(video.len() - 1).min(video.len() - 1);
                    (start, end)
                })
            });
            let response = match range {
                Some((a, b)) if a <= b && a < video.len() => Response::new("206 Partial Content", &video[a..=b])
                    .header("Content-Range", format!("bytes {a}-{b}/{}", video.len())),
                _ => Response::new("200 OK", video.as_slice()),
            };
            response.header("Content-Type", "video/mp4").header("Accept-Ranges", "bytes")
        } else if let Some(q) = target.strip_prefix("/report?") {
            let decoded = percent_decode(q);
            let (lock, cv) = &report;
            *lock.lock().unwrap() = Some(decoded.clone());
            cv.notify_all();
            let _ = tx.send(decoded);
            Response::new("204 No Content", "").header("Content-Type", "text/plain")
        } else {
            if target == "/hold" {
                let (lock, cv) = &report;
                let guard = lock.lock().unwrap();
                let _ = cv.wait_timeout_while(guard, Duration::from_secs(30), |r| r.is_none()).unwrap();
            }
            Response::new("404 Not Found", "").header("Content-Type", "text/plain")
        };
        response.header("Cache-Control", "no-store")
    });
    let port = server.port();

    let profile = dir.path(&format!("profile-{port}"));
    std::fs::create_dir_all(&profile).unwrap();
    let mut child = Command::new(chrome)
        .args(t2v_testkit::chromium_flags(&profile))
        .args(["--no-proxy-server", "--mute-audio", "--autoplay-policy=no-user-gesture-required"])
        .arg("--dump-dom")
        .arg(format!("http://127.0.0.1:{port}/index.html"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let result = rx.recv_timeout(Duration::from_secs(60));
    // Chromium exits by itself once the page has loaded; make sure it does.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    result.unwrap_or_else(|_| "NO REPORT from chromium within 60 s".to_string())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn mp4_plays_in_headless_chromium() {
    let Some(chrome) = t2v_testkit::chromium() else { return };
    let dir = TmpDir::new("mp4-chromium");
    let (f, h, w) = (16, 96, 128);
    let mut data = smooth_clip(f, h, w);
    // A flat patch in the top-left corner of every frame for a colour check through <canvas>.
    let patch = [0.8f32, 0.2, 0.4];
    for t in 0..f {
        for y in 0..16 {
            for x in 0..16 {
                let i = ((t * h + y) * w + x) * 3;
                data[i..i + 3].copy_from_slice(&patch);
            }
        }
    }
    let frames = Frames::new(&data, f, h, w).unwrap();
    write_video(&frames, VideoFormat::Mp4, &dir.path("clip.mp4"), &opts_with(Some(META))).unwrap();
    let line = chromium_report(&chrome, &dir, &dir.path("clip.mp4"));
    eprintln!("chromium reported (smooth 128x96, 16 frames @ 8 fps): {line}");
    assert!(line.starts_with("OK 128x96 2 "), "chromium could not load the MP4: {line}");
    assert!(line.contains("seeked=1.99"), "chromium could not seek to the last frame: {line}");
    // Colour check when the canvas is readable (file:// pages may taint it).
    if let Some(px) = line.split("px=").nth(1).and_then(|s| s.split(' ').next()) {
        let vals: Vec<f32> = px.split(',').filter_map(|v| v.parse().ok()).collect();
        if vals.len() == 3 {
            for k in 0..3 {
                assert!((vals[k] - patch[k] * 255.0).abs() <= 6.0, "chromium shows {vals:?} for {patch:?}");
            }
        } else {
            eprintln!("note: chromium canvas pixel not readable ({px}); colour check skipped");
        }
    }

    // Noise frames are big enough to be split into several slices per frame.
    let data = noise_clip(16, 256, 256, 11);
    let frames = Frames::new(&data, 16, 256, 256).unwrap();
    write_video(&frames, VideoFormat::Mp4, &dir.path("noise.mp4"), &EncodeOptions::default()).unwrap();
    let line = chromium_report(&chrome, &dir, &dir.path("noise.mp4"));
    eprintln!("chromium reported (noise 256x256, 16 frames @ 8 fps): {line}");
    assert!(line.starts_with("OK 256x256 2 "), "chromium could not load the MP4: {line}");
    assert!(line.contains("seeked=1.99"), "chromium could not seek to the last frame: {line}");

    // The harness does catch a file chromium cannot play.
    let mut junk = std::fs::read(dir.path("clip.mp4")).unwrap();
    let n = junk.len();
    junk[n / 3..].fill(0x55);
    std::fs::write(dir.path("junk.mp4"), &junk).unwrap();
    let line = chromium_report(&chrome, &dir, &dir.path("junk.mp4"));
    eprintln!("chromium reported (corrupted copy): {line}");
    assert!(!line.contains("seeked="), "a corrupted file should not play: {line}");
}

// ---------------------------------------------------------------------------------------------
// GIF, PNG, NPY
// ---------------------------------------------------------------------------------------------

#[test]
fn gif_loops_with_right_frames_and_delays() {
    let dir = TmpDir::new("gif");
    let (f, h, w) = (5, 96, 80);
    let data = smooth_clip(f, h, w);
    let frames = Frames::new(&data, f, h, w).unwrap();
    let path = dir.path("clip.gif");
    assert_eq!(write_video_auto(&frames, &path, &EncodeOptions::default()).unwrap(), VideoFormat::Gif);
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.starts_with(b"GIF89a"));
    // NETSCAPE2.0 application extension with loop count 0 (= forever).
    let pos = bytes.windows(11).position(|w| w == b"NETSCAPE2.0").expect("no NETSCAPE2.0 loop extension");
    assert_eq!(&bytes[pos + 11..pos + 16], &[3, 1, 0, 0, 0], "loop count must be 0 (infinite)");

    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::RGBA);
    let mut dec = opts.read_info(std::io::Cursor::new(&bytes)).unwrap();
    assert_eq!((dec.width() as usize, dec.height() as usize), (w, h));
    let mut delays = Vec::new();
    let mut max_err = 0f32;
    let mut sum_err = 0f64;
    let mut t = 0;
    while let Some(fr) = dec.read_next_frame().unwrap() {
        delays.push(fr.delay);
        assert_eq!((fr.width as usize, fr.height as usize), (w, h));
        for p in 0..h * w {
            for k in 0..3 {
                let e = (fr.buffer[p * 4 + k] as f32 - data[(t * h * w + p) * 3 + k] * 255.0).abs();
                max_err = max_err.max(e);
                sum_err += e as f64;
            }
        }
        t += 1;
    }
    assert_eq!(dec.repeat(), gif::Repeat::Infinite);
    assert_eq!(delays.len(), f);
    assert_eq!(delays, [13, 12, 13, 12, 13], "8 fps alternates 12/13 centiseconds");
    let mean_err = sum_err / (f * h * w * 3) as f64;
    eprintln!("gif palette error: mean {mean_err:.2}, max {max_err:.0} (of 255)");
    assert!(mean_err < 8.0, "palette error too large: mean {mean_err}");
    assert_eq!(gif_delay_cs(0, 10), 10);
    assert_eq!((0..3).map(|i| gif_delay_cs(i, 3)).sum::<u16>(), 100);

    if t2v_testkit::ffmpeg_tool("ffprobe").is_some() {
        let j = ffprobe(&path);
        assert_eq!(j["streams"][0]["codec_name"], "gif");
        assert_eq!(j["streams"][0]["nb_read_frames"], "5");
    }
}

#[test]
fn png_frames_folder() {
    let dir = TmpDir::new("png");
    let (f, h, w) = (3, 8, 6);
    let mut data = smooth_clip(f, h, w);
    data[0] = 1.7; // clamped to 255
    data[1] = -0.2; // clamped to 0
    data[2] = f32::NAN; // becomes 0
    let frames = Frames::new(&data, f, h, w).unwrap();
    let out = dir.path("frames");
    assert_eq!(write_video_auto(&frames, &out, &EncodeOptions::default()).unwrap(), VideoFormat::PngFrames);
    let check = |out: &Path| {
        let mut names: Vec<String> =
            std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["frame_0000.png", "frame_0001.png", "frame_0002.png"]);
        for (t, name) in names.iter().enumerate() {
            let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(out.join(name)).unwrap()));
            let mut r = dec.read_info().unwrap();
            let mut buf = vec![0; r.output_buffer_size().unwrap()];
            let info = r.next_frame(&mut buf).unwrap();
            assert_eq!((info.width, info.height, info.color_type), (6, 8, png::ColorType::Rgb));
            for i in 0..h * w * 3 {
                let v = data[t * h * w * 3 + i];
                let want = if v.is_nan() { 0 } else { (v.clamp(0.0, 1.0) * 255.0).round() as u8 };
                assert_eq!(buf[i], want, "frame {t} value {i}");
            }
        }
    };
    check(&out);
    // Writing again replaces our own folder...
    write_video(&frames, VideoFormat::PngFrames, &out, &EncodeOptions::default()).unwrap();
    check(&out);
    assert_eq!(dir.entries(), ["frames"]);
    // ...but never a folder with other files in it.
    let other = dir.path("precious");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"keep me").unwrap();
    let e = write_video(&frames, VideoFormat::PngFrames, &other, &EncodeOptions::default()).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(std::fs::read(other.join("notes.txt")).unwrap(), b"keep me");
    assert_eq!(dir.entries(), ["frames", "precious"]);
}

#[test]
fn npy_header_and_data() {
    let dir = TmpDir::new("npy");
    let (f, h, w) = (2, 3, 5);
    let mut data = noise_clip(f, h, w, 3);
    data[0] = -1.5; // stored as is, not clamped
    data[1] = 2.25;
    let frames = Frames::new(&data, f, h, w).unwrap();
    let path = dir.path("clip.npy");
    write_video(&frames, VideoFormat::Npy, &path, &EncodeOptions::default()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0, "header should be 64-byte aligned");
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 5, 3), }"), "{header}");
    assert!(header.ends_with('\n'));
    let body = &bytes[10 + hlen..];
    assert_eq!(body.len(), data.len() * 4);
    for (i, c) in body.chunks(4).enumerate() {
        assert_eq!(f32::from_le_bytes(c.try_into().unwrap()).to_bits(), data[i].to_bits());
    }

    // numpy itself, when a python3 with numpy is around.
    let Some(py) = t2v_testkit::python_with("numpy", "pip install numpy") else { return };
    let out = Command::new(&py)
        .args(["-c", "import numpy as np, sys; a = np.load(sys.argv[1]); print(a.dtype, a.shape, repr(float(a[0,0,0,0])), repr(float(a[0,0,0,1])), repr(float(a[1,2,4,2])))"])
        .arg(&path)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last = data[data.len() - 1] as f64;
    assert_eq!(s.trim(), format!("float32 (2, 3, 5, 3) -1.5 2.25 {last:?}"));
}

// ---------------------------------------------------------------------------------------------
// atomic writes
// ---------------------------------------------------------------------------------------------

#[test]
fn failed_writes_leave_nothing_behind() {
    let dir = TmpDir::new("atomic");
    let data = smooth_clip(2, 16, 16);
    let frames = Frames::new(&data, 2, 16, 16).unwrap();
    let opts = opts_with(Some(META));

    // Missing parent folder: error, no file, no temp.
    for (f, name) in [
        (VideoFormat::Mp4, "a.mp4"),
        (VideoFormat::Gif, "a.gif"),
        (VideoFormat::Npy, "a.npy"),
        (VideoFormat::PngFrames, "a"),
    ] {
        let p = dir.path("missing").join(name);
        let e = write_video(&frames, f, &p, &opts).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());

    // The final rename fails (the target is a non-empty folder) after the whole temp file was
    // written: the temp file must be gone.
    for (f, name) in [(VideoFormat::Mp4, "b.mp4"), (VideoFormat::Gif, "b.gif"), (VideoFormat::Npy, "b.npy")] {
        let p = dir.path(name);
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("keep"), b"x").unwrap();
        let e = write_video(&frames, f, &p, &opts).unwrap_err();
        assert!(e.to_string().contains("is a folder"), "{e}");
        assert!(p.join("keep").exists());
    }
    assert_eq!(dir.entries(), ["b.gif", "b.mp4", "b.npy"]);

    // Replacing an existing file works and leaves only the new file.
    let p = dir.path("c.npy");
    std::fs::write(&p, b"old").unwrap();
    write_video(&frames, VideoFormat::Npy, &p, &opts).unwrap();
    assert!(std::fs::read(&p).unwrap().starts_with(b"\x93NUMPY"));

    // A read-only folder. Root writes into a 0o555 folder, so there a folder no one can write to
    // stands in: /proc refuses new files to root too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.path("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let root = std::fs::write(ro.join("probe"), b"").is_ok();
        let _ = std::fs::remove_file(ro.join("probe"));
        let target = if root { PathBuf::from("/proc") } else { ro.clone() };
        for (f, name) in [(VideoFormat::Mp4, "t2v-test-a.mp4"), (VideoFormat::PngFrames, "t2v-test-a")] {
            assert!(write_video(&frames, f, &target.join(name), &opts).is_err(), "{}", target.display());
        }
        // Nothing left behind: no file of that name, staged or final.
        let left: Vec<String> = std::fs::read_dir(&target)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("t2v-test-a"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert_eq!(dir.entries(), ["b.gif", "b.mp4", "b.npy", "c.npy", "ro"]);
}

/// A file that appears while a video is being made is never replaced unless asked: the check is
/// the publishing rename itself.
#[test]
fn publishing_never_replaces_what_appeared_meanwhile() {
    let dir = TmpDir::new("noclobber");
    let data = smooth_clip(2, 16, 16);
    let clip = Frames::new(&data, 2, 16, 16).unwrap();
    for (name, format) in [("v.npy", VideoFormat::Npy), ("frames", VideoFormat::PngFrames)] {
        let path = dir.path(name);
        let staged = t2v::video::stage_video(&clip, format, &path, &EncodeOptions::default()).unwrap();
        // Someone else's file (or folder) appears before the video is published.
        if format == VideoFormat::PngFrames {
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("mine.txt"), b"mine").unwrap();
        } else {
            std::fs::write(&path, b"mine").unwrap();
        }
        let err = staged.publish(false).unwrap_err();
        assert!(matches!(err, t2v::Error::OutputExists { .. }), "{name}: {err}");
        let kept = if format == VideoFormat::PngFrames { path.join("mine.txt") } else { path.clone() };
        assert_eq!(std::fs::read(&kept).unwrap(), b"mine", "{name} untouched");
    }
    // Nothing but the two intruders is left: the staged temporaries are gone.
    assert_eq!(dir.entries(), ["frames", "v.npy"]);
    // With overwrite, a file is replaced.
    let path = dir.path("v.npy");
    t2v::video::stage_video(&clip, VideoFormat::Npy, &path, &EncodeOptions::default()).unwrap().publish(true).unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), b"mine");
}
