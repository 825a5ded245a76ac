//! Labelled image folders and a reproducible stratified split.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// One labelled image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// Images with class indices into `labels` (sorted by name).
#[derive(Debug, Clone)]
pub struct Dataset {
    pub labels: Vec<String>,
    pub samples: Vec<Sample>,
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"];

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The class a file name encodes: its stem without a trailing `_<number>`
/// (`rolled-in_scale_12.jpg` → `rolled-in_scale`).
pub fn class_from_file_name(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    let (prefix, suffix) = stem.rsplit_once('_')?;
    (!prefix.is_empty() && !suffix.is_empty() && suffix.chars().all(|c| c.is_ascii_digit())).then(|| prefix.to_string())
}

impl Dataset {
    /// Scans `root`: if it has sub-folders with images, each sub-folder is a
    /// class; otherwise the class is the file-name prefix of each image.
    pub fn scan(root: &Path) -> anyhow::Result<Self> {
        let mut by_class: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", root.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        let dirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
        if !dirs.is_empty() {
            for d in dirs {
                let class = d.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                let mut files: Vec<PathBuf> =
                    std::fs::read_dir(d)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_image(p)).collect();
                files.sort();
                if !files.is_empty() {
                    by_class.entry(class).or_default().extend(files);
                }
            }
        } else {
            for p in entries.iter().filter(|p| is_image(p)) {
                let class = class_from_file_name(p)
                    .ok_or_else(|| anyhow::anyhow!("{}: no class prefix (expected NAME_<number>.ext)", p.display()))?;
                by_class.entry(class).or_default().push(p.clone());
            }
        }
        anyhow::ensure!(by_class.len() >= 2, "{} holds {} classes; need at least 2", root.display(), by_class.len());
        let labels: Vec<String> = by_class.keys().cloned().collect();
        let samples = by_class
            .into_values()
            .enumerate()
            .flat_map(|(label, files)| files.into_iter().map(move |path| Sample { path, label }))
            .collect();
        Ok(Self { labels, samples })
    }

    /// Splits every class by itself: `val_fraction` of its images (shuffled by `seed`) are held out.
    pub fn split(&self, val_fraction: f64, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for label in 0..self.labels.len() {
            let mut class: Vec<Sample> = self.samples.iter().filter(|s| s.label == label).cloned().collect();
            class.shuffle(&mut rng);
            let n_val = ((class.len() as f64) * val_fraction).round() as usize;
            val.extend(class.drain(..n_val));
            train.extend(class);
        }
        (train, val)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_prefixes() {
        assert_eq!(class_from_file_name(Path::new("a/rolled-in_scale_12.jpg")).as_deref(), Some("rolled-in_scale"));
        assert_eq!(class_from_file_name(Path::new("pitted_surface_1.jpg")).as_deref(), Some("pitted_surface"));
        assert_eq!(class_from_file_name(Path::new("crazing.jpg")), None);
        assert_eq!(class_from_file_name(Path::new("crazing_x.jpg")), None);
    }
}
