//! The HTTP stack of the real binary: request ids, the envelope on router and layer errors,
//! CORS, compression, body limits, health, graceful shutdown and config errors.

mod support;

use serde_json::{json, Value};
use std::process::Command;
use support::app::{bin, expect_error, token, Options, TestServer};

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let s = TestServer::start().await;
    let r = s
        .client
        .get(s.url("/healthz"))
        .header("x-request-id", "client-id-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-id-42");
    let r = s.get("/healthz", None).await;
    assert!(!r.headers()["x-request-id"].is_empty());
    // Errors carry the same id in the envelope.
    let r = s
        .client
        .get(s.url("/api/characters"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    let v = expect_error(r, 401, "UNAUTHENTICATED").await;
    assert_eq!(v["error"]["requestId"], "abc-123");
}

#[tokio::test]
async fn unknown_route_and_wrong_method_get_the_envelope() {
    let s = TestServer::start().await;
    expect_error(s.get("/no/such/thing", None).await, 404, "NOT_FOUND").await;
    let r = s
        .client
        .patch(s.url("/api/characters"))
        .bearer_auth(token("a"))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("allow"));
    expect_error(r, 405, "METHOD_NOT_ALLOWED").await;
}

#[tokio::test]
async fn oversized_body_is_413_and_stores_nothing() {
    let s = TestServer::start_with(Options {
        config: Some("[http]\nbody_limit_bytes = 2048\n".into()),
        ..Options::default()
    })
    .await;
    let t = token("alice");
    let big = json!({"name": "Big", "description": "x".repeat(4096)});
    let r = s.post_json("/api/characters", Some(&t), &big).await;
    // The unread body makes the connection unusable; the client must be told not to reuse it.
    assert_eq!(r.headers()["connection"], "close");
    expect_error(r, 413, "PAYLOAD_TOO_LARGE").await;
    // Chunked (no content-length) bodies are limited as well.
    let body =
        reqwest::Body::wrap_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
            serde_json::to_vec(&big).unwrap(),
        )]));
    let r = s
        .client
        .post(s.url("/api/characters"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "PAYLOAD_TOO_LARGE").await;
    let v: Value = s
        .get("/api/characters", Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"], 0);
}

#[tokio::test]
async fn cors_preflight_is_204_with_explicit_headers() {
    let s = TestServer::start_with(Options {
        config: Some("[http]\ncors_origins = [\"http://tauri.localhost\"]\n".into()),
        ..Options::default()
    })
    .await;
    let r = s
        .preflight("/api/characters", "http://tauri.localhost")
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://tauri.localhost"
    );
    let allow = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap();
    for h in [
        "authorization",
        "content-type",
        "accept",
        "x-requested-with",
    ] {
        assert!(allow.contains(h), "{allow}");
    }
    // A foreign origin gets no allow-origin.
    let r = s.preflight("/api/characters", "http://evil.example").await;
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn json_responses_are_compressed_when_asked() {
    let s = TestServer::start().await;
    let t = token("alice");
    for i in 0..20 {
        s.create_character(
            &t,
            json!({"name": format!("C{i}"), "description": "words ".repeat(50)}),
        )
        .await;
    }
    for enc in ["gzip", "br"] {
        let r = s
            .client
            .get(s.url("/api/characters"))
            .bearer_auth(&t)
            .header("accept-encoding", enc)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-encoding"], enc);
    }
    // Small bodies are not worth it: they go out as they are.
    let r = s
        .client
        .get(s.url("/healthz"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
}

#[tokio::test]
async fn graceful_shutdown_exits_zero() {
    let s = TestServer::start().await;
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn startup_logs_listen_address_and_data_dir() {
    let s = TestServer::start().await;
    let logs = s.logs();
    assert!(logs.contains("listen=127.0.0.1:"), "{logs}");
    assert!(
        logs.contains(&format!("data_dir={}", s.data_dir.display())),
        "{logs}"
    );
}

#[test]
fn bad_config_exits_with_code_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[http]\nbody_limt = 5\n", "body_limt"),
        (
            "[limits]\nmax_characters_per_user = \"lots\"\n",
            "max_characters_per_user",
        ),
        ("[auth]\nalgorithm = \"RS256\"\n", "auth.public_key_file"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key} not in {err}");
    }
    let out = Command::new(bin())
        .args(["serve", "--config", "/nonexistent/taproom.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/taproom.toml"));
    let out = Command::new(bin())
        .args(["serve"])
        .env("TAPROOM_LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TAPROOM_LISTEN"));
}

#[tokio::test]
async fn token_command_and_generated_secret_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(Options {
        data_dir: Some(dir.path().to_path_buf()),
        no_secret: true,
        ..Options::default()
    })
    .await;
    let secret = dir.path().join("jwt.secret");
    assert!(secret.exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = Command::new(bin())
        .args([
            "token",
            "--sub",
            "carol",
            "--admin",
            "--ttl",
            "1h",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("TAPROOM_JWT_SECRET")
        .output()
        .unwrap();
    assert!(out.status.success());
    let jwt = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let r = s.get("/api/characters", Some(&jwt)).await;
    assert_eq!(r.status(), 200);
    // The token from another data dir's secret is refused.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["token", "--sub", "carol", "--data-dir"])
        .arg(other.path())
        .env_remove("TAPROOM_JWT_SECRET")
        .output()
        .unwrap();
    let foreign = String::from_utf8(out.stdout).unwrap().trim().to_string();
    expect_error(
        s.get("/api/characters", Some(&foreign)).await,
        401,
        "UNAUTHENTICATED",
    )
    .await;
}
