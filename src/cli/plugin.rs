//! `lineside plugin`: check a component against the WIT worlds, and measure
//! what plugins cost per image.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use image::DynamicImage;
use lineside_inference::LoadedModel;
use lineside_inference::preprocess::{DecodeLimits, decode};
use lineside_plugins::{
    EngineOptions, Image, Kind, LabelScore, Limits, Metadata, ModelOutput, PixelFormat, Plugin, PluginEngine, Region,
    inspect_component,
};

use super::bench::{peak_rss_mib, percentile};

/// Work with WebAssembly plugins.
#[derive(Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Subcommand)]
enum PluginCommand {
    Check(CheckArgs),
    Bench(PluginBenchArgs),
}

/// Validate a component against the lineside:plugin@0.1.0 worlds and print its imports and exports.
#[derive(Args)]
struct CheckArgs {
    /// The component (`.wasm`).
    file: PathBuf,
}

/// Measure plugin cost per image: roi-crop on a large RGB image and
/// defect-codes on the model's output, each against the same logic in native
/// Rust, and their share of end-to-end time per image.
#[derive(Args)]
struct PluginBenchArgs {
    /// The roi-crop component.
    #[arg(long, default_value = "plugins/guest/target/wasm32-wasip2/release/roi_crop.wasm")]
    pre: PathBuf,
    /// The defect-codes component.
    #[arg(long, default_value = "plugins/guest/target/wasm32-wasip2/release/defect_codes.wasm")]
    post: PathBuf,
    #[arg(long, default_value_t = 1920)]
    width: u32,
    #[arg(long, default_value_t = 1080)]
    height: u32,
    /// Timed iterations per measurement (the median is reported).
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Model for the end-to-end figure.
    #[arg(long, default_value = "builtin:steel-surface")]
    model: String,
}

pub fn run(a: PluginArgs) -> anyhow::Result<()> {
    match a.command {
        PluginCommand::Check(c) => check(c),
        PluginCommand::Bench(b) => bench(b),
    }
}

fn check(a: CheckArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let engine = PluginEngine::new(&EngineOptions { cache_dir: None, ..EngineOptions::default() })?;
    let info =
        inspect_component(&engine, &bytes).with_context(|| format!("{} is not a usable plugin", a.file.display()))?;
    println!(
        "{}: lineside:plugin@0.1.0 {} ({} bytes, sha256 {})",
        a.file.display(),
        info.kind.world(),
        info.size_bytes,
        info.sha256
    );
    println!("exports:");
    info.exports.iter().for_each(|e| println!("  {e}"));
    println!("imports:");
    info.imports.iter().for_each(|i| println!("  {i}"));
    Ok(())
}

/// The ROI the benchmark crops: the middle half of the image.
fn roi(w: u32, h: u32) -> Region {
    Region { x: w / 4, y: h / 4, width: w / 2, height: h / 2 }
}

fn bench(a: PluginBenchArgs) -> anyhow::Result<()> {
    let engine = PluginEngine::new(&EngineOptions::default())?;
    let r = roi(a.width, a.height);
    let pre_cfg = [("x", r.x), ("y", r.y), ("width", r.width), ("height", r.height)]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec();
    let limits = Limits::default();
    let pre = Plugin::load_file(&engine, "roi-crop", Kind::Preprocessor, &a.pre, pre_cfg, limits)?;
    let post_cfg = vec![("codes.scratches".to_string(), "SS-06".to_string())];
    let post = Plugin::load_file(&engine, "defect-codes", Kind::Postprocessor, &a.post, post_cfg, limits)?;

    let rgb = synthetic_image(a.width, a.height);
    let img = Image { width: a.width, height: a.height, format: PixelFormat::Rgb8, pixels: rgb.as_raw().clone() };
    let meta = Metadata { factory: "bench".into(), line: None, part_id: None, headers: vec![] };
    let labels = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"];
    let scores = [0.01f32, 0.02, 0.01, 0.03, 0.03, 0.9];
    let output = ModelOutput::Classification(
        labels.iter().zip(scores).map(|(l, s)| LabelScore { label: l.to_string(), score: s }).collect(),
    );

    println!("plugin call cost per image ({}x{} RGB input, median of {} calls)", a.width, a.height, a.iters);
    println!("{:<44} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    let pre_fresh =
        measure("roi-crop, wasm, fresh sandbox per call", a.iters, || pre.preprocess(&img, &meta).map(drop))?;
    let mut sandbox = pre.sandbox()?;
    measure("roi-crop, wasm, one sandbox reused", a.iters, || sandbox.preprocess(&img, &meta).map(drop))?;
    drop(sandbox);
    let pre_native = measure("roi-crop, native Rust", a.iters, || {
        std::hint::black_box(native_roi_gray(&img, r));
        Ok::<_, anyhow::Error>(())
    })?;
    let post_fresh =
        measure("defect-codes, wasm, fresh sandbox per call", a.iters, || post.postprocess(&output, &meta).map(drop))?;
    let mut sandbox = post.sandbox()?;
    measure("defect-codes, wasm, one sandbox reused", a.iters, || sandbox.postprocess(&output, &meta).map(drop))?;
    drop(sandbox);
    let post_native = measure("defect-codes, native Rust", a.iters, || {
        std::hint::black_box(native_codes(&labels, &scores));
        Ok::<_, anyhow::Error>(())
    })?;

    // End to end in process: decode the JPEG, crop, resize and normalise, one batch-1 forward pass.
    let files = lineside::source::LocalModel::read_files(&a.model)?;
    let model = LoadedModel::load(&files, &Device::Cpu)?;
    let jpeg = encode_jpeg(&rgb)?;
    let (c, h, w) = model.preprocessor.input_shape();
    let e2e_iters = (a.iters / 4).max(10);
    let e2e = measure("end to end: decode + plugins + model (batch 1)", e2e_iters, || {
        let decoded = decode(&jpeg, DecodeLimits::default())?;
        let input = Image {
            width: decoded.width(),
            height: decoded.height(),
            format: PixelFormat::Rgb8,
            pixels: decoded.into_rgb8().into_raw(),
        };
        let out = pre.preprocess(&input, &meta)?;
        let gray = image::GrayImage::from_raw(out.width, out.height, out.pixels).context("plugin image")?;
        let x = model.preprocessor.run(&DynamicImage::ImageLuma8(gray))?;
        let logits = model.network.forward(&Tensor::from_vec(x, (1, c, h, w), &Device::Cpu)?)?;
        std::hint::black_box(logits);
        post.postprocess(&output, &meta)?;
        Ok::<_, anyhow::Error>(())
    })?;
    let plugin_ms = pre_fresh + post_fresh;
    println!();
    println!(
        "wasm overhead over native: roi-crop {:.2} ms, defect-codes {:.3} ms",
        pre_fresh - pre_native,
        post_fresh - post_native
    );
    println!(
        "plugins take {plugin_ms:.2} ms of {e2e:.1} ms end to end per image: {:.1}% (goal <= 3%); peak RSS {:.0} MiB",
        100.0 * plugin_ms / e2e,
        peak_rss_mib()
    );
    Ok(())
}

/// Times `f` `iters` times after a warm-up; prints and returns the median in ms.
fn measure<E: Into<anyhow::Error>>(
    what: &str,
    iters: usize,
    mut f: impl FnMut() -> Result<(), E>,
) -> anyhow::Result<f64> {
    f().map_err(Into::into)?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f().map_err(Into::into)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&ms, 0.5), percentile(&ms, 0.99));
    println!("{what:<44} {p50:>10.3} {p99:>10.3}");
    Ok(p50)
}

/// A deterministic textured image (gradients and a checker), so JPEG decode costs what a photo would.
fn synthetic_image(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let checker = if (x / 16 + y / 16) % 2 == 0 { 40 } else { 0 };
        image::Rgb([(x * 255 / w) as u8 ^ checker, (y * 255 / h) as u8, ((x ^ y) & 0xff) as u8])
    })
}

fn encode_jpeg(img: &image::RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg)?;
    Ok(out.into_inner())
}

/// roi-crop's logic in native Rust: crop, then BT.601 integer luma.
fn native_roi_gray(img: &Image, r: Region) -> Vec<u8> {
    let row = img.width as usize * 3;
    let mut out = Vec::with_capacity((r.width * r.height) as usize);
    for y in r.y..r.y + r.height {
        let start = y as usize * row + r.x as usize * 3;
        for p in img.pixels[start..start + r.width as usize * 3].chunks_exact(3) {
            out.push(((77 * p[0] as u32 + 150 * p[1] as u32 + 29 * p[2] as u32 + 128) >> 8) as u8);
        }
    }
    out
}

/// defect-codes' rule in native Rust, with the benchmark's one-entry code table.
fn native_codes(labels: &[&str], scores: &[f32]) -> Vec<(String, String, f32)> {
    labels
        .iter()
        .zip(scores)
        .filter(|(_, s)| **s >= 0.5)
        .map(|(l, s)| (if *l == "scratches" { "SS-06" } else { "UNMAPPED" }.to_string(), l.to_string(), *s))
        .collect()
}
