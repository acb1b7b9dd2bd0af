//! Streaming over the spec's WebSocket protocol and SSE: chunk order, done events, the three
//! ways to authenticate, concurrent generations on one socket, cancel and disconnect reaching
//! the upstream promptly, heartbeat timeouts and upstream stream cuts.

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use support::app::{token, Options, TestServer};
use support::fake_upstream::FakeUpstream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start(fake: &FakeUpstream, extra: &str) -> TestServer {
    TestServer::start_with(Options {
        config: Some(format!(
            "{extra}\n[upstreams.main]\nurl = \"{}\"\n",
            fake.openai_url()
        )),
        ..Options::default()
    })
    .await
}

fn ws_url(s: &TestServer, query: &str) -> String {
    format!("{}/ws{query}", s.base.replace("http://", "ws://"))
}

async fn connect(s: &TestServer, tok: Option<&str>, query: &str) -> Ws {
    let mut req = ws_url(s, query).into_client_request().unwrap();
    if let Some(t) = tok {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next JSON envelope, skipping heartbeats and the ready notice.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("socket open")
            .expect("frame");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "heartbeat" || v["payload"]["event"] == "ready" {
                continue;
            }
            return v;
        }
    }
}

fn generate(id: &str, char_id: &str, message: &str) -> Value {
    json!({"type": "generate", "id": id, "timestamp": "2026-11-26T00:00:00Z",
           "payload": {"characterId": char_id, "message": message}})
}

/// Collects one generation's deltas until its final frame.
async fn collect(ws: &mut Ws, id: &str) -> (String, Value) {
    let mut text = String::new();
    loop {
        let v = next(ws).await;
        assert_eq!(v["id"], id, "{v}");
        assert!(v["timestamp"].is_string());
        if v["type"] == "stream" && v["payload"]["done"] == true {
            return (text, v);
        }
        if v["type"] == "control" {
            return (text, v);
        }
        text.push_str(v["payload"]["delta"].as_str().unwrap());
    }
}

#[tokio::test]
async fn websocket_generate_streams_deltas_then_done() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(6);
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Sock"})).await;
    let id = c["id"].as_str().unwrap();
    let mut ws = connect(&s, Some(&t), "").await;
    send(&mut ws, generate("g1", id, "over the wire")).await;
    let (text, done) = collect(&mut ws, "g1").await;
    assert_eq!(text, "echo: over the wire");
    assert_eq!(done["payload"]["response"]["response"]["content"], text);
    let cid = done["payload"]["response"]["conversationId"]
        .as_str()
        .unwrap()
        .to_string();
    // Continue the same conversation over the socket.
    send(
        &mut ws,
        json!({"type": "generate", "id": "g2", "payload": {"characterId": id, "message": "more", "conversationId": cid}}),
    )
    .await;
    let (text, _) = collect(&mut ws, "g2").await;
    assert_eq!(text, "echo: more");
    let conv: Value = s
        .get(&format!("/api/conversations/{cid}"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(conv["messageCount"], 4);
    // Heartbeats are answered with the same id.
    send(&mut ws, json!({"type": "heartbeat", "id": "hb1"})).await;
    let hb = loop {
        let msg = ws.next().await.unwrap().unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == "hb1" {
                break v;
            }
        }
    };
    assert_eq!(hb["type"], "heartbeat");
    // Bad input gets an error frame, and the socket stays usable.
    send(
        &mut ws,
        json!({"type": "generate", "id": "bad", "payload": {"message": "no character"}}),
    )
    .await;
    let v = next(&mut ws).await;
    assert_eq!(v["type"], "control");
    assert_eq!(v["payload"]["event"], "error");
    assert_eq!(v["payload"]["error"]["code"], "VALIDATION_ERROR");
    send(&mut ws, json!({"type": "bogus"})).await;
    let v = next(&mut ws).await;
    assert_eq!(v["payload"]["error"]["code"], "VALIDATION_ERROR");
}

#[tokio::test]
async fn websocket_auth_by_header_query_or_first_message() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "[websocket]\nauth_timeout_ms = 300\n").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Auth"})).await;
    let id = c["id"].as_str().unwrap();

    let mut ws = connect(&s, None, &format!("?token={t}")).await;
    send(&mut ws, generate("q", id, "query token")).await;
    assert_eq!(collect(&mut ws, "q").await.0, "echo: query token");

    let mut ws = connect(&s, None, "").await;
    send(
        &mut ws,
        json!({"type": "control", "payload": {"action": "auth", "token": t}}),
    )
    .await;
    send(&mut ws, generate("m", id, "message token")).await;
    assert_eq!(collect(&mut ws, "m").await.0, "echo: message token");

    // No auth message in time: closed with a clear reason.
    let mut ws = connect(&s, None, "").await;
    let close = wait_close(&mut ws).await;
    assert_eq!(close.0, 4401);
    assert!(close.1.contains("unauthenticated"), "{}", close.1);
    // A bad token: closed too.
    let mut ws = connect(&s, Some("not-a-jwt"), "").await;
    let close = wait_close(&mut ws).await;
    assert_eq!(close.0, 4401);
    assert!(close.1.contains("malformed"), "{}", close.1);
    // Another user's private character is refused over the socket as over HTTP.
    let mut ws = connect(&s, Some(&token("bob")), "").await;
    send(&mut ws, generate("x", id, "let me in")).await;
    let v = next(&mut ws).await;
    assert_eq!(v["payload"]["error"]["code"], "CHARACTER_ACCESS_DENIED");
}

async fn wait_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn concurrent_generations_on_one_socket_are_told_apart_by_id() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(8);
    fake.set_drip(5);
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Multi"})).await;
    let id = c["id"].as_str().unwrap();
    let mut ws = connect(&s, Some(&t), "").await;
    for n in 0..3 {
        send(
            &mut ws,
            generate(&format!("g{n}"), id, &format!("message number {n}")),
        )
        .await;
    }
    let mut texts: std::collections::HashMap<String, String> = Default::default();
    let mut done = 0;
    while done < 3 {
        let v = next(&mut ws).await;
        let gid = v["id"].as_str().unwrap().to_string();
        if v["payload"]["done"] == true {
            assert_eq!(v["payload"]["response"]["response"]["content"], texts[&gid]);
            done += 1;
        } else {
            texts
                .entry(gid)
                .or_default()
                .push_str(v["payload"]["delta"].as_str().unwrap());
        }
    }
    for n in 0..3 {
        assert_eq!(texts[&format!("g{n}")], format!("echo: message number {n}"));
    }
}

#[tokio::test]
async fn websocket_cancel_stops_the_upstream_and_stores_the_partial_reply() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(40);
    fake.set_drip(50);
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Cancel"})).await;
    let id = c["id"].as_str().unwrap();
    let mut ws = connect(&s, Some(&t), "").await;
    send(&mut ws, generate("long", id, "a very long answer please")).await;
    let first = next(&mut ws).await;
    assert!(first["payload"]["delta"].is_string());
    let mut partial = first["payload"]["delta"].as_str().unwrap().to_string();
    let cancelled_at = Instant::now();
    send(
        &mut ws,
        json!({"type": "control", "id": "long", "payload": {"action": "cancel"}}),
    )
    .await;
    let last = loop {
        let v = next(&mut ws).await;
        if v["payload"]["done"] == true {
            break v;
        }
        partial.push_str(v["payload"]["delta"].as_str().unwrap_or(""));
    };
    assert_eq!(last["payload"]["cancelled"], true);
    let stored = &last["payload"]["response"]["response"];
    assert_eq!(stored["metadata"]["finishReason"], "cancelled");
    assert_eq!(stored["content"], partial);
    let closed = wait_upstream_closed(&fake).await;
    assert!(
        closed.saturating_duration_since(cancelled_at) < Duration::from_millis(100),
        "upstream closed {:?} after cancel",
        closed.saturating_duration_since(cancelled_at)
    );
}

async fn wait_upstream_closed(fake: &FakeUpstream) -> Instant {
    for _ in 0..100 {
        if let Some(at) = fake.requests().last().and_then(|r| r.closed_early_at) {
            return at;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the upstream never saw its connection closed");
}

#[tokio::test]
async fn sse_client_disconnect_reaches_the_upstream_within_100ms() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(40);
    fake.set_drip(50);
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Gone"})).await;
    let id = c["id"].as_str().unwrap();
    let mut r = s
        .client
        .post(s.url(&format!("/api/characters/{id}/interact")))
        .bearer_auth(&t)
        .header("accept", "text/event-stream")
        .json(&json!({"message": "talk for a while"}))
        .send()
        .await
        .unwrap();
    let mut got = String::new();
    while !got.contains("event: chunk") {
        let chunk = r.chunk().await.unwrap().unwrap();
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    let dropped_at = Instant::now();
    drop(r);
    let closed = wait_upstream_closed(&fake).await;
    assert!(
        closed.saturating_duration_since(dropped_at) < Duration::from_millis(100),
        "upstream closed {:?} after the client left",
        closed.saturating_duration_since(dropped_at)
    );
    // The partial reply is stored as cancelled.
    let mut last = Value::Null;
    for _ in 0..50 {
        let list: Value = s
            .get(&format!("/api/characters/{id}/conversations"), Some(&t))
            .await
            .json()
            .await
            .unwrap();
        let cid = list["conversations"][0]["id"].as_str().unwrap().to_string();
        let conv: Value = s
            .get(&format!("/api/conversations/{cid}"), Some(&t))
            .await
            .json()
            .await
            .unwrap();
        last = conv["messages"].as_array().unwrap().last().unwrap().clone();
        if last["role"] == "character" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last["metadata"]["finishReason"], "cancelled", "{last}");
    let partial = last["content"].as_str().unwrap();
    assert!(
        !partial.is_empty() && "echo: talk for a while".starts_with(partial),
        "{partial}"
    );
}

#[tokio::test]
async fn silent_clients_are_dropped_after_missed_heartbeats() {
    let fake = FakeUpstream::start().await;
    let s = start(
        &fake,
        "[websocket]\nheartbeat_interval_ms = 100\nmissed_heartbeats = 2\n",
    )
    .await;
    let t = token("ann");
    // A client that answers stays connected well past the timeout.
    let mut alive = connect(&s, Some(&t), "").await;
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until {
        send(&mut alive, json!({"type": "heartbeat"})).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(1), alive.next()).await
        {}
    }
    send(&mut alive, json!({"type": "heartbeat", "id": "still"})).await;
    let reply = loop {
        if let Message::Text(t) = alive.next().await.unwrap().unwrap() {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == "still" {
                break v;
            }
        }
    };
    assert_eq!(reply["type"], "heartbeat");
    // A silent one is closed with a heartbeat timeout.
    let mut silent = connect(&s, Some(&t), "").await;
    let started = Instant::now();
    let (code, reason) = wait_close(&mut silent).await;
    assert_eq!(code, 4408);
    assert!(reason.contains("heartbeat"));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn websocket_upstream_cut_sends_an_error_frame() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(6);
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Cut"})).await;
    let id = c["id"].as_str().unwrap();
    let mut ws = connect(&s, Some(&t), "").await;
    send(&mut ws, generate("c", id, "[[fault:cut:3]] long story")).await;
    let (partial, last) = collect(&mut ws, "c").await;
    assert!(!partial.is_empty());
    assert_eq!(last["type"], "control");
    assert_eq!(last["payload"]["event"], "error");
    assert_eq!(last["payload"]["error"]["code"], "ST_GENERATION_FAILED");
}
