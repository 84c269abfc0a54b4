//! TLS on the gateway (rustls with the `ring` provider): the certificate chain and key
//! come from PEM files (`http.tls_cert_file`, `http.tls_key_file`) and are read again
//! when either file changes, so a renewed certificate (cert-manager, certbot) is served
//! to new connections without a restart. A file that does not load keeps the previous
//! certificate in service and is logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Read a certificate chain and its private key from PEM files.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("http.tls_cert_file {}: {error}", cert_file.display()))?;
    if chain.is_empty() {
        return Err(format!("http.tls_cert_file {}: no certificate in the file", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|error| format!("http.tls_key_file {}: {error}", key_file.display()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|error| format!("http.tls_key_file {}: {error}", key_file.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|error| {
        format!("http.tls_key_file {} does not belong to the certificate: {error}", key_file.display())
    })?;
    Ok(certified)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|meta| meta.modified()).ok()
}

/// Serves the current certificate; [`ReloadingCert::reload_if_changed`] swaps it.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamps: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl ReloadingCert {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, String> {
        let stamps = (modified(cert_file), modified(key_file));
        let current = load_certified_key(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new(Arc::new(current)),
            stamps: Mutex::new(stamps),
        })
    }

    /// Read the files again if either changed since the last look; `Some(outcome)` when
    /// a reload was tried.
    pub fn reload_if_changed(&self) -> Option<Result<(), String>> {
        let stamps = (modified(&self.cert_file), modified(&self.key_file));
        {
            let mut last = self.stamps.lock();
            if *last == stamps {
                return None;
            }
            *last = stamps;
        }
        Some(load_certified_key(&self.cert_file, &self.key_file).map(|certified| {
            *self.current.write() = Arc::new(certified);
        }))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read()))
    }
}

/// The gateway's TLS: an acceptor and the certificate it reloads.
pub struct GatewayTls {
    pub acceptor: TlsAcceptor,
    pub cert: Arc<ReloadingCert>,
}

impl GatewayTls {
    /// `None` when no certificate is configured.
    pub fn from_config(http: &crate::config::HttpConfig) -> Result<Option<Self>, String> {
        match (http.tls_cert_file.is_empty(), http.tls_key_file.is_empty()) {
            (true, true) => return Ok(None),
            (false, false) => {}
            _ => return Err("http.tls_cert_file and http.tls_key_file: set both or neither".into()),
        }
        let cert = Arc::new(ReloadingCert::load(Path::new(&http.tls_cert_file), Path::new(&http.tls_key_file))?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("TLS: {error}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&cert) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Self { acceptor: TlsAcceptor::from(Arc::new(config)), cert }))
    }
}
