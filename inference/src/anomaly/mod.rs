//! Anomaly detection from good images only: PatchCore (Roth et al., 2022),
//! following anomalib's implementation, on any backbone that exposes
//! feature maps.
//!
//! - [`patchcore`]: embedding, fitting, scoring, saving and loading;
//! - [`coreset`]: greedy k-center selection of the memory bank;
//! - [`blur`]: the Gaussian smoothing of anomaly maps;
//! - [`regions`]: connected components of a thresholded map;
//! - [`metrics`]: AUROC and F1 for evaluation.

pub mod blur;
pub mod coreset;
pub mod metrics;
pub mod patchcore;
pub mod regions;
pub mod render;

pub use patchcore::{AnomalyMap, FitSettings, Manifest, PatchCore};
pub use regions::{Region, regions};
