//! Separable Gaussian blur of a single-channel map, as anomalib applies to
//! PatchCore's anomaly map (σ = 4, kernel 2·⌊4σ + 0.5⌋ + 1, reflected borders).

/// The normalised 1-D kernel anomalib (kornia) uses for `sigma`.
pub fn kernel(sigma: f32) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as usize;
    let k: Vec<f32> =
        (0..=2 * radius).map(|i| (-((i as f32 - radius as f32).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f32 = k.iter().sum();
    k.into_iter().map(|v| v / sum).collect()
}

/// Mirror index without repeating the edge (PyTorch's `reflect` padding).
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m >= n { period - m } else { m }) as usize
}

/// Blurs a row-major `height × width` map.
pub fn gaussian_blur(map: &[f32], width: usize, height: usize, sigma: f32) -> Vec<f32> {
    assert_eq!(map.len(), width * height, "map size");
    let k = kernel(sigma);
    let mut tmp = vec![0f32; map.len()];
    for (src, dst) in map.chunks_exact(width).zip(tmp.chunks_exact_mut(width)) {
        convolve(src, dst, &k);
    }
    // Columns: transpose, blur rows, transpose back (keeps the inner loop contiguous).
    let mut cols = transpose(&tmp, width, height);
    let mut out_t = vec![0f32; map.len()];
    for (src, dst) in cols.chunks_exact(height).zip(out_t.chunks_exact_mut(height)) {
        convolve(src, dst, &k);
    }
    cols.clear();
    transpose(&out_t, height, width)
}

/// One line convolved with `k`, borders reflected.
fn convolve(src: &[f32], dst: &mut [f32], k: &[f32]) {
    let n = src.len();
    let r = k.len() / 2;
    // Padding once makes the inner loop branch-free.
    let padded: Vec<f32> = (0..n + 2 * r).map(|i| src[reflect(i as isize - r as isize, n)]).collect();
    for (x, d) in dst.iter_mut().enumerate() {
        *d = padded[x..x + k.len()].iter().zip(k).map(|(a, b)| a * b).sum();
    }
}

fn transpose(m: &[f32], width: usize, height: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    for y in 0..height {
        for x in 0..width {
            out[x * height + y] = m[y * width + x];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_anomalib_size_and_sums_to_one() {
        let k = kernel(4.0);
        assert_eq!(k.len(), 33);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(k[16] > k[15] && (k[15] - k[17]).abs() < 1e-9);
    }

    #[test]
    fn blur_keeps_constants_and_spreads_a_peak() {
        let flat = vec![2.0f32; 40 * 30];
        assert!(gaussian_blur(&flat, 40, 30, 4.0).iter().all(|v| (v - 2.0).abs() < 1e-5));
        let mut peak = vec![0f32; 41 * 41];
        peak[20 * 41 + 20] = 1.0;
        let b = gaussian_blur(&peak, 41, 41, 4.0);
        assert!((b.iter().sum::<f32>() - 1.0).abs() < 1e-4, "mass is kept away from the borders");
        assert!(b[20 * 41 + 20] > b[20 * 41 + 24] && b[20 * 41 + 24] > 0.0);
    }

    #[test]
    fn reflect_mirrors_without_the_edge() {
        assert_eq!([-2, -1, 0, 4, 5, 6].map(|i| reflect(i, 5)), [2, 1, 0, 4, 3, 2]);
    }
}
