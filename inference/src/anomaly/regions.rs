//! Defect regions: 8-connected components of the pixels at or above a threshold.

use serde::Serialize;

/// One connected region of an anomaly map, in the map's pixel coordinates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// Pixels in the region.
    pub area: u32,
    /// Share of the whole map, in percent.
    pub area_percent: f32,
    /// Highest map value inside.
    pub peak: f32,
}

/// Regions of `map` (row-major `width × height`) where values ≥ `threshold`,
/// largest peak first.
pub fn regions(map: &[f32], width: usize, height: usize, threshold: f32) -> Vec<Region> {
    assert_eq!(map.len(), width * height, "map size");
    let mut label = vec![false; map.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..map.len() {
        if label[start] || map[start] < threshold {
            continue;
        }
        label[start] = true;
        stack.push(start);
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        let (mut area, mut peak) = (0u32, f32::MIN);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % width, i / width);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            area += 1;
            peak = peak.max(map[i]);
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let (nx, ny) = (x as isize + dx, y as isize + dy);
                    if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if !label[j] && map[j] >= threshold {
                        label[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(Region {
            x: x0 as u32,
            y: y0 as u32,
            width: (x1 - x0 + 1) as u32,
            height: (y1 - y0 + 1) as u32,
            area,
            area_percent: 100.0 * area as f32 / map.len() as f32,
            peak,
        });
    }
    out.sort_by(|a, b| b.peak.total_cmp(&a.peak));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_separate_blobs_with_boxes_areas_and_peaks() {
        #[rustfmt::skip]
        let map = [
            0.9, 0.8, 0.0, 0.0, 0.0,
            0.0, 0.7, 0.0, 0.0, 0.6,
            0.0, 0.0, 0.0, 0.0, 0.6,
            0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let r = regions(&map, 5, 4, 0.5);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].x, r[0].y, r[0].width, r[0].height, r[0].area), (0, 0, 2, 2, 3));
        assert_eq!(r[0].peak, 0.9);
        assert_eq!((r[1].x, r[1].y, r[1].width, r[1].height, r[1].area), (4, 1, 1, 2, 2));
        assert!((r[1].area_percent - 10.0).abs() < 1e-5);
        assert!(regions(&map, 5, 4, 0.95).is_empty());
    }

    #[test]
    fn diagonal_neighbours_connect() {
        let map = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(regions(&map, 2, 2, 0.5).len(), 1);
    }
}
