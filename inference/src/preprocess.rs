//! Image decoding with hard limits, and timm's eval-time transform.
//!
//! timm evaluates with `Resize(floor(size / crop_pct))` on the shorter side,
//! `CenterCrop(size)`, `ToTensor` and `Normalize(mean, std)`. The resize uses
//! fast_image_resize, whose convolution filters follow Pillow's (which timm
//! uses through torchvision), so our tensors match timm's to within rounding.

use std::io::Cursor;
use std::ops::Range;

use fast_image_resize::{self as fr, FilterType, ResizeAlg, ResizeOptions};
use image::{DynamicImage, ImageFormat, RgbImage};

use crate::hub_config::{Interpolation, PretrainedCfg};
use crate::libjpeg::JpegRegion;
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

/// Decodes an encoded image, every pixel. Dimensions are checked against
/// `limits` from the header, before any pixel buffer is allocated, so a
/// decompression bomb costs nothing. JPEGs go through libjpeg-turbo (PIL's
/// decoder, so PIL's pixels, the same as [`Preprocessor::decode`] gives the
/// model: what a model is fitted on is what it is served); the rest, and
/// JPEGs libjpeg refuses or does not take, through `image` (zune-jpeg for
/// JPEGs). See [`jpeg_simd`] for what a build without nasm costs.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<DynamicImage> {
    match libjpeg(bytes, limits, |w, h| (w, h), |w, h| (0..w, 0..h))? {
        Some(jpeg) => Ok(jpeg.image),
        None => decode_with_image(bytes, limits),
    }
}

/// Whether libjpeg-turbo runs its SIMD code here: built with nasm on x86
/// (`mozjpeg-sys`'s `nasm_simd`, which leaves it out where nasm is
/// missing), and a CPU with the instructions. Without it, its IDCT and
/// colour conversion are plain C: the same pixels, but every pixel of a
/// 1080p frame takes 1.6× as long as zune-jpeg's (10.4 against 6.7 ms),
/// and a model's region at full scale about as long (docs/performance.md).
pub fn jpeg_simd() -> bool {
    crate::libjpeg::runs_simd()
}

/// [`crate::libjpeg::decode`], with `Ok(None)` also for data libjpeg finds
/// corrupt: zune-jpeg then accepts it or gives the error.
fn libjpeg(
    bytes: &[u8],
    limits: DecodeLimits,
    target: impl Fn(u32, u32) -> (u32, u32),
    region: impl Fn(u32, u32) -> (Range<u32>, Range<u32>),
) -> Result<Option<JpegRegion>> {
    match crate::libjpeg::decode(bytes, limits, target, region) {
        Err(Error::Decode(_)) => Ok(None),
        other => other,
    }
}

/// Decodes any accepted format through the `image` crate.
fn decode_with_image(bytes: &[u8], limits: DecodeLimits) -> Result<DynamicImage> {
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
    /// Every pixel, then timm's resize: exactly timm's eval transform, a
    /// JPEG decoded by PIL's decoder (libjpeg-turbo) to PIL's pixels.
    #[default]
    Full,
    /// At the smallest DCT scale (1/2, 1/4 or 1/8) that still covers timm's
    /// resize target, then the same resize, as PIL's `draft` mode does.
    /// A third less decoding time than `Full` for 1080p frames into
    /// 224×224 models (40% with the resize); the pixels differ slightly from `Full`
    /// (docs/performance.md gives by how much).
    Scaled,
}

/// A decoded image, and the size it was encoded at.
pub struct Decoded {
    /// The picture, or with a [`Self::window`] only part of it: transform it
    /// with [`Preprocessor::run_window`] and that window, never on its own.
    pub image: DynamicImage,
    /// Width and height as encoded: larger than `image` after a scaled or
    /// windowed decode.
    pub source_size: (u32, u32),
    /// Set after a decode by libjpeg, which keeps only the part of the
    /// (possibly reduced) frame that the transform reads: where `image`
    /// lies in that frame. Hand it to [`Preprocessor::run_window`] with the image.
    pub window: Option<Window>,
}

impl Decoded {
    /// An image decoded whole (by [`decode`]): no window.
    pub fn whole(image: DynamicImage) -> Self {
        Self { source_size: (image.width(), image.height()), image, window: None }
    }
}

/// Where a partly decoded image lies in the frame it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The image's top-left pixel in the frame.
    origin: (u32, u32),
    /// The whole frame's width and height.
    frame: (u32, u32),
}

impl Window {
    /// The whole frame's width and height.
    pub fn frame(&self) -> (u32, u32) {
        self.frame
    }
}

impl Preprocessor {
    /// Decodes `bytes` for this transform. A JPEG goes through libjpeg-turbo,
    /// which transforms only the region the resize and crop read (a
    /// [`Decoded::window`]), at full scale or, under [`JpegDecode::Scaled`],
    /// at the smallest DCT scale that still covers the resize target. The
    /// rest, and JPEGs libjpeg refuses or does not take, are decoded whole
    /// by `image`, so this refuses nothing that [`decode`] accepts.
    pub fn decode(&self, bytes: &[u8], limits: DecodeLimits, mode: JpegDecode) -> Result<Decoded> {
        let target = |w, h| self.jpeg_target(mode, w, h);
        let region = |w: u32, h: u32| self.region(w as usize, h as usize);
        if let Some(jpeg) = libjpeg(bytes, limits, target, region)? {
            return Ok(Decoded {
                image: jpeg.image,
                source_size: jpeg.source_size,
                window: Some(Window { origin: jpeg.origin, frame: jpeg.frame }),
            });
        }
        Ok(Decoded::whole(decode_with_image(bytes, limits)?))
    }

    /// The size a `w`×`h` JPEG's decode must cover under `mode`: the whole
    /// image, or timm's resize target (at most the image: one smaller than
    /// its target is decoded at full scale).
    fn jpeg_target(&self, mode: JpegDecode, w: u32, h: u32) -> (u32, u32) {
        match mode {
            JpegDecode::Full => (w, h),
            JpegDecode::Scaled => {
                let (nw, nh) = self.resized_size(w as usize, h as usize);
                ((nw as u32).min(w), (nh as u32).min(h))
            }
        }
    }
}

/// The resize step of timm's eval transform.
#[derive(Debug, Clone, Copy)]
enum Scale {
    ShorterSide(usize),
    Exact { width: usize, height: usize },
}

/// Where the center crop lies in the resized frame.
struct CropBox {
    /// Whether the frame is resized at all (else the crop is a plain cut).
    resized: bool,
    /// The crop's first column and row in the resized frame.
    left: usize,
    top: usize,
    /// Frame pixels per resized pixel, across and down.
    scale: (f64, f64),
}

/// How far the resize filters reach from a sample, in resized pixels: Catmull-Rom's support
/// is 2, bilinear's 1.
const FILTER_REACH: f64 = 3.0;

/// Frame pixels kept past the filter's reach on each side.
const EDGE_MARGIN: f64 = 8.0;

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
        self.run_window(img, None)
    }

    /// [`Self::run`] on `img` cut from a larger frame at `window` (a libjpeg
    /// decode's [`Decoded::window`]): the transform of the whole frame.
    pub fn run_window(&self, img: &DynamicImage, window: Option<Window>) -> Result<Vec<f32>> {
        // Colour JPEGs decode to RGB8 already; copying a 1080p frame costs 0.5 ms.
        let rgb = match img {
            DynamicImage::ImageRgb8(rgb) => std::borrow::Cow::Borrowed(rgb),
            other => std::borrow::Cow::Owned(other.to_rgb8()),
        };
        let window = window.unwrap_or(Window { origin: (0, 0), frame: (rgb.width(), rgb.height()) });
        let cropped = self.resize_crop(&rgb, window)?;
        Ok(self.normalize(&cropped))
    }

    /// Where timm's resize-then-center-crop samples a `w`×`h` frame.
    fn crop_box(&self, w: usize, h: usize) -> CropBox {
        let (nw, nh) = self.resized_size(w, h);
        // torchvision.CenterCrop: int(round((size - crop) / 2)) with Python's round-half-even.
        let top = round_half_even((nh - self.height) as f64 / 2.0);
        let left = round_half_even((nw - self.width) as f64 / 2.0);
        CropBox { resized: (nw, nh) != (w, h), left, top, scale: (w as f64 / nw as f64, h as f64 / nh as f64) }
    }

    /// The columns and rows of a `w`×`h` frame that the transform reads:
    /// the crop box, widened by the filter's reach.
    fn region(&self, w: usize, h: usize) -> (Range<u32>, Range<u32>) {
        let b = self.crop_box(w, h);
        let span = |start: usize, len: usize, scale: f64, side: usize| {
            // Pillow's filters widen with the downscale; libjpeg's fancy
            // upsampling makes the kept region's edge pixels differ from
            // the whole frame's, so a margin keeps them out of reach.
            let reach = FILTER_REACH * scale.max(1.0) + EDGE_MARGIN;
            let a = (start as f64 * scale - reach).floor().max(0.0) as usize;
            let b = (((start + len) as f64 * scale + reach).ceil() as usize).min(side);
            a as u32..b as u32
        };
        (span(b.left, self.width, b.scale.0, w), span(b.top, self.height, b.scale.1, h))
    }

    /// timm's resize-then-center-crop of the frame `window` describes, from
    /// `rgb`, the part of it at `window.origin`; computed for the crop
    /// window only: the same pixels as resizing the whole image, without
    /// ever allocating it (a 1×16384 strip would otherwise resize to 256×4
    /// million).
    fn resize_crop(&self, rgb: &RgbImage, window: Window) -> Result<RgbImage> {
        let ((w, h), (ox, oy)) = (window.frame, window.origin);
        if w == 0 || h == 0 || rgb.width() == 0 || rgb.height() == 0 {
            return Err(Error::Decode("image has no pixels".into()));
        }
        let b = self.crop_box(w as usize, h as usize);
        let (cols, rows) = self.region(w as usize, h as usize);
        let covered = |r: &Range<u32>, o: u32, side: u32| o <= r.start && r.end <= o + side;
        if !covered(&cols, ox, rgb.width()) || !covered(&rows, oy, rgb.height()) {
            return Err(Error::Window(format!(
                "a {}×{} image at {ox},{oy} does not hold columns {cols:?} and rows {rows:?} of its {w}×{h} frame",
                rgb.width(),
                rgb.height()
            )));
        }
        if !b.resized {
            // Unresized, frame and crop share pixels: the region holds the crop.
            let (left, top) = (b.left as u32 - ox, b.top as u32 - oy);
            return Ok(image::imageops::crop_imm(rgb, left, top, self.width as u32, self.height as u32).to_image());
        }
        let (sx, sy) = b.scale;
        let options = ResizeOptions::new().resize_alg(self.filter).crop(
            b.left as f64 * sx - f64::from(ox),
            b.top as f64 * sy - f64::from(oy),
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
        // The frame a decode was cut from (the whole image where zune-jpeg decoded).
        let frame = |d: &Decoded| d.window.map_or((d.image.width(), d.image.height()), |w| w.frame());
        // 1080 / 4 = 270 still covers the 256 px shorter side; 1080 / 8 would not.
        let d = pre.decode(&jpeg(1920, 1080), limits, JpegDecode::Scaled).unwrap();
        assert_eq!((frame(&d), d.source_size), ((480, 270), (1920, 1080)));
        // Full scale, only the columns the crop reads (992 of 1920: the
        // crop's 224 of 455, times 1080 / 256, and the filter's reach).
        let d = pre.decode(&jpeg(1920, 1080), limits, JpegDecode::Full).unwrap();
        assert_eq!((frame(&d), d.source_size), ((1920, 1080), (1920, 1080)));
        assert!(d.image.width() < 1000 && d.image.height() < 1080, "{}×{}", d.image.width(), d.image.height());
        // Portrait: 1/2 gives 300×501 for a 256×427 target (1/4 would be 150 wide).
        let d = pre.decode(&jpeg(600, 1001), limits, JpegDecode::Scaled).unwrap();
        assert_eq!(frame(&d), (300, 501));
        // libjpeg rounds up: ceil(2041 / 8) = 256 covers 256 (rounding down would need 1/4).
        let d = pre.decode(&jpeg(2041, 2041), limits, JpegDecode::Scaled).unwrap();
        assert_eq!(frame(&d), (256, 256));
        // Nothing smaller covers a 300 px image, nor a 200 px one (which
        // the resize enlarges): decoded at full scale.
        let d = pre.decode(&jpeg(300, 300), limits, JpegDecode::Scaled).unwrap();
        assert_eq!(frame(&d), (300, 300));
        let d = pre.decode(&jpeg(200, 200), limits, JpegDecode::Scaled).unwrap();
        assert_eq!(frame(&d), (200, 200));
    }

    #[test]
    fn scaled_jpeg_tensor_stays_close_to_the_full_transform() {
        let pre = imagenet_224();
        let bytes = jpeg(1920, 1080);
        let tensor = |mode| {
            let d = pre.decode(&bytes, DecodeLimits::default(), mode).unwrap();
            pre.run_window(&d.image, d.window).unwrap()
        };
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

    /// Decoding only the region the transform reads gives the tensor of the
    /// whole frame, bit for bit: landscape, portrait and odd sizes, scales
    /// 1/2, 1/4, 1/8 and 8/8, colour (4:2:0, 4:2:2, 4:4:4) and grey,
    /// baseline, progressive and with restart markers.
    #[test]
    fn jpeg_region_gives_the_whole_frames_tensor() {
        for mode in [JpegDecode::Scaled, JpegDecode::Full] {
            region_gives_the_whole_frames_tensor(mode);
        }
    }

    fn region_gives_the_whole_frames_tensor(mode: JpegDecode) {
        let pre = imagenet_224();
        let limits = DecodeLimits::default();
        let target = |w, h| pre.jpeg_target(mode, w, h);
        // Made by Pillow from the `jpeg` pattern: the layouts our encoder
        // does not write, whose rows libjpeg skips and crops differently.
        let fixtures = ["progressive-420.jpg", "progressive-444.jpg", "restart-422.jpg"].map(|f| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg/");
            ((1283, 777), vec![std::fs::read(format!("{path}{f}")).unwrap()])
        });
        let made = [(1920, 1080), (600, 1001), (2041, 2041), (1283, 777), (5000, 600)].map(|(w, h)| {
            let mut grey = Vec::new();
            let luma = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 251) as u8]));
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut grey, 90).encode_image(&luma).unwrap();
            ((w, h), vec![jpeg(w, h), grey])
        });
        for ((w, h), files) in made.into_iter().chain(fixtures) {
            for bytes in files {
                let whole = crate::libjpeg::decode(&bytes, limits, target, |w, h| (0..w, 0..h)).unwrap().unwrap();
                let part = pre.decode(&bytes, limits, mode).unwrap();
                let window = part.window.expect("a JPEG decode has a window");
                assert_eq!(window.frame(), (whole.image.width(), whole.image.height()), "{w}×{h}");
                assert!(part.image.width() * part.image.height() < window.frame.0 * window.frame.1, "{w}×{h}: no cut");
                eprintln!(
                    "{mode:?} {w}×{h}: {}×{} of {}×{} at {:?}",
                    part.image.width(),
                    part.image.height(),
                    window.frame.0,
                    window.frame.1,
                    window.origin
                );
                let expected = pre.run(&whole.image).unwrap();
                assert!(pre.run_window(&part.image, part.window).unwrap() == expected, "{w}×{h}");
            }
        }
        // A window that does not hold the region is refused, not resized.
        let part = pre.decode(&jpeg(1920, 1080), limits, JpegDecode::Scaled).unwrap();
        let shifted = Window { origin: (0, 0), ..part.window.unwrap() };
        assert!(matches!(pre.run_window(&part.image, Some(shifted)), Err(Error::Window(_))));
    }

    /// What libjpeg refuses (a truncated file, which it would decode with
    /// grey rows and only warn about; garbage) or does not take (CMYK, more
    /// scans than zune-jpeg takes) goes to zune-jpeg whole, in both modes
    /// and in [`decode`], so every path accepts and refuses what zune-jpeg does.
    #[test]
    fn libjpeg_leaves_bad_and_odd_jpegs_to_zune_jpeg() {
        let pre = imagenet_224();
        let limits = DecodeLimits::default();
        let whole = jpeg(1920, 1080);
        let cut = whole[..whole.len() / 2].to_vec();
        let garbage = [&[0xFF, 0xD8, 0xFF, 0xE0][..], &[0x42; 64]].concat();
        let target = |_, _| (256, 256);
        let whole_frame = |w, h| (0..w, 0..h);
        for bad in [&cut, &garbage] {
            let err = crate::libjpeg::decode(bad, limits, target, whole_frame).err();
            assert!(matches!(err, Some(Error::Decode(_))), "{err:?}");
        }
        // More SOS markers than zune-jpeg takes (here in a comment segment)
        // are left to zune-jpeg, whatever libjpeg would make of them.
        assert!(crate::libjpeg::decode(&whole, limits, target, whole_frame).unwrap().is_some());
        let mut comment = vec![0xFF, 0xFE, 0, 0];
        comment.extend([0xFF, 0xDA].repeat(101));
        let len = (comment.len() - 2) as u16;
        comment[2..4].copy_from_slice(&len.to_be_bytes());
        let many_scans = [&whole[..2], &comment, &whole[2..]].concat();
        assert!(crate::libjpeg::decode(&many_scans, limits, target, whole_frame).unwrap().is_none());
        let cmyk = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg/cmyk.jpg")).unwrap();
        assert!(crate::libjpeg::decode(&cmyk, limits, target, whole_frame).unwrap().is_none());
        for bytes in [&cut, &garbage, &many_scans, &cmyk] {
            let zune = decode_with_image(bytes, limits).map(|i| (i.width(), i.height()));
            let free = decode(bytes, limits).map(|i| (i.width(), i.height()));
            assert_eq!(format!("{free:?}"), format!("{zune:?}"));
            for mode in [JpegDecode::Full, JpegDecode::Scaled] {
                match (pre.decode(bytes, limits, mode), &zune) {
                    (Ok(d), Ok(size)) => assert_eq!(((d.image.width(), d.image.height()), d.window), (*size, None)),
                    (Err(e), Err(z)) => assert_eq!(e.to_string(), z.to_string()),
                    (d, z) => panic!("{mode:?}: {:?} where zune-jpeg gave {z:?}", d.map(|d| d.window)),
                }
            }
        }
        let small = DecodeLimits { max_width: 1000, ..limits };
        for mode in [JpegDecode::Full, JpegDecode::Scaled] {
            assert!(matches!(pre.decode(&whole, small, mode), Err(Error::ImageTooLarge(_))));
        }
        assert!(matches!(decode(&whole, small), Err(Error::ImageTooLarge(_))));
        // Other formats take the usual path.
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(RgbImage::new(640, 480))
            .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let d = pre.decode(&png, limits, JpegDecode::Scaled).unwrap();
        assert_eq!((d.image.width(), d.image.height(), d.window), (640, 480, None));
    }

    /// Images too small or too thin for any cut, or exactly the size of the
    /// crop or of the resize, and grey ones (which stay grey, as zune-jpeg
    /// gives them): libjpeg's windowed decode gives the whole decode's tensor.
    #[test]
    fn libjpeg_handles_small_thin_and_grey_jpegs() {
        let pre = imagenet_224();
        let limits = DecodeLimits::default();
        for (w, h) in [(1, 300), (300, 1), (7, 7), (224, 224), (256, 256), (256, 300)] {
            let mut grey = Vec::new();
            let luma = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 251) as u8]));
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut grey, 90).encode_image(&luma).unwrap();
            for (bytes, is_grey) in [(jpeg(w, h), false), (grey, true)] {
                let whole = crate::libjpeg::decode(&bytes, limits, |w, h| (w, h), |w, h| (0..w, 0..h)).unwrap();
                let whole = whole.expect("libjpeg takes it").image;
                assert_eq!(matches!(whole, DynamicImage::ImageLuma8(_)), is_grey, "{w}×{h}");
                let expected = pre.run(&whole).unwrap();
                for mode in [JpegDecode::Full, JpegDecode::Scaled] {
                    let d = pre.decode(&bytes, limits, mode).unwrap();
                    assert!(d.window.is_some(), "{w}×{h} {mode:?}: decoded by libjpeg");
                    assert!(pre.run_window(&d.image, d.window).unwrap() == expected, "{w}×{h} {mode:?}");
                }
            }
        }
    }

    /// libjpeg-turbo is Pillow's decoder: a 4:2:0 JPEG that Pillow wrote
    /// decodes to the pixels Pillow decoded it to (`regen.py`), whole and
    /// in a region. zune-jpeg's differ by a level here and there.
    #[test]
    fn libjpeg_gives_pillows_pixels() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg/");
        let bytes = std::fs::read(format!("{dir}pil-420.jpg")).unwrap();
        let pillow = image::open(format!("{dir}pil-420.decoded.png")).unwrap().to_rgb8();
        let limits = DecodeLimits::default();
        let whole = |w, h| (0..w, 0..h);
        let libjpeg = crate::libjpeg::decode(&bytes, limits, |w, h| (w, h), whole).unwrap().unwrap();
        assert!(libjpeg.image.to_rgb8() == pillow, "libjpeg's whole decode");
        let part = crate::libjpeg::decode(&bytes, limits, |w, h| (w, h), |_, _| (50..110, 20..70)).unwrap().unwrap();
        let (x0, y0) = part.origin;
        let part = part.image.to_rgb8();
        // All but a cropped row's two end pixels, which fancy upsampling
        // computes without their outer neighbours (`Preprocessor::region`
        // keeps them out of the transform's reach).
        let differ = |x: u32, y: u32| part.get_pixel(x, y) != pillow.get_pixel(x0 + x, y0 + y);
        let inner = 1..part.width() - 1;
        assert!(!(0..part.height()).any(|y| inner.clone().any(|x| differ(x, y))), "a region's inner pixels");
        let zune = decode_with_image(&bytes, limits).unwrap().to_rgb8();
        assert!(zune != pillow, "zune-jpeg's pixels are not Pillow's: this fixture tells the decoders apart");
    }

    /// Mutated JPEGs (bytes flipped, runs overwritten, cut short; baseline,
    /// progressive and restart-marker files) through every decoding path:
    /// each gives an image or an error, never a panic, and nothing that
    /// zune-jpeg accepts is refused. A cheap, deterministic complement to
    /// `fuzz/` (cargo-fuzz), which CI does not run.
    #[test]
    fn mutated_jpegs_never_panic() {
        let pre = imagenet_224();
        let limits = DecodeLimits { max_width: 4096, max_height: 4096, max_alloc: 64 << 20 };
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg/");
        let fixture = |f: &str| std::fs::read(format!("{dir}{f}")).unwrap();
        let seeds = [jpeg(96, 64), fixture("restart-422.jpg"), fixture("progressive-420.jpg")];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..300 {
            let mut bytes = seeds[i % seeds.len()].clone();
            let len = bytes.len() as u64;
            match next() % 3 {
                0 => (0..1 + next() % 8).for_each(|_| bytes[(next() % len) as usize] ^= 1 << (next() % 8)),
                1 => {
                    let at = (next() % len) as usize;
                    let end = (at + 1 + (next() % 32) as usize).min(bytes.len());
                    bytes[at..end].fill(next() as u8);
                }
                _ => bytes.truncate((next() % len) as usize),
            }
            // libjpeg may take what zune-jpeg refuses, never the reverse.
            let zune_ok = decode_with_image(&bytes, limits).is_ok();
            assert!(decode(&bytes, limits).is_ok() || !zune_ok, "mutation {i}: whole decode");
            for mode in [JpegDecode::Full, JpegDecode::Scaled] {
                match pre.decode(&bytes, limits, mode) {
                    Ok(d) => {
                        pre.run_window(&d.image, d.window).unwrap();
                    }
                    Err(e) => assert!(!zune_ok, "mutation {i}, {mode:?}: refused ({e}) what zune-jpeg accepts"),
                }
            }
        }
    }

    /// Decode and transform times of `LINESIDE_JPEG` (a file), alternating:
    /// every pixel by zune-jpeg (what `JpegDecode::Full` did before
    /// libjpeg) and by [`decode`], full scale keeping the region the transform
    /// reads (`JpegDecode::Full`), and the reduced scale keeping the whole
    /// frame or the region (`JpegDecode::Scaled`):
    /// `LINESIDE_JPEG=part.jpg cargo test --release -p lineside-inference --lib decode_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn decode_speed() {
        let bytes = std::fs::read(std::env::var("LINESIDE_JPEG").expect("LINESIDE_JPEG")).unwrap();
        let pre = imagenet_224();
        let limits = DecodeLimits::default();
        let target = |w, h| pre.jpeg_target(JpegDecode::Scaled, w, h);
        let whole_frame = || {
            let s = crate::libjpeg::decode(&bytes, limits, target, |w, h| (0..w, 0..h)).unwrap().unwrap();
            Decoded { image: s.image, source_size: s.source_size, window: None }
        };
        let ways: [(&str, &dyn Fn() -> Decoded); 5] = [
            ("zune-jpeg, whole", &|| Decoded::whole(decode_with_image(&bytes, limits).unwrap())),
            ("whole (decode: libjpeg with SIMD, else zune-jpeg)", &|| Decoded::whole(decode(&bytes, limits).unwrap())),
            ("full, region", &|| pre.decode(&bytes, limits, JpegDecode::Full).unwrap()),
            ("scaled, whole frame", &whole_frame),
            ("scaled, region", &|| pre.decode(&bytes, limits, JpegDecode::Scaled).unwrap()),
        ];
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mut times = vec![(Vec::new(), Vec::new()); ways.len()];
        for _ in 0..30 {
            for ((_, decode), (dec, all)) in ways.iter().zip(&mut times) {
                let t = std::time::Instant::now();
                let d = decode();
                dec.push(t.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(pre.run_window(&d.image, d.window).unwrap());
                all.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        for ((name, _), (dec, all)) in ways.iter().zip(&mut times) {
            println!("{name}: decode {:.2} ms, with the transform {:.2} ms (medians of 30)", median(dec), median(all));
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
