//! Models compiled into the binary, so `lineside serve` works with no files and no network.

use std::borrow::Cow;

use lineside_inference::ModelFiles;

/// Prefix of built-in model sources in the config: `builtin:steel-surface`.
pub const SCHEME: &str = "builtin:";

/// The steel-surface defect classifier trained on NEU-DET (see `models/steel-surface/README.md`).
pub fn steel_surface() -> ModelFiles {
    ModelFiles {
        origin: "builtin:steel-surface".into(),
        config_json: Cow::Borrowed(include_str!("../models/steel-surface/config.json")),
        weights: Cow::Borrowed(include_bytes!("../models/steel-surface/model.safetensors")),
    }
}

/// Names accepted after `builtin:`.
pub const NAMES: &[&str] = &["steel-surface"];

/// The built-in model called `name`.
pub fn get(name: &str) -> Option<ModelFiles> {
    match name {
        "steel-surface" => Some(steel_surface()),
        _ => None,
    }
}
