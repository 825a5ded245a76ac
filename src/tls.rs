//! Optional TLS (rustls) for the API, with certificate reload and optional
//! mutual TLS for line clients.
//!
//! [`TlsListener`] plugs into `axum::serve`, so graceful shutdown is the same
//! with and without TLS. A background task accepts TCP connections and runs
//! each handshake in a task of its own (a slow or silent client cannot hold
//! up the others); finished connections are handed to axum. A watcher
//! re-reads the certificate, key and client CA when their files change and
//! swaps the new config in for the next handshakes; a bad new file is logged
//! and the old config stays.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The `[tls]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates for client certificates: turns on mutual TLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client must present a certificate.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// How often the files are checked for changes; 0 turns reload off.
    #[serde(default = "d_reload")]
    pub reload_interval_s: u64,
}

fn d_reload() -> u64 {
    10
}

/// Whether line clients must present a certificate signed by `client_ca`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Handshakes without a valid client certificate fail.
    #[default]
    Required,
    /// A certificate, if sent, must be valid; none is accepted too.
    Optional,
}

/// Handshakes in progress at once; more wait for their turn.
const MAX_HANDSHAKES: usize = 256;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the files `cfg` names into a rustls server config.
pub fn server_config(cfg: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .with_context(|| format!("tls.cert {}", cfg.cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "tls.cert {}: no certificate in the file", cfg.cert.display());
    let key = PrivateKeyDer::from_pem_file(&cfg.key).with_context(|| format!("tls.key {}", cfg.key.display()))?;
    // The provider is named: the build may link more than one, and then none is the default.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("tls.client_ca {}", ca.display()))? {
                roots.add(c.with_context(|| format!("tls.client_ca {}", ca.display()))?)?;
            }
            anyhow::ensure!(!roots.is_empty(), "tls.client_ca {}: no certificate in the file", ca.display());
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match cfg.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(verifier.build().context("client certificate verifier")?)
        }
    };
    let mut config = builder.with_single_cert(certs, key).context("tls.cert and tls.key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A TLS listener for `axum::serve`.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves TLS on `tcp` with the files `cfg` names, reloading them when they change.
    pub fn new(tcp: TcpListener, cfg: &TlsConfig) -> anyhow::Result<Self> {
        let current = Arc::new(RwLock::new(Arc::new(server_config(cfg)?)));
        let local = tcp.local_addr()?;
        let (tx, accepted) = mpsc::channel(64);
        tokio::spawn(accept_loop(tcp, current.clone(), tx));
        if cfg.reload_interval_s > 0 {
            tokio::spawn(watch(cfg.clone(), current));
        }
        tracing::info!(
            cert = %cfg.cert.display(),
            mutual = cfg.client_ca.is_some(),
            client_auth = ?cfg.client_auth,
            "TLS on"
        );
        Ok(Self { accepted, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(conn) => conn,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accepts until axum drops the listener (shutdown), handshaking concurrently.
async fn accept_loop(
    tcp: TcpListener,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            a = tcp.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let acceptor = TlsAcceptor::from(current.read().expect("tls config lock").clone());
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => {
                    metrics::counter!("lineside_tls_handshake_failures_total").increment(1);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Re-reads the files when any of them changes; keeps the old config on error.
async fn watch(cfg: TlsConfig, current: Arc<RwLock<Arc<rustls::ServerConfig>>>) {
    let files: Vec<PathBuf> =
        [Some(cfg.cert.clone()), Some(cfg.key.clone()), cfg.client_ca.clone()].into_iter().flatten().collect();
    let stamps = || files.iter().map(|f| modified(f)).collect::<Vec<_>>();
    let mut seen = stamps();
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.reload_interval_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamps();
        if now == seen {
            continue;
        }
        seen = now;
        let c = cfg.clone();
        match tokio::task::spawn_blocking(move || server_config(&c)).await {
            Ok(Ok(new)) => {
                *current.write().expect("tls config lock") = Arc::new(new);
                tracing::info!(cert = %cfg.cert.display(), "TLS certificate reloaded");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "TLS reload failed; the previous certificate stays")
            }
            Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
        }
    }
}
