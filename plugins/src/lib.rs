//! The wasmtime host for lineside plugins.
//!
//! Factories customise pre- and post-processing with WebAssembly components
//! that implement the `lineside:plugin` WIT package (`wit/plugin.wit`). This
//! crate compiles them once (with an on-disk cache), and runs every call in a
//! fresh, limited sandbox:
//!
//! - one [`PluginEngine`] per process: a wasmtime `Engine` with the pooling
//!   allocator and epoch interruption, and a thread that ticks the epoch;
//! - a [`Plugin`] per loaded component: its `InstancePre`, config and limits;
//! - a new `Store` per call, with a memory cap, a deadline and output checks,
//!   so a hostile or buggy plugin can fail its own request and nothing else;
//! - a [`PluginSlot`] that swaps a plugin atomically when its file changes.

mod bindings;
mod cache;
mod engine;
mod error;
mod plugin;
mod sandbox;
mod slot;
mod validate;

pub use bindings::types::{
    AnomalyMap, Decision, Defect, Detection, Image, LabelScore, Metadata, ModelOutput, PixelFormat, Region, Verdict,
};
pub use engine::{EngineOptions, PluginEngine};
pub use error::{Failure, LoadError, PluginError};
pub use plugin::{Kind, Limits, Plugin, PluginInfo, Sandbox, inspect_component};
pub use slot::{ContentCheck, PluginSlot, SlotStatus};

/// Bytes a pixel takes in `format`.
pub fn channels(format: PixelFormat) -> usize {
    match format {
        PixelFormat::Gray8 => 1,
        PixelFormat::Rgb8 => 3,
        PixelFormat::Rgba8 => 4,
    }
}
