//! Operations: health and readiness, Prometheus metrics, per-user rate limits, and the CLI's
//! check-config, backup (with the server running and stopped), restore, export-all and import.

mod support;

use serde_json::{json, Value};
use std::process::Output;
use support::app::{
    admin_token, cli as taproom, expect_error, fixture, token, Options, TestServer, SECRET,
};

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn healthz_and_readyz_answer_when_serving() {
    let s = TestServer::start().await;
    let r = s.get("/healthz", None).await;
    assert_eq!(r.status(), 200);
    let r = s.get("/readyz", None).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ready");
}

#[tokio::test]
async fn readyz_is_503_when_every_upstream_circuit_is_open() {
    let dir = tempfile::tempdir().unwrap();
    // An upstream nobody listens on, whose breaker opens after one failure.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = format!(
        "[upstreams.main]\nurl = \"http://127.0.0.1:{port}/v1\"\n\
         [upstreams.main.retry]\nmax_attempts = 1\n\
         [upstreams.main.circuit_breaker]\nconsecutive_failures = 1\n"
    );
    let mut config = taproom::config::Config::from_toml(&toml).unwrap();
    config.data_dir = dir.path().to_path_buf();
    config.auth.jwt_secret = SECRET.into();
    let state = taproom::server::build_state(config).unwrap();
    state
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    let app = taproom::http::router(state.clone());
    let ready = |app: axum::Router| async move {
        let req = axum::http::Request::get("/readyz")
            .body(axum::body::Body::empty())
            .unwrap();
        let res = tower::ServiceExt::oneshot(app, req).await.unwrap();
        let status = res.status().as_u16();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice::<Value>(&body).unwrap())
    };
    assert_eq!(ready(app.clone()).await.0, 200);
    let upstream = state.upstreams.get(None).unwrap();
    let req = taproom::upstream::GenerateRequest {
        messages: vec![taproom::upstream::ChatMessage::new("user", "hi")],
        ..Default::default()
    };
    assert!(upstream.generate(&req).await.is_err());
    assert_eq!(state.upstreams.counters(), vec![("main".to_string(), 1, 0)]);
    let (status, body) = ready(app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "SERVICE_UNAVAILABLE");
    assert_eq!(body["error"]["details"]["openUpstreams"], json!(["main"]));
}

#[tokio::test]
async fn metrics_report_requests_by_route_and_status() {
    let s = TestServer::start().await;
    let t = token("alice");
    let c = s
        .create_character(&t, json!({"name": "Metra", "description": "d"}))
        .await;
    let id = c["id"].as_str().unwrap();
    for _ in 0..3 {
        assert_eq!(
            s.get(&format!("/api/characters/{id}"), Some(&t))
                .await
                .status(),
            200
        );
    }
    s.get("/api/characters", None).await;
    let r = s.get("/metrics", None).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let body = r.text().await.unwrap();
    for want in [
        r#"taproom_http_requests_total{method="GET",route="/api/characters/{id}",status="200"} 3"#,
        r#"taproom_http_requests_total{method="POST",route="/api/characters",status="201"} 1"#,
        r#"taproom_http_requests_total{method="GET",route="/api/characters",status="401"} 1"#,
        r#"taproom_http_request_duration_seconds_bucket{method="GET",route="/api/characters/{id}",status="200",le="+Inf"} 3"#,
        r#"taproom_upstream_breaker_state{state="closed",upstream="main"} 1"#,
        r#"taproom_upstream_attempts_total{upstream="main"} 0"#,
        "taproom_character_cache_hit_ratio",
        "taproom_active_sockets 1",
        "taproom_active_streams 0",
    ] {
        assert!(body.contains(want), "missing {want} in\n{body}");
    }
    let size: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("taproom_database_size_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("database size");
    assert!(size > 0);
    let hits: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("taproom_character_cache_hit_ratio "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(hits > 0.0, "reads after create come from the cache");
}

#[tokio::test]
async fn metrics_can_be_disabled() {
    let s = TestServer::start_with(Options {
        config: Some("[metrics]\nenabled = false\n".into()),
        ..Options::default()
    })
    .await;
    expect_error(s.get("/metrics", None).await, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn a_user_over_the_rate_limit_gets_429_with_retry_after() {
    let s = TestServer::start_with(Options {
        config: Some("[rate_limit]\nother_per_minute = 3\ninteract_per_minute = 1\n".into()),
        ..Options::default()
    })
    .await;
    let alice = token("alice");
    for _ in 0..3 {
        assert_eq!(s.get("/api/characters", Some(&alice)).await.status(), 200);
    }
    let r = s.get("/api/characters", Some(&alice)).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "retry-after {retry}");
    expect_error(r, 429, "RATE_LIMITED").await;
    // Another user has their own bucket; probes are never limited.
    assert_eq!(
        s.get("/api/characters", Some(&token("bob"))).await.status(),
        200
    );
    for _ in 0..5 {
        assert_eq!(s.get("/healthz", None).await.status(), 200);
    }
    // Generation routes draw from the other bucket (the route itself may not exist yet).
    let r = s
        .post_json("/v1/chat/completions", Some(&token("carol")), &json!({}))
        .await;
    assert_ne!(r.status(), 429);
    let r = s
        .post_json("/v1/chat/completions", Some(&token("carol")), &json!({}))
        .await;
    expect_error(r, 429, "RATE_LIMITED").await;
}

#[tokio::test]
async fn check_config_validates_and_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let ok = taproom(&["check-config"], dir.path());
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("config ok"), "{out}");
    assert!(!out.contains(SECRET), "the secret must not be printed");
    assert!(out.contains("<redacted>"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[rate_limit]\nper_minute = 3\n").unwrap();
    let o = taproom(
        &["check-config", "--config", bad.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("per_minute"));
}

#[tokio::test]
async fn backup_while_running_then_restore_after_stop() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(Options {
        data_dir: Some(data.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let t = token("alice");
    let kept = s
        .create_character(
            &t,
            json!({"name": "Kept", "description": "before the backup"}),
        )
        .await;

    // Non-admins may not take snapshots.
    let r = s
        .client
        .post(s.url("/api/admin/backup"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "FORBIDDEN").await;
    let r = s
        .client
        .post(s.url("/api/admin/backup"))
        .bearer_auth(admin_token("root"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let file = work.path().join("snap.redb");
    let o = taproom(
        &["backup", "--out", file.to_str().unwrap(), "--url", &s.base],
        data.path(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("running server"));
    let again = taproom(
        &["backup", "--out", file.to_str().unwrap(), "--url", &s.base],
        data.path(),
    );
    assert_eq!(again.status.code(), Some(1), "never overwrite a backup");

    let lost = s
        .create_character(
            &t,
            json!({"name": "Lost", "description": "after the backup"}),
        )
        .await;
    let busy = taproom(&["restore", file.to_str().unwrap()], data.path());
    assert_eq!(busy.status.code(), Some(1), "{}", text(&busy));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("stop the server"));

    assert!(s.terminate().success());
    let o = taproom(&["restore", file.to_str().unwrap()], data.path());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(data.path().join("taproom.redb.bak").exists());

    // Offline backups open the file directly.
    let offline = work.path().join("offline.redb");
    let o = taproom(&["backup", "--out", offline.to_str().unwrap()], data.path());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("rows copied"));

    let s = TestServer::start_with(Options {
        data_dir: Some(data.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let r = s
        .get(
            &format!("/api/characters/{}", kept["id"].as_str().unwrap()),
            Some(&t),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = s
        .get(
            &format!("/api/characters/{}", lost["id"].as_str().unwrap()),
            Some(&t),
        )
        .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn restore_refuses_a_file_that_is_not_a_backup() {
    let data = tempfile::tempdir().unwrap();
    let bogus = data.path().join("bogus.redb");
    std::fs::write(&bogus, b"hello").unwrap();
    let o = taproom(&["restore", bogus.to_str().unwrap()], data.path());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!data.path().join("taproom.redb").exists());
}

#[tokio::test]
async fn export_all_then_import_into_a_fresh_database() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(Options {
        data_dir: Some(data.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let t = token("alice");
    let c = s
        .create_character(
            &t,
            json!({"name": "Seraphina", "description": "guardian", "firstMes": "Hello"}),
        )
        .await;
    let id = c["id"].as_str().unwrap().to_string();
    let avatar = std::fs::read(fixture("user-default.png")).unwrap();
    let r = s
        .client
        .put(s.url(&format!("/api/characters/{id}/avatar")))
        .bearer_auth(&t)
        .header("content-type", "image/png")
        .body(avatar.clone())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let chat = std::fs::read(fixture("seraphina_chat.jsonl")).unwrap();
    let r = s
        .client
        .post(s.url(&format!("/api/characters/{id}/conversations/import")))
        .bearer_auth(&t)
        .body(chat)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    // Someone else's character is not part of alice's export.
    s.create_character(&token("bob"), json!({"name": "Bobs", "description": "x"}))
        .await;

    let busy = taproom(
        &[
            "export-all",
            "--user",
            "alice",
            out.path().to_str().unwrap(),
        ],
        data.path(),
    );
    assert_eq!(busy.status.code(), Some(1), "{}", text(&busy));
    assert!(s.terminate().success());

    let o = taproom(
        &[
            "export-all",
            "--user",
            "alice",
            out.path().to_str().unwrap(),
        ],
        data.path(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["user"], "alice");
    assert_eq!(manifest["characters"].as_array().unwrap().len(), 1);
    assert_eq!(manifest["chats"].as_array().unwrap().len(), 1);
    let chat_file = manifest["chats"][0]["file"].as_str().unwrap();
    let jsonl = std::fs::read_to_string(out.path().join(chat_file)).unwrap();
    assert!(jsonl.lines().count() > 1);

    let fresh = tempfile::tempdir().unwrap();
    let o = taproom(&["import", out.path().to_str().unwrap()], fresh.path());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s = TestServer::start_with(Options {
        data_dir: Some(fresh.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let r = s.get(&format!("/api/characters/{id}"), Some(&t)).await;
    assert_eq!(r.status(), 200);
    let r = s
        .get(&format!("/api/characters/{id}/avatar"), Some(&t))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), avatar);
    let v: Value = s
        .get(&format!("/api/characters/{id}/conversations"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["conversations"].as_array().map(Vec::len), Some(1), "{v}");
}
