//! The `lineside` command: serve, inspect offline, train, benchmark, check plugins, fit and evaluate anomaly models.

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
}

fn main() -> anyhow::Result<()> {
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
    }
}

impl Default for Command {
    fn default() -> Self {
        Command::Serve(cli::serve::ServeArgs::default())
    }
}
