//! `.npy` arrays of shape (F, H, W, 3): uint8, or float16/32/64 in [0, 1].
//! Hand-written: the header is a one-line Python dict literal, and only C-order arrays of these
//! few dtypes are accepted, which the crates for the format do not make simpler.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::{Collector, Want};
use crate::error::{Error, Result};

/// Values this far outside [0, 1] are taken for rounding and clamped; farther ones are refused.
const RANGE_SLACK: f32 = 1e-4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    U8,
    F16,
    F32,
    F64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }
}

struct Header {
    dtype: Dtype,
    big_endian: bool,
    shape: Vec<usize>,
    data_offset: u64,
}

pub(super) fn read_npy(path: &Path, c: &mut Collector) -> Result<()> {
    let mut file = crate::files::open_regular(path, crate::files::FileKind::Video)?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let header = read_header(&mut file, c)?;
    let [frames, height, width, channels] = header.shape[..] else {
        return Err(c.error(format!(
            "the array has shape {:?}: a video is an array of shape (frames, height, width, 3)",
            header.shape
        )));
    };
    if channels != 3 {
        return Err(c.error(format!("the array has shape {:?}: its last dimension must be 3 (RGB)", header.shape)));
    }
    c.check_declared_size(width, height, "each frame")?;
    c.check_declared_frames(frames as u64)?;
    let frame_values = height.checked_mul(width).and_then(|v| v.checked_mul(3));
    let frame_bytes = frame_values.and_then(|v| v.checked_mul(header.dtype.size()));
    let total = frame_bytes.and_then(|b| b.checked_mul(frames)).map(|b| b as u64 + header.data_offset);
    let (Some(frame_values), Some(frame_bytes), Some(total)) = (frame_values, frame_bytes, total) else {
        return Err(c.error(format!("the array's shape {:?} is too large", header.shape)));
    };
    if total > file_len {
        return Err(c.error(format!(
            "the file is truncated: its header announces {total} bytes but it holds {file_len}: write it again"
        )));
    }
    let mut buf = vec![0u8; frame_bytes];
    for i in 0..frames {
        match c.offer() {
            Want::Stop => break,
            Want::Skip => continue,
            Want::Take => {}
        }
        let offset = header.data_offset + (i * frame_bytes) as u64;
        file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut buf)).map_err(|e| Error::io(path, e))?;
        let what = format!("frame {i}");
        match header.dtype {
            Dtype::U8 => c.push_u8(&buf, width, height, &what)?,
            float => {
                let values = floats(&buf, float, header.big_endian, frame_values);
                let (lo, hi) =
                    values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                if values.iter().any(|v| v.is_nan()) || lo < -RANGE_SLACK || hi > 1.0 + RANGE_SLACK {
                    let nan = if values.iter().any(|v| v.is_nan()) { " and NaN" } else { "" };
                    return Err(c.error(format!(
                        "{what} holds values from {lo} to {hi}{nan}: a float array must hold RGB in [0, 1] \
                         (divide 0-255 values by 255; map [-1, 1] values with (x + 1) / 2)"
                    )));
                }
                let values: Vec<f32> = values.into_iter().map(|v| v.clamp(0.0, 1.0)).collect();
                c.push_f32(&values, width, height, &what)?;
            }
        }
    }
    Ok(())
}

fn floats(bytes: &[u8], dtype: Dtype, big_endian: bool, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match dtype {
        Dtype::F16 => out.extend(bytes.chunks_exact(2).map(|b| {
            let raw = [b[0], b[1]];
            half::f16::from_bits(if big_endian { u16::from_be_bytes(raw) } else { u16::from_le_bytes(raw) }).to_f32()
        })),
        Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|b| {
            let raw = [b[0], b[1], b[2], b[3]];
            if big_endian {
                f32::from_be_bytes(raw)
            } else {
                f32::from_le_bytes(raw)
            }
        })),
        Dtype::F64 => out.extend(bytes.chunks_exact(8).map(|b| {
            let raw: [u8; 8] = b.try_into().expect("8 bytes");
            (if big_endian { f64::from_be_bytes(raw) } else { f64::from_le_bytes(raw) }) as f32
        })),
        Dtype::U8 => unreachable!("8-bit frames are not converted"),
    }
    out
}

fn read_header(file: &mut File, c: &Collector) -> Result<Header> {
    let not_npy = || c.error("it is not a .npy file (no \\x93NUMPY magic): save the array with numpy.save");
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic).map_err(|_| not_npy())?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err(not_npy());
    }
    let (len_bytes, prefix) = match magic[6] {
        1 => (2, 10u64),
        2 | 3 => (4, 12u64),
        v => {
            return Err(
                c.error(format!("it is a .npy file of format version {v}, which is unknown: save it with numpy.save"))
            )
        }
    };
    let mut len = [0u8; 4];
    file.read_exact(&mut len[..len_bytes]).map_err(|_| c.error("the file is truncated inside its header"))?;
    let header_len = u32::from_le_bytes(len) as usize;
    if header_len > 1 << 20 {
        return Err(c.error(format!("its header claims {header_len} bytes: the file is corrupt")));
    }
    let mut text = vec![0u8; header_len];
    file.read_exact(&mut text).map_err(|_| c.error("the file is truncated inside its header"))?;
    let text = String::from_utf8_lossy(&text);
    let field = |key: &str| -> Option<String> {
        let start = text.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = text[start..].trim_start().strip_prefix(':')?.trim_start();
        let end = if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}'])? };
        Some(rest[..end].trim().to_string())
    };
    let corrupt = |what: &str| {
        c.error(format!("its header has no readable {what}: the file is corrupt; save the array with numpy.save"))
    };
    let descr = field("descr").ok_or_else(|| corrupt("descr"))?;
    let descr = descr.trim_matches(|ch| ch == '\'' || ch == '"');
    let (big_endian, code) = match descr.split_at(1.min(descr.len())) {
        (">", code) => (true, code),
        ("<" | "|" | "=", code) => (false, code),
        _ => (false, descr),
    };
    let dtype = match code {
        "u1" | "B" => Dtype::U8,
        "f2" | "e" => Dtype::F16,
        "f4" | "f" => Dtype::F32,
        "f8" | "d" => Dtype::F64,
        _ => {
            return Err(c.error(format!(
                "the array's dtype is `{descr}`: a video array must be uint8 (0-255) or float in [0, 1] \
                 (float16, float32 or float64); convert it with arr.astype(numpy.uint8) or arr.astype(numpy.float32)"
            )))
        }
    };
    if field("fortran_order").ok_or_else(|| corrupt("fortran_order"))? != "False" {
        return Err(c.error("the array is stored in Fortran order: save numpy.ascontiguousarray(arr) instead"));
    }
    let shape_text = field("shape").ok_or_else(|| corrupt("shape"))?;
    let shape = shape_text
        .trim_matches(|ch| ch == '(' || ch == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| corrupt("shape"))?;
    Ok(Header { dtype, big_endian, shape, data_offset: prefix + header_len as u64 })
}
