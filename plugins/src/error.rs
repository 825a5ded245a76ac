//! Why a plugin could not be loaded or did not answer.

use std::fmt;

/// A plugin component that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("does not implement the lineside:plugin@0.1.0 `{world}` world: {reason}")]
    WrongWorld { world: &'static str, reason: String },
    /// The host's content check (a pinned digest, a signature) refused the file.
    #[error("refused: {0}")]
    Refused(String),
}

/// How a plugin call failed. Each maps to a distinct error code in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Ran past its deadline and was interrupted.
    Timeout,
    /// Tried to grow its memory past the cap.
    MemoryLimit,
    /// Recursed past the wasm stack limit.
    StackOverflow,
    /// Trapped: a panic, `unreachable`, an out-of-bounds access.
    Trap,
    /// Returned something the host cannot use (wrong sizes, NaN scores).
    InvalidOutput,
    /// Returned more data than the limit allows.
    OutputTooLarge,
    /// Returned an error of its own (rejected its config or the input).
    Rejected,
    /// Could not be instantiated.
    Unavailable,
}

impl Failure {
    /// Stable name used in API errors and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::MemoryLimit => "memory_limit",
            Failure::StackOverflow => "stack_overflow",
            Failure::Trap => "trap",
            Failure::InvalidOutput => "invalid_output",
            Failure::OutputTooLarge => "output_too_large",
            Failure::Rejected => "plugin_error",
            Failure::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed plugin call, naming the plugin.
#[derive(Debug, Clone, thiserror::Error)]
#[error("plugin `{plugin}` failed ({failure}): {message}")]
pub struct PluginError {
    pub plugin: String,
    pub failure: Failure,
    pub message: String,
}
