//! Plugins end to end through interact: the dice roller answers `/roll` without the upstream,
//! the mood tracker's line reaches the upstream prompt and its state persists, the content guard
//! vetoes replies, bindings are validated and private to the owner, and a fail-closed plugin
//! failure answers PLUGIN_FAILED.

#[path = "support/plugins.rs"]
mod plugins_support;
mod support;

use plugins_support::{PluginsDir, AFTER, BEFORE};
use serde_json::{json, Value};
use support::app::{admin_token, expect_error, token, Options, TestServer};
use support::fake_upstream::FakeUpstream;

const GUARD_SCHEMA: &str = r#"
[config-schema]
type = "object"
required = ["rules"]
properties.rules = { type = "array", items = { type = "object", required = ["match"] } }
"#;

async fn start(fake: &FakeUpstream, dir: &PluginsDir) -> TestServer {
    TestServer::start_with(Options {
        config: Some(format!(
            "[upstreams.main]\nurl = \"{}\"\n",
            fake.openai_url()
        )),
        env: vec![(
            "TAPROOM_PLUGINS_DIR".into(),
            dir.path().to_string_lossy().to_string(),
        )],
        ..Options::default()
    })
    .await
}

async fn turn(s: &TestServer, t: &str, id: &str, body: Value) -> (u16, Value) {
    let r = s
        .post_json(&format!("/api/characters/{id}/interact"), Some(t), &body)
        .await;
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn example_plugins_work_through_interact() {
    let dir = PluginsDir::new();
    dir.add("dice", "taproom_plugin_dice", BEFORE, "fail-open", "");
    dir.add("mood", "taproom_plugin_mood", BEFORE, "fail-open", "");
    dir.add(
        "guard",
        "taproom_plugin_guard",
        AFTER,
        "fail-closed",
        GUARD_SCHEMA,
    );
    let fake = FakeUpstream::start().await;
    let s = start(&fake, &dir).await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Gamemaster"})).await;
    let id = c["id"].as_str().unwrap();
    let bindings = json!([
        {"name": "dice", "config": {}, "enabled": true},
        {"name": "mood", "config": {"step": 10, "depth": 1}, "enabled": true},
        {"name": "guard", "config": {"rules": [{"match": "forbidden", "action": "veto", "reason": "spoilers"}]}, "enabled": true}
    ]);
    let r = s
        .put_json(
            &format!("/api/characters/{id}/plugins"),
            Some(&t),
            &bindings,
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let got: Value = s
        .get(&format!("/api/characters/{id}/plugins"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got.as_array().unwrap().len(), 3);

    // /roll is answered by the dice plugin; the upstream is never called.
    let (status, v) = turn(&s, &t, id, json!({"message": "/roll 2d6"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(fake.request_count(), 0);
    assert_eq!(v["plugins"]["shortCircuit"], "dice");
    assert!(
        v["response"]["content"].as_str().unwrap().contains("2d6"),
        "{v}"
    );
    let cid = v["conversationId"].as_str().unwrap().to_string();

    // A normal message: the mood tracker's line reaches the upstream prompt.
    let (status, v) = turn(
        &s,
        &t,
        id,
        json!({"message": "Thank you, you are so kind!", "conversationId": cid}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let sent = fake.last_body().unwrap().to_string();
    assert!(sent.contains("affection"), "{sent}");
    // The mood change it remembered is stored as a plugin memory of Ann's.
    let mut found = false;
    for _ in 0..100 {
        let m: Value = s
            .get(&format!("/api/characters/{id}/memory"), Some(&t))
            .await
            .json()
            .await
            .unwrap();
        if m["memory"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["source"] == "plugin")
        {
            found = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(found, "plugin memory stored");

    // A new conversation has no mood state yet: the plugin recalls the remembered mood through
    // the host's `recall` import (Taproom's memory service) instead of starting neutral.
    let (status, v) = turn(&s, &t, id, json!({"message": "Hello again."})).await;
    assert_eq!(status, 200, "{v}");
    assert_ne!(v["conversationId"].as_str().unwrap(), cid);
    let sent = fake.last_body().unwrap().to_string();
    assert!(sent.contains("friendly (affection 30/100)"), "{sent}");

    // The guard vetoes a reply that mentions the forbidden word; what is stored is what the
    // client is told.
    let (status, v) = turn(
        &s,
        &t,
        id,
        json!({"message": "say forbidden things", "conversationId": cid}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["plugins"]["vetoed"]["reason"], "spoilers");
    assert_eq!(v["response"]["content"], "[reply withheld: spoilers]");
    let conv: Value = s
        .get(&format!("/api/conversations/{cid}"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    let last = conv["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["content"], "[reply withheld: spoilers]");

    // Streaming: the done event carries the final (vetoed) reply.
    let r = s
        .client
        .post(s.url(&format!("/api/characters/{id}/interact")))
        .bearer_auth(&t)
        .header("accept", "text/event-stream")
        .json(&json!({"message": "more forbidden talk", "conversationId": cid}))
        .send()
        .await
        .unwrap();
    let events = support::sse::parse(&r.text().await.unwrap());
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "done");
    let done: Value = serde_json::from_str(data).unwrap();
    assert_eq!(done["response"]["content"], "[reply withheld: spoilers]");
    assert_eq!(done["plugins"]["vetoed"]["reason"], "spoilers");

    // Admin stats count the calls.
    let stats: Value = s
        .get("/api/admin/plugins", Some(&admin_token("root")))
        .await
        .json()
        .await
        .unwrap();
    let dice = stats["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "dice")
        .unwrap()
        .clone();
    assert!(dice["calls"].as_u64().unwrap() >= 3, "{stats}");
    expect_error(
        s.get("/api/admin/plugins", Some(&t)).await,
        403,
        "FORBIDDEN",
    )
    .await;
}

#[tokio::test]
async fn bindings_are_validated_and_private_to_the_owner() {
    let dir = PluginsDir::new();
    dir.add(
        "guard",
        "taproom_plugin_guard",
        AFTER,
        "fail-closed",
        GUARD_SCHEMA,
    );
    let fake = FakeUpstream::start().await;
    let s = start(&fake, &dir).await;
    let t = token("ann");
    let c = s
        .create_character(&t, json!({"name": "Guarded", "isPublic": true}))
        .await;
    let id = c["id"].as_str().unwrap();
    let path = format!("/api/characters/{id}/plugins");
    let v = expect_error(
        s.put_json(&path, Some(&t), &json!([{"name": "nope", "config": {}}]))
            .await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_eq!(v["error"]["details"]["field"], "[0].name");
    let v = expect_error(
        s.put_json(
            &path,
            Some(&t),
            &json!([{"name": "guard", "config": {"rules": "x"}}]),
        )
        .await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_eq!(v["error"]["details"]["field"], "[0].config");
    // Another user can chat with the public character but not read or change its plugins.
    let bob = token("bob");
    expect_error(
        s.get(&path, Some(&bob)).await,
        403,
        "CHARACTER_ACCESS_DENIED",
    )
    .await;
    expect_error(
        s.put_json(&path, Some(&bob), &json!([])).await,
        403,
        "CHARACTER_ACCESS_DENIED",
    )
    .await;
}

#[tokio::test]
async fn a_fail_closed_plugin_failure_is_plugin_failed() {
    let dir = PluginsDir::new();
    dir.add("trap", "taproom_hostile_trap", BEFORE, "fail-closed", "");
    dir.add("spin", "taproom_hostile_spin", BEFORE, "fail-open", "");
    let fake = FakeUpstream::start().await;
    let s = start(&fake, &dir).await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Fragile"})).await;
    let id = c["id"].as_str().unwrap();
    let path = format!("/api/characters/{id}/plugins");
    // A fail-open plugin that loops forever is skipped and noted; the turn still succeeds.
    s.put_json(&path, Some(&t), &json!([{"name": "spin", "config": {}}]))
        .await;
    let (status, v) = turn(&s, &t, id, json!({"message": "hello"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["plugins"]["skipped"][0]["plugin"], "spin");
    assert_eq!(v["response"]["content"], "echo: hello");
    // A fail-closed plugin that traps ends the turn with PLUGIN_FAILED; the server goes on.
    s.put_json(&path, Some(&t), &json!([{"name": "trap", "config": {}}]))
        .await;
    let r = s
        .post_json(
            &format!("/api/characters/{id}/interact"),
            Some(&t),
            &json!({"message": "hello again"}),
        )
        .await;
    let v = expect_error(r, 502, "PLUGIN_FAILED").await;
    assert_eq!(v["error"]["details"]["plugin"], "trap");
    assert_eq!(s.get("/healthz", None).await.status(), 200);
}
