//! The pooled HTTP client shared by both protocols: hyper-util's legacy client over hyper-rustls
//! (ring provider), HTTP/1.1 and h2 via ALPN, keep-alive pooling, system roots plus an optional
//! extra CA file.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::config::{UpstreamConfig, UpstreamsConfig};
use super::error::{UpstreamError, UpstreamErrorKind};
use super::http1_pool::{Http1Pool, SendError, UpstreamBody};

/// The client type every upstream uses.
pub(crate) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Trust roots: system certificates (loaded once, only when some upstream uses TLS) plus each
/// upstream's optional CA file.
#[derive(Debug)]
pub(crate) struct TlsRoots {
    system: Vec<CertificateDer<'static>>,
}

impl TlsRoots {
    pub(crate) fn new(cfg: &UpstreamsConfig) -> Result<Self, String> {
        let needs_tls = cfg.upstreams.values().any(|u| {
            u.url.starts_with("https://")
                || u.websocket
                    .url
                    .as_deref()
                    .is_some_and(|w| w.starts_with("wss://"))
        });
        // Reading the system store costs tens of milliseconds; plain-http setups skip it.
        let system = if needs_tls {
            let loaded = rustls_native_certs::load_native_certs();
            for e in &loaded.errors {
                tracing::warn!(error = %e, "could not load some system root certificates");
            }
            loaded.certs
        } else {
            Vec::new()
        };
        Ok(Self { system })
    }

    /// A rustls client config trusting the system roots plus `cfg.ca_file`.
    pub(crate) fn client_config(
        &self,
        cfg: &UpstreamConfig,
    ) -> Result<rustls::ClientConfig, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(self.system.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(config)
    }
}

/// Builds the pooled client for one upstream.
pub(crate) fn build_client(
    cfg: &UpstreamConfig,
    tls: rustls::ClientConfig,
) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    // The TLS wrapper decides the scheme; the inner connector must accept https URIs too.
    http.enforce_http(false);
    // Small request and SSE frames must not wait for Nagle.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.timeout()));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_millis(cfg.pool_idle_timeout_ms))
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// POSTs a JSON body, on `direct`'s connections when it serves `uri`, else on the pooled
/// client; connection-level failures become `Connect` or `Reset` errors.
pub(crate) async fn post_json(
    client: &HttpClient,
    direct: Option<&Arc<Http1Pool>>,
    upstream: &str,
    uri: Uri,
    auth: Option<&HeaderValue>,
    body: Bytes,
) -> Result<http::Response<UpstreamBody>, UpstreamError> {
    // Filled in place: `Request::builder` moves the whole request head at every step.
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/json, text/event-stream"),
    );
    if let Some(a) = auth {
        headers.insert(header::AUTHORIZATION, a.clone());
    }
    if let Some(pool) = direct.filter(|p| p.serves(req.uri())) {
        return pool.send(req).await.map_err(|e| match e {
            SendError::Connect(msg) => {
                UpstreamError::new(UpstreamErrorKind::Connect, upstream, msg)
            }
            SendError::Reset(e) => {
                UpstreamError::new(UpstreamErrorKind::Reset, upstream, error_chain(&e))
            }
        });
    }
    match client.request(req).await {
        Ok(resp) => Ok(resp.map(UpstreamBody::pooled)),
        Err(e) => {
            let kind = if e.is_connect() {
                UpstreamErrorKind::Connect
            } else {
                UpstreamErrorKind::Reset
            };
            Err(UpstreamError::new(kind, upstream, error_chain(&e)))
        }
    }
}

/// Reads a whole body, refusing more than `limit` bytes.
pub(crate) async fn read_limited(body: UpstreamBody, limit: usize) -> Result<Bytes, String> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("reading the upstream body failed: {e}"))
}

/// The error and its causes on one line (hyper's top-level messages alone are vague).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
