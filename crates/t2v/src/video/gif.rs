//! Animated GIF: loops forever (NETSCAPE2.0 extension), per-frame NeuQuant palette.

use std::io::{self, Write};

use super::Frames;
use crate::error::{Error, Result};

/// NeuQuant sampling speed, 1 (best, slowest: samples every pixel) to 30. The network needs
/// many samples, so small frames get 1; it rises to 10 only for frames over ~2.6 Mpx.
fn quant_speed(pixels: usize) -> i32 {
    (pixels / (256 * 1024)).clamp(1, 10) as i32
}

pub(super) fn check(frames: &Frames) -> Result<()> {
    if frames.width > u16::MAX as usize || frames.height > u16::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "a GIF can be at most 65535x65535 pixels, not {}x{}",
            frames.width, frames.height
        )));
    }
    Ok(())
}

/// GIF delays are in 1/100 s. Frame `i` shows for `round((i+1)*100/fps) - round(i*100/fps)`
/// centiseconds, so the total duration stays exact even when 100/fps is not an integer
/// (8 fps alternates 12 and 13).
pub fn gif_delay_cs(i: usize, fps: u32) -> u16 {
    let t = |k: usize| (k as u64 * 200 + fps as u64) / (2 * fps as u64); // round(k*100/fps)
    (t(i + 1) - t(i)).clamp(1, u16::MAX as u64) as u16
}

pub(super) fn write_gif(frames: &Frames, fps: u32, w: &mut impl Write) -> io::Result<()> {
    let to_io = |e: gif::EncodingError| match e {
        gif::EncodingError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    };
    let (width, height) = (frames.width as u16, frames.height as u16);
    let mut enc = gif::Encoder::new(w, width, height, &[]).map_err(to_io)?;
    enc.set_repeat(gif::Repeat::Infinite).map_err(to_io)?;
    let speed = quant_speed(frames.width * frames.height);
    for i in 0..frames.frames {
        let rgb = frames.frame_rgb8(i);
        let mut frame = gif::Frame::from_rgb_speed(width, height, &rgb, speed);
        frame.delay = gif_delay_cs(i, fps);
        enc.write_frame(&frame).map_err(to_io)?;
    }
    enc.into_inner().map_err(to_io)?;
    Ok(())
}
