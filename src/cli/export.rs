//! `lineside export`: inspection records as CSV or JSON lines, for MES and
//! quality systems. Reads the store directly, so it works beside a running
//! server (SQLite in WAL mode allows concurrent readers).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use lineside::config::Config;
use lineside::inspections::{format_time, parse_time, record_json};
use lineside_store::{Filter, Record, Store};

/// Export inspection records (oldest first)
///
/// Examples:
///   lineside export --since 24h --format csv > last-day.csv
///   lineside export --since 2026-11-01T00:00:00Z --factory acme --format jsonl --out acme.jsonl
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ExportArgs {
    /// Start: RFC 3339, ms since the epoch, or a span back from now (24h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// End (exclusive), in the same forms.
    #[arg(long)]
    until: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Csv)]
    format: Format,
    #[arg(long)]
    factory: Option<String>,
    #[arg(long)]
    line: Option<String>,
    /// Only this verdict (after review): pass, fail or review.
    #[arg(long)]
    verdict: Option<String>,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// TOML configuration file (for its [records] section).
    #[arg(long, env = "LINESIDE_CONFIG")]
    config: Option<PathBuf>,
    /// The data directory (overrides the config).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A PostgreSQL store (overrides the config).
    #[arg(long, env = "LINESIDE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Csv,
    Jsonl,
}

const CSV_COLUMNS: &[&str] = &[
    "id",
    "time",
    "factory",
    "line",
    "part_id",
    "capture_id",
    "model",
    "model_version",
    "verdict",
    "effective_verdict",
    "label",
    "score",
    "anomaly_score",
    "defect_codes",
    "reviewed_by",
    "reviewed_at",
    "image_sha256",
    "storage_warning",
];

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(a.config.as_deref())?.records;
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if let Some(u) = a.database_url {
        cfg.database_url = Some(u);
    }
    let time =
        |v: &Option<String>| v.as_deref().map(|s| parse_time(s).map_err(|e| anyhow::anyhow!("`{s}`: {e}"))).transpose();
    let filter = Filter {
        factory: a.factory,
        line: a.line,
        verdict: a.verdict,
        since_ms: time(&a.since)?,
        until_ms: time(&a.until)?,
        ..Default::default()
    };
    let out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let n = rt.block_on(async {
        let backend = cfg.backend();
        anyhow::ensure!(
            cfg.database_url.is_some() || backend.data_dir().join("lineside.db").is_file(),
            "no record store in {} (give --data-dir or --database-url)",
            backend.data_dir().display()
        );
        let store = Store::open(backend).await?;
        let n = write_all(&store, &filter, a.format, out).await;
        store.close().await;
        n
    })?;
    tracing::info!(records = n, "exported");
    Ok(())
}

async fn write_all(store: &Store, filter: &Filter, format: Format, out: Box<dyn Write>) -> anyhow::Result<u64> {
    let out = std::io::BufWriter::new(out);
    let mut sink = match format {
        Format::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(CSV_COLUMNS)?;
            Sink::Csv(Box::new(w))
        }
        Format::Jsonl => Sink::Jsonl(out),
    };
    let (mut after, mut n) = (0i64, 0u64);
    loop {
        let batch = store.scan(filter, after, 1000).await?;
        let Some(last) = batch.last() else { break };
        after = last.seq;
        for r in &batch {
            match &mut sink {
                Sink::Csv(w) => w.write_record(csv_row(r))?,
                Sink::Jsonl(w) => writeln!(w, "{}", record_json(r))?,
            }
            n += 1;
        }
    }
    match sink {
        Sink::Csv(mut w) => w.flush()?,
        Sink::Jsonl(mut w) => w.flush()?,
    }
    Ok(n)
}

enum Sink {
    Csv(Box<csv::Writer<std::io::BufWriter<Box<dyn Write>>>>),
    Jsonl(std::io::BufWriter<Box<dyn Write>>),
}

fn csv_row(r: &Record) -> Vec<String> {
    let d = &r.data;
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let codes: Vec<String> = d
        .defects
        .as_array()
        .map(|x| x.iter().filter_map(|x| x.get("code").or(x.get("label"))?.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    vec![
        d.id.clone(),
        format_time(d.created_ms),
        opt(&d.factory),
        opt(&d.line),
        opt(&d.part_id),
        opt(&d.capture_id),
        d.model.clone(),
        d.model_version.clone(),
        d.verdict.clone(),
        r.effective_verdict().to_string(),
        d.label.clone(),
        format!("{:.6}", d.score),
        d.anomaly_score.map(|s| format!("{s:.6}")).unwrap_or_default(),
        codes.join(";"),
        r.review.as_ref().map(|v| v.reviewer.clone()).unwrap_or_default(),
        r.review.as_ref().map(|v| format_time(v.reviewed_ms)).unwrap_or_default(),
        opt(&r.image_sha256),
        opt(&d.storage_warning),
    ]
}
