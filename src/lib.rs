//! lineside: the inspection server.
//!
//! A request flows `server` (HTTP, limits, errors) → `pipeline` (decode and
//! preprocess on the preprocessing pool (`preprocess_pool`), submit to the model's batcher, build the
//! verdict) → `lineside_inference::batcher` (batched candle inference on its
//! own thread). Factory pipelines add wasm plugins before and after the
//! model (`factories`, `lineside_plugins`). `registry` owns the loaded models; `source` and `hub` turn model sources (folders, `hf://` repos) into
//! local files; `config` is the TOML/env configuration; `builtin` embeds the default steel-surface model. `records` writes every
//! answer to the record store (`lineside_store`) before it is sent;
//! `inspections` is its query API and `ui` the review pages.

pub mod auth;
pub mod builtin;
pub mod config;
pub mod error;
pub mod factories;
pub mod fit;
pub mod hub;
pub mod inspections;
pub mod integrity;
pub mod metrics;
pub mod oip;
pub mod openapi;
pub mod pipeline;
pub mod preprocess_pool;
pub mod records;
pub mod registry;
pub mod server;
pub mod source;
pub mod tls;
pub mod ui;
