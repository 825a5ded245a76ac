//! Host bindings generated from `wit/plugin.wit`.
//!
//! The postprocessor world reuses the preprocessor world's `types` and `host`
//! modules, so both worlds share one set of Rust types and one `log` impl.

pub mod pre {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "preprocessor",
    });
}

pub mod post {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "postprocessor",
        with: {
            "lineside:plugin/types": super::pre::lineside::plugin::types,
            "lineside:plugin/host": super::pre::lineside::plugin::host,
        },
    });
}

pub use pre::lineside::plugin::{host, types};
