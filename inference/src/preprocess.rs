//! Image decoding with hard limits, and timm's eval-time transform.
//!
//! timm evaluates with `Resize(floor(size / crop_pct))` on the shorter side,
//! `CenterCrop(size)`, `ToTensor` and `Normalize(mean, std)`. The resize uses
//! fast_image_resize, whose convolution filters follow Pillow's (which timm
//! uses through torchvision), so our tensors match timm's to within rounding.

use std::io::Cursor;

use fast_image_resize::{self as fr, FilterType, ResizeAlg, ResizeOptions};
use image::{DynamicImage, ImageFormat, RgbImage};

use crate::hub_config::{Interpolation, PretrainedCfg};
use crate::{Error, Result};

/// Limits applied while decoding untrusted images.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Largest decoder allocation in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_width: 16_384, max_height: 16_384, max_alloc: 512 * 1024 * 1024 }
    }
}

/// Image formats lineside accepts.
pub const ACCEPTED_FORMATS: &[ImageFormat] =
    &[ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Bmp, ImageFormat::Tiff, ImageFormat::WebP];

/// Decodes an encoded image. Dimensions are checked against `limits` from the
/// header, before any pixel buffer is allocated, so a decompression bomb costs nothing.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<DynamicImage> {
    let mut reader =
        image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| Error::Decode(e.to_string()))?;
    match reader.format() {
        Some(f) if ACCEPTED_FORMATS.contains(&f) => {}
        Some(f) => return Err(Error::UnsupportedFormat(format!("{f:?}"))),
        None => return Err(Error::Decode("not a recognised image format".into())),
    }
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_width);
    l.max_image_height = Some(limits.max_height);
    l.max_alloc = Some(limits.max_alloc);
    reader.limits(l);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(e) => Error::ImageTooLarge(e.to_string()),
        other => Error::Decode(other.to_string()),
    })
}

/// timm's eval transform for one model.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    height: usize,
    width: usize,
    /// Shorter side after the resize: `floor(size / crop_pct)`.
    scale_size: usize,
    filter: ResizeAlg,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Preprocessor {
    /// The transform `pretrained_cfg` describes.
    pub fn new(cfg: &PretrainedCfg) -> Self {
        let [_, height, width] = cfg.input_size;
        let scale_size = (height.min(width) as f64 / cfg.crop_pct as f64).floor() as usize;
        let filter = match cfg.interpolation {
            Interpolation::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            Interpolation::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            Interpolation::Nearest => ResizeAlg::Nearest,
        };
        Self { height, width, scale_size, filter, mean: cfg.mean, std: cfg.std }
    }

    /// `(channels, height, width)` of the tensors this produces.
    pub fn input_shape(&self) -> (usize, usize, usize) {
        (3, self.height, self.width)
    }

    /// Resize, center-crop and normalize to a CHW f32 buffer.
    pub fn run(&self, img: &DynamicImage) -> Result<Vec<f32>> {
        let rgb = img.to_rgb8();
        let resized = self.resize_shorter_side(&rgb)?;
        Ok(self.crop_normalize(&resized))
    }

    /// Normalize an RGB image that already has the model's input size.
    pub fn normalize_exact(&self, rgb: &RgbImage) -> Result<Vec<f32>> {
        if (rgb.width() as usize, rgb.height() as usize) != (self.width, self.height) {
            return Err(Error::config("input", format!("expected {}x{}", self.width, self.height)));
        }
        Ok(self.crop_normalize(rgb))
    }

    fn resize_shorter_side(&self, rgb: &RgbImage) -> Result<RgbImage> {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        // torchvision.Resize(int): the shorter side becomes `scale_size`, the other keeps the aspect (truncated).
        let (nw, nh) = if w <= h {
            (self.scale_size, self.scale_size * h / w)
        } else {
            (self.scale_size * w / h, self.scale_size)
        };
        let (nw, nh) = (nw.max(self.width), nh.max(self.height));
        if (nw, nh) == (w, h) {
            return Ok(rgb.clone());
        }
        let mut dst = RgbImage::new(nw as u32, nh as u32);
        fr::Resizer::new()
            .resize(rgb, &mut dst, &ResizeOptions::new().resize_alg(self.filter))
            .map_err(|e| Error::Decode(format!("resize failed: {e}")))?;
        Ok(dst)
    }

    fn crop_normalize(&self, rgb: &RgbImage) -> Vec<f32> {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        // torchvision.CenterCrop: int(round((size - crop) / 2)) with Python's round-half-even.
        let top = round_half_even((h - self.height) as f64 / 2.0);
        let left = round_half_even((w - self.width) as f64 / 2.0);
        let plane = self.height * self.width;
        let mut out = vec![0f32; 3 * plane];
        let raw = rgb.as_raw();
        for y in 0..self.height {
            let row = &raw[((top + y) * w + left) * 3..((top + y) * w + left + self.width) * 3];
            for (x, px) in row.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    out[c * plane + y * self.width + x] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
                }
            }
        }
        out
    }
}

fn round_half_even(v: f64) -> usize {
    let r = v.round();
    let r = if (v - v.trunc() - 0.5).abs() < 1e-9 && (r as i64) % 2 != 0 { r - 1.0 } else { r };
    r as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_like_python() {
        assert_eq!(round_half_even(80.5), 80);
        assert_eq!(round_half_even(81.5), 82);
        assert_eq!(round_half_even(16.0), 16);
        assert_eq!(round_half_even(3.4), 3);
    }

    #[test]
    fn rejects_bomb_header_before_decoding() {
        // A PNG signature and an IHDR chunk declaring 100000 x 100000 RGBA, nothing else.
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        assert!(matches!(decode(&png, DecodeLimits::default()), Err(Error::ImageTooLarge(_))));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
