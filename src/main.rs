//! The `lineside` command: serve, inspect offline, train, benchmark, check plugins, fit and evaluate anomaly
//! models, export inspection records, make API keys, sign models and plugins.

use clap::{Parser, Subcommand};

mod cli;

/// lineside — AI visual inspection server for production lines.
#[derive(Parser)]
#[command(name = "lineside", version, about, long_about = None)]
struct Cli {
    /// Defaults to `serve` with the built-in model.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    Serve(cli::serve::ServeArgs),
    Inspect(cli::inspect::InspectArgs),
    Bench(cli::bench::BenchArgs),
    Train(cli::train::TrainArgs),
    Plugin(cli::plugin::PluginArgs),
    Fit(cli::fit::FitArgs),
    Eval(cli::eval::EvalArgs),
    Models(cli::models::ModelsArgs),
    Export(cli::export::ExportArgs),
    Keys(cli::keys::KeysArgs),
    Sign(cli::sign::SignArgs),
}

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    settle_candle_threads();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,lineside=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command.unwrap_or_default() {
        Command::Serve(args) => cli::serve::run(args),
        Command::Inspect(args) => cli::inspect::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Train(args) => cli::train::run(args),
        Command::Plugin(args) => cli::plugin::run(args),
        Command::Fit(args) => cli::fit::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Models(args) => cli::models::run(args),
        Command::Export(args) => cli::export::run(args),
        Command::Keys(args) => cli::keys::run(args),
        Command::Sign(args) => cli::sign::run(args),
    }
}

impl Default for Command {
    fn default() -> Self {
        Command::Serve(cli::serve::ServeArgs::default())
    }
}

/// Gives candle its thread count once, in `RAYON_NUM_THREADS`, unless the
/// environment already does.
///
/// candle sizes every CPU matmul's parallelism from that variable and, when
/// it is unset, from `num_cpus::get_physical`, which reads and parses
/// `/proc/cpuinfo` on each call: once per forward pass (the classifier
/// head), and 0.5% of the server's CPU at saturation on a 2-core VM, in the
/// model's own threads. `lineside bench` sets the variable from `--threads`,
/// so the server paid a cost that the raw figures did not. rayon reads the
/// same variable for its global pool, whose default it matches.
///
/// candle's matmul now splits over the logical CPUs, as in `lineside
/// bench`, where its own default counts the physical cores (half of them
/// on SMT hosts); `CANDLE_CPU_MASK`, which candle reads once, is left to
/// decide when set.
fn settle_candle_threads() {
    let set = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).is_some_and(|n| n > 0);
    if set("RAYON_NUM_THREADS") || std::env::var_os("CANDLE_CPU_MASK").is_some() {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: before any thread is spawned (`keep_freed_memory`, called
    // before, spawns none).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
}

/// Keeps freed layer outputs in glibc's heap for the next batch.
///
/// Every layer allocates its output (up to tens of MiB at batch 8), and
/// glibc by default serves such blocks with mmap and unmaps them on free, so
/// each batch page-faults its whole working set in again. Raising the mmap
/// threshold to its 32 MiB maximum was not enough: mobilenetv2's expanded
/// maps at batch 8 are 38.5 MB, and their faults still took about 10% of the
/// server's CPU. So mmap is off for ordinary allocations (`M_MMAP_MAX = 0`):
/// every block comes from a heap, which is not trimmed below 512 MiB. glibc
/// still maps a block directly when a thread's heap cannot hold it (over
/// 64 MiB), so nothing fails. Measured on `lineside bench --batch-sizes 8`:
/// 98–106 img/s before, 128 after, and a lower peak RSS (117 against 145 MiB).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}
