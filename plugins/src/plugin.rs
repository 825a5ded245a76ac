//! A loaded plugin and the sandbox each call runs in.

use std::path::Path;
use std::time::Duration;

use wasmtime::Store;
use wasmtime::component::{Component, HasSelf, Linker};

use crate::bindings::post::{Postprocessor, PostprocessorPre};
use crate::bindings::pre::{Preprocessor, PreprocessorPre};
use crate::bindings::types::{Decision, Image, Metadata, ModelOutput};
use crate::cache::digest;
use crate::engine::{EPOCH_TICK, PluginEngine};
use crate::error::{Failure, LoadError, PluginError};
use crate::sandbox::{StoreState, classify};

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `lineside:plugin/preprocessor`: image in, image out.
    Preprocessor,
    /// `lineside:plugin/postprocessor`: model output in, decision out.
    Postprocessor,
}

impl Kind {
    pub fn world(self) -> &'static str {
        match self {
            Kind::Preprocessor => "preprocessor",
            Kind::Postprocessor => "postprocessor",
        }
    }
}

/// What one call may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock budget for instantiate + init + process.
    pub timeout: Duration,
    /// Linear memory cap.
    pub memory_bytes: usize,
    /// Largest image a preprocessor may return, in pixel bytes.
    pub max_image_bytes: usize,
    /// Largest decision a postprocessor may return (strings and defects, estimated bytes).
    pub max_decision_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(50),
            memory_bytes: 64 << 20,
            max_image_bytes: 32 << 20,
            max_decision_bytes: 64 << 10,
        }
    }
}

/// Identity and shape of a loaded component.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub name: String,
    pub kind: Kind,
    /// Hex SHA-256 of the component bytes.
    pub sha256: String,
    pub size_bytes: usize,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

enum Pre {
    Pre(PreprocessorPre<StoreState>),
    Post(PostprocessorPre<StoreState>),
}

/// A compiled, linked plugin with its config. Calls are independent: each
/// gets a fresh [`Sandbox`], so no state leaks from one request to the next.
pub struct Plugin {
    info: PluginInfo,
    engine: PluginEngine,
    pre: Pre,
    config: Vec<(String, String)>,
    limits: Limits,
}

impl Plugin {
    /// Compiles (or loads from the cache) and links a component of `kind`.
    pub fn load(
        engine: &PluginEngine,
        name: &str,
        kind: Kind,
        bytes: &[u8],
        config: Vec<(String, String)>,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        let sha256 = digest(bytes);
        let component = engine.cache().load(engine.engine(), bytes, &sha256)?;
        let pre = link(engine, &component, kind)?;
        let (imports, exports) = interface_names(engine, &component);
        let info = PluginInfo { name: name.to_string(), kind, sha256, size_bytes: bytes.len(), imports, exports };
        Ok(Self { info, engine: engine.clone(), pre, config, limits })
    }

    /// [`Plugin::load`] from a file.
    pub fn load_file(
        engine: &PluginEngine,
        name: &str,
        kind: Kind,
        path: &Path,
        config: Vec<(String, String)>,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        let bytes =
            std::fs::read(path).map_err(|source| LoadError::Read { path: path.display().to_string(), source })?;
        Self::load(engine, name, kind, &bytes, config, limits)
    }

    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// A fresh instance, initialised with the plugin's config.
    pub fn sandbox(&self) -> Result<Sandbox<'_>, PluginError> {
        let mut store = Store::new(self.engine.engine(), StoreState::new(&self.info.name, self.limits.memory_bytes));
        store.limiter(|s| &mut s.limiter);
        arm_deadline(&mut store, self.limits.timeout);
        let instance = match &self.pre {
            Pre::Pre(p) => p.instantiate(&mut store).map(Instance::Pre),
            Pre::Post(p) => p.instantiate(&mut store).map(Instance::Post),
        };
        let instance = instance.map_err(|e| self.trap(&store, e, Failure::Unavailable))?;
        let mut sandbox = Sandbox { plugin: self, store, instance };
        sandbox.init()?;
        Ok(sandbox)
    }

    /// Runs the preprocessor in a fresh sandbox.
    pub fn preprocess(&self, image: &Image, meta: &Metadata) -> Result<Image, PluginError> {
        self.sandbox()?.preprocess(image, meta)
    }

    /// Runs the postprocessor in a fresh sandbox.
    pub fn postprocess(&self, output: &ModelOutput, meta: &Metadata) -> Result<Decision, PluginError> {
        self.sandbox()?.postprocess(output, meta)
    }

    fn error(&self, failure: Failure, message: impl Into<String>) -> PluginError {
        PluginError { plugin: self.info.name.clone(), failure, message: message.into() }
    }

    /// Turns a wasmtime error into a named failure, with what the plugin wrote to stderr.
    fn trap(&self, store: &Store<StoreState>, err: wasmtime::Error, fallback: Failure) -> PluginError {
        let failure = match classify(&err, store.data().limiter.hit_cap) {
            Failure::Trap if err.downcast_ref::<wasmtime::Trap>().is_none() => fallback,
            f => f,
        };
        let mut message = match failure {
            Failure::Timeout => format!("interrupted after its {} ms deadline", self.limits.timeout.as_millis()),
            Failure::MemoryLimit => format!("tried to grow memory past {} MiB", self.limits.memory_bytes >> 20),
            Failure::StackOverflow => "wasm stack overflow (recursion too deep)".to_string(),
            _ => match err.downcast_ref::<wasmtime::Trap>() {
                Some(trap) => format!("wasm trap: {trap}"),
                None => first_line(&err.to_string()),
            },
        };
        let stderr = store.data().stderr();
        if !stderr.is_empty() {
            message.push_str("; stderr: ");
            message.push_str(&stderr);
        }
        self.error(failure, message)
    }
}

fn arm_deadline(store: &mut Store<StoreState>, timeout: Duration) {
    let ticks = timeout.as_micros().div_ceil(EPOCH_TICK.as_micros()).max(1) as u64;
    store.set_epoch_deadline(ticks);
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().chars().take(300).collect()
}

fn link(engine: &PluginEngine, component: &Component, kind: Kind) -> Result<Pre, LoadError> {
    let wrong =
        |e: wasmtime::Error| LoadError::WrongWorld { world: kind.world(), reason: first_line(&format!("{e:#}")) };
    let mut linker: Linker<StoreState> = Linker::new(engine.engine());
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(wrong)?;
    match kind {
        Kind::Preprocessor => Preprocessor::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s),
        Kind::Postprocessor => Postprocessor::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s),
    }
    .map_err(wrong)?;
    let instance_pre = linker.instantiate_pre(component).map_err(wrong)?;
    Ok(match kind {
        Kind::Preprocessor => Pre::Pre(PreprocessorPre::new(instance_pre).map_err(wrong)?),
        Kind::Postprocessor => Pre::Post(PostprocessorPre::new(instance_pre).map_err(wrong)?),
    })
}

fn interface_names(engine: &PluginEngine, component: &Component) -> (Vec<String>, Vec<String>) {
    let ty = component.component_type();
    let imports = ty.imports(engine.engine()).map(|(n, _)| n.to_string()).collect();
    let exports = ty.exports(engine.engine()).map(|(n, _)| n.to_string()).collect();
    (imports, exports)
}

/// Loads a component and reports which world it implements, for `lineside plugin check`.
pub fn inspect_component(engine: &PluginEngine, bytes: &[u8]) -> Result<PluginInfo, LoadError> {
    let sha256 = digest(bytes);
    let component = engine.cache().load(engine.engine(), bytes, &sha256)?;
    let (imports, exports) = interface_names(engine, &component);
    let mut reasons = Vec::new();
    for kind in [Kind::Preprocessor, Kind::Postprocessor] {
        match link(engine, &component, kind) {
            Ok(_) => {
                return Ok(PluginInfo { name: String::new(), kind, sha256, size_bytes: bytes.len(), imports, exports });
            }
            Err(e) => reasons.push(e.to_string()),
        }
    }
    Err(LoadError::WrongWorld { world: "preprocessor or postprocessor", reason: reasons.join("; ") })
}

enum Instance {
    Pre(Preprocessor),
    Post(Postprocessor),
}

/// One instantiated, initialised plugin. The server makes one per call; a
/// benchmark may reuse one to measure what instantiation costs.
pub struct Sandbox<'a> {
    plugin: &'a Plugin,
    store: Store<StoreState>,
    instance: Instance,
}

impl Sandbox<'_> {
    fn init(&mut self) -> Result<(), PluginError> {
        let config = &self.plugin.config;
        let r = match &self.instance {
            Instance::Pre(i) => i.lineside_plugin_preprocess().call_init(&mut self.store, config),
            Instance::Post(i) => i.lineside_plugin_postprocess().call_init(&mut self.store, config),
        };
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(self.plugin.error(Failure::Rejected, format!("rejected its config: {}", clip(&msg)))),
            Err(e) => Err(self.plugin.trap(&self.store, e, Failure::Trap)),
        }
    }

    /// Runs `process` of a preprocessor and checks the image it returns.
    pub fn preprocess(&mut self, image: &Image, meta: &Metadata) -> Result<Image, PluginError> {
        let Instance::Pre(i) = &self.instance else {
            return Err(self.plugin.error(Failure::Unavailable, "not a preprocessor"));
        };
        arm_deadline(&mut self.store, self.plugin.limits.timeout);
        let out = match i.lineside_plugin_preprocess().call_process(&mut self.store, image, meta) {
            Ok(Ok(out)) => out,
            Ok(Err(msg)) => return Err(self.plugin.error(Failure::Rejected, clip(&msg))),
            Err(e) => return Err(self.plugin.trap(&self.store, e, Failure::Trap)),
        };
        crate::validate::image(&out, &self.plugin.limits).map_err(|(f, m)| self.plugin.error(f, m))?;
        Ok(out)
    }

    /// Runs `process` of a postprocessor and checks the decision it returns.
    pub fn postprocess(&mut self, output: &ModelOutput, meta: &Metadata) -> Result<Decision, PluginError> {
        let Instance::Post(i) = &self.instance else {
            return Err(self.plugin.error(Failure::Unavailable, "not a postprocessor"));
        };
        arm_deadline(&mut self.store, self.plugin.limits.timeout);
        let out = match i.lineside_plugin_postprocess().call_process(&mut self.store, output, meta) {
            Ok(Ok(out)) => out,
            Ok(Err(msg)) => return Err(self.plugin.error(Failure::Rejected, clip(&msg))),
            Err(e) => return Err(self.plugin.trap(&self.store, e, Failure::Trap)),
        };
        crate::validate::decision(&out, &self.plugin.limits).map_err(|(f, m)| self.plugin.error(f, m))?;
        Ok(out)
    }
}

/// Plugin-supplied text is bounded before it reaches logs and responses.
fn clip(s: &str) -> String {
    s.chars().take(500).collect()
}
