//! TLS termination of the real binary, with a CA and certificates generated at test time:
//! h2 and HTTP/1.1 chosen by ALPN, certificate reload (SIGHUP and file change) that keeps open
//! connections alive, and the plain-HTTP redirect listener.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::app::{signal, Options, TestServer};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A test CA that signs server certificates for localhost / 127.0.0.1.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "taproom test ca");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes a fresh leaf certificate and key to `dir/server.{pem,key}`; returns its DER.
    fn issue(&self, dir: &Path, cn: &str) -> Vec<u8> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // Key first, then cert: the server may poll in between and must cope with a mismatch.
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        cert.der().to_vec()
    }

    fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls::pki_types::pem::PemObject::from_pem_slice(self.pem.as_bytes()).unwrap();
        roots.add(ca).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(cfg))
    }
}

async fn start_tls(ca: &Ca, dir: &Path, extra: &str) -> (TestServer, String, Vec<u8>) {
    let der = ca.issue(dir, "first");
    let config = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n{extra}",
        dir.join("server.pem"),
        dir.join("server.key")
    );
    let s = TestServer::start_with(Options {
        config: Some(config),
        no_wait: true,
        ..Options::default()
    })
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    (s, addr, der)
}

async fn connect(connector: &TlsConnector, addr: &str) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

fn peer_cert(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    let certs: &[CertificateDer<'_>] = stream.get_ref().1.peer_certificates().unwrap();
    certs[0].to_vec()
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn h1(stream: TlsStream<TcpStream>) -> H1 {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get_h1(sender: &mut H1, path: &str) -> (u16, String) {
    sender.ready().await.unwrap();
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits until the TLS server answers `/healthz`.
async fn wait_tls(ca: &Ca, addr: &str) {
    let connector = ca.client(&[b"http/1.1"]);
    for _ in 0..200 {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            if let Ok(stream) = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
            {
                let mut s = h1(stream).await;
                if get_h1(&mut s, "/healthz").await.0 == 200 {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("tls server never became healthy");
}

#[tokio::test]
async fn alpn_negotiates_h2_and_http1() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (s, addr, _) = start_tls(&ca, dir.path(), "").await;
    wait_tls(&ca, &addr).await;

    let stream = connect(&ca.client(&[b"h2", b"http/1.1"]), &addr).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("https://localhost/healthz")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.version(), hyper::Version::HTTP_2);
    assert_eq!(res.status(), 200);

    let stream = connect(&ca.client(&[b"http/1.1"]), &addr).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut sender = h1(stream).await;
    assert_eq!(get_h1(&mut sender, "/healthz").await.0, 200);
    // Errors are the usual envelope over TLS too.
    let (status, body) = get_h1(&mut sender, "/api/characters").await;
    assert_eq!(status, 401, "{body}");
    drop(s);
}

#[tokio::test]
async fn certificate_reload_keeps_open_connections() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (s, addr, first) = start_tls(&ca, dir.path(), "").await;
    wait_tls(&ca, &addr).await;
    let connector = ca.client(&[b"http/1.1"]);

    let old = connect(&connector, &addr).await;
    assert_eq!(peer_cert(&old), first);
    let mut old = h1(old).await;
    assert_eq!(get_h1(&mut old, "/healthz").await.0, 200);

    // SIGHUP reloads.
    let second = ca.issue(dir.path(), "second");
    signal(s.pid(), "HUP");
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = peer_cert(&connect(&connector, &addr).await);
        if seen == second {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen, second,
        "new handshakes must use the reloaded certificate"
    );
    // The keep-alive connection made before the reload still works.
    assert_eq!(get_h1(&mut old, "/healthz").await.0, 200);

    // A file change alone reloads too (polled every 2 s); mtime granularity needs a new second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = ca.issue(dir.path(), "third");
    for _ in 0..120 {
        seen = peer_cert(&connect(&connector, &addr).await);
        if seen == third {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen, third,
        "a changed file must be picked up without a signal"
    );
    assert_eq!(get_h1(&mut old, "/healthz").await.0, 200);
    assert!(
        s.logs().contains("tls certificate reloaded"),
        "{}",
        s.logs()
    );
}

#[tokio::test]
async fn a_broken_certificate_file_keeps_the_previous_one() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (s, addr, first) = start_tls(&ca, dir.path(), "").await;
    wait_tls(&ca, &addr).await;
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    signal(s.pid(), "HUP");
    for _ in 0..100 {
        if s.logs().contains("tls reload failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.logs().contains("tls reload failed"), "{}", s.logs());
    let stream = connect(&ca.client(&[b"http/1.1"]), &addr).await;
    assert_eq!(peer_cert(&stream), first);
}

#[tokio::test]
async fn redirect_listener_answers_308_to_https() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (s, addr, _) = start_tls(&ca, dir.path(), "redirect_http = \"127.0.0.1:0\"\n").await;
    wait_tls(&ca, &addr).await;
    let logs = s.logs();
    let redirect = logs
        .split("http_redirect=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no redirect address in logs:\n{logs}"))
        .to_string();
    let port = addr.rsplit(':').next().unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client
        .get(format!("http://{redirect}/api/characters?limit=5"))
        .header("host", "localhost:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://localhost:{port}/api/characters?limit=5").as_str()
    );
}

#[tokio::test]
async fn mismatched_tls_config_is_a_config_error() {
    let out = std::process::Command::new(support::app::bin())
        .args(["check-config", "--config"])
        .arg({
            let dir = tempfile::tempdir().unwrap().keep();
            let p = dir.join("c.toml");
            std::fs::write(&p, "[tls]\ncert = \"/nonexistent.pem\"\n").unwrap();
            p
        })
        .env_remove("TAPROOM_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls"));
}

#[tokio::test]
async fn backup_cli_reaches_a_tls_server_by_its_configured_certificate() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (s, addr, _) = start_tls(&ca, dir.path(), "").await;
    wait_tls(&ca, &addr).await;
    let config = dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            dir.path().join("server.pem"),
            dir.path().join("server.key")
        ),
    )
    .unwrap();
    let out = dir.path().join("tls-backup.redb");
    let o = std::process::Command::new(support::app::bin())
        .args(["backup", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&s.data_dir)
        .arg("--out")
        .arg(&out)
        .arg("--url")
        .arg(format!("https://{addr}"))
        .env_remove("TAPROOM_CONFIG")
        .env("TAPROOM_JWT_SECRET", support::app::SECRET)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("running server"));
    assert!(out.exists());
}
