//! Greedy k-center coreset selection (Sener & Savarese, 2018), as PatchCore
//! uses to keep its memory bank small: each step adds the patch farthest from
//! everything chosen so far, so the bank covers the feature space with a
//! fraction of the patches.
//!
//! Distances are computed on a random Gaussian projection of the features
//! (anomalib uses a sparse random projection with ε = 0.9); the projection
//! only guides the selection, the bank keeps the full features.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// Indices of `k` rows of `features` (`n × d`, row-major) chosen greedily.
pub fn greedy_k_center(
    features: &[f32],
    d: usize,
    k: usize,
    projection_dim: usize,
    seed: u64,
    mut progress: impl FnMut(usize),
) -> Vec<usize> {
    let n = features.len() / d;
    assert_eq!(n * d, features.len(), "features are n × d");
    let k = k.clamp(1, n);
    let mut rng = StdRng::seed_from_u64(seed);
    let (points, pd) = if projection_dim > 0 && projection_dim < d {
        (project(features, d, projection_dim, &mut rng), projection_dim)
    } else {
        (features.to_vec(), d)
    };
    let mut min_dist = vec![f32::INFINITY; n];
    let mut chosen = Vec::with_capacity(k);
    let mut next = rng.random_range(0..n);
    for step in 0..k {
        chosen.push(next);
        let center = points[next * pd..(next + 1) * pd].to_vec();
        // Each point's distance to its nearest chosen center, updated with the newest one.
        min_dist.par_chunks_mut(4096).enumerate().for_each(|(c, chunk)| {
            for (j, m) in chunk.iter_mut().enumerate() {
                let i = c * 4096 + j;
                let p = &points[i * pd..(i + 1) * pd];
                let dist: f32 = p.iter().zip(&center).map(|(a, b)| (a - b) * (a - b)).sum();
                if dist < *m {
                    *m = dist;
                }
            }
        });
        next = argmax(&min_dist);
        if step % 64 == 0 {
            progress(step);
        }
    }
    progress(k);
    chosen
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::MIN), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0
}

/// `features · R` with `R` a `d × p` Gaussian matrix scaled by 1/√p (Johnson–Lindenstrauss).
fn project(features: &[f32], d: usize, p: usize, rng: &mut StdRng) -> Vec<f32> {
    let scale = 1.0 / (p as f32).sqrt();
    let r: Vec<f32> = (0..d * p).map(|_| gaussian(rng) * scale).collect();
    features
        .par_chunks(d)
        .flat_map_iter(|row| {
            let mut out = vec![0f32; p];
            for (x, rrow) in row.iter().zip(r.chunks_exact(p)) {
                for (o, w) in out.iter_mut().zip(rrow) {
                    *o += x * w;
                }
            }
            out
        })
        .collect()
}

/// A standard normal sample (Box–Muller).
fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_one_point_per_cluster_first() {
        // Three tight clusters: the first three centers must hit all three.
        let mut f = Vec::new();
        for c in [0.0f32, 10.0, 20.0] {
            for j in 0..50 {
                f.extend([c + (j as f32) * 1e-3, -c]);
            }
        }
        let chosen = greedy_k_center(&f, 2, 3, 0, 7, |_| {});
        let mut clusters: Vec<usize> = chosen.iter().map(|i| i / 50).collect();
        clusters.sort();
        assert_eq!(clusters, [0, 1, 2]);
    }

    #[test]
    fn projection_keeps_distances_roughly() {
        let mut rng = StdRng::seed_from_u64(1);
        let f: Vec<f32> = (0..2 * 256).map(|_| gaussian(&mut rng)).collect();
        let p = project(&f, 256, 128, &mut rng);
        let d = |v: &[f32], dim: usize| v[..dim].iter().zip(&v[dim..]).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
        let ratio = d(&p, 128) / d(&f, 256);
        assert!((0.6..1.4).contains(&ratio), "JL ratio {ratio}");
    }
}
