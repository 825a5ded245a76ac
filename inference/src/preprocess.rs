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

/// How JPEGs are decoded for a model whose input is much smaller than the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JpegDecode {
    /// Every pixel, then timm's resize: exactly timm's eval transform.
    #[default]
    Full,
    /// At the smallest DCT scale (1/2, 1/4 or 1/8) that still covers timm's
    /// resize target, then the same resize, as PIL's `draft` mode does. About
    /// 4× less decoding for 1080p frames into 224×224 models; the pixels
    /// differ slightly from `Full` (docs/performance.md gives by how much).
    Scaled,
}

/// A decoded image, and the size it was encoded at.
pub struct Decoded {
    pub image: DynamicImage,
    /// Width and height as encoded: larger than `image` after a scaled decode.
    pub source_size: (u32, u32),
}

impl Preprocessor {
    /// Decodes `bytes` for this transform: as [`decode`] does, or, for a JPEG
    /// under [`JpegDecode::Scaled`], at the smallest DCT scale that still
    /// covers the resize target. [`decode`] takes over where no smaller scale
    /// does, where the JPEG is not YCbCr or grey, and where libjpeg finds it
    /// corrupt or unsupported, so this refuses nothing that [`decode`] accepts.
    pub fn decode(&self, bytes: &[u8], limits: DecodeLimits, mode: JpegDecode) -> Result<Decoded> {
        if mode == JpegDecode::Scaled {
            let target = |w: u32, h: u32| {
                let (nw, nh) = self.resized_size(w as usize, h as usize);
                (nw as u32, nh as u32)
            };
            match crate::scaled_jpeg::decode(bytes, limits, target) {
                Ok(Some(s)) => {
                    return Ok(Decoded { image: DynamicImage::ImageRgb8(s.image), source_size: s.source_size });
                }
                Ok(None) | Err(Error::Decode(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let image = decode(bytes, limits)?;
        Ok(Decoded { source_size: (image.width(), image.height()), image })
    }
}

/// The resize step of timm's eval transform.
#[derive(Debug, Clone, Copy)]
enum Scale {
    ShorterSide(usize),
    Exact { width: usize, height: usize },
}

/// timm's eval transform for one model.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    height: usize,
    width: usize,
    /// Size after the resize, before the crop.
    scale: Scale,
    filter: ResizeAlg,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Preprocessor {
    /// The transform `pretrained_cfg` describes.
    pub fn new(cfg: &PretrainedCfg) -> Self {
        let [_, height, width] = cfg.input_size;
        let scaled = |s: usize| (s as f64 / cfg.crop_pct as f64).floor() as usize;
        // timm: a square input resizes the shorter side; a non-square one resizes to both sides exactly.
        let scale = if height == width {
            Scale::ShorterSide(scaled(height))
        } else {
            Scale::Exact { width: scaled(width), height: scaled(height) }
        };
        let filter = match cfg.interpolation {
            Interpolation::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            Interpolation::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            Interpolation::Nearest => ResizeAlg::Nearest,
        };
        Self { height, width, scale, filter, mean: cfg.mean, std: cfg.std }
    }

    /// Resizes the whole image to `input_size` (no crop, aspect not kept),
    /// then normalises: for models whose output maps onto the full image.
    pub fn stretch(cfg: &PretrainedCfg) -> Self {
        let [_, height, width] = cfg.input_size;
        Self { scale: Scale::Exact { width, height }, ..Self::new(cfg) }
    }

    /// `(channels, height, width)` of the tensors this produces.
    pub fn input_shape(&self) -> (usize, usize, usize) {
        (3, self.height, self.width)
    }

    /// Resize, center-crop and normalize to a CHW f32 buffer.
    pub fn run(&self, img: &DynamicImage) -> Result<Vec<f32>> {
        // Decoded JPEGs are already RGB8; copying a 1080p frame costs 0.5 ms.
        let rgb = match img {
            DynamicImage::ImageRgb8(rgb) => std::borrow::Cow::Borrowed(rgb),
            other => std::borrow::Cow::Owned(other.to_rgb8()),
        };
        let cropped = self.resize_crop(&rgb)?;
        Ok(self.normalize(&cropped))
    }

    /// timm's resize-then-center-crop, computed for the crop window only: the
    /// same pixels as resizing the whole image, without ever allocating it
    /// (a 1×16384 strip would otherwise resize to 256×4 million).
    fn resize_crop(&self, rgb: &RgbImage) -> Result<RgbImage> {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        if w == 0 || h == 0 {
            return Err(Error::Decode("image has no pixels".into()));
        }
        let (nw, nh) = self.resized_size(w, h);
        // torchvision.CenterCrop: int(round((size - crop) / 2)) with Python's round-half-even.
        let top = round_half_even((nh - self.height) as f64 / 2.0);
        let left = round_half_even((nw - self.width) as f64 / 2.0);
        if (nw, nh) == (w, h) {
            return Ok(image::imageops::crop_imm(rgb, left as u32, top as u32, self.width as u32, self.height as u32)
                .to_image());
        }
        let (sx, sy) = (w as f64 / nw as f64, h as f64 / nh as f64);
        let options = ResizeOptions::new().resize_alg(self.filter).crop(
            left as f64 * sx,
            top as f64 * sy,
            self.width as f64 * sx,
            self.height as f64 * sy,
        );
        let mut dst = RgbImage::new(self.width as u32, self.height as u32);
        fr::Resizer::new().resize(rgb, &mut dst, &options).map_err(|e| Error::Decode(format!("resize failed: {e}")))?;
        Ok(dst)
    }

    /// The size a `w`×`h` image is resized to before the center crop.
    fn resized_size(&self, w: usize, h: usize) -> (usize, usize) {
        let (nw, nh) = match self.scale {
            // torchvision.Resize(int): the shorter side becomes `s`, the other keeps the aspect (truncated).
            Scale::ShorterSide(s) if w <= h => (s, (s as u64 * h as u64 / w.max(1) as u64) as usize),
            Scale::ShorterSide(s) => ((s as u64 * w as u64 / h.max(1) as u64) as usize, s),
            Scale::Exact { width, height } => (width, height),
        };
        (nw.max(self.width), nh.max(self.height))
    }

    fn normalize(&self, rgb: &RgbImage) -> Vec<f32> {
        let w = rgb.width() as usize;
        let plane = self.height * self.width;
        let mut out = vec![0f32; 3 * plane];
        let raw = rgb.as_raw();
        for y in 0..self.height {
            let row = &raw[y * w * 3..(y * w + self.width) * 3];
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
    fn extreme_aspect_ratios_stay_small() {
        let cfg: PretrainedCfg = serde_json::from_str(
            r#"{"input_size":[3,224,224],"interpolation":"bicubic","crop_pct":0.875,"mean":[0.5,0.5,0.5],"std":[0.5,0.5,0.5]}"#,
        )
        .unwrap();
        let pre = Preprocessor::new(&cfg);
        for (w, h) in [(1, 16_384), (16_384, 1), (1, 1), (3, 500)] {
            let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30])));
            let out = pre.run(&img).unwrap();
            assert_eq!(out.len(), 3 * 224 * 224, "{w}x{h}");
            assert!((out[0] - (10.0 / 255.0 - 0.5) / 0.5).abs() < 0.02, "{w}x{h}: {}", out[0]);
        }
    }

    fn imagenet_224() -> Preprocessor {
        let cfg: PretrainedCfg = serde_json::from_str(
            r#"{"input_size":[3,224,224],"interpolation":"bicubic","crop_pct":0.875,"mean":[0.485,0.456,0.406],"std":[0.229,0.224,0.225]}"#,
        )
        .unwrap();
        Preprocessor::new(&cfg)
    }

    /// A `w`×`h` JPEG of smooth gradients with a sharp checkered patch.
    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            let check = if (x / 7 + y / 5) % 2 == 0 && x > w / 3 && x < w / 2 { 90 } else { 0 };
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, (((x + y) / 3) % 160) as u8 + check])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
        out
    }

    #[test]
    fn scaled_jpeg_decode_keeps_the_resize_target_covered() {
        let pre = imagenet_224();
        let limits = DecodeLimits::default();
        // 1080 / 4 = 270 still covers the 256 px shorter side; 1080 / 8 would not.
        let d = pre.decode(&jpeg(1920, 1080), limits, JpegDecode::Scaled).unwrap();
        assert_eq!((d.image.width(), d.image.height(), d.source_size), (480, 270, (1920, 1080)));
        let d = pre.decode(&jpeg(1920, 1080), limits, JpegDecode::Full).unwrap();
        assert_eq!((d.image.width(), d.image.height(), d.source_size), (1920, 1080, (1920, 1080)));
        // Portrait: 1/2 gives 300×501 for a 256×427 target (1/4 would be 150 wide).
        let d = pre.decode(&jpeg(600, 1001), limits, JpegDecode::Scaled).unwrap();
        assert_eq!((d.image.width(), d.image.height()), (300, 501));
        // libjpeg rounds up: ceil(2041 / 8) = 256 covers 256 (rounding down would need 1/4).
        let d = pre.decode(&jpeg(2041, 2041), limits, JpegDecode::Scaled).unwrap();
        assert_eq!((d.image.width(), d.image.height()), (256, 256));
        // Nothing smaller covers a 300 px image: decoded in full.
        let d = pre.decode(&jpeg(300, 300), limits, JpegDecode::Scaled).unwrap();
        assert_eq!((d.image.width(), d.image.height()), (300, 300));
    }

    #[test]
    fn scaled_jpeg_tensor_stays_close_to_the_full_transform() {
        let pre = imagenet_224();
        let bytes = jpeg(1920, 1080);
        let tensor = |mode| pre.run(&pre.decode(&bytes, DecodeLimits::default(), mode).unwrap().image).unwrap();
        let (full, scaled) = (tensor(JpegDecode::Full), tensor(JpegDecode::Scaled));
        // In 8-bit pixel levels: undo Normalize's std.
        let plane = 224 * 224;
        let levels: Vec<f32> = full
            .iter()
            .zip(&scaled)
            .enumerate()
            .map(|(i, (a, b))| (a - b).abs() * [0.229, 0.224, 0.225][i / plane] * 255.0)
            .collect();
        let mean = levels.iter().sum::<f32>() / levels.len() as f32;
        let max = levels.iter().cloned().fold(0.0, f32::max);
        assert!(mean < 1.5 && max < 40.0, "mean {mean:.2} max {max:.1} levels");
    }

    #[test]
    fn scaled_jpeg_decode_leaves_bad_and_odd_jpegs_to_the_full_decoder() {
        let pre = imagenet_224();
        let limits = DecodeLimits::default();
        let whole = jpeg(1920, 1080);
        let cut = &whole[..whole.len() / 2];
        let garbage = [&[0xFF, 0xD8, 0xFF, 0xE0][..], &[0x42; 64]].concat();
        // libjpeg would fill a truncated file's missing rows with grey and
        // only warn: the scaled decoder refuses both, and leaves the answer
        // to the full one.
        let target = |_, _| (256, 256);
        for bad in [cut, &garbage[..]] {
            let err = crate::scaled_jpeg::decode(bad, limits, target).err();
            assert!(matches!(err, Some(Error::Decode(_))), "{err:?}");
        }
        assert!(pre.decode(&garbage, limits, JpegDecode::Scaled).is_err());
        // More SOS markers than zune-jpeg takes (here in a comment segment)
        // are left to zune-jpeg, whatever libjpeg would make of them.
        assert!(crate::scaled_jpeg::decode(&whole, limits, target).unwrap().is_some());
        let mut comment = vec![0xFF, 0xFE, 0, 0];
        comment.extend([0xFF, 0xDA].repeat(101));
        let len = (comment.len() - 2) as u16;
        comment[2..4].copy_from_slice(&len.to_be_bytes());
        let many_scans = [&whole[..2], &comment, &whole[2..]].concat();
        assert!(crate::scaled_jpeg::decode(&many_scans, limits, target).unwrap().is_none());
        let small = DecodeLimits { max_width: 1000, ..limits };
        assert!(matches!(pre.decode(&whole, small, JpegDecode::Scaled), Err(Error::ImageTooLarge(_))));
        // Other formats take the usual path.
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(RgbImage::new(640, 480))
            .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let d = pre.decode(&png, limits, JpegDecode::Scaled).unwrap();
        assert_eq!((d.image.width(), d.image.height()), (640, 480));
    }

    /// Decode times of `LINESIDE_JPEG` (a file) in both modes:
    /// `LINESIDE_JPEG=part.jpg cargo test --release -p lineside-inference --lib decode_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn decode_speed() {
        let bytes = std::fs::read(std::env::var("LINESIDE_JPEG").expect("LINESIDE_JPEG")).unwrap();
        let pre = imagenet_224();
        for mode in [JpegDecode::Full, JpegDecode::Scaled, JpegDecode::Full, JpegDecode::Scaled] {
            let mut times: Vec<f64> = (0..30)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(pre.decode(&bytes, DecodeLimits::default(), mode).unwrap());
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(f64::total_cmp);
            println!("{mode:?}: decode median {:.2} ms (min {:.2})", times[15], times[0]);
        }
    }

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
