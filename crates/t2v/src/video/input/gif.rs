//! Animated GIFs: each frame is drawn onto the logical screen as a browser does (its
//! rectangle, transparency, and the previous frame's disposal), and the screen is the frame.
//! Pixels that no frame has painted are black.

use std::io::BufReader;
use std::path::Path;

use super::{Collector, Want};
use crate::error::Result;

/// Reads the frames; returns the frame rate the delays give (`None` when no delay is set).
pub(super) fn read_gif(path: &Path, c: &mut Collector) -> Result<Option<f64>> {
    let file = crate::files::open_regular(path, crate::files::FileKind::Video)?;
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::RGBA);
    // A frame's own rectangle (up to 65535x65535 whatever the screen) is held whole as RGBA by
    // the decoder: no more than the pixel budget's worth of it.
    let frame_bytes = c.max_source_pixels().saturating_mul(4).max(1) as u64;
    options.set_memory_limit(gif::MemoryLimit::Bytes(std::num::NonZeroU64::new(frame_bytes).expect("at least 1")));
    let unreadable = |e: gif::DecodingError| {
        c.error(format!("it is not a readable GIF ({e}): the file is corrupt or truncated; export it again"))
    };
    let mut decoder = options.read_info(BufReader::new(file)).map_err(unreadable)?;
    let (w, h) = (decoder.width() as usize, decoder.height() as usize);
    if w == 0 || h == 0 {
        return Err(c.error(format!("its screen is {w}x{h} pixels: the file is corrupt")));
    }
    // The screen is the canvas every frame is drawn on: checked before it is allocated.
    c.check_declared_size(w, h, "its screen")?;
    let mut canvas = vec![0u8; w * h * 4];
    let mut delays: Vec<u16> = Vec::new();
    let mut index = 0usize;
    loop {
        let frame = match decoder.read_next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            // The decoder refuses a rectangle past the limit before allocating it.
            Err(gif::DecodingError::MemoryLimit | gif::DecodingError::OutOfMemory) => {
                return Err(c.error(format!(
                    "frame {index} declares a rectangle of more than the {} pixels a frame this reader accepts: \
                     scale the video down first",
                    c.max_source_pixels()
                )))
            }
            Err(e) => {
                return Err(c.error(format!(
                    "frame {index} cannot be read ({e}): the file is corrupt or truncated; export it again"
                )))
            }
        };
        delays.push(frame.delay);
        let saved = (frame.dispose == gif::DisposalMethod::Previous).then(|| canvas.clone());
        draw(&mut canvas, w, h, frame);
        let want = c.offer();
        if want == Want::Stop {
            break;
        }
        if want == Want::Take {
            let rgb: Vec<u8> = canvas.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
            c.push_u8(&rgb, w, h, &format!("frame {index}"))?;
        }
        // The disposal applies before the next frame is drawn.
        match frame.dispose {
            gif::DisposalMethod::Background => clear(&mut canvas, w, h, frame),
            gif::DisposalMethod::Previous => {
                if let Some(saved) = saved {
                    canvas = saved;
                }
            }
            gif::DisposalMethod::Any | gif::DisposalMethod::Keep => {}
        }
        index += 1;
    }
    let (lo, hi) = (delays.iter().min().copied().unwrap_or(0), delays.iter().max().copied().unwrap_or(0));
    // Delays are whole centiseconds, so a steady rate such as 8 fps alternates 12 and 13.
    if hi > lo + 1 {
        c.warn(format!(
            "the GIF's frames show for {} to {} ms each (a variable frame rate): frames are taken by their number, not by time",
            lo as u32 * 10,
            hi as u32 * 10
        ));
    }
    let mean_cs = delays.iter().map(|&d| d as f64).sum::<f64>() / delays.len().max(1) as f64;
    Ok((mean_cs > 0.0).then(|| 100.0 / mean_cs))
}

/// The part of the frame's rectangle that lies on the screen: (left, top, width, height).
fn visible(w: usize, h: usize, frame: &gif::Frame) -> (usize, usize, usize, usize) {
    let (left, top) = (frame.left as usize, frame.top as usize);
    let fw = (frame.width as usize).min(w.saturating_sub(left));
    let fh = (frame.height as usize).min(h.saturating_sub(top));
    (left, top, fw, fh)
}

fn draw(canvas: &mut [u8], w: usize, h: usize, frame: &gif::Frame) {
    let (left, top, fw, fh) = visible(w, h, frame);
    let stride = frame.width as usize * 4;
    for y in 0..fh {
        for x in 0..fw {
            let src = y * stride + x * 4;
            let Some(px) = frame.buffer.get(src..src + 4) else { return };
            if px[3] != 0 {
                let dst = ((top + y) * w + left + x) * 4;
                canvas[dst..dst + 3].copy_from_slice(&px[..3]);
                canvas[dst + 3] = 255;
            }
        }
    }
}

fn clear(canvas: &mut [u8], w: usize, h: usize, frame: &gif::Frame) {
    let (left, top, fw, fh) = visible(w, h, frame);
    for y in 0..fh {
        let dst = ((top + y) * w + left) * 4;
        canvas[dst..dst + fw * 4].fill(0);
    }
}
