//! Any bytes as an uploaded image: decoding with the server's limits, then
//! the timm transform, must return a value or an error, never panic, hang or
//! allocate past the limits. Three ways, as the server decodes: the whole
//! picture (plugins, heatmaps), and the region the crop reads at full and
//! at reduced DCT scale (libjpeg's cropped and skipped scanlines).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lineside_inference::preprocess::{DecodeLimits, JpegDecode, decode};
use lineside_inference::{HubConfig, Preprocessor};

/// The built-in model's transform: resize the shorter side to 256, crop 224, normalise.
fn preprocessor() -> &'static Preprocessor {
    static P: OnceLock<Preprocessor> = OnceLock::new();
    P.get_or_init(|| {
        let cfg = HubConfig::from_json(include_str!("../../models/steel-surface/config.json")).unwrap();
        Preprocessor::new(&cfg.pretrained_cfg)
    })
}

fuzz_target!(|data: &[u8]| {
    // Smaller than the server's defaults, so the fuzzer explores instead of allocating.
    let limits = DecodeLimits { max_width: 4096, max_height: 4096, max_alloc: 64 << 20 };
    if let Ok(img) = decode(data, limits) {
        let _ = preprocessor().run(&img);
    }
    for mode in [JpegDecode::Full, JpegDecode::Scaled] {
        if let Ok(d) = preprocessor().decode(data, limits, mode) {
            let _ = preprocessor().run_window(&d.image, d.window);
        }
    }
});
