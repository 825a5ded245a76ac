//! The `config.json` that timm's `save_for_hf` / `push_to_hf_hub` writes.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A timm hub-format `config.json`.
///
/// Unknown keys are kept in `extra` so that a config read and written back by
/// lineside (for example after fine-tuning) loses nothing timm relies on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubConfig {
    pub architecture: String,
    pub num_classes: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_features: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_names: Option<Vec<String>>,
    pub pretrained_cfg: PretrainedCfg,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The eval-time data configuration timm keeps in `pretrained_cfg`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainedCfg {
    /// `[channels, height, width]`.
    pub input_size: [usize; 3],
    #[serde(default = "default_interpolation")]
    pub interpolation: Interpolation,
    #[serde(default = "default_crop_pct")]
    pub crop_pct: f32,
    #[serde(default = "default_crop_mode")]
    pub crop_mode: String,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Resampling filter used by the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bicubic,
    Bilinear,
    Nearest,
}

fn default_interpolation() -> Interpolation {
    Interpolation::Bilinear
}
fn default_crop_pct() -> f32 {
    0.875
}
fn default_crop_mode() -> String {
    "center".into()
}

impl HubConfig {
    /// Parses a `config.json` document.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: HubConfig = serde_json::from_str(text).map_err(|e| Error::config("config.json", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.pretrained_cfg.input_size[0] != 3 {
            return Err(Error::config("pretrained_cfg.input_size", "only 3-channel models are supported"));
        }
        if !(0.05..=1.0).contains(&self.pretrained_cfg.crop_pct) {
            return Err(Error::config("pretrained_cfg.crop_pct", "must be in [0.05, 1]"));
        }
        if self.num_classes == 0 {
            return Err(Error::config("num_classes", "must be at least 1"));
        }
        let [_, h, w] = self.pretrained_cfg.input_size;
        if !(8..=4096).contains(&h) || !(8..=4096).contains(&w) {
            return Err(Error::config("pretrained_cfg.input_size", "height and width must be 8..=4096"));
        }
        if self.pretrained_cfg.crop_mode != "center" {
            return Err(Error::config(
                "pretrained_cfg.crop_mode",
                format!("`{}` is not supported (only `center`)", self.pretrained_cfg.crop_mode),
            ));
        }
        if let Some(labels) = &self.label_names
            && labels.len() != self.num_classes
        {
            return Err(Error::config(
                "label_names",
                format!("{} names for {} classes", labels.len(), self.num_classes),
            ));
        }
        Ok(())
    }

    /// Class names: `label_names` when present, else `class_<i>`.
    pub fn labels(&self) -> Vec<String> {
        match &self.label_names {
            Some(l) => l.clone(),
            None => (0..self.num_classes).map(|i| format!("class_{i}")).collect(),
        }
    }
}
