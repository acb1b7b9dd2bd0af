//! Talking to characters through the real server and the fake upstream: the exact prompt sent,
//! multi-turn history, greetings, regenerate and swipes, idempotency, isolation, upstream
//! failures, dry runs, SSE streaming, SillyTavern upstreams and chat JSONL.

mod support;

use serde_json::{json, Value};
use support::app::{expect_error, fixture, token, Options, TestServer};
use support::fake_upstream::FakeUpstream;

async fn start(fake: &FakeUpstream, extra_config: &str) -> TestServer {
    let config = format!(
        "{extra_config}\n[upstreams.main]\nurl = \"{}\"\n[upstreams.main.retry]\nmax_attempts = 2\nbase_delay_ms = 10\nmax_delay_ms = 20\n",
        fake.openai_url()
    );
    TestServer::start_with(Options {
        config: Some(config),
        ..Options::default()
    })
    .await
}

fn seraphina_body() -> Value {
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("seraphina_prompt_fields.json")).unwrap(),
    )
    .unwrap();
    json!({
        "name": f["name"],
        "description": f["description"],
        "personality": {
            "personality": f["personality"],
            "firstMes": f["first_mes"],
            "mesExample": f["mes_example"],
            "alternateGreetings": ["Back again, {{user}}?"],
            "characterBook": f["character_book"],
        },
    })
}

fn entry_content(i: usize) -> String {
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("seraphina_prompt_fields.json")).unwrap(),
    )
    .unwrap();
    f["character_book"]["entries"][i]["content"]
        .as_str()
        .unwrap()
        .replace("{{user}}", "Ann")
        .replace("{{char}}", "Seraphina")
}

async fn interact(s: &TestServer, t: &str, char_id: &str, body: Value) -> (u16, Value) {
    let r = s
        .post_json(
            &format!("/api/characters/{char_id}/interact"),
            Some(t),
            &body,
        )
        .await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The stored conversation `cid` as its owner `t` reads it.
async fn conversation(s: &TestServer, t: &str, cid: &str) -> Value {
    s.get(&format!("/api/conversations/{cid}"), Some(t))
        .await
        .json()
        .await
        .unwrap()
}

fn sent_messages(fake: &FakeUpstream) -> Vec<(String, String)> {
    let body = fake.last_body().expect("upstream was called");
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn seraphina_prompt_reaches_the_upstream_exactly() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, seraphina_body()).await;
    let id = c["id"].as_str().unwrap();
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "Thank you. Who attacked me?", "parameters": {"userName": "Ann", "temperature": 0.7}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let greeting = c["firstMes"].as_str().unwrap().to_string();
    let sent = sent_messages(&fake);
    let expected = vec![
        (
            "system".to_string(),
            "Write Seraphina's next reply in a fictional chat between Seraphina and Ann."
                .to_string(),
        ),
        // The greeting mentions the forest, beasts and magic: entries 0, 1 and 3 fire, before
        // the description (position 0), in insertion order.
        (
            "system".to_string(),
            format!(
                "{}\n{}\n{}",
                entry_content(0),
                entry_content(1),
                entry_content(3)
            ),
        ),
        (
            "system".to_string(),
            c["description"]
                .as_str()
                .unwrap()
                .replace("{{user}}", "Ann")
                .replace("{{char}}", "Seraphina"),
        ),
        ("system".to_string(), "[Start a new Chat]".to_string()),
        ("assistant".to_string(), greeting),
        (
            "user".to_string(),
            "Thank you. Who attacked me?".to_string(),
        ),
    ];
    assert_eq!(sent, expected);
    let body = fake.last_body().unwrap();
    assert_eq!(body["temperature"], 0.7);
    assert_eq!(body["max_tokens"], 512);

    // The response is the spec's CharacterInteractionResponse.
    assert_eq!(v["response"]["role"], "character");
    assert_eq!(
        v["response"]["content"],
        "echo: Thank you. Who attacked me?"
    );
    assert_eq!(v["response"]["characterName"], "Seraphina");
    assert_eq!(v["response"]["generated"], true);
    assert!(v["usage"]["totalTokens"].as_u64().unwrap() > 0);
    let cid = v["conversationId"].as_str().unwrap().to_string();
    assert_eq!(v["context"]["conversationId"], cid);

    // Later turns: the greeting leaves the scan depth (2), so only keys in recent messages fire.
    for msg in [
        "I feel better now.",
        "Tell me about this place.",
        "Where am I exactly?",
    ] {
        let (status, _) =
            interact(&s, &t, id, json!({"message": msg, "conversationId": cid})).await;
        assert_eq!(status, 200);
    }
    let sent = sent_messages(&fake);
    assert!(
        !sent
            .iter()
            .any(|(_, c)| c.contains("What are Shadowfangs?")),
        "no lorebook entry fires without a key in the last two messages"
    );
    let (_, _) = interact(
        &s,
        &t,
        id,
        json!({"message": "Is the glade a safe haven?", "conversationId": cid}),
    )
    .await;
    let sent = sent_messages(&fake);
    assert_eq!(
        sent[1],
        ("system".to_string(), entry_content(2)),
        "{sent:?}"
    );
    // The whole history is there, oldest first, and ends with the new message.
    let users: Vec<&str> = sent
        .iter()
        .filter(|(r, _)| r == "user")
        .map(|(_, c)| c.as_str())
        .collect();
    assert_eq!(
        users,
        vec![
            "Thank you. Who attacked me?",
            "I feel better now.",
            "Tell me about this place.",
            "Where am I exactly?",
            "Is the glade a safe haven?"
        ]
    );
    assert!(sent
        .iter()
        .any(|(r, c)| r == "assistant" && c == "echo: I feel better now."));

    // Statistics and usage count move.
    let d: Value = s
        .get(&format!("/api/characters/{id}"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d["usageCount"], 5);
    assert_eq!(d["statistics"]["conversationCount"], 1);
    assert_eq!(d["statistics"]["messageCount"], 11);
    assert!(d["statistics"]["lastUsedAt"].is_string());
}

#[tokio::test]
async fn budget_trimming_drops_the_oldest_history_first() {
    let fake = FakeUpstream::start().await;
    let s = start(
        &fake,
        "[prompt]\nmax_context_tokens = 400\nmax_reply_tokens = 100\n",
    )
    .await;
    let t = token("ann");
    let c = s
        .create_character(
            &t,
            json!({"name": "Tiny", "description": "Short.", "personality": {"firstMes": "Hello."}}),
        )
        .await;
    let id = c["id"].as_str().unwrap();
    let (_, v) = interact(&s, &t, id, json!({"message": "first message ".repeat(20)})).await;
    let cid = v["conversationId"].as_str().unwrap().to_string();
    for i in 0..6 {
        interact(
            &s,
            &t,
            id,
            json!({"message": format!("turn {i} {}", "words ".repeat(20)), "conversationId": cid}),
        )
        .await;
    }
    let (status, dry) = interact(
        &s,
        &t,
        id,
        json!({"message": "newest", "conversationId": cid, "parameters": {"dryRun": true}}),
    )
    .await;
    assert_eq!(status, 200, "{dry}");
    let items = &dry["itemization"];
    assert!(items["historyDropped"].as_u64().unwrap() > 0, "{items}");
    assert!(items["totalTokens"].as_u64().unwrap() <= 300, "{items}");
    let contents: Vec<&str> = dry["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(*contents.last().unwrap(), "newest");
    assert!(!contents.iter().any(|c| c.starts_with("first message")));
    // The system prompt (fixed part) is always kept.
    assert!(contents[0].starts_with("Write Tiny's next reply"));
}

#[tokio::test]
async fn dry_run_stores_nothing_and_calls_no_upstream() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, seraphina_body()).await;
    let id = c["id"].as_str().unwrap();
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "Tell me of the shadowfang beasts", "parameters": {"dryRun": true, "userName": "Ann"}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["dryRun"], true);
    assert_eq!(fake.request_count(), 0);
    let fired: Vec<&str> = v["itemization"]["lorebook"]["activated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["uid"].as_str().unwrap())
        .collect();
    assert!(fired.contains(&"1"), "{v}");
    assert!(v["itemization"]["sections"].as_array().unwrap().len() >= 3);
    let convs: Value = s
        .get(&format!("/api/characters/{id}/conversations"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(convs["conversations"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn greetings_regenerate_and_swipes() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, seraphina_body()).await;
    let id = c["id"].as_str().unwrap();
    // An alternate greeting, with macros substituted when the chat starts.
    let (_, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "Hi", "parameters": {"greetingIndex": 1, "userName": "Ann"}}),
    )
    .await;
    let cid = v["conversationId"].as_str().unwrap().to_string();
    let conv = conversation(&s, &t, &cid).await;
    let msgs = conv["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3);
    assert_eq!(msgs[0]["content"], "Back again, Ann?");
    assert_eq!(msgs[0]["metadata"]["swipeId"], 1);
    assert_eq!(msgs[0]["metadata"]["swipes"].as_array().unwrap().len(), 2);
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "Hi", "parameters": {"greetingIndex": 9}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");

    // Regenerate: the last reply gains a swipe; the earlier one is kept.
    fake.clear_requests();
    let r = s
        .post_json(
            &format!("/api/conversations/{cid}/regenerate"),
            Some(&t),
            &json!({"parameters": {"temperature": 1.2}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["response"]["metadata"]["swipes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(v["response"]["metadata"]["swipeId"], 1);
    // The regenerated prompt ends with the user's message, not the old reply.
    let sent = sent_messages(&fake);
    assert_eq!(
        sent.last().unwrap(),
        &("user".to_string(), "Hi".to_string())
    );
    let reply_id = v["response"]["id"].as_str().unwrap().to_string();

    // Choose the first swipe back; edit it; delete it.
    let r = s
        .put_json(
            &format!("/api/conversations/{cid}/messages/{reply_id}/swipe"),
            Some(&t),
            &json!({"swipeId": 0}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = s
        .put_json(
            &format!("/api/conversations/{cid}/messages/{reply_id}/swipe"),
            Some(&t),
            &json!({"swipeId": 5}),
        )
        .await;
    expect_error(r, 400, "VALIDATION_ERROR").await;
    let r = s
        .put_json(
            &format!("/api/conversations/{cid}/messages/{reply_id}"),
            Some(&t),
            &json!({"content": "edited"}),
        )
        .await;
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["content"], "edited");
    let conv = conversation(&s, &t, &cid).await;
    assert_eq!(conv["messages"][2]["content"], "edited");
    assert_eq!(conv["messages"][2]["metadata"]["swipes"][0], "edited");
    let r = s
        .delete(
            &format!("/api/conversations/{cid}/messages/{reply_id}"),
            Some(&t),
        )
        .await;
    assert_eq!(r.status(), 204);
    let conv = conversation(&s, &t, &cid).await;
    assert_eq!(conv["messages"].as_array().unwrap().len(), 2);
    // Now the last message is the user's: regenerate refuses.
    let r = s
        .client
        .post(s.url(&format!("/api/conversations/{cid}/regenerate")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "VALIDATION_ERROR").await;

    // Editing an early message replaces it in place in the cached history; the next turn
    // appends after it, in order.
    let greeting_id = conv["messages"][0]["id"].as_str().unwrap().to_string();
    let r = s
        .put_json(
            &format!("/api/conversations/{cid}/messages/{greeting_id}"),
            Some(&t),
            &json!({"content": "Welcome back."}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "Tell me more", "conversationId": cid}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let conv = conversation(&s, &t, &cid).await;
    let contents: Vec<&str> = conv["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents.len(), 4, "{contents:?}");
    assert_eq!(contents[..3], ["Welcome back.", "Hi", "Tell me more"]);
    // The prompt of that turn saw the edited greeting.
    let sent = sent_messages(&fake);
    assert!(sent.iter().any(|(_, c)| c == "Welcome back."), "{sent:?}");
}

#[tokio::test]
async fn idempotency_key_returns_the_first_result() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Echo"})).await;
    let id = c["id"].as_str().unwrap();
    let send = |body: Value| {
        s.client
            .post(s.url(&format!("/api/characters/{id}/interact")))
            .bearer_auth(&t)
            .header("idempotency-key", "key-1")
            .json(&body)
            .send()
    };
    let first: Value = send(json!({"message": "once"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = send(json!({"message": "once"})).await.unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let second: Value = r.json().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(fake.request_count(), 1);
    let r = send(json!({"message": "something else"})).await.unwrap();
    expect_error(r, 409, "VERSION_CONFLICT").await;
    let cid = first["conversationId"].as_str().unwrap();
    let conv = conversation(&s, &t, cid).await;
    assert_eq!(conv["messageCount"], 2, "one user message and one reply");
}

#[tokio::test]
async fn other_users_cannot_read_or_continue_a_conversation() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let a = token("ann");
    let b = token("bob");
    let c = s
        .create_character(&a, json!({"name": "Shared", "isPublic": true}))
        .await;
    let id = c["id"].as_str().unwrap();
    let (_, v) = interact(&s, &a, id, json!({"message": "secret"})).await;
    let cid = v["conversationId"].as_str().unwrap().to_string();
    expect_error(
        s.get(&format!("/api/conversations/{cid}"), Some(&b)).await,
        404,
        "NOT_FOUND",
    )
    .await;
    expect_error(
        s.get(&format!("/api/conversations/{cid}/export"), Some(&b))
            .await,
        404,
        "NOT_FOUND",
    )
    .await;
    expect_error(
        s.delete(&format!("/api/conversations/{cid}"), Some(&b))
            .await,
        404,
        "NOT_FOUND",
    )
    .await;
    let (status, v) = interact(
        &s,
        &b,
        id,
        json!({"message": "hijack", "conversationId": cid}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    // Bob may chat with the public character in his own conversation; lists are separate.
    let (status, _) = interact(&s, &b, id, json!({"message": "hello"})).await;
    assert_eq!(status, 200);
    let list: Value = s
        .get(&format!("/api/characters/{id}/conversations"), Some(&b))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["conversations"].as_array().unwrap().len(), 1);
    assert_ne!(list["conversations"][0]["id"], cid.as_str());
    // A private character cannot be talked to by others.
    let p = s.create_character(&a, json!({"name": "Private"})).await;
    let (status, _) = interact(&s, &b, p["id"].as_str().unwrap(), json!({"message": "hi"})).await;
    assert_eq!(status, 403);
    // Unauthenticated: 401.
    let r = s
        .post_json(
            &format!("/api/characters/{id}/interact"),
            None,
            &json!({"message": "x"}),
        )
        .await;
    expect_error(r, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn upstream_failure_keeps_a_consistent_conversation() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s
        .create_character(
            &t,
            json!({"name": "Flaky", "personality": {"firstMes": "Hi."}}),
        )
        .await;
    let id = c["id"].as_str().unwrap();
    let (_, v) = interact(&s, &t, id, json!({"message": "first"})).await;
    let cid = v["conversationId"].as_str().unwrap().to_string();
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "[[fault:503]] second", "conversationId": cid}),
    )
    .await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "ST_GENERATION_FAILED");
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "[[fault:401]] third", "conversationId": cid}),
    )
    .await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "ST_API_AUTH_FAILED");
    let conv = conversation(&s, &t, &cid).await;
    let contents: Vec<&str> = conv["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        vec![
            "Hi.",
            "first",
            "echo: first",
            "[[fault:503]] second",
            "[[fault:401]] third"
        ]
    );
    // The conversation goes on.
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "fourth", "conversationId": cid}),
    )
    .await;
    assert_eq!(status, 200, "{v}");

    // An unreachable upstream is ST_API_UNAVAILABLE with Retry-After-free 503.
    let dead = TestServer::start_with(Options {
        config: Some("[upstreams.main]\nurl = \"http://127.0.0.1:9/v1\"\n[upstreams.main.retry]\nmax_attempts = 1\n".into()),
        ..Options::default()
    })
    .await;
    let c = dead.create_character(&t, json!({"name": "Alone"})).await;
    let r = dead
        .post_json(
            &format!("/api/characters/{}/interact", c["id"].as_str().unwrap()),
            Some(&t),
            &json!({"message": "anyone?"}),
        )
        .await;
    expect_error(r, 503, "ST_API_UNAVAILABLE").await;
}

#[tokio::test]
async fn sse_streams_chunks_then_done_and_stores_the_reply() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(5);
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Streamer"})).await;
    let id = c["id"].as_str().unwrap();
    let r = s
        .client
        .post(s.url(&format!("/api/characters/{id}/interact")))
        .bearer_auth(&t)
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip")
        .json(&json!({"message": "stream me please"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(
        r.headers().get("content-encoding").is_none(),
        "SSE is never compressed"
    );
    let text = r.text().await.unwrap();
    let events = support::sse::parse(&text);
    let chunks: Vec<String> = events
        .iter()
        .filter(|(e, _)| e == "chunk")
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["delta"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(chunks.len() >= 2, "{text}");
    let (last_event, last_data) = events.last().unwrap();
    assert_eq!(last_event, "done", "{text}");
    let done: Value = serde_json::from_str(last_data).unwrap();
    assert_eq!(chunks.concat(), "echo: stream me please");
    assert_eq!(done["response"]["content"], chunks.concat());
    let cid = done["conversationId"].as_str().unwrap();
    let conv = conversation(&s, &t, cid).await;
    assert_eq!(
        conv["messages"].as_array().unwrap().last().unwrap()["content"],
        chunks.concat()
    );
}

/// A streamed turn's user message is stored before any of the reply reaches the client: read
/// as soon as the first delta arrives, while the reply still streams, the conversation holds it.
#[tokio::test]
async fn a_streamed_turns_user_message_is_stored_before_its_first_delta() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(6);
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Early"})).await;
    let id = c["id"].as_str().unwrap();
    let (status, first) = interact(&s, &t, id, json!({"message": "first turn"})).await;
    assert_eq!(status, 200, "{first}");
    let cid = first["conversationId"].as_str().unwrap();
    for turn in 0..3 {
        let message = format!("[[fault:drip:50]] turn {turn}");
        let mut r = s
            .client
            .post(s.url(&format!("/api/characters/{id}/interact")))
            .bearer_auth(&t)
            .header("accept", "text/event-stream")
            .json(&json!({"message": message, "conversationId": cid}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut seen = String::new();
        while !seen.contains("event: chunk") {
            let bytes = r.chunk().await.unwrap().expect("a chunk before the end");
            seen.push_str(&String::from_utf8_lossy(&bytes));
        }
        let conv = conversation(&s, &t, cid).await;
        let messages = conv["messages"].as_array().unwrap();
        let last = messages.last().unwrap();
        // The reply is still streaming (not stored yet), and the user message already is.
        assert_eq!(last["content"], message.as_str(), "turn {turn}: {conv}");
        assert_eq!(last["role"], "user", "turn {turn}: {conv}");
        assert_eq!(messages.len(), 3 + 2 * turn, "turn {turn}: {conv}");
        let rest = r.text().await.unwrap();
        assert!(rest.contains("event: done"), "turn {turn}: {seen}{rest}");
    }
    let conv = conversation(&s, &t, cid).await;
    let last = conv["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["content"], "echo: turn 2");
}

#[tokio::test]
async fn sse_stream_cut_sends_an_error_and_keeps_the_partial_reply() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(6);
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Cut"})).await;
    let id = c["id"].as_str().unwrap();
    let r = s
        .post_json(
            &format!("/api/characters/{id}/interact"),
            Some(&t),
            &json!({"message": "[[fault:cut:3]] tell me a long story", "parameters": {"stream": true}}),
        )
        .await;
    let text = r.text().await.unwrap();
    let events = support::sse::parse(&text);
    let (last_event, last_data) = events.last().unwrap();
    assert_eq!(last_event, "error", "{text}");
    let err: Value = serde_json::from_str(last_data).unwrap();
    assert_eq!(err["error"]["code"], "ST_GENERATION_FAILED");
    let partial: String = events
        .iter()
        .filter(|(e, _)| e == "chunk")
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["delta"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(!partial.is_empty());
    let list: Value = s
        .get(&format!("/api/characters/{id}/conversations"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    let cid = list["conversations"][0]["id"].as_str().unwrap();
    let conv = conversation(&s, &t, cid).await;
    let last = conv["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["content"], partial);
    assert_eq!(last["metadata"]["finishReason"], "error");
}

/// An upstream's `timeout_ms` bounds the silence between stream events, not the whole stream.
#[tokio::test]
async fn a_slow_stream_finishes_and_a_stalled_one_ends_with_an_error() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(6);
    let s = TestServer::start_with(Options {
        config: Some(format!(
            "[upstreams.main]\nurl = \"{}\"\ntimeout_ms = 400\n[upstreams.main.retry]\nmax_attempts = 1\n",
            fake.openai_url()
        )),
        ..Options::default()
    })
    .await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Slow"})).await;
    let path = format!("/api/characters/{}/interact", c["id"].as_str().unwrap());
    let stream = |message: &str| json!({"message": message, "parameters": {"stream": true}});

    // Frames 60 ms apart: over half a second in all, longer than the timeout, but never 400 ms
    // without an event (the tail, finish + usage + [DONE] + end of body, makes one event).
    let started = std::time::Instant::now();
    let text = s
        .post_json(&path, Some(&t), &stream("[[fault:drip:60]] slowly"))
        .await
        .text()
        .await
        .unwrap();
    let events = support::sse::parse(&text);
    assert_eq!(events.last().unwrap().0, "done", "{text}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(500));

    // Two frames, then silence with the connection open: an error after the 400 ms, and the
    // partial reply kept.
    let started = std::time::Instant::now();
    let text = s
        .post_json(&path, Some(&t), &stream("[[fault:stall:2]] and then"))
        .await
        .text()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let events = support::sse::parse(&text);
    let (last_event, last_data) = events.last().unwrap();
    assert_eq!(last_event, "error", "{text}");
    assert!(last_data.contains("stalled"), "{last_data}");
    assert!(events.iter().any(|(e, _)| e == "chunk"), "{text}");
    assert!(
        elapsed >= std::time::Duration::from_millis(400),
        "{elapsed:?}"
    );
    assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
}

#[tokio::test]
async fn sillytavern_upstream_gets_override_settings_and_keeps_character_state() {
    let fake = FakeUpstream::start().await;
    let config = format!(
        "[upstreams.main]\nkind = \"sillytavern\"\nurl = \"{}\"\napi_key = \"st-key-123\"\n",
        fake.st_url()
    );
    let s = TestServer::start_with(Options {
        config: Some(config),
        ..Options::default()
    })
    .await;
    let t = token("ann");
    let c = s
        .create_character(&t, json!({"name": "Tavern", "personality": {"firstMes": "Welcome!", "systemPrompt": "{{original}} Be terse."}}))
        .await;
    let id = c["id"].as_str().unwrap();
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "Hello there", "parameters": {"userName": "Ann"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let req = fake.requests().last().cloned().unwrap();
    assert_eq!(req.path, format!("/api/characters/{id}/generate"));
    assert_eq!(req.header("authorization"), Some("Bearer st-key-123"));
    assert_eq!(req.body["userInput"], "Hello there");
    let system = req.body["overrideSettings"]["systemPrompt"]
        .as_str()
        .unwrap();
    assert!(
        system.starts_with(
            "Write Tavern's next reply in a fictional chat between Tavern and Ann. Be terse."
        ),
        "{system}"
    );
    assert_eq!(req.body["overrideSettings"]["character"]["name"], "Tavern");
    assert_eq!(req.body["history"][0]["content"], "Welcome!");
    assert_eq!(v["response"]["content"], "echo: Hello there");
    // The key never leaks into the reply or the logs.
    assert!(!v.to_string().contains("st-key-123"));
    assert!(!s.logs().contains("st-key-123"));
}

#[tokio::test]
async fn seraphina_chat_jsonl_imports_with_swipes_and_exports_back() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, seraphina_body()).await;
    let id = c["id"].as_str().unwrap();
    let raw = std::fs::read(fixture("seraphina_chat.jsonl")).unwrap();
    let r = s
        .client
        .post(s.url(&format!("/api/characters/{id}/conversations/import")))
        .bearer_auth(&t)
        .header("content-type", "application/jsonl")
        .body(raw.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let cid = v["id"].as_str().unwrap();
    assert_eq!(v["messages"][0]["content"], "Hello");
    assert_eq!(
        v["messages"][0]["metadata"]["swipes"],
        json!(["Hello", "Hi"])
    );
    assert_eq!(v["messages"][1]["role"], "user");
    assert_eq!(v["messages"][1]["timestamp"], "2024-10-01T10:01:00.000Z");
    let text = s
        .get(
            &format!("/api/conversations/{cid}/export?format=jsonl"),
            Some(&t),
        )
        .await
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let original: Vec<Value> = String::from_utf8(raw)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), original.len());
    assert_eq!(lines[0]["user_name"], "User");
    assert_eq!(lines[0]["chat_metadata"], original[0]["chat_metadata"]);
    for (got, want) in lines[1..].iter().zip(&original[1..]) {
        for k in ["name", "is_user", "is_system", "mes", "send_date", "extra"] {
            assert_eq!(got[k], want[k], "{k}");
        }
    }
    assert_eq!(lines[1]["swipes"], original[1]["swipes"]);
    assert_eq!(lines[1]["swipe_id"], 0);
    // The imported chat continues like any other.
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "Still here", "conversationId": cid}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // Garbage is refused and stores nothing.
    let r = s
        .client
        .post(s.url(&format!("/api/characters/{id}/conversations/import")))
        .bearer_auth(&t)
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "VALIDATION_ERROR").await;
    let list: Value = s
        .get(&format!("/api/characters/{id}/conversations"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["conversations"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn deleting_a_character_removes_its_conversations() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Temp"})).await;
    let id = c["id"].as_str().unwrap();
    let (_, v) = interact(&s, &t, id, json!({"message": "hello"})).await;
    let cid = v["conversationId"].as_str().unwrap().to_string();
    // Later turns rewrite the conversation but not its character-index entry; the delete
    // must still find it through that index.
    for message in ["again", "and again"] {
        let (status, v) = interact(
            &s,
            &t,
            id,
            json!({"message": message, "conversationId": cid}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(
        s.delete(&format!("/api/characters/{id}"), Some(&t))
            .await
            .status(),
        204
    );
    expect_error(
        s.get(&format!("/api/conversations/{cid}"), Some(&t)).await,
        404,
        "NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn conversation_list_pages_newest_activity_first() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Many"})).await;
    let id = c["id"].as_str().unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, v) = interact(&s, &t, id, json!({"message": format!("chat {i}")})).await;
        ids.push(v["conversationId"].as_str().unwrap().to_string());
    }
    // Touch the first one again: it becomes the newest.
    interact(
        &s,
        &t,
        id,
        json!({"message": "again", "conversationId": ids[0]}),
    )
    .await;
    let mut seen = Vec::new();
    let mut url = format!("/api/characters/{id}/conversations?limit=2");
    loop {
        let v: Value = s.get(&url, Some(&t)).await.json().await.unwrap();
        seen.extend(
            v["conversations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_string()),
        );
        match v["nextCursor"].as_str() {
            Some(cur) => url = format!("/api/characters/{id}/conversations?limit=2&before={cur}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec![
            ids[0].clone(),
            ids[4].clone(),
            ids[3].clone(),
            ids[2].clone(),
            ids[1].clone()
        ]
    );
    let v: Value = s
        .get(
            &format!("/api/characters/{id}/conversations?limit=1&context=true"),
            Some(&t),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["conversations"][0]["context"]["messages"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    expect_error(
        s.get(
            &format!("/api/characters/{id}/conversations?limit=101"),
            Some(&t),
        )
        .await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    expect_error(
        s.get(
            &format!("/api/characters/{id}/conversations?before=zzz"),
            Some(&t),
        )
        .await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
}

#[tokio::test]
async fn memories_are_recalled_into_the_prompt_and_summaries_follow_turns() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "[memory]\nsummarize_every_turns = 2\n").await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Rememberer"})).await;
    let id = c["id"].as_str().unwrap();
    let r = s
        .post_json(
            &format!("/api/characters/{id}/memory"),
            Some(&t),
            &json!({"operation": "add", "memory": {"content": "Ann's cat is called Biscuit", "kind": "fact", "importance": 0.9, "tags": ["cat"]}}),
        )
        .await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    // dryRun shows which memories would be recalled.
    let (_, dry) = interact(
        &s,
        &t,
        id,
        json!({"message": "What is my cat called?", "parameters": {"dryRun": true}}),
    )
    .await;
    assert_eq!(
        dry["memory"][0]["content"], "Ann's cat is called Biscuit",
        "{dry}"
    );
    // A real turn puts it into the prompt the upstream receives.
    let (status, v) = interact(&s, &t, id, json!({"message": "What is my cat called?"})).await;
    assert_eq!(status, 200, "{v}");
    let sent = sent_messages(&fake);
    assert!(sent.iter().any(|(_, c)| c.contains("Biscuit")), "{sent:?}");
    let cid = v["conversationId"].as_str().unwrap().to_string();
    // Another user's turn with the same character never sees Ann's private memory.
    let mut body = json!({"name": "Shared Rememberer", "isPublic": true});
    let public = s.create_character(&t, body.take()).await;
    let pid = public["id"].as_str().unwrap();
    s.post_json(
        &format!("/api/characters/{pid}/memory"),
        Some(&t),
        &json!({"operation": "add", "memory": {"content": "Ann's secret password is swordfish", "importance": 1.0}}),
    )
    .await;
    let (status, _) = interact(
        &s,
        &token("bob"),
        pid,
        json!({"message": "what is the secret password?"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!sent_messages(&fake)
        .iter()
        .any(|(_, c)| c.contains("swordfish")));
    // After N user turns a rolling summary is written in the background.
    interact(
        &s,
        &t,
        id,
        json!({"message": "Tell me more.", "conversationId": cid}),
    )
    .await;
    let mut summary = Value::Null;
    for _ in 0..100 {
        let v: Value = s
            .get(&format!("/api/characters/{id}/memory"), Some(&t))
            .await
            .json()
            .await
            .unwrap();
        if v["summary"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            summary = v["summary"].clone();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let last: Value = s
        .get(&format!("/api/characters/{id}/memory"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        summary["content"]
            .as_str()
            .unwrap_or("")
            .starts_with("echo"),
        "{summary} {last} {}",
        s.logs()
            .lines()
            .filter(|l| l.contains("summar"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn concurrent_turns_share_commits_and_every_count_is_exact() {
    // Saves that arrive together are committed together; each conversation must still get
    // exactly its own messages in order, and counters touched by many turns in one commit
    // must add up.
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "[rate_limit]\ninteract_per_minute = 0\n").await;
    let t = token("ann");
    let mut ids = Vec::new();
    for name in ["Alpha", "Beta"] {
        let c = s.create_character(&t, json!({"name": name})).await;
        ids.push(c["id"].as_str().unwrap().to_string());
    }
    let per_character = 12;
    let first = futures_util::future::join_all((0..2 * per_character).map(|i| {
        let (s, t, id) = (&s, &t, ids[i % 2].clone());
        async move {
            let (status, v) = interact(s, t, &id, json!({"message": format!("m{i}-1")})).await;
            assert_eq!(status, 200, "{v}");
            (i, id, v["conversationId"].as_str().unwrap().to_string())
        }
    }))
    .await;
    futures_util::future::join_all(first.iter().map(|(i, id, cid)| {
        let (s, t) = (&s, &t);
        async move {
            let body = json!({"message": format!("m{i}-2"), "conversationId": cid});
            let (status, v) = interact(s, t, id, body).await;
            assert_eq!(status, 200, "{v}");
        }
    }))
    .await;
    for (i, _, cid) in &first {
        let v = conversation(&s, &t, cid).await;
        let texts: Vec<&str> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(
            texts,
            vec![
                format!("m{i}-1"),
                format!("echo: m{i}-1"),
                format!("m{i}-2"),
                format!("echo: m{i}-2")
            ],
            "conversation {cid}"
        );
    }
    for id in &ids {
        let d: Value = s
            .get(&format!("/api/characters/{id}"), Some(&t))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(d["usageCount"], 2 * per_character as u64, "{d}");
        assert_eq!(d["statistics"]["conversationCount"], per_character as u64);
        assert_eq!(d["statistics"]["messageCount"], 4 * per_character as u64);
    }
}

#[tokio::test]
async fn usage_counts_follow_turns_in_details_lists_and_the_usage_sort() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let mut ids = Vec::new();
    for (name, turns) in [("Once", 1), ("Never", 0), ("Thrice", 3)] {
        let c = s
            .create_character(&t, json!({"name": name, "description": "d"}))
            .await;
        let id = c["id"].as_str().unwrap().to_string();
        let mut cid: Option<String> = None;
        for i in 0..turns {
            let mut body = json!({"message": format!("hello {i}")});
            if let Some(cid) = &cid {
                body["conversationId"] = json!(cid);
            }
            let (status, v) = interact(&s, &t, &id, body).await;
            assert_eq!(status, 200, "{v}");
            cid = v["conversationId"].as_str().map(str::to_string);
        }
        ids.push((id, turns));
    }
    // An edit keeps the count.
    let thrice = &ids[2].0;
    let before: Value = s
        .get(&format!("/api/characters/{thrice}"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    let r = s
        .put_json(
            &format!("/api/characters/{thrice}"),
            Some(&t),
            &json!({"version": before["version"], "description": "edited"}),
        )
        .await;
    let edited: Value = r.json().await.unwrap();
    assert_eq!(edited["usageCount"], 3, "{edited}");
    for (id, turns) in &ids {
        let d: Value = s
            .get(&format!("/api/characters/{id}"), Some(&t))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(d["usageCount"], *turns, "{d}");
        assert_eq!(d["statistics"]["usageCount"], *turns, "{d}");
    }
    let page: Value = s
        .get("/api/characters?sort=usage&order=desc", Some(&t))
        .await
        .json()
        .await
        .unwrap();
    let listed: Vec<(&str, u64)> = page["characters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["usageCount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, vec![("Thrice", 3), ("Once", 1), ("Never", 0)]);
}

#[tokio::test]
async fn a_streamed_turn_stores_its_lorebook_state_for_the_next_turn() {
    // The stream frees the turn's prompt once the upstream has it; what the next turn needs
    // from it (the lorebook's sticky state) must still be stored with the reply.
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let book = json!({"name": "Lore", "scan_depth": 1, "entries": [{
        "keys": ["dragon"], "content": "DRAGON LORE: the wyrm sleeps under the hill.",
        "enabled": true, "insertion_order": 1, "extensions": {"sticky": 2}
    }]});
    let c = s
        .create_character(
            &t,
            json!({"name": "Keeper", "personality": {"firstMes": "Hail.", "characterBook": book}}),
        )
        .await;
    let id = c["id"].as_str().unwrap();
    let prompt_has_lore = |fake: &FakeUpstream| {
        let req = fake.requests().last().cloned().unwrap();
        req.body["messages"].to_string().contains("DRAGON LORE")
    };

    let text = s
        .post_json(
            &format!("/api/characters/{id}/interact"),
            Some(&t),
            &json!({"message": "Tell me of the dragon", "parameters": {"stream": true}}),
        )
        .await
        .text()
        .await
        .unwrap();
    let events = support::sse::parse(&text);
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "done", "{text}");
    assert!(prompt_has_lore(&fake), "the key fires the entry");
    let done: Value = serde_json::from_str(done).unwrap();
    let cid = done["conversationId"].as_str().unwrap().to_owned();
    let usage = &done["usage"];
    assert!(usage["promptTokens"].as_u64().unwrap() > 0, "{done}");

    // No key now, and a scan depth of one message: only the sticky state stored by the
    // streamed turn keeps the entry in the prompt.
    let (status, v) = interact(
        &s,
        &t,
        id,
        json!({"message": "And then?", "conversationId": cid}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        prompt_has_lore(&fake),
        "sticky keeps the entry after a streamed turn"
    );

    // A conversation whose first turn did not fire it has no sticky entry to keep.
    let (status, v) = interact(&s, &t, id, json!({"message": "Hello"})).await;
    assert_eq!(status, 200, "{v}");
    let cid2 = v["conversationId"].as_str().unwrap().to_owned();
    assert!(!prompt_has_lore(&fake));
    let (status, _) = interact(
        &s,
        &t,
        id,
        json!({"message": "And then?", "conversationId": cid2}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!prompt_has_lore(&fake), "no key, no sticky state");
}
