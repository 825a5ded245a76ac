//! lineside's model core.
//!
//! Everything between "decoded image" and "class probabilities" lives here:
//! timm-compatible model definitions in candle ([`models`]), the eval-time
//! preprocessing that timm's `pretrained_cfg` describes ([`preprocess`]), the
//! CPU kernels that make those models fast ([`ops`]) and the per-model dynamic
//! [`batcher`]. There is no HTTP in this crate: the server and the offline CLI
//! both drive it through [`batcher::Batcher`].

pub mod anomaly;
pub mod batcher;
pub mod device;
pub mod error;
pub mod hub_config;
mod libjpeg;
pub mod models;
pub mod ops;
pub mod parity;
pub mod preprocess;
pub mod weights;

pub use device::{ComputeDevice, Kernels};
pub use error::{Error, Result};
pub use hub_config::{HubConfig, PretrainedCfg};
pub use models::{Classifier, ImageModel, LoadedModel, ModelFiles};
pub use preprocess::{DecodeLimits, Decoded, JpegDecode, Preprocessor, Window};
