//! Bringing frames to the asked size with `fast_image_resize` (separable convolution filters,
//! the same family as Pillow's `Image.resize`).

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::error::{Error, Result};

/// How a frame of another size is brought to the asked size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Fit {
    /// Scale each side to the asked size, changing the aspect ratio if they differ (what
    /// diffusers' zeroscope example does with `Image.resize`).
    #[default]
    Resize,
    /// Scale to cover the asked size, keeping the aspect ratio, and cut the overflow off
    /// both sides equally.
    Crop,
    /// Scale to fit inside the asked size, keeping the aspect ratio, and fill the rest with
    /// black bars on both sides equally.
    Pad,
}

impl Fit {
    pub fn name(self) -> &'static str {
        match self {
            Fit::Resize => "resize",
            Fit::Crop => "crop",
            Fit::Pad => "pad",
        }
    }

    /// `resize` (or `stretch`), `crop`, `pad` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "resize" | "stretch" => Ok(Fit::Resize),
            "crop" => Ok(Fit::Crop),
            "pad" => Ok(Fit::Pad),
            _ => Err(Error::InvalidArgument(format!(
                "unknown way to fit frames `{s}`: choose resize (stretch to the size), crop (cover and cut) or pad (fit and add black bars)"
            ))),
        }
    }
}

impl std::str::FromStr for Fit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Fit::parse(s)
    }
}

/// The resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResizeFilter {
    /// Lanczos with 3 lobes: the sharpest, for both up- and downscaling.
    #[default]
    Lanczos3,
    /// Catmull-Rom bicubic (a = −0.5): Pillow's `BICUBIC`, the default of `Image.resize`.
    Bicubic,
    Bilinear,
}

impl ResizeFilter {
    pub fn name(self) -> &'static str {
        match self {
            ResizeFilter::Lanczos3 => "Lanczos3",
            ResizeFilter::Bicubic => "bicubic (Catmull-Rom)",
            ResizeFilter::Bilinear => "bilinear",
        }
    }

    /// `lanczos3` (or `lanczos`), `bicubic` (or `catmull-rom`), `bilinear` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lanczos3" | "lanczos" => Ok(ResizeFilter::Lanczos3),
            "bicubic" | "catmull-rom" | "catmullrom" => Ok(ResizeFilter::Bicubic),
            "bilinear" => Ok(ResizeFilter::Bilinear),
            _ => Err(Error::InvalidArgument(format!(
                "unknown resize filter `{s}`: choose lanczos3, bicubic or bilinear"
            ))),
        }
    }

    fn filter_type(self) -> FilterType {
        match self {
            ResizeFilter::Lanczos3 => FilterType::Lanczos3,
            ResizeFilter::Bicubic => FilterType::CatmullRom,
            ResizeFilter::Bilinear => FilterType::Bilinear,
        }
    }
}

impl std::str::FromStr for ResizeFilter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ResizeFilter::parse(s)
    }
}

/// Resizes frames one at a time, keeping the resizer's buffers between frames.
pub(crate) struct FrameResizer {
    fit: Fit,
    filter: ResizeFilter,
    resizer: Resizer,
}

impl FrameResizer {
    pub(crate) fn new(fit: Fit, filter: ResizeFilter) -> Self {
        Self { fit, filter, resizer: Resizer::new() }
    }

    /// An 8-bit RGB frame `w`×`h` → `ow`×`oh` (a copy when the sizes match).
    pub(crate) fn resize_u8(
        &mut self,
        rgb: &[u8],
        w: usize,
        h: usize,
        ow: usize,
        oh: usize,
    ) -> std::result::Result<Vec<u8>, String> {
        if rgb.len() != w * h * 3 {
            return Err(format!("a frame holds {} bytes, not the {} of {w}x{h} RGB", rgb.len(), w * h * 3));
        }
        if (w, h) == (ow, oh) {
            return Ok(rgb.to_vec());
        }
        self.resize_bytes(rgb.to_vec(), PixelType::U8x3, w, h, ow, oh)
    }

    /// A float RGB frame `w`×`h` → `ow`×`oh`.
    pub(crate) fn resize_f32(
        &mut self,
        rgb: &[f32],
        w: usize,
        h: usize,
        ow: usize,
        oh: usize,
    ) -> std::result::Result<Vec<f32>, String> {
        if rgb.len() != w * h * 3 {
            return Err(format!("a frame holds {} values, not the {} of {w}x{h} RGB", rgb.len(), w * h * 3));
        }
        if (w, h) == (ow, oh) {
            return Ok(rgb.to_vec());
        }
        let bytes: Vec<u8> = rgb.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let out = self.resize_bytes(bytes, PixelType::F32x3, w, h, ow, oh)?;
        Ok(out.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    fn resize_bytes(
        &mut self,
        src: Vec<u8>,
        pixel: PixelType,
        w: usize,
        h: usize,
        ow: usize,
        oh: usize,
    ) -> std::result::Result<Vec<u8>, String> {
        let err = |e: &dyn std::fmt::Display| format!("cannot resize a {w}x{h} frame to {ow}x{oh}: {e}");
        let src = Image::from_vec_u8(w as u32, h as u32, src, pixel).map_err(|e| err(&e))?;
        let alg = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(self.filter.filter_type()));
        match self.fit {
            Fit::Resize | Fit::Crop => {
                let options = if self.fit == Fit::Crop { alg.fit_into_destination(Some((0.5, 0.5))) } else { alg };
                let mut dst = Image::new(ow as u32, oh as u32, pixel);
                self.resizer.resize(&src, &mut dst, &options).map_err(|e| err(&e))?;
                Ok(dst.into_vec())
            }
            Fit::Pad => {
                // The largest size of the source's aspect ratio inside the asked one.
                let (iw, ih) = if w * oh >= h * ow {
                    (ow, ((h * ow) as f64 / w as f64).round().max(1.0) as usize)
                } else {
                    (((w * oh) as f64 / h as f64).round().max(1.0) as usize, oh)
                };
                let mut inner = Image::new(iw as u32, ih as u32, pixel);
                self.resizer.resize(&src, &mut inner, &alg).map_err(|e| err(&e))?;
                let px = pixel.size();
                let (left, top) = ((ow - iw) / 2, (oh - ih) / 2);
                // Zero bytes are black for both 8-bit and float pixels.
                let mut out = vec![0u8; ow * oh * px];
                let inner = inner.buffer();
                for y in 0..ih {
                    let dst = ((top + y) * ow + left) * px;
                    out[dst..dst + iw * px].copy_from_slice(&inner[y * iw * px..(y + 1) * iw * px]);
                }
                Ok(out)
            }
        }
    }
}
