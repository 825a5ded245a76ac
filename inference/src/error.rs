//! Errors of the inference core.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between model files and predictions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid model config {what}: {message}")]
    Config { what: String, message: String },

    #[error("device {device}: {message}")]
    Device { device: String, message: String },

    #[error("unsupported architecture `{found}`; supported: {supported}")]
    UnsupportedArchitecture { found: String, supported: String },

    #[error("weights `{file}` lack tensor `{name}`")]
    MissingTensor { file: String, name: String },

    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { name: String, found: Vec<usize>, expected: Vec<usize> },

    #[error("image could not be decoded: {0}")]
    Decode(String),

    #[error("image is too large: {0}")]
    ImageTooLarge(String),

    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),

    /// A partly decoded image handed to the transform with a window it does
    /// not fill: a caller's mistake, not the image's.
    #[error("decoded window does not fit the transform: {0}")]
    Window(String),
}

impl Error {
    pub(crate) fn config(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { what: what.into(), message: message.into() }
    }
}
