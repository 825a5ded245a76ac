//! TLS: HTTPS with a real rustls client, certificate reload while serving,
//! and mutual TLS for line clients. Certificates are made here with rcgen.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate authority for the test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// A leaf certificate signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, name: &str) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client trusting `server_ca`, presenting `identity` if given.
fn client(server_ca: &Ca, identity: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(server_ca.pem.as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    Arc::new(config)
}

/// `GET path` over TLS: the status and the certificate the server presented.
async fn get(addr: SocketAddr, path: &str, client: Arc<rustls::ClientConfig>) -> std::io::Result<(u16, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls =
        tokio_rustls::TlsConnector::from(client).connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
    let peer = tls.get_ref().1.peer_certificates().map(|c| c[0].to_vec()).unwrap_or_default();
    tls.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    let read = tls.read_to_end(&mut buf).await;
    if buf.is_empty() {
        read?;
    }
    let head = String::from_utf8_lossy(&buf);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, peer))
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// Starts a server with `tls_toml` as its `[tls]` section; its address.
async fn serve(tls_toml: &str, data: &Path) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let toml = format!("[records]\ndata_dir = \"{}\"\n[tls]\n{tls_toml}", data.display());
    let cfg = lineside::config::Config::from_toml(&toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        lineside::server::serve(cfg, listener, async move {
            let _ = stopped.await;
        })
        .await
        .expect("server runs");
    });
    (addr, stop)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    // Replaced in one step, as a deployment tool would, so the watcher never reads half a file.
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p.display().to_string()
}

async fn wait_for_status(addr: SocketAddr, client: Arc<rustls::ClientConfig>, want: u16) {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok((s, _)) = get(addr, "/ready", client.clone()).await
            && s == want
        {
            return;
        }
        assert!(Instant::now() < until, "no {want} from /ready over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let authority = ca("lineside test CA");
    let first = leaf(&authority, "lineside-first");
    let cert = write(dir.path(), "cert.pem", &first.0);
    let key = write(dir.path(), "key.pem", &first.1);
    let (addr, _stop) =
        serve(&format!("cert = \"{cert}\"\nkey = \"{key}\"\nreload_interval_s = 1\n"), dir.path()).await;
    let c = client(&authority, None);
    wait_for_status(addr, c.clone(), 200).await;
    let (status, peer) = get(addr, "/health", c.clone()).await.unwrap();
    assert_eq!((status, peer), (200, der(&first.0)));

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"), "plain HTTP must not be served");

    // A new certificate and key, written while serving, are picked up without a restart.
    let second = leaf(&authority, "lineside-second");
    write(dir.path(), "key.pem", &second.1);
    write(dir.path(), "cert.pem", &second.0);
    let written = Instant::now();
    loop {
        let (status, peer) = get(addr, "/health", c.clone()).await.unwrap();
        if peer == der(&second.0) {
            assert_eq!(status, 200);
            break;
        }
        assert!(written.elapsed() < Duration::from_secs(15), "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("new certificate served {:?} after it was written", written.elapsed());

    // A broken file is refused and the last good certificate keeps serving.
    write(dir.path(), "cert.pem", "not a certificate");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, peer) = get(addr, "/health", c).await.unwrap();
    assert_eq!((status, peer), (200, der(&second.0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_line_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("server CA");
    let lines_ca = ca("line clients CA");
    let rogue_ca = ca("someone else's CA");
    let (cert_pem, key_pem) = leaf(&server_ca, "lineside");
    let cert = write(dir.path(), "cert.pem", &cert_pem);
    let key = write(dir.path(), "key.pem", &key_pem);
    let client_ca = write(dir.path(), "lines-ca.pem", &lines_ca.pem);
    let (addr, _stop) =
        serve(&format!("cert = \"{cert}\"\nkey = \"{key}\"\nclient_ca = \"{client_ca}\"\n"), dir.path()).await;
    let line = leaf(&lines_ca, "line-3");
    wait_for_status(addr, client(&server_ca, Some(&line)), 200).await;

    let ok = get(addr, "/health", client(&server_ca, Some(&line))).await.unwrap();
    assert_eq!(ok.0, 200, "a line client with its certificate is served");
    let refused = |r: std::io::Result<(u16, Vec<u8>)>| !matches!(r, Ok((200, _)));
    assert!(refused(get(addr, "/health", client(&server_ca, None)).await), "no client certificate: refused");
    let rogue = leaf(&rogue_ca, "intruder");
    assert!(refused(get(addr, "/health", client(&server_ca, Some(&rogue))).await), "a foreign CA: refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_auth_accepts_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("server CA");
    let lines_ca = ca("line clients CA");
    let (cert_pem, key_pem) = leaf(&server_ca, "lineside");
    let cert = write(dir.path(), "cert.pem", &cert_pem);
    let key = write(dir.path(), "key.pem", &key_pem);
    let client_ca = write(dir.path(), "lines-ca.pem", &lines_ca.pem);
    let toml = format!("cert = \"{cert}\"\nkey = \"{key}\"\nclient_ca = \"{client_ca}\"\nclient_auth = \"optional\"\n");
    let (addr, _stop) = serve(&toml, dir.path()).await;
    wait_for_status(addr, client(&server_ca, None), 200).await;
    let rogue = leaf(&ca("someone else's CA"), "intruder");
    let r = get(addr, "/health", client(&server_ca, Some(&rogue))).await;
    assert!(!matches!(r, Ok((200, _))), "a certificate that is sent must still be valid");
}
