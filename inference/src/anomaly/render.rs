//! Pictures of an anomaly map: a heatmap overlay on the part, and a binary mask.

use image::{GrayImage, Luma, Rgb, RgbImage};

use super::regions::Region;

/// Bilinear sample of a `size × size` map at the centre of output pixel (x, y) of a `w × h` image.
fn sample(map: &[f32], size: usize, x: u32, y: u32, w: u32, h: u32) -> f32 {
    let fx = ((x as f32 + 0.5) * size as f32 / w as f32 - 0.5).clamp(0.0, (size - 1) as f32);
    let fy = ((y as f32 + 0.5) * size as f32 / h as f32 - 0.5).clamp(0.0, (size - 1) as f32);
    let (x0, y0) = (fx as usize, fy as usize);
    let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
    let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
    let at = |x: usize, y: usize| map[y * size + x];
    let top = at(x0, y0) * (1.0 - tx) + at(x1, y0) * tx;
    let bottom = at(x0, y1) * (1.0 - tx) + at(x1, y1) * tx;
    top * (1.0 - ty) + bottom * ty
}

/// The "jet" colour of a value in [0, 1].
fn jet(v: f32) -> [f32; 3] {
    let c = |o: f32| (1.5 - (4.0 * v - o).abs()).clamp(0.0, 1.0);
    [c(3.0), c(2.0), c(1.0)]
}

/// The part with the normalised map blended over it (0.5 opacity) and each
/// region's box, all at the image's own size. `regions` are in map pixels.
pub fn overlay(image: &RgbImage, map: &[f32], size: usize, regions: &[Region]) -> RgbImage {
    let (w, h) = image.dimensions();
    let mut out = RgbImage::from_fn(w, h, |x, y| {
        let heat = jet(sample(map, size, x, y, w, h));
        let px = image.get_pixel(x, y).0;
        Rgb(std::array::from_fn(|c| (0.5 * px[c] as f32 + 0.5 * 255.0 * heat[c]) as u8))
    });
    for r in regions {
        let sx = |v: u32| (v as u64 * w as u64 / size as u64) as u32;
        let sy = |v: u32| (v as u64 * h as u64 / size as u64) as u32;
        let (x0, y0) = (sx(r.x), sy(r.y));
        let (x1, y1) = (sx(r.x + r.width).min(w) - 1, sy(r.y + r.height).min(h) - 1);
        let white = Rgb([255, 255, 255]);
        for t in 0..2u32 {
            for x in x0..=x1 {
                out.put_pixel(x, (y0 + t).min(h - 1), white);
                out.put_pixel(x, y1.saturating_sub(t), white);
            }
            for y in y0..=y1 {
                out.put_pixel((x0 + t).min(w - 1), y, white);
                out.put_pixel(x1.saturating_sub(t), y, white);
            }
        }
    }
    out
}

/// 255 where the normalised map is ≥ 0.5, at `w × h`.
pub fn mask(map: &[f32], size: usize, w: u32, h: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| Luma([if sample(map, size, x, y, w, h) >= 0.5 { 255 } else { 0 }]))
}

/// Encodes an image as PNG.
pub fn png<P, C>(img: &image::ImageBuffer<P, C>) -> Vec<u8>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("PNG encoding to memory");
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_and_overlay_follow_the_map() {
        let mut map = vec![0f32; 16];
        map[5] = 1.0; // (1, 1) of a 4×4 map
        let m = mask(&map, 4, 8, 8);
        assert_eq!(m.get_pixel(2, 2).0[0], 255);
        assert_eq!(m.get_pixel(7, 7).0[0], 0);
        let img = RgbImage::new(8, 8);
        let o = overlay(&img, &map, 4, &[]);
        assert!(o.get_pixel(2, 2).0[0] > o.get_pixel(7, 7).0[0], "hot is red");
        assert!(o.get_pixel(7, 7).0[2] > 0, "cold is blue");
    }
}
