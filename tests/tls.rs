//! HTTPS on the gateway: served with the configured certificate, a renewed certificate
//! picked up without a restart, a broken renewal leaving the previous one in service,
//! and plain HTTP refused on the TLS port.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{eventually, start};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Cert {
    der: CertificateDer<'static>,
    pem: String,
    key_pem: String,
}

fn make_cert() -> Cert {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("self-signed certificate");
    Cert { der: made.cert.der().clone(), pem: made.cert.pem(), key_pem: made.signing_key.serialize_pem() }
}

/// GET `path` over TLS trusting only `trusted`; the status line and the certificate the
/// server presented.
async fn get(addr: std::net::SocketAddr, trusted: &Cert, path: &str) -> Result<(String, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.der.clone()).map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    // Servers may close without close_notify after Connection: close; what was read counts.
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    Ok((answer.lines().next().unwrap_or_default().to_string(), presented))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_certificates_reloaded_on_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let first = make_cert();
    std::fs::write(&cert_file, &first.pem).expect("write cert");
    std::fs::write(&key_file, &first.key_pem).expect("write key");
    let runtime = start(
        common::sources(dir.path())
            .with("http.tls_cert_file", cert_file.to_string_lossy().to_string())
            .with("http.tls_key_file", key_file.to_string_lossy().to_string())
            .with("http.tls_reload_interval", "100ms"),
    )
    .await;
    let addr = runtime.addr();
    let (status, presented) = get(addr, &first, "/health").await.expect("HTTPS");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(presented, first.der.to_vec());

    // Plain HTTP on the TLS port gets no answer.
    let mut plain = tokio::net::TcpStream::connect(addr).await.expect("connect");
    plain.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "plain HTTP was served");

    // A renewed certificate is served without a restart.
    let second = make_cert();
    std::fs::write(&key_file, &second.key_pem).expect("write key");
    std::fs::write(&cert_file, &second.pem).expect("write cert");
    eventually(Duration::from_secs(10), "the renewed certificate served", || async {
        get(addr, &second, "/health").await.ok().filter(|(status, _)| status == "HTTP/1.1 200 OK")
    })
    .await;
    assert!(get(addr, &first, "/health").await.is_err(), "the old certificate is no longer presented");

    // A broken renewal keeps the current certificate in service.
    std::fs::write(&cert_file, "not a certificate").expect("write cert");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, presented) = get(addr, &second, "/health").await.expect("still HTTPS");
    assert_eq!((status.as_str(), presented), ("HTTP/1.1 200 OK", second.der.to_vec()));
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_its_key_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cert_file = dir.path().join("tls.crt");
    std::fs::write(&cert_file, make_cert().pem).expect("write cert");
    let config =
        common::config(common::sources(dir.path()).with("http.tls_cert_file", cert_file.to_string_lossy().to_string()));
    let error = tidemark::runtime::Runtime::start(config).await.err().expect("refused");
    assert!(format!("{error:#}").contains("set both or neither"), "{error:#}");
    let other = make_cert();
    let key_file = dir.path().join("other.key");
    std::fs::write(&key_file, other.key_pem).expect("write key");
    let config = common::config(
        common::sources(dir.path())
            .with("http.tls_cert_file", cert_file.to_string_lossy().to_string())
            .with("http.tls_key_file", key_file.to_string_lossy().to_string()),
    );
    let error = tidemark::runtime::Runtime::start(config).await.err().expect("refused");
    assert!(format!("{error:#}").contains("does not belong to the certificate"), "{error:#}");
}
