//! `lineside serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use lineside::config::Config;

/// Serve the inspection API
///
/// With no flags, serves the built-in `steel-surface` model on 0.0.0.0:8080,
/// with no network access and no files needed.
///
/// Configuration is layered: built-in defaults, then the TOML file given by
/// --config, then LINESIDE_* environment variables (sections and keys joined
/// by a double underscore, e.g. LINESIDE_SERVER__ADDR=127.0.0.1:9000), then
/// flags. The TOML keys, with their defaults:
///
///   [server]
///   addr = "0.0.0.0:8080"
///   body_limit_bytes = 33554432      # 413 above this
///   default_timeout_ms = 10000       # deadline without X-Request-Timeout-Ms
///   default_model = "steel-surface"  # for /v1/inspect without ?model=
///   top_k = 5                        # predictions per response
///   max_image_side = 16384           # larger images are refused from the header (413)
///   max_decode_bytes = 536870912     # largest decoder allocation
///   model_dir = "lineside-data/models"       # where POST /v1/models/{name}/fit saves models
///   fit_backbone = "builtin:steel-surface"   # backbone for fits that name none
///   # admin_token = "…"                     # enables the admin API (swaps, rollbacks, fits, reloads);
///                                          # better: LINESIDE_SERVER__ADMIN_TOKEN, or auth.admin_token_sha256
///   shutdown_grace_s = 30            # on SIGTERM: how long in-flight requests may take before exit
///   preprocess_threads = 0           # threads decoding and resizing images (0: one per core)
///   preprocess_nice = 10             # their niceness, 0-19, so inference goes first (0: same as the server)
///   jpeg_decode = "full"             # "scaled": decode JPEGs at 1/2-1/8 DCT scale when the model input is
///                                    # small (PIL's draft mode; a third less decoding for
///                                    # 1080p, pixels differ slightly)
///
///   [auth]                           # docs/access.md
///   required = false                 # true: every API call needs a factory key or the admin token
///   # admin_token_sha256 = "…"       # `lineside keys hash`; instead of server.admin_token
///   [[auth.keys]]                    # repeat per key; `lineside keys new --factory acme` prints one
///   name = "line-3"                  # a label for logs
///   factory = "acme"                 # the factory it acts for
///   sha256 = "…"                     # digest of the key (the key itself is never stored)
///
///   [tls]                            # HTTPS (docs/security.md); absent = plain HTTP
///   cert = "cert.pem"                # PEM chain
///   key = "key.pem"
///   # client_ca = "lines-ca.pem"     # mutual TLS: clients need a certificate from this CA
///   # client_auth = "required"       # or "optional"
///   reload_interval_s = 10           # files re-read when they change; 0 = never
///
///   [integrity]                      # docs/security.md
///   trusted_keys = []                # Ed25519 public keys (base64) whose signatures count
///   require_signatures = false       # true: unsigned model folders and plugins are refused
///
///   [[models]]                       # repeat per model
///   name = "steel-surface"
///   source = "builtin:steel-surface" # or a timm hub-format folder, a PatchCore folder (lineside fit),
///                                    # or hf://org/repo[@revision] (fetched into the hub cache)
///   max_batch_size = 8
///   max_queue_delay_ms = 5           # the most a partial batch waits (after its oldest request) for
///                                    # requests still being decoded; with none on the way it runs at once
///   queue_capacity = 64              # 429 with Retry-After when full
///   # threads = 2                    # compute threads (default: all cores); wide convolution
///                                    # GEMMs use a shared pool sized by MATMUL_NUM_THREADS
///   # device = "cpu"                 # or "cuda" / "cuda:N": needs a build with --features cuda;
///                                    # classifiers only (PatchCore models run on the CPU)
///   # sha256 = "…"                   # pin: `lineside models digest SOURCE`; other files are refused
///   [models.verdict]                 # pass only if top label is listed and score >= min_score
///   pass_labels = ["good", "ok", "pass", "normal"]
///   min_score = 0.5
///
///   [hub]                            # hf:// sources; each key falls back to the env variable
///   # endpoint = "https://huggingface.co"   # HF_ENDPOINT
///   # cache_dir = "~/.cache/huggingface/hub" # HF_HUB_CACHE, else $HF_HOME/hub
///   # offline = false                # HF_HUB_OFFLINE: read only the cache
///   # retries = 1                    # before falling back to the cache
///   # (the token is read from HF_TOKEN only, never from this file)
///
///   [records]                        # every answer is stored before it is sent
///   enabled = true                   # --no-records turns it off
///   data_dir = "lineside-data"       # --data-dir: lineside.db (SQLite, WAL) and images/
///   # database_url = "postgres://…"  # --database-url: PostgreSQL instead of SQLite, shared
///                                    # by replicas; better: LINESIDE_RECORDS__DATABASE_URL
///   pass_sample_rate = 0.01          # share of passing parts whose image is kept
///                                    # (failed and review parts: always, with heatmaps)
///   max_image_age_days = 90          # retained images unused for longer are removed
///   max_image_bytes = 21474836480    # then least recently used ones, past this total
///   retention_interval_s = 600
///
///   [plugins]
///   # cache_dir = "/var/cache/lineside/plugins"  # compiled plugins (default: OS temp dir)
///   watch_interval_ms = 250          # hot reload of plugin files; 0 = off
///
///   [[factories]]                    # POST /v1/factories/{name}/inspect; see plugins/README.md
///   name = "acme"
///   # model = "steel-surface"        # default: server.default_model
///   on_plugin_error = "fail"         # or "pass_through"
///   allowed_headers = []             # request headers plugins may see
///   [factories.preprocess]           # and/or [factories.postprocess]
///   path = "roi_crop.wasm"
///   config = { x = 0, y = 0, width = 512, height = 512 }
///   timeout_ms = 50
///   memory_mib = 64
///   max_output_mib = 32
///   # sha256 = "…"                   # pin: the .wasm file's SHA-256; checked on every reload
#[derive(Args, Default)]
#[command(verbatim_doc_comment)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "LINESIDE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides the config).
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Data directory for records and retained images (default ./lineside-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep records in PostgreSQL (`postgres://user:pass@host/db`) instead of SQLite.
    #[arg(long, env = "LINESIDE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Store no records (answers are not kept; idempotency keys are ignored).
    #[arg(long)]
    no_records: bool,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    // `lineside` with no subcommand builds these args without clap, so read the env here too.
    let file = a.config.or_else(|| std::env::var_os("LINESIDE_CONFIG").map(PathBuf::from));
    let mut cfg = Config::load(file.as_deref())?;
    if let Some(addr) = a.addr {
        cfg.server.addr = addr;
    }
    if let Some(dir) = a.data_dir {
        cfg.records.data_dir = dir;
    }
    let database_url = a.database_url.or_else(|| std::env::var("LINESIDE_DATABASE_URL").ok());
    if let Some(url) = database_url {
        cfg.records.database_url = Some(url);
    }
    if a.no_records {
        cfg.records.enabled = false;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.server.addr).await?;
        lineside::server::serve(cfg, listener, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
