//! `.npy` (format version 1.0): float32 little-endian, C order, shape (F, H, W, 3).

use std::io::{self, Write};

use super::Frames;

/// The complete `.npy` header (magic, version, length, dict, padding) for a float32 C-order
/// array of `shape`. Its length is a multiple of 64, as numpy writes it.
pub fn npy_header(shape: &[usize]) -> Vec<u8> {
    npy_header_of("<f4", shape)
}

/// [`npy_header`] for elements of numpy type `descr` (`<f4`, `|u1`, …).
pub fn npy_header_of(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_str}, }}");
    // magic(6) + version(2) + header_len(2) + dict + '\n', padded with spaces to a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    let total = unpadded.div_ceil(64) * 64;
    dict.extend(std::iter::repeat_n(' ', total - unpadded));
    dict.push('\n');
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    debug_assert_eq!(out.len(), total);
    out
}

pub(super) fn write_npy(frames: &Frames, w: &mut impl Write) -> io::Result<()> {
    let header = npy_header(&[frames.frames, frames.height, frames.width, 3]);
    if header.len() > 10 + u16::MAX as usize {
        return Err(io::Error::other("npy header too long"));
    }
    w.write_all(&header)?;
    let mut buf = Vec::with_capacity(64 * 1024);
    for chunk in frames.data.chunks(16 * 1024) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    Ok(())
}
