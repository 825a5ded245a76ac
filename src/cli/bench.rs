//! `lineside bench`: raw model throughput per batch size.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use clap::Args;
use lineside_inference::{ComputeDevice, Kernels, LoadedModel};
use serde::Serialize;

/// Measure model throughput and latency per batch size.
///
/// Model only: no decode, no HTTP (bench/http.sh measures end to end). Each batch size runs `--runs` timed runs of at least
/// `--min-run-ms` each; the figures are the median run, with the spread.
#[derive(Args)]
pub struct BenchArgs {
    /// `builtin:steel-surface` or a timm hub-format folder.
    #[arg(long, default_value = "builtin:steel-surface")]
    model: String,
    /// Comma-separated batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch_sizes: Vec<u32>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N` (a GPU needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: ComputeDevice,
    /// `lineside`: our CPU kernels (the default on a CPU); `candle`: candle's
    /// own ops only, as a GPU runs them (to compare the two on a CPU).
    #[arg(long, default_value = "lineside")]
    kernels: Kernels,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    #[arg(long, default_value_t = 1500)]
    min_run_ms: u64,
    /// One JSON object per batch size instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct BatchResult {
    model: String,
    device: String,
    kernels: String,
    batch: usize,
    threads: usize,
    images_per_second: f64,
    images_per_second_min: f64,
    images_per_second_max: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    // candle and the `gemm` crate size their parallelism from RAYON_NUM_THREADS,
    // `matrixmultiply` (wide convolution GEMMs) from MATMUL_NUM_THREADS.
    // SAFETY: set before any other thread exists in this process.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    }
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let files = lineside::source::LocalModel::read_files(&a.model)?;
    let device = a.device.open()?;
    let model = LoadedModel::load_on(&files, &device, a.kernels)?;
    let kernels = model.kernels;
    let (c, h, w) = model.preprocessor.input_shape();
    // A GPU queues kernels and returns: a batch is done when the device says so.
    let forward = |x: &Tensor| -> anyhow::Result<()> {
        model.network.forward(x)?;
        Ok(device.synchronize()?)
    };
    if !a.json {
        println!(
            "model {} ({}), {c}x{h}x{w}, {threads} threads, {}, {kernels} kernels",
            a.model, model.config.architecture, a.device
        );
        println!("{:>6} {:>12} {:>18} {:>10} {:>10} {:>9}", "batch", "img/s", "spread", "p50 ms", "p99 ms", "RSS MiB");
    }
    for batch in a.batch_sizes.iter().map(|&b| b as usize) {
        let x = Tensor::randn(0f32, 1.0, (batch, c, h, w), &device)?;
        // Three warm-up batches, as `bench/peers.py` gives every peer: the
        // first passes build per-shape state (layer cuts, buffers).
        for _ in 0..3 {
            forward(&x)?;
        }
        let mut rates = Vec::new();
        let mut latencies = Vec::new();
        for _ in 0..a.runs {
            let start = Instant::now();
            let mut n = 0usize;
            while start.elapsed() < Duration::from_millis(a.min_run_ms) || n == 0 {
                let t = Instant::now();
                forward(&x)?;
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
                n += 1;
            }
            rates.push((n * batch) as f64 / start.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        latencies.sort_by(f64::total_cmp);
        let r = BatchResult {
            model: a.model.clone(),
            device: a.device.to_string(),
            kernels: kernels.to_string(),
            batch,
            threads,
            images_per_second: rates[rates.len() / 2],
            images_per_second_min: rates[0],
            images_per_second_max: rates[rates.len() - 1],
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
            rss_mib: peak_rss_mib(),
        };
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:>6} {:>12.1} {:>18} {:>10.2} {:>10.2} {:>9.0}",
                r.batch,
                r.images_per_second,
                format!("{:.1}-{:.1}", r.images_per_second_min, r.images_per_second_max),
                r.p50_ms,
                r.p99_ms,
                r.rss_mib
            );
        }
    }
    Ok(())
}

pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Peak resident set size (VmHWM) of this process, in MiB; 0 where /proc is absent.
pub(crate) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .map(|kib: f64| kib / 1024.0)
        .unwrap_or(0.0)
}
