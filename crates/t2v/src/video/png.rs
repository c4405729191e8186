//! A folder of numbered 8-bit RGB PNG frames.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use super::{png_frame_name, Frames};
use crate::error::{Error, Result};

pub(super) fn write_png_frames(frames: &Frames, dir: &Path) -> Result<()> {
    let (w, h) = (u32::try_from(frames.width), u32::try_from(frames.height));
    let (Ok(w), Ok(h)) = (w, h) else {
        return Err(Error::InvalidArgument("frame too large for PNG".to_string()));
    };
    for i in 0..frames.frames {
        let path = dir.join(png_frame_name(i));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut enc = png::Encoder::new(BufWriter::new(file), w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let to_io = |e: png::EncodingError| Error::io(&path, std::io::Error::other(e.to_string()));
        let mut writer = enc.write_header().map_err(to_io)?;
        writer.write_image_data(&frames.frame_rgb8(i)).map_err(to_io)?;
        writer.finish().map_err(to_io)?;
    }
    Ok(())
}
