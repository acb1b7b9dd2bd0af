//! Starts the real `taproom` binary on an ephemeral port with its own data dir and JWT secret.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The HS256 secret every test server uses unless told otherwise.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// How to start a server.
#[derive(Default, Clone)]
pub struct Options {
    /// TOML written to a config file and passed with --config.
    pub config: Option<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Reuse a data dir (for restart tests).
    pub data_dir: Option<PathBuf>,
    /// Don't set TAPROOM_JWT_SECRET (to test the generated secret file).
    pub no_secret: bool,
    /// Don't wait for `/healthz` over plain HTTP (a TLS server answers only https).
    pub no_wait: bool,
}

/// A running `taproom serve`.
pub struct TestServer {
    child: Child,
    pub base: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    logs: Arc<Mutex<String>>,
    pub client: reqwest::Client,
}

/// Path of the built binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_taproom")
}

impl TestServer {
    /// Starts with defaults.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// Starts with options and waits until `/healthz` answers.
    pub async fn start_with(opts: Options) -> Self {
        let (tmp, data_dir) = match &opts.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .env_remove("TAPROOM_CONFIG")
            .env("TAPROOM_LOG", "info,taproom=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !opts.no_secret {
            cmd.env("TAPROOM_JWT_SECRET", SECRET);
        }
        if let Some(cfg) = &opts.config {
            let path = data_dir.with_extension("toml");
            std::fs::write(&path, cfg).expect("write config");
            cmd.arg("--config").arg(path);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn taproom");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .split("listen=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.to_string());
                    }
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start; logs:\n{}", logs.lock().unwrap());
            }
        };
        let server = Self {
            child,
            base: format!("http://{addr}"),
            data_dir,
            _tmp: tmp,
            logs,
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
        };
        if !opts.no_wait {
            server.wait_healthy().await;
        }
        server
    }

    async fn wait_healthy(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.client.get(self.url("/healthz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server never became healthy; logs:\n{}", self.logs());
    }

    /// Full URL for a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        self.child.wait().expect("wait")
    }

    /// Kills with SIGKILL.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GET with an optional bearer token.
    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut r = self.client.get(self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("send")
    }

    /// A CORS preflight for a POST with `authorization` and `content-type` from `origin`.
    pub async fn preflight(&self, path: &str, origin: &str) -> reqwest::Response {
        self.client
            .request(reqwest::Method::OPTIONS, self.url(path))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
            .await
            .expect("send")
    }

    /// POST JSON.
    pub async fn post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut r = self.client.post(self.url(path)).json(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("send")
    }

    /// PUT JSON.
    pub async fn put_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut r = self.client.put(self.url(path)).json(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("send")
    }

    /// DELETE.
    pub async fn delete(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut r = self.client.delete(self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("send")
    }

    /// Creates a character and returns its JSON.
    pub async fn create_character(&self, token: &str, body: Value) -> Value {
        let r = self.post_json("/api/characters", Some(token), &body).await;
        let status = r.status();
        let v: Value = r.json().await.expect("json");
        assert_eq!(status, 201, "create failed: {v}");
        v
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal by name with the `kill` command.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Claims for a test token.
pub fn claims(sub: &str, admin: bool, exp_offset_secs: i64) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut c = serde_json::json!({ "sub": sub, "exp": now + exp_offset_secs, "iat": now });
    if admin {
        c["role"] = "admin".into();
    }
    c
}

/// An HS256 token signed with `SECRET`.
pub fn token(sub: &str) -> String {
    sign_hs(&claims(sub, false, 3600), SECRET)
}

/// An admin token signed with `SECRET`.
pub fn admin_token(sub: &str) -> String {
    sign_hs(&claims(sub, true, 3600), SECRET)
}

/// Signs claims with HS256 and a secret.
pub fn sign_hs(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// Path of a test fixture.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Asserts the response is the spec's error envelope with `code` and `status`; returns it.
pub async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    let got_status = r.status().as_u16();
    let header_id = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = r.text().await.expect("body");
    assert_eq!(got_status, status, "unexpected status; body: {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    let e = &v["error"];
    assert_eq!(e["code"], code, "body: {text}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{text}"
    );
    assert!(e["timestamp"].as_str().is_some(), "{text}");
    let rid = e["requestId"].as_str().expect("requestId");
    assert!(!rid.is_empty());
    assert_eq!(
        Some(rid.to_string()),
        header_id,
        "requestId must match x-request-id"
    );
    v
}

/// Runs a `taproom` CLI command on `data_dir` with the test secret and no inherited config.
pub fn cli(args: &[&str], data_dir: &Path) -> Output {
    Command::new(bin())
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("TAPROOM_CONFIG")
        .env("TAPROOM_JWT_SECRET", SECRET)
        .env("TAPROOM_LOG", "warn")
        .output()
        .expect("run taproom")
}
