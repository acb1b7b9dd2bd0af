//! TLS termination: the rustls server config built from the PEM files in `[tls]`, offering h2
//! and HTTP/1.1 via ALPN, and its reload. The current config sits behind a lock that only new
//! handshakes read, so a reload never touches open connections; a failed reload keeps serving
//! the previous certificate.

use crate::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio_rustls::TlsAcceptor;

/// How often the certificate files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("tls.key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("tls: {0}")]
    Config(String),
}

/// Builds a rustls server config (ring provider, h2 + HTTP/1.1) from PEM files.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.to_path_buf(),
            message: format!("cannot read PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.to_path_buf(),
            message: "no CERTIFICATE block found".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        message: format!("cannot read a PEM private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Config(format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The reloadable TLS acceptor.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    /// The config new handshakes use; a `RwLock` because reads (every handshake) vastly
    /// outnumber writes (reloads), and readers only clone the `Arc`.
    current: RwLock<Arc<ServerConfig>>,
    /// Modification times of (cert, key) at the last load, to detect file changes.
    stamps: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Tls {
    /// Loads the configured certificate; `None` when TLS is not configured.
    pub fn from_config(cfg: &TlsConfig) -> Result<Option<Arc<Self>>, TlsError> {
        let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
            return Ok(None);
        };
        let stamps = (mtime(cert), mtime(key));
        let config = load_server_config(cert, key)?;
        Ok(Some(Arc::new(Self {
            cert: cert.clone(),
            key: key.clone(),
            current: RwLock::new(Arc::new(config)),
            stamps: RwLock::new(stamps),
        })))
    }

    /// An acceptor using the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        TlsAcceptor::from(config)
    }

    /// Re-reads the files; on error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = (mtime(&self.cert), mtime(&self.key));
        let config = load_server_config(&self.cert, &self.key)?;
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(config),
            Err(p) => *p.into_inner() = Arc::new(config),
        }
        match self.stamps.write() {
            Ok(mut s) => *s = stamps,
            Err(p) => *p.into_inner() = stamps,
        }
        Ok(())
    }

    /// Whether either file changed since the last load.
    fn changed(&self) -> bool {
        let now = (mtime(&self.cert), mtime(&self.key));
        let last = self.stamps.read().map(|s| *s).unwrap_or((None, None));
        now != last
    }

    /// Reloads on SIGHUP and whenever a file's modification time changes; runs until dropped.
    pub async fn watch(self: Arc<Self>) {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hup_recv = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hup_recv = std::future::pending::<()>();
            let why = tokio::select! {
                _ = hup_recv => "SIGHUP",
                _ = tick.tick() => {
                    if !self.changed() {
                        continue;
                    }
                    "file change"
                }
            };
            match self.reload() {
                Ok(()) => {
                    tracing::info!(trigger = why, cert = %self.cert.display(), "tls certificate reloaded")
                }
                Err(e) => {
                    tracing::warn!(trigger = why, error = %e, "tls reload failed; keeping the previous certificate")
                }
            }
        }
    }
}
