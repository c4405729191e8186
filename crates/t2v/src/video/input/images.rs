//! A folder of PNG or JPEG frames, read in the natural order of their names (`frame_2` before
//! `frame_10`).

use std::cmp::Ordering;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use super::{Collector, Want};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Png,
    Jpeg,
}

fn kind_of(path: &Path) -> Option<Kind> {
    match path.extension()?.to_string_lossy().to_ascii_lowercase().as_str() {
        "png" => Some(Kind::Png),
        "jpg" | "jpeg" => Some(Kind::Jpeg),
        _ => None,
    }
}

pub(super) fn read_folder(dir: &Path, c: &mut Collector) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<(PathBuf, Kind)> = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if let (Some(kind), false) = (kind_of(&path), hidden) {
            if path.is_file() {
                files.push((path, kind));
            }
        }
    }
    if files.is_empty() {
        return Err(c.error(
            "the folder holds no .png, .jpg or .jpeg files: put the frames in it as numbered images (frame_0000.png, ...)",
        ));
    }
    files.sort_by(|a, b| natural_cmp(&a.0.to_string_lossy(), &b.0.to_string_lossy()));
    for (path, kind) in &files {
        match c.offer() {
            Want::Stop => break,
            Want::Skip => continue,
            Want::Take => {}
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (rgb, w, h) = match kind {
            Kind::Png => read_png(path, &name, c)?,
            Kind::Jpeg => read_jpeg(path, &name, c)?,
        };
        c.push_u8(&rgb, w, h, &name)?;
    }
    Ok(())
}

/// A PNG as 8-bit RGB: palettes expanded, 16-bit samples cut to 8, grey spread to the three
/// channels, alpha dropped (as PIL's `convert("RGB")`).
fn read_png(path: &Path, name: &str, c: &Collector) -> Result<(Vec<u8>, usize, usize)> {
    let file = crate::files::open_regular(path, crate::files::FileKind::Video)?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let unreadable = |e: png::DecodingError| {
        c.error(format!("{name} is not a readable PNG ({e}): the file is corrupt or truncated; export it again"))
    };
    let mut reader = decoder.read_info().map_err(unreadable)?;
    let size = reader.output_buffer_size().ok_or_else(|| c.error(format!("{name} is too large")))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(unreadable)?;
    let (w, h) = (info.width as usize, info.height as usize);
    let line = info.line_size;
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(c.error(format!("{name}: its palette could not be expanded"))),
    };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for row in buf.chunks(line).take(h) {
        for px in row[..w * channels].chunks_exact(channels) {
            match channels {
                1 | 2 => rgb.extend_from_slice(&[px[0], px[0], px[0]]),
                _ => rgb.extend_from_slice(&px[..3]),
            }
        }
    }
    Ok((rgb, w, h))
}

/// A JPEG as 8-bit RGB (zune-jpeg; greyscale and CMYK converted).
fn read_jpeg(path: &Path, name: &str, c: &Collector) -> Result<(Vec<u8>, usize, usize)> {
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let data = crate::files::read_bounded(path, crate::files::FileKind::Video)?;
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(super::MAX_SIDE)
        .set_max_height(super::MAX_SIDE);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(data.as_slice(), options);
    let rgb = decoder.decode().map_err(|e| {
        c.error(format!("{name} is not a readable JPEG ({e:?}): the file is corrupt or truncated; export it again"))
    })?;
    let info = decoder.info().ok_or_else(|| c.error(format!("{name} has no readable JPEG header")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    if rgb.len() != w * h * 3 {
        return Err(c.error(format!("{name} decoded to {} bytes, not the {} of {w}x{h} RGB", rgb.len(), w * h * 3)));
    }
    Ok((rgb, w, h))
}

/// Compares names with runs of digits taken as numbers, so `frame_2` sorts before `frame_10`;
/// equal numbers with different zero padding fall back to the plain order.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) if p.is_ascii_digit() && q.is_ascii_digit() => {
                let dx = x.iter().take_while(|ch| ch.is_ascii_digit()).count();
                let dy = y.iter().take_while(|ch| ch.is_ascii_digit()).count();
                let nx = std::str::from_utf8(&x[..dx]).unwrap_or("0").trim_start_matches('0');
                let ny = std::str::from_utf8(&y[..dy]).unwrap_or("0").trim_start_matches('0');
                let ord = nx.len().cmp(&ny.len()).then_with(|| nx.cmp(ny));
                if ord != Ordering::Equal {
                    return ord;
                }
                x = &x[dx..];
                y = &y[dy..];
            }
            (Some(p), Some(q)) => {
                if p != q {
                    return p.cmp(q);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}
