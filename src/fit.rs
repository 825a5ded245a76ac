//! `POST /v1/models/{name}/fit`: fit an anomaly model from uploaded good
//! images, save it under `server.model_dir`, and serve it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use lineside_inference::anomaly::patchcore::{FitSettings, Manifest, PatchCore};

/// What to fit.
pub struct FitRequest {
    pub name: String,
    pub backbone: crate::source::LocalModel,
    pub coreset_ratio: f32,
    pub image_size: usize,
    pub images: Vec<Bytes>,
}

/// Fits and saves the model; returns its folder and manifest. Blocking: CPU work.
pub fn fit_and_save(req: &FitRequest, model_dir: &Path) -> anyhow::Result<(PathBuf, Manifest)> {
    let files = req.backbone.files()?;
    let out = model_dir.join(&req.name);
    let upload = model_dir.join(format!(".{}.upload", req.name));
    let _ = std::fs::remove_dir_all(&upload);
    std::fs::create_dir_all(&upload).with_context(|| format!("creating {}", upload.display()))?;
    let result = (|| {
        let mut paths = Vec::with_capacity(req.images.len());
        for (i, bytes) in req.images.iter().enumerate() {
            let p = upload.join(format!("{i:05}.img"));
            std::fs::write(&p, bytes)?;
            paths.push(p);
        }
        let settings =
            FitSettings { coreset_ratio: req.coreset_ratio, image_size: req.image_size, ..FitSettings::default() };
        let model = PatchCore::fit(&files, &paths, &settings, |_| {})?;
        // Write beside, then swap in, so a failed save never leaves half a model.
        let staging = model_dir.join(format!(".{}.new", req.name));
        let _ = std::fs::remove_dir_all(&staging);
        model.save(&staging)?;
        let _ = std::fs::remove_dir_all(&out);
        std::fs::rename(&staging, &out)?;
        Ok::<_, anyhow::Error>(model.manifest.clone())
    })();
    let _ = std::fs::remove_dir_all(&upload);
    Ok((out, result?))
}

/// Model names become folder names: keep them to a safe alphabet.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-')
}
