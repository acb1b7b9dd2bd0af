//! The real OpenAI Python SDK (from PyPI, installed by this test into a venv under `target/`)
//! against the real server: models.list, chat completions with and without streaming, and the
//! SDK's error classes for 401, 404 and 503 (breaker open).

mod support;

use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use support::app::{token, Options, TestServer};
use support::fake_upstream::{FakeUpstream, Fault};

/// The OpenAI SDK version the checks were written against.
const OPENAI_SDK: &str = "openai==1.109.1";

/// Creates `target/pyenv` with the OpenAI SDK once; returns its python.
fn python_with_openai() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target").join("pyenv");
    let python = venv.join("bin").join("python");
    let ready = venv.join(format!(".installed-{OPENAI_SDK}"));
    if ready.exists() {
        return python;
    }
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 is needed for the OpenAI SDK test");
    assert!(status.success(), "python3 -m venv failed");
    let status = Command::new(venv.join("bin").join("pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            OPENAI_SDK,
        ])
        .status()
        .expect("pip");
    assert!(status.success(), "pip install {OPENAI_SDK} failed");
    std::fs::write(&ready, b"").expect("marker");
    python
}

#[tokio::test]
async fn the_openai_python_sdk_works_against_taproom() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let fake = FakeUpstream::start().await;
    let down = FakeUpstream::start().await;
    down.set_fault(Some(Fault::Status(503)));
    let config = |url: String| {
        format!("[upstreams.main]\nurl = \"{url}\"\n[upstreams.main.retry]\nmax_attempts = 1\n[upstreams.main.circuit_breaker]\nconsecutive_failures = 2\nrecovery_timeout_ms = 60000\n")
    };
    let s = TestServer::start_with(Options {
        config: Some(config(fake.openai_url())),
        ..Options::default()
    })
    .await;
    let broken = TestServer::start_with(Options {
        config: Some(config(down.openai_url())),
        ..Options::default()
    })
    .await;
    let t = token("sdk-user");
    s.create_character(&t, json!({"name": "Sdk Friend"})).await;
    broken.create_character(&t, json!({"name": "Broken"})).await;
    let down_base = format!("{}/v1", broken.base);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_sdk_check.py");
    let base = format!("{}/v1", s.base);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("TAPROOM_BASE", base)
            .env("TAPROOM_KEY", t)
            .env("TAPROOM_MODEL", "char-sdk-friend")
            .env("TAPROOM_DOWN_MODEL", "char-broken")
            .env("TAPROOM_DOWN_BASE", down_base)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
