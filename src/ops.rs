//! The operations commands behind the CLI: `check-config`, `backup`, `restore`, `export-all`
//! and `import`. Each returns the process exit code: 0 success, 1 the operation failed, 2 bad
//! configuration.
//!
//! redb allows one process per file, so commands that read the database open it directly only
//! when no server holds it; `backup` then asks the running server for the snapshot instead.

use crate::auth::Authenticator;
use crate::characters::CharacterService;
use crate::config::Config;
use crate::conversations::ConversationService;
use crate::store::{check_backup, snapshot_file, Store, StoreError};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("taproom: {message}");
    ExitCode::FAILURE
}

/// Whether a store error means another process (a running server) holds the file.
fn held_by_server(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(redb::Error::DatabaseAlreadyOpen))
}

/// `taproom check-config`: the config is already loaded and validated; also builds everything
/// `serve` would (upstream clients, TLS files, auth keys) without opening the database, then
/// prints the effective config with secrets masked.
pub fn check_config(config: &Config) -> ExitCode {
    if let Err(e) = crate::upstream::Upstreams::new(&config.upstreams) {
        eprintln!("taproom: config error: upstreams: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = crate::tls::Tls::from_config(&config.tls) {
        eprintln!("taproom: config error: {e}");
        return ExitCode::from(2);
    }
    // With no secret configured, `serve` generates one in the data dir; checking must not.
    if !(config.auth.algorithm.starts_with("HS") && config.auth.jwt_secret.is_empty()) {
        if let Err(e) = Authenticator::from_config(&config.auth, &config.data_dir) {
            return crate::cli::config_error(e);
        }
    }
    let mut shown = config.clone();
    if !shown.auth.jwt_secret.is_empty() {
        shown.auth.jwt_secret = "<redacted>".into();
    }
    // Upstream API keys print as <redacted> through their own Debug.
    println!("{shown:#?}");
    println!("config ok");
    ExitCode::SUCCESS
}

/// `taproom backup --out FILE`.
pub fn backup(config: &Config, out: &Path, url: Option<&str>) -> ExitCode {
    if out.exists() {
        return fail(format!(
            "{} already exists; choose a new backup file",
            out.display()
        ));
    }
    let db = config.db_path();
    if !db.exists() {
        return fail(format!("no database at {}; check --data-dir", db.display()));
    }
    let part = partial_path(out);
    let _ = std::fs::remove_file(&part);
    let how = match snapshot_file(&db, &config.store, &part) {
        Ok(rows) => format!("{rows} rows copied from {}", db.display()),
        Err(e) if held_by_server(&e) => {
            let _ = std::fs::remove_file(&part);
            match backup_over_http(config, &part, url) {
                Ok(base) => format!("snapshot taken by the running server at {base}"),
                Err(e) => {
                    let _ = std::fs::remove_file(&part);
                    return fail(format!("backup through the running server failed: {e}"));
                }
            }
        }
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return fail(format!("backup failed: {e}"));
        }
    };
    if let Err(e) = check_backup(&part) {
        let _ = std::fs::remove_file(&part);
        return fail(format!("the snapshot does not open cleanly: {e}"));
    }
    if let Err(e) = std::fs::rename(&part, out) {
        return fail(format!(
            "cannot move the snapshot to {}: {e}",
            out.display()
        ));
    }
    println!("backup written to {} ({how})", out.display());
    ExitCode::SUCCESS
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// The running server's base URL: `listen` (wildcard addresses become loopback) and the
/// scheme `[tls]` implies.
fn local_url(config: &Config) -> String {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let scheme = if config.tls.enabled() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{addr}")
}

fn backup_over_http(config: &Config, dest: &Path, url: Option<&str>) -> Result<String, String> {
    let base = url
        .map(|u| u.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| local_url(config));
    let auth = Authenticator::from_config(&config.auth, &config.data_dir)
        .map_err(|e| format!("cannot mint an admin token: {e}"))?;
    let token = auth
        .mint("taproom-backup", true, Duration::from_secs(300))
        .map_err(|e| format!("cannot mint an admin token: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = http_client(config)?;
        let req = http::Request::post(format!("{base}/api/admin/backup"))
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let res = client
            .request(req)
            .await
            .map_err(|e| format!("{base}: {}", error_chain(&e)))?;
        let status = res.status();
        let mut body = res.into_body();
        if !status.is_success() {
            let text = body
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(format!("{base} answered {status}: {text}"));
        }
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| format!("{}: {e}", dest.display()))?;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| error_chain(&e))?;
            if let Ok(data) = frame.into_data() {
                file.write_all(&data)
                    .await
                    .map_err(|e| format!("{}: {e}", dest.display()))?;
            }
        }
        file.sync_all()
            .await
            .map_err(|e| format!("{}: {e}", dest.display()))?;
        Ok(base)
    })
}

type OpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<bytes::Bytes>,
>;

/// A client for the local server. It accepts the exact certificate the server is configured
/// to present (read from `tls.cert`), so a self-signed or private-CA deployment reached as
/// `https://127.0.0.1` can be backed up from the same machine; any other certificate must chain
/// to the system roots and match the host name as usual.
fn http_client(config: &Config) -> Result<OpsClient, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let fallback = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .ok();
    let pinned: Vec<Vec<u8>> = match &config.tls.cert {
        Some(cert) => CertificateDer::pem_file_iter(cert)
            .map(|it| it.filter_map(Result::ok).map(|c| c.to_vec()).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let verifier = PinnedOrWebPki {
        pinned,
        fallback,
        provider: provider.clone(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// Accepts the server's configured certificate byte for byte, otherwise verifies normally.
/// Handshake signatures are always checked, so only the holder of the key gets through.
#[derive(Debug)]
struct PinnedOrWebPki {
    pinned: Vec<Vec<u8>>,
    fallback: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedOrWebPki {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|p| p.as_slice() == end_entity.as_ref())
        {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        match &self.fallback {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `taproom restore FILE`: validates the backup, then atomically swaps it in, keeping the
/// current file as `taproom.redb.bak`.
pub fn restore(config: &Config, file: &Path) -> ExitCode {
    let version = match check_backup(file) {
        Ok(v) => v,
        Err(e) => return fail(format!("{} is not a usable backup: {e}", file.display())),
    };
    let db = config.db_path();
    if db.exists() {
        // Opening takes redb's file lock: failing with "already open" means a server runs.
        match redb::Database::open(&db) {
            Ok(handle) => drop(handle),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return fail("the database is in use; stop the server before restoring")
            }
            // A damaged current file is exactly what a restore replaces.
            Err(e) => tracing::warn!(error = %e, "current database does not open; replacing it"),
        }
    }
    if let Err(e) = std::fs::create_dir_all(&config.data_dir) {
        return fail(format!("{}: {e}", config.data_dir.display()));
    }
    let staged = config.data_dir.join("taproom.redb.restore");
    let result = (|| -> std::io::Result<()> {
        std::fs::copy(file, &staged)?;
        std::fs::File::open(&staged)?.sync_all()?;
        if db.exists() {
            let bak = config.data_dir.join("taproom.redb.bak");
            let _ = std::fs::remove_file(&bak);
            std::fs::rename(&db, &bak)?;
        }
        // rename() replaces atomically: there is never a half-written taproom.redb.
        std::fs::rename(&staged, &db)?;
        std::fs::File::open(&config.data_dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&staged);
        return fail(format!("restore failed: {e}"));
    }
    println!(
        "restored {} (schema {version}) into {}; the previous file is taproom.redb.bak",
        file.display(),
        db.display()
    );
    ExitCode::SUCCESS
}

/// Opens the store and services for the offline commands.
fn open_services(config: Config) -> Result<(Store, ConversationService), String> {
    let db = config.db_path();
    let store = match Store::open(&db, &config.store) {
        Ok(s) => s,
        Err(e) if held_by_server(&e) => {
            return Err("the database is in use; stop the server first".into())
        }
        Err(e) => return Err(format!("cannot open {}: {e}", db.display())),
    };
    let characters = CharacterService::new(
        store.clone(),
        config.limits.clone(),
        config.store.cache_capacity,
    );
    let conversations = ConversationService::new(store.clone(), characters);
    Ok((store, conversations))
}

/// `taproom export-all --user SUB DIR`.
pub fn export_all(config: Config, user: &str, dir: &Path) -> ExitCode {
    let (store, conversations) = match open_services(config) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match crate::transfer::export_user(&store, &conversations, user, dir) {
        Ok(m) => {
            println!(
                "exported {} characters and {} chats of {user} to {}",
                m.characters.len(),
                m.chats.len(),
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("export failed: {e}")),
    }
}

/// `taproom import DIR`.
pub fn import(config: Config, dir: &Path) -> ExitCode {
    let (store, conversations) = match open_services(config) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    match runtime.block_on(crate::transfer::import_dir(&store, &conversations, dir)) {
        Ok(r) => {
            println!(
                "imported {} characters ({} already present) and {} chats from {}",
                r.characters,
                r.skipped,
                r.chats,
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("import failed: {e}")),
    }
}

/// Card files under `paths` (files as given; directories: their .png, .json and .charx files).
fn card_paths(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|f| {
                            f.is_file()
                                && matches!(
                                    f.extension()
                                        .and_then(|e| e.to_str())
                                        .map(str::to_lowercase)
                                        .as_deref(),
                                    Some("png" | "json" | "charx")
                                )
                        })
                        .collect()
                })
                .unwrap_or_default();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// `taproom import --user SUB PATH...`: imports card files offline, each on its own.
pub fn import_cards(config: Config, user: &str, paths: &[PathBuf]) -> ExitCode {
    let (_store, conversations) = match open_services(config) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let owner = crate::auth::User {
        id: user.to_string(),
        admin: false,
        name: None,
    };
    let (mut ok, mut failed) = (0usize, 0usize);
    for path in card_paths(paths) {
        let result = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                crate::cards::import_card(&bytes, &crate::cards::CardLimits::default())
                    .map_err(|e| e.to_string())
            })
            .and_then(|card| {
                runtime
                    .block_on(conversations.characters().create_from_card(&owner, card))
                    .map_err(|e| e.message)
            });
        match result {
            Ok(c) => {
                ok += 1;
                println!("imported {} as {} ({})", path.display(), c.name, c.id);
            }
            Err(e) => {
                failed += 1;
                eprintln!("taproom: {}: {e}", path.display());
            }
        }
    }
    println!("{ok} imported, {failed} failed");
    if failed == 0 && ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
