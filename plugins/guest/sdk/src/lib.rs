//! Write a lineside plugin in Rust.
//!
//! Enable the `preprocessor` or `postprocessor` feature, implement the
//! matching trait, and register it with one macro:
//!
//! ```ignore
//! use lineside_plugin_sdk::{Config, pre::*};
//!
//! struct Invert;
//!
//! impl Preprocessor for Invert {
//!     fn init(_: Config) -> Result<Self, String> { Ok(Invert) }
//!     fn process(&self, mut img: Image, _: &Metadata) -> Result<Image, String> {
//!         img.pixels.iter_mut().for_each(|p| *p = 255 - *p);
//!         Ok(img)
//!     }
//! }
//!
//! lineside_plugin_sdk::preprocessor!(Invert);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`: the `.wasm` in
//! `target/wasm32-wasip2/release/` is the component lineside loads.

use std::any::Any;
use std::cell::RefCell;
use std::str::FromStr;

// Generated code names this crate by its external path, also from inside it.
extern crate self as lineside_plugin_sdk;

#[doc(hidden)]
pub use wit_bindgen;

/// The preprocessor world: image in, image out.
#[cfg(feature = "preprocessor")]
pub mod pre {
    wit_bindgen::generate!({
        path: "../../../wit",
        world: "preprocessor",
        pub_export_macro: true,
        export_macro_name: "__export_preprocessor",
        default_bindings_module: "lineside_plugin_sdk::pre",
        runtime_path: "lineside_plugin_sdk::wit_bindgen::rt",
    });

    pub use self::lineside::plugin::host::Level;
    pub use self::lineside::plugin::types::{Image, Metadata, PixelFormat, Region};

    /// A plugin that transforms the image before the model sees it.
    pub trait Preprocessor: Sized + 'static {
        /// Reads the factory's settings; an error rejects them.
        fn init(config: crate::Config) -> Result<Self, String>;
        /// Transforms one image.
        fn process(&self, image: Image, meta: &Metadata) -> Result<Image, String>;
    }

    /// Writes a line to the server log.
    pub fn log(level: Level, message: &str) {
        self::lineside::plugin::host::log(level, message);
    }

    impl PixelFormat {
        /// Bytes a pixel takes.
        pub fn channels(self) -> usize {
            match self {
                PixelFormat::Gray8 => 1,
                PixelFormat::Rgb8 => 3,
                PixelFormat::Rgba8 => 4,
            }
        }
    }

    impl Image {
        /// The part of the image inside `r`, clipped to the image; an error if nothing is left.
        pub fn crop(&self, r: Region) -> Result<Image, String> {
            let (x0, y0, x1, y1) = self.clip(r)?;
            let c = self.format.channels();
            let (row, w) = (self.width as usize * c, (x1 - x0) as usize * c);
            let mut pixels = Vec::with_capacity(w * (y1 - y0) as usize);
            for y in y0..y1 {
                let start = y as usize * row + x0 as usize * c;
                pixels.extend_from_slice(&self.pixels[start..start + w]);
            }
            Ok(Image { width: x1 - x0, height: y1 - y0, format: self.format, pixels })
        }

        /// [`Image::crop`] then [`Image::to_gray`] in one pass over the pixels.
        pub fn crop_gray(&self, r: Region) -> Result<Image, String> {
            if matches!(self.format, PixelFormat::Gray8) {
                return self.crop(r);
            }
            let (x0, y0, x1, y1) = self.clip(r)?;
            let c = self.format.channels();
            let row = self.width as usize * c;
            let mut pixels = Vec::with_capacity(((x1 - x0) * (y1 - y0)) as usize);
            for y in y0..y1 {
                let start = y as usize * row + x0 as usize * c;
                let line = &self.pixels[start..start + (x1 - x0) as usize * c];
                pixels.extend(line.chunks_exact(c).map(luma));
            }
            Ok(Image { width: x1 - x0, height: y1 - y0, format: PixelFormat::Gray8, pixels })
        }

        /// `r` clipped to the image, as `(x0, y0, x1, y1)`; an error if nothing is left.
        fn clip(&self, r: Region) -> Result<(u32, u32, u32, u32), String> {
            let (x0, y0) = (r.x.min(self.width), r.y.min(self.height));
            let x1 = r.x.saturating_add(r.width).min(self.width);
            let y1 = r.y.saturating_add(r.height).min(self.height);
            if x1 <= x0 || y1 <= y0 {
                return Err(format!("region {r:?} lies outside the {}×{} image", self.width, self.height));
            }
            Ok((x0, y0, x1, y1))
        }

        /// Luma (ITU-R BT.601, integer weights) as a one-channel image.
        pub fn to_gray(&self) -> Image {
            let c = self.format.channels();
            let pixels = match self.format {
                PixelFormat::Gray8 => self.pixels.clone(),
                _ => self.pixels.chunks_exact(c).map(luma).collect(),
            };
            Image { width: self.width, height: self.height, format: PixelFormat::Gray8, pixels }
        }
    }

    /// BT.601 luma of an RGB(A) pixel, with integer weights.
    fn luma(p: &[u8]) -> u8 {
        ((77 * p[0] as u32 + 150 * p[1] as u32 + 29 * p[2] as u32 + 128) >> 8) as u8
    }

    /// Registers a [`Preprocessor`] as the component's export.
    #[macro_export]
    macro_rules! preprocessor {
        ($t:ty) => {
            #[doc(hidden)]
            pub struct __LinesidePreprocessor;

            impl $crate::pre::exports::lineside::plugin::preprocess::Guest for __LinesidePreprocessor {
                fn init(config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>) -> Result<(), String> {
                    $crate::__init(|| <$t as $crate::pre::Preprocessor>::init($crate::Config::new(config)))
                }
                fn process(
                    image: $crate::pre::Image,
                    meta: $crate::pre::Metadata,
                ) -> Result<$crate::pre::Image, String> {
                    $crate::__with(|p: &$t| $crate::pre::Preprocessor::process(p, image, &meta))
                }
            }

            $crate::pre::__export_preprocessor!(__LinesidePreprocessor with_types_in $crate::pre);
        };
    }
}

/// The postprocessor world: model output in, decision out.
#[cfg(feature = "postprocessor")]
pub mod post {
    wit_bindgen::generate!({
        path: "../../../wit",
        world: "postprocessor",
        pub_export_macro: true,
        export_macro_name: "__export_postprocessor",
        default_bindings_module: "lineside_plugin_sdk::post",
        runtime_path: "lineside_plugin_sdk::wit_bindgen::rt",
    });

    pub use self::lineside::plugin::host::Level;
    pub use self::lineside::plugin::types::{
        AnomalyMap, Decision, Defect, Detection, LabelScore, Metadata, ModelOutput, Region, Verdict,
    };

    /// A plugin that turns model output into the factory's decision.
    pub trait Postprocessor: Sized + 'static {
        /// Reads the factory's settings; an error rejects them.
        fn init(config: crate::Config) -> Result<Self, String>;
        /// Decides on one part.
        fn process(&self, output: ModelOutput, meta: &Metadata) -> Result<Decision, String>;
    }

    /// Writes a line to the server log.
    pub fn log(level: Level, message: &str) {
        self::lineside::plugin::host::log(level, message);
    }

    /// Registers a [`Postprocessor`] as the component's export.
    #[macro_export]
    macro_rules! postprocessor {
        ($t:ty) => {
            #[doc(hidden)]
            pub struct __LinesidePostprocessor;

            impl $crate::post::exports::lineside::plugin::postprocess::Guest for __LinesidePostprocessor {
                fn init(config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>) -> Result<(), String> {
                    $crate::__init(|| <$t as $crate::post::Postprocessor>::init($crate::Config::new(config)))
                }
                fn process(
                    output: $crate::post::ModelOutput,
                    meta: $crate::post::Metadata,
                ) -> Result<$crate::post::Decision, String> {
                    $crate::__with(|p: &$t| $crate::post::Postprocessor::process(p, output, &meta))
                }
            }

            $crate::post::__export_postprocessor!(__LinesidePostprocessor with_types_in $crate::post);
        };
    }
}

/// The factory's plugin settings: flat `key = value` strings. Nested TOML
/// tables arrive with dotted keys (`codes.crazing`), lists comma-joined.
#[derive(Debug, Clone, Default)]
pub struct Config(Vec<(String, String)>);

impl Config {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self(pairs)
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `key` parsed as `T`, or `default` when unset; an error names the key.
    pub fn parse_or<T: FromStr>(&self, key: &str, default: T) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|e| format!("config `{key}` = `{v}`: {e}")),
        }
    }

    /// Entries under `prefix.`, with the prefix removed (`codes.crazing` → `crazing`).
    pub fn section<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.0.iter().filter_map(move |(k, v)| {
            let rest = k.strip_prefix(prefix)?.strip_prefix('.')?;
            Some((rest, v.as_str()))
        })
    }

    /// All entries.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

thread_local! {
    // Wasm components are single-threaded; this holds the plugin built by `init`.
    static PLUGIN: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

#[doc(hidden)]
pub fn __init<T: 'static>(make: impl FnOnce() -> Result<T, String>) -> Result<(), String> {
    let plugin = make()?;
    PLUGIN.with(|p| *p.borrow_mut() = Some(Box::new(plugin)));
    Ok(())
}

#[doc(hidden)]
pub fn __with<T: 'static, R>(f: impl FnOnce(&T) -> Result<R, String>) -> Result<R, String> {
    PLUGIN.with(|p| {
        let p = p.borrow();
        let plugin = p.as_ref().and_then(|b| b.downcast_ref::<T>()).ok_or("process was called before init")?;
        f(plugin)
    })
}
