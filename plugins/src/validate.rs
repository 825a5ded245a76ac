//! Checks on what a plugin returns, before the host uses it.
//!
//! The component model guarantees the types; these checks cover what types
//! cannot say: buffer sizes that match dimensions, finite scores, bounded text.

use crate::bindings::types::{Decision, Image};
use crate::error::Failure;
use crate::plugin::Limits;

type Invalid = (Failure, String);

/// Longest string accepted in a defect code, label or extra field.
const MAX_TEXT: usize = 4096;

pub(crate) fn image(img: &Image, limits: &Limits) -> Result<(), Invalid> {
    let len = img.pixels.len();
    if len > limits.max_image_bytes {
        return Err((
            Failure::OutputTooLarge,
            format!("returned a {len}-byte image; the limit is {} bytes", limits.max_image_bytes),
        ));
    }
    if img.width == 0 || img.height == 0 {
        return Err((Failure::InvalidOutput, format!("returned an empty {}×{} image", img.width, img.height)));
    }
    let expected = img.width as usize * img.height as usize * crate::channels(img.format);
    if len != expected {
        return Err((
            Failure::InvalidOutput,
            format!(
                "returned {len} pixel bytes for a {}×{} {:?} image, which needs {expected}",
                img.width, img.height, img.format
            ),
        ));
    }
    Ok(())
}

pub(crate) fn decision(d: &Decision, limits: &Limits) -> Result<(), Invalid> {
    let texts = d.defects.iter().flat_map(|x| [&x.code, &x.label]).chain(d.extra.iter().flat_map(|(k, v)| [k, v]));
    let mut bytes = 0usize;
    for t in texts {
        if t.len() > MAX_TEXT {
            return Err((
                Failure::OutputTooLarge,
                format!("returned a {}-byte string; the limit is {MAX_TEXT}", t.len()),
            ));
        }
        bytes += t.len();
    }
    bytes += d.defects.len() * 32;
    if bytes > limits.max_decision_bytes {
        return Err((
            Failure::OutputTooLarge,
            format!("returned a decision of about {bytes} bytes; the limit is {}", limits.max_decision_bytes),
        ));
    }
    for x in &d.defects {
        if !(x.severity.is_finite() && (0.0..=1.0).contains(&x.severity)) {
            return Err((
                Failure::InvalidOutput,
                format!("defect `{}` has severity {} outside 0..=1", x.code, x.severity),
            ));
        }
        if !x.score.is_finite() {
            return Err((Failure::InvalidOutput, format!("defect `{}` has a non-finite score", x.code)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::types::{Defect, PixelFormat, Verdict};

    fn img(w: u32, h: u32, format: PixelFormat, len: usize) -> Image {
        Image { width: w, height: h, format, pixels: vec![0; len] }
    }

    #[test]
    fn images_must_match_their_size_and_the_limit() {
        let limits = Limits { max_image_bytes: 1000, ..Limits::default() };
        assert!(image(&img(10, 10, PixelFormat::Rgb8, 300), &limits).is_ok());
        assert_eq!(image(&img(10, 10, PixelFormat::Rgb8, 299), &limits).unwrap_err().0, Failure::InvalidOutput);
        assert_eq!(image(&img(0, 10, PixelFormat::Gray8, 0), &limits).unwrap_err().0, Failure::InvalidOutput);
        assert_eq!(image(&img(40, 40, PixelFormat::Gray8, 1600), &limits).unwrap_err().0, Failure::OutputTooLarge);
    }

    #[test]
    fn decisions_need_finite_bounded_values() {
        let defect = |severity: f32, code: &str| Defect {
            code: code.into(),
            label: "x".into(),
            severity,
            score: 0.9,
            region: None,
        };
        let d = |defects| Decision { verdict: Verdict::Fail, defects, extra: vec![] };
        let limits = Limits::default();
        assert!(decision(&d(vec![defect(0.5, "A")]), &limits).is_ok());
        assert_eq!(decision(&d(vec![defect(f32::NAN, "A")]), &limits).unwrap_err().0, Failure::InvalidOutput);
        assert_eq!(decision(&d(vec![defect(1.5, "A")]), &limits).unwrap_err().0, Failure::InvalidOutput);
        let long = "C".repeat(MAX_TEXT + 1);
        assert_eq!(decision(&d(vec![defect(0.5, &long)]), &limits).unwrap_err().0, Failure::OutputTooLarge);
        let many = (0..3000).map(|_| defect(0.5, "A")).collect();
        assert_eq!(decision(&d(many), &limits).unwrap_err().0, Failure::OutputTooLarge);
    }
}
