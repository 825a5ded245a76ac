//! JPEG decoding through libjpeg-turbo's decoder, as vendored by
//! `mozjpeg-sys`: the decoder PIL uses, so with its default settings (the
//! accurate integer IDCT, fancy upsampling) it gives PIL's pixels exactly,
//! which are what timm's transforms start from. zune-jpeg (through `image`)
//! differs from them by one level on about 0.5% of the values of a 1080p
//! frame.
//!
//! Two things make it cheaper than decoding every pixel:
//!
//! - **A reduced DCT scale** (PIL's `draft` mode). A JPEG stores 8×8 blocks
//!   of DCT coefficients, so a decoder can produce the image at 1/2, 1/4 or
//!   1/8 of its size by running a smaller inverse DCT on each block's low
//!   frequencies: the entropy decoding still reads every coefficient, but
//!   the IDCT, upsampling and colour conversion shrink with the output. For
//!   a model input of 224×224 from a 1920×1080 frame, a quarter scale
//!   (480×270) is still larger than timm's resize target (455×256), so the
//!   resize that follows only has less to do. Those pixels differ slightly
//!   from decoding every pixel and resizing: the DCT scaling acts as a
//!   box-like prefilter where Pillow's resize alone would use its wider
//!   kernel. The caller picks the scale by the size it needs; asking for
//!   the whole size gives 8/8, every pixel.
//! - **Only the region asked for.** Only the part of the frame that the
//!   resize and center crop read is transformed (libjpeg's
//!   `jpeg_crop_scanline` and `jpeg_skip_scanlines`): for that frame at a
//!   quarter scale, 260 of 480 columns and 260 of 270 rows; at full scale,
//!   992 of 1920 columns.
//!
//! libjpeg reports fatal errors by calling `error_exit`, which must not
//! return; ours unwinds (`mozjpeg-sys`'s `unwinding` feature declares the C
//! functions `C-unwind`), and we catch it here. libjpeg
//! also papers over corrupt data (a truncated file decodes with its missing
//! rows grey) and only *warns*; we turn those warnings into errors too, and
//! the caller leaves a damaged image to zune-jpeg to accept or refuse,
//! so this decoder refuses nothing that zune-jpeg accepts.
//!
//! The C library's SIMD code (colour conversion, upsampling, the full-size
//! IDCT) is assembled with nasm where the build finds it (`nasm_simd`), and
//! left out otherwise; its entropy decoding, most of the cost at reduced
//! scales, has none in any build.

use std::any::Any;
use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::OnceLock;

use image::{DynamicImage, GrayImage, RgbImage};
use mozjpeg_sys::{
    J_COLOR_SPACE, c_int, c_ulong, jpeg_common_struct, jpeg_create_decompress, jpeg_crop_scanline,
    jpeg_decompress_struct, jpeg_destroy_decompress, jpeg_error_mgr, jpeg_finish_decompress, jpeg_mem_src,
    jpeg_read_header, jpeg_read_scanlines, jpeg_skip_scanlines, jpeg_start_decompress, jpeg_std_error,
};

use crate::preprocess::DecodeLimits;
use crate::{Error, Result};

// Every libjpeg error reaches Rust as an unwind: with panic = "abort" each
// corrupt upload would abort the server.
#[cfg(panic = "abort")]
compile_error!("libjpeg needs panic = \"unwind\": libjpeg's errors unwind to catch_unwind");

/// DCT scales tried, smallest output first: numerators over 8.
const NUMERATORS: [u8; 4] = [1, 2, 4, 8];

/// Bytes per source pixel that libjpeg may hold while decoding: a
/// progressive JPEG keeps every coefficient (2 bytes × 3 components) of
/// the whole image until its last scan.
const WORKING_BYTES_PER_PIXEL: u64 = 6;

unsafe extern "C" {
    /// libjpeg-turbo's own test for its SIMD inverse DCT: 0 where the
    /// build had no nasm (`jsimd_none.c`) or the CPU lacks the instructions.
    fn jsimd_can_idct_islow() -> c_int;
}

/// Whether libjpeg-turbo runs its SIMD code here (see `preprocess::jpeg_simd`).
pub(crate) fn runs_simd() -> bool {
    static SIMD: OnceLock<bool> = OnceLock::new();
    // SAFETY: a query without arguments; libjpeg-turbo's decoders call it themselves.
    *SIMD.get_or_init(|| unsafe { jsimd_can_idct_islow() } != 0)
}

/// `jpeg_read_header`'s answer for a header followed by an image.
const JPEG_HEADER_OK: c_int = 1;

/// Most scans (SOS markers) this decoder takes on. libjpeg has no limit of
/// its own, and a progressive JPEG of a hundred thousand tiny scans would
/// walk the whole coefficient buffer for each; zune-jpeg, which the rest go
/// to, refuses more than 100.
const MAX_SCANS: usize = 100;

/// A JPEG decoded at some DCT scale: the part of the frame that was asked
/// for, where it lies, and the sizes of the frame and of the encoded image.
pub(crate) struct JpegRegion {
    /// The region's pixels, RGB or, for a grey JPEG, grey; libjpeg may
    /// start it a few columns left of the region (at a boundary of its MCUs).
    pub image: DynamicImage,
    /// `image`'s top-left pixel in the frame.
    pub origin: (u32, u32),
    /// The whole frame at the scale decoded.
    pub frame: (u32, u32),
    /// The image's width and height as encoded.
    pub source_size: (u32, u32),
}

/// Decodes `bytes` at the smallest DCT scale (1/8, 1/4, 1/2 or 8/8) whose
/// output is still at least `target(width, height)` on both sides, keeping
/// only the columns and rows `region(frame width, frame height)` of that
/// frame. The rest is still entropy-decoded (a JPEG cannot be read
/// otherwise, and so corrupt data anywhere is still found), but not
/// transformed or colour-converted. Grey JPEGs stay grey.
///
/// `Ok(None)` means this decoder does not apply and the caller should use
/// zune-jpeg: not a JPEG, a colour space other than YCbCr or grey (CMYK), a
/// target larger than the image, more than [`MAX_SCANS`] scans, or an image
/// whose working memory would exceed `limits.max_alloc` (zune-jpeg enforces
/// those limits).
pub(crate) fn decode(
    bytes: &[u8],
    limits: DecodeLimits,
    target: impl Fn(u32, u32) -> (u32, u32),
    region: impl Fn(u32, u32) -> (Range<u32>, Range<u32>),
) -> Result<Option<JpegRegion>> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || scan_markers(bytes) > MAX_SCANS {
        return Ok(None);
    }
    match catch_unwind(AssertUnwindSafe(|| decode_unguarded(bytes, limits, target, region))) {
        Ok(result) => result,
        Err(payload) => Err(Error::Decode(panic_message(payload))),
    }
}

fn decode_unguarded(
    bytes: &[u8],
    limits: DecodeLimits,
    target: impl Fn(u32, u32) -> (u32, u32),
    region: impl Fn(u32, u32) -> (Range<u32>, Range<u32>),
) -> Result<Option<JpegRegion>> {
    let mut jpeg = Decompressor::new(bytes);
    let (width, height) = jpeg.read_header()?;
    if width > limits.max_width || height > limits.max_height {
        return Err(Error::ImageTooLarge(format!(
            "{width}×{height} exceeds the {}×{} limit",
            limits.max_width, limits.max_height
        )));
    }
    if u64::from(width) * u64::from(height) * WORKING_BYTES_PER_PIXEL > limits.max_alloc {
        return Ok(None);
    }
    if !matches!(jpeg.cinfo.jpeg_color_space, J_COLOR_SPACE::JCS_YCbCr | J_COLOR_SPACE::JCS_GRAYSCALE) {
        return Ok(None);
    }
    let (min_w, min_h) = target(width, height);
    let Some(numerator) =
        NUMERATORS.into_iter().find(|&n| scaled_side(width, n) >= min_w && scaled_side(height, n) >= min_h)
    else {
        return Ok(None);
    };
    let (w, h) = jpeg.start(numerator);
    if w < min_w || h < min_h || w == 0 || h == 0 {
        // Not libjpeg's documented rounding: leave it to zune-jpeg.
        return Ok(None);
    }
    let (cols, rows) = region(w, h);
    let cols = cols.start.min(w - 1)..cols.end.clamp(cols.start.min(w - 1) + 1, w);
    let rows = rows.start.min(h - 1)..rows.end.clamp(rows.start.min(h - 1) + 1, h);
    let (x0, cw) = jpeg.crop(cols);
    let pixels = jpeg.read_rows(rows.clone(), cw);
    let short = || Error::Decode(format!("libjpeg returned a short image for {cw}×{}", rows.len()));
    let image = match jpeg.components() {
        1 => DynamicImage::ImageLuma8(GrayImage::from_raw(cw, rows.len() as u32, pixels).ok_or_else(short)?),
        3 => DynamicImage::ImageRgb8(RgbImage::from_raw(cw, rows.len() as u32, pixels).ok_or_else(short)?),
        n => return Err(Error::Decode(format!("libjpeg gave {n} components per pixel"))),
    };
    Ok(Some(JpegRegion { image, origin: (x0, rows.start), frame: (w, h), source_size: (width, height) }))
}

/// libjpeg's decompressor over a JPEG in memory, destroyed when dropped,
/// also when one of libjpeg's errors unwinds through it.
struct Decompressor<'a> {
    // Boxed: libjpeg keeps pointers to both.
    cinfo: Box<jpeg_decompress_struct>,
    _err: Box<jpeg_error_mgr>,
    _bytes: PhantomData<&'a [u8]>,
}

impl<'a> Decompressor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let mut err = Box::new(strict_error_mgr());
        // SAFETY: a C struct of integers, floats and nullable pointers, for
        // which all-zero is the state jpeg_create_decompress expects.
        let mut cinfo: Box<jpeg_decompress_struct> = Box::new(unsafe { std::mem::zeroed() });
        cinfo.common.err = &mut *err;
        // SAFETY: `cinfo` is zeroed with its error manager set.
        unsafe { jpeg_create_decompress(&mut *cinfo) };
        let mut this = Self { cinfo, _err: err, _bytes: PhantomData };
        // SAFETY: libjpeg reads `bytes` until `this` is dropped, which the
        // lifetime `'a` keeps within the borrow.
        unsafe { jpeg_mem_src(&mut this.cinfo, bytes.as_ptr(), bytes.len() as c_ulong) };
        this
    }

    /// The image's width and height as encoded.
    fn read_header(&mut self) -> Result<(u32, u32)> {
        // SAFETY: a created decompressor with a source; errors unwind.
        if unsafe { jpeg_read_header(&mut self.cinfo, 1) } != JPEG_HEADER_OK {
            return Err(Error::Decode("no image in the JPEG".into()));
        }
        Ok((self.cinfo.image_width, self.cinfo.image_height))
    }

    /// Starts decoding at `numerator / 8`, to grey for a grey JPEG (as
    /// zune-jpeg gives it) and to RGB otherwise: the frame's size.
    fn start(&mut self, numerator: u8) -> (u32, u32) {
        self.cinfo.scale_num = numerator.into();
        self.cinfo.scale_denom = 8;
        self.cinfo.out_color_space = match self.cinfo.jpeg_color_space {
            J_COLOR_SPACE::JCS_GRAYSCALE => J_COLOR_SPACE::JCS_GRAYSCALE,
            _ => J_COLOR_SPACE::JCS_RGB,
        };
        // SAFETY: after the header; with a memory source it never suspends.
        unsafe { jpeg_start_decompress(&mut self.cinfo) };
        (self.cinfo.output_width, self.cinfo.output_height)
    }

    /// Keeps columns `cols` (non-empty, inside the frame); libjpeg moves
    /// the start left to a boundary of its MCUs: the first column and the
    /// width it keeps.
    fn crop(&mut self, cols: Range<u32>) -> (u32, u32) {
        let (mut x0, mut width) = (cols.start, cols.len() as u32);
        if width < self.cinfo.output_width {
            // SAFETY: started and nothing read; `x0 + width` is inside the frame.
            unsafe { jpeg_crop_scanline(&mut self.cinfo, &mut x0, &mut width) };
        }
        (x0, width)
    }

    /// Rows `rows` (non-empty, inside the frame) of the kept columns,
    /// `width` of them. The rows above and below are skipped, which still
    /// entropy-decodes them, so corrupt data anywhere is still found; but
    /// the last row is read, not skipped: a skip to the bottom would stop
    /// decoding there and leave the rest of the stream unchecked.
    fn read_rows(&mut self, rows: Range<u32>, width: u32) -> Vec<u8> {
        let height = self.cinfo.output_height;
        self.skip(rows.start);
        let row_bytes = width as usize * self.components();
        let mut pixels = vec![0u8; row_bytes * rows.len()];
        for row in pixels.chunks_exact_mut(row_bytes) {
            self.read_row(row);
        }
        if rows.end < height {
            self.skip(height - 1 - rows.end);
            self.read_row(&mut vec![0u8; row_bytes]);
        }
        // SAFETY: every row was read or skipped.
        unsafe { jpeg_finish_decompress(&mut self.cinfo) };
        pixels
    }

    fn skip(&mut self, lines: u32) {
        if lines > 0 {
            // SAFETY: started; libjpeg stops at the frame's last row.
            unsafe { jpeg_skip_scanlines(&mut self.cinfo, lines) };
        }
    }

    /// Bytes per output pixel: 1 (grey) or 3 (RGB).
    fn components(&self) -> usize {
        self.cinfo.output_components as usize
    }

    /// The next row into `row`, which holds a kept row's bytes.
    fn read_row(&mut self, row: &mut [u8]) {
        assert_eq!(row.len(), self.cinfo.output_width as usize * self.components(), "a whole output row");
        let mut rows = [row.as_mut_ptr()];
        // SAFETY: started, before the last row; `row` holds one output row
        // (checked above). A memory source never suspends, and data that
        // ends early is a warning, which unwinds.
        let read = unsafe { jpeg_read_scanlines(&mut self.cinfo, rows.as_mut_ptr(), 1) };
        assert_eq!(read, 1, "libjpeg read no row");
    }
}

impl Drop for Decompressor<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `new`; libjpeg frees its memory in any state.
        unsafe { jpeg_destroy_decompress(&mut self.cinfo) };
    }
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

/// libjpeg's message for its own failures; any other panic is a bug of
/// ours, not bad data, and goes on unwinding (to the request's own catch).
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<JpegFailure>() {
        Ok(f) => f.0,
        Err(other) => resume_unwind(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libjpeg's own failures are bad data; any other panic is a bug, and
    /// must not be mistaken for one (and answered by falling back).
    #[test]
    fn only_libjpegs_failures_become_messages() {
        assert_eq!(panic_message(Box::new(JpegFailure("Bogus marker".into()))), "Bogus marker");
        let other = catch_unwind(|| panic_message(Box::new("index out of bounds")));
        assert_eq!(other.err().and_then(|p| p.downcast_ref::<&str>().copied()), Some("index out of bounds"));
    }
}
