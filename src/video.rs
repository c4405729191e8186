//! Writing generated frames to files. (Interim: `.npy` only; the video encoders follow.)

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoFormat {
    Npy,
}

impl VideoFormat {
    pub fn from_path(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("npy") => Ok(Self::Npy),
            other => Err(Error::InvalidArgument(format!(
                "cannot tell the output format from the extension {other:?} of {}: use .npy",
                path.display()
            ))),
        }
    }
}

pub struct Frames<'a> {
    pub data: &'a [f32],
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

#[derive(Debug, Clone, Default)]
pub struct EncodeOptions {
    pub fps: u32,
    pub metadata: Option<String>,
}

pub fn write_video(frames: &Frames, _format: VideoFormat, path: &Path, _opts: &EncodeOptions) -> Result<()> {
    let header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}, {}, 3), }}",
        frames.frames, frames.height, frames.width
    );
    let mut header = header.into_bytes();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(b' ');
    }
    header.push(b'\n');
    let tmp = path.with_extension("npy.partial");
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(b"\x93NUMPY\x01\x00")?;
        f.write_all(&(header.len() as u16).to_le_bytes())?;
        f.write_all(&header)?;
        for v in frames.data {
            f.write_all(&v.to_le_bytes())?;
        }
        f.flush()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
