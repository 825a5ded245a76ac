//! JPEG decoding at a reduced DCT scale (PIL's `draft` mode), through
//! libjpeg-turbo's decoder as vendored by `mozjpeg-sys`.
//!
//! A JPEG stores 8×8 blocks of DCT coefficients, so a decoder can produce the
//! image at 1/2, 1/4 or 1/8 of its size by running a smaller inverse DCT on
//! each block's low frequencies: the entropy decoding still reads every
//! coefficient, but the IDCT, upsampling and colour conversion shrink with
//! the output. For a model input of 224×224 from a 1920×1080 frame, a quarter
//! scale (480×270) is still larger than timm's resize target (455×256), so the
//! resize that follows only has less to do. The pixels differ slightly from
//! decoding every pixel and resizing: the DCT scaling acts as a box-like
//! prefilter where Pillow's resize alone would use its wider kernel.
//!
//! libjpeg reports fatal errors by calling `error_exit`, which must not
//! return; `mozjpeg` turns that into an unwind that we catch here. libjpeg
//! also papers over corrupt data (a truncated file decodes with its missing
//! rows grey) and only *warns*; we turn those warnings into errors too, and
//! the caller leaves a damaged image to the full decoder to accept or refuse,
//! so scaled decoding refuses nothing that full decoding accepts.
//!
//! The C library is built without its SIMD code (that needs nasm): its
//! entropy decoding, most of the cost at reduced scales, has none anyway.

use std::any::Any;
use std::os::raw::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use image::RgbImage;
use mozjpeg::{ColorSpace, Decompress};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error};

use crate::preprocess::DecodeLimits;
use crate::{Error, Result};

// Every libjpeg error reaches Rust as an unwind: with panic = "abort" each
// corrupt upload would abort the server.
#[cfg(panic = "abort")]
compile_error!("scaled_jpeg needs panic = \"unwind\": libjpeg's errors unwind to catch_unwind");

/// DCT scales tried, smallest output first: numerators over 8.
const NUMERATORS: [u8; 3] = [1, 2, 4];

/// Bytes per source pixel that libjpeg may hold while decoding: a
/// progressive JPEG keeps every coefficient (2 bytes × 3 components) of
/// the whole image until its last scan.
const WORKING_BYTES_PER_PIXEL: u64 = 6;

/// Most scans (SOS markers) this decoder takes on. libjpeg has no limit of
/// its own, and a progressive JPEG of a hundred thousand tiny scans would
/// walk the whole coefficient buffer for each; zune-jpeg, which the rest go
/// to, refuses more than 100.
const MAX_SCANS: usize = 100;

/// A JPEG decoded at a reduced scale, and the size it was encoded at.
pub(crate) struct ScaledJpeg {
    pub image: RgbImage,
    pub source_size: (u32, u32),
}

/// Decodes `bytes` at the smallest DCT scale whose output is still at
/// least `target(width, height)` on both sides.
///
/// `Ok(None)` means this decoder does not apply and the caller should decode
/// in full: not a JPEG, a colour space other than YCbCr or grey (CMYK), no
/// scale below 1 that keeps the target, more than [`MAX_SCANS`] scans, or an
/// image whose working memory would exceed `limits.max_alloc` (the full
/// decoder enforces those limits).
pub(crate) fn decode(
    bytes: &[u8],
    limits: DecodeLimits,
    target: impl Fn(u32, u32) -> (u32, u32),
) -> Result<Option<ScaledJpeg>> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || scan_markers(bytes) > MAX_SCANS {
        return Ok(None);
    }
    match catch_unwind(AssertUnwindSafe(|| decode_unguarded(bytes, limits, target))) {
        Ok(result) => result,
        Err(payload) => Err(Error::Decode(panic_message(payload))),
    }
}

fn decode_unguarded(
    bytes: &[u8],
    limits: DecodeLimits,
    target: impl Fn(u32, u32) -> (u32, u32),
) -> Result<Option<ScaledJpeg>> {
    let io = |e: std::io::Error| Error::Decode(e.to_string());
    let mut jpeg = Decompress::with_err(strict_error_mgr()).from_mem(bytes).map_err(io)?;
    let (width, height) = (jpeg.width() as u32, jpeg.height() as u32);
    if width > limits.max_width || height > limits.max_height {
        return Err(Error::ImageTooLarge(format!(
            "{width}×{height} exceeds the {}×{} limit",
            limits.max_width, limits.max_height
        )));
    }
    if u64::from(width) * u64::from(height) * WORKING_BYTES_PER_PIXEL > limits.max_alloc {
        return Ok(None);
    }
    if !matches!(jpeg.color_space(), ColorSpace::JCS_YCbCr | ColorSpace::JCS_GRAYSCALE) {
        return Ok(None);
    }
    let (min_w, min_h) = target(width, height);
    let Some(numerator) =
        NUMERATORS.into_iter().find(|&n| scaled_side(width, n) >= min_w && scaled_side(height, n) >= min_h)
    else {
        return Ok(None);
    };
    jpeg.scale(numerator);
    let mut started = jpeg.rgb().map_err(io)?;
    let (w, h) = (started.width() as u32, started.height() as u32);
    let pixels: Vec<u8> = started.read_scanlines().map_err(io)?;
    started.finish().map_err(io)?;
    if w < min_w || h < min_h {
        // Not libjpeg's documented rounding: let the full decoder do it.
        return Ok(None);
    }
    let image = RgbImage::from_raw(w, h, pixels)
        .ok_or_else(|| Error::Decode(format!("libjpeg returned a short image for {w}×{h}")))?;
    Ok(Some(ScaledJpeg { image, source_size: (width, height) }))
}

/// How many SOS markers `bytes` holds, at most. Byte stuffing keeps `FF DA`
/// out of entropy-coded data; one inside a metadata segment (an EXIF
/// thumbnail) only overcounts, which costs a full decode.
fn scan_markers(bytes: &[u8]) -> usize {
    bytes.windows(2).filter(|w| w == &[0xFF, 0xDA]).count()
}

/// libjpeg's output side at `numerator / 8`: it rounds up.
fn scaled_side(side: u32, numerator: u8) -> u32 {
    (side * u32::from(numerator)).div_ceil(8)
}

/// libjpeg's standard error manager, with fatal errors and corrupt-data
/// warnings both unwinding to [`decode`] and nothing printed to stderr.
fn strict_error_mgr() -> jpeg_error_mgr {
    // SAFETY: jpeg_error_mgr is a C struct of integers and nullable function
    // pointers, for which all-zero is valid; jpeg_std_error fills it in.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(fail);
    err.emit_message = Some(on_message);
    err
}

/// A message for libjpeg's current error or warning.
fn message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: libjpeg calls our handlers with `err` pointing at the manager
    // that strict_error_mgr built, whose format_message jpeg_std_error set.
    let Some(format) = (unsafe { cinfo.err.as_ref() }).and_then(|e| e.format_message) else {
        return "libjpeg error".into();
    };
    // The binding declares the buffer `&[u8; 80]`, but libjpeg writes the
    // message into it: call it as the `&mut` it is.
    type Format = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]);
    // SAFETY: the same C function; only the Rust type of its pointer argument changes.
    let format: Format = unsafe { std::mem::transmute(format) };
    let mut buffer = [0u8; 80];
    unsafe { format(cinfo, &mut buffer) };
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// A failure carried through the unwind, so that [`decode`] can tell ours
/// from any other panic.
struct JpegFailure(String);

extern "C-unwind" fn fail(cinfo: &mut jpeg_common_struct) {
    // resume_unwind skips the panic hook: a bad upload is not a crash to log.
    resume_unwind(Box::new(JpegFailure(message(cinfo))));
}

extern "C-unwind" fn on_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    // Level -1 is a warning about corrupt data (libjpeg goes on with grey or
    // garbled pixels); higher levels are trace messages.
    if level < 0 {
        fail(cinfo);
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<JpegFailure>() {
        Ok(f) => f.0,
        Err(other) => match other.downcast::<String>() {
            Ok(s) => *s,
            Err(other) => other.downcast_ref::<&str>().map_or("JPEG decoder panicked".into(), |s| s.to_string()),
        },
    }
}
