//! The OpenAI-compatible surface as NextChat, SillyTavern and the OpenAI SDK use it: NextChat's
//! exact requests (headers, a 4-message window, title and summary requests) keep the stored
//! conversation clean; `Bearer undefined` is refused clearly; passthrough reaches the upstream
//! unchanged; errors carry OpenAI's shape.

mod support;

use serde_json::{json, Value};
use support::app::{token, Options, TestServer};
use support::fake_upstream::FakeUpstream;

async fn start(fake: &FakeUpstream, extra: &str) -> TestServer {
    TestServer::start_with(Options {
        config: Some(format!(
            "{extra}\n[upstreams.main]\nurl = \"{}\"\nmodel = \"fake-model\"\n[upstreams.main.retry]\nmax_attempts = 1\n[upstreams.main.circuit_breaker]\nconsecutive_failures = 2\nrecovery_timeout_ms = 60000\n",
            fake.openai_url()
        )),
        ..Options::default()
    })
    .await
}

/// Posts like NextChat's server does: only Content-Type, Cache-Control and Authorization.
async fn nextchat_post(s: &TestServer, key: &str, body: &Value) -> reqwest::Response {
    s.client
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .header("authorization", format!("Bearer {key}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn sse_contents(text: &str) -> (String, Vec<Value>) {
    let mut content = String::new();
    let mut chunks = Vec::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            chunks.push(json!("[DONE]"));
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
        chunks.push(v);
    }
    (content, chunks)
}

#[tokio::test]
async fn models_lists_visible_characters_and_passthrough_models() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    s.create_character(&t, json!({"name": "Alice Liddell"}))
        .await;
    s.create_character(
        &token("bob"),
        json!({"name": "Alice Liddell", "isPublic": true}),
    )
    .await;
    s.create_character(&token("bob"), json!({"name": "Hidden"}))
        .await;
    let v: Value = s.get("/v1/models", Some(&t)).await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"char-alice-liddell"), "{ids:?}");
    assert!(
        ids.contains(&"char-alice-liddell-2"),
        "slugs are unique: {ids:?}"
    );
    assert!(ids.contains(&"fake-model"));
    assert!(!ids.iter().any(|i| i.contains("hidden")));
    for m in v["data"].as_array().unwrap() {
        assert_eq!(m["object"], "model");
        assert!(m["created"].is_number());
        assert!(m["owned_by"].is_string());
    }
    // NextChat's CUSTOM_MODELS string.
    let v: Value = s
        .get("/api/nextchat/custom-models", Some(&t))
        .await
        .json()
        .await
        .unwrap();
    let custom = v["customModels"].as_str().unwrap();
    assert!(custom.starts_with("-all,+char-"), "{custom}");
    assert!(custom.contains("+char-alice-liddell@openai=Alice Liddell"));
    assert!(v["defaultModel"].as_str().unwrap().ends_with("@openai"));
}

#[tokio::test]
async fn a_new_changed_or_deleted_slug_routes_at_once() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let status = |model: &'static str| {
        let (s, t, body) = (&s, &t, chat(model));
        async move { nextchat_post(s, t, &body).await.status().as_u16() }
    };
    let alice = s.create_character(&t, json!({"name": "Alice"})).await;
    assert_eq!(status("char-alice").await, 200);
    // Unknown first (and remembered as unknown), then created: it routes at once.
    assert_eq!(status("char-bob").await, 404);
    let bob = s.create_character(&t, json!({"name": "Bob"})).await;
    assert_eq!(status("char-bob").await, 200);
    // A renamed slug: the old one stops routing, the new one starts.
    let id = alice["id"].as_str().unwrap();
    let r = s
        .put_json(
            &format!("/api/characters/{id}"),
            Some(&t),
            &json!({"version": alice["version"], "slug": "alicia"}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(status("char-alice").await, 404);
    assert_eq!(status("char-alicia").await, 200);
    // A deleted character's slug is gone.
    let r = s
        .delete(
            &format!("/api/characters/{}", bob["id"].as_str().unwrap()),
            Some(&t),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(status("char-bob").await, 404);
}

#[tokio::test]
async fn nextchat_turns_title_and_summary_keep_the_stored_conversation_clean() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let c = s
        .create_character(
            &t,
            json!({"name": "Alice", "personality": {"firstMes": "Hello, {{user}}!"}}),
        )
        .await;
    let cid_of = |r: &reqwest::Response| {
        r.headers()["x-taproom-conversation"]
            .to_str()
            .unwrap()
            .to_string()
    };

    // 1st turn: the mask's context holds the greeting; no earlier reply → a new conversation.
    let body = json!({"messages": [
            {"role": "assistant", "content": "Hello, {{user}}!"},
            {"role": "user", "content": "Hi Alice"}],
        "stream": true, "model": "char-alice", "temperature": 0.5, "presence_penalty": 0,
        "frequency_penalty": 0, "top_p": 1});
    let r = nextchat_post(&s, &t, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["cache-control"], "no-cache");
    assert_eq!(r.headers()["x-accel-buffering"], "no");
    let cid = cid_of(&r);
    let text = r.text().await.unwrap();
    assert!(!text.lines().any(|l| l.starts_with("id:")), "no id: lines");
    let (content, chunks) = sse_contents(&text);
    assert_eq!(content, "echo: Hi Alice");
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["object"], "chat.completion.chunk");
    assert_eq!(last["model"], "char-alice");

    // Auto-title (stream false): answered by the upstream as is, not stored.
    let title = json!({"messages": [
            {"role": "user", "content": "Hi Alice"},
            {"role": "assistant", "content": "echo: Hi Alice"},
            {"role": "user", "content": "Please generate a four to five word title summarizing our conversation without any lead-in, punctuation, quotation marks, periods, symbols, bold text, or additional text. Remove enclosing quotation marks."}],
        "stream": false, "model": "char-alice"});
    let r = nextchat_post(&s, &t, &title).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v.get("data").is_none());
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("echo: Please generate"));
    // Out of character: the upstream saw NextChat's messages, not Alice's prompt.
    let sent = fake.last_body().unwrap();
    assert!(!sent.to_string().contains("Write Alice's next reply"));

    // 2nd turn: NextChat sends its 4-message window; Taproom continues the stored conversation.
    let turn2 = json!({"messages": [
            {"role": "system", "content": "This is a summary of the chat history as a recap: nothing"},
            {"role": "assistant", "content": "Hello, {{user}}!"},
            {"role": "user", "content": "Hi Alice"},
            {"role": "assistant", "content": "echo: Hi Alice"},
            {"role": "user", "content": [{"type": "text", "text": "How are you?"}]}],
        "stream": true, "model": "char-alice"});
    let r = nextchat_post(&s, &t, &turn2).await;
    assert_eq!(cid_of(&r), cid);
    let (content, _) = sse_contents(&r.text().await.unwrap());
    assert_eq!(content, "echo: How are you?");
    // The prompt was rebuilt from the stored history, not from NextChat's window.
    let sent: Vec<String> = fake.last_body().unwrap()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert!(sent[0].starts_with("Write Alice's next reply"));
    assert!(!sent.iter().any(|m| m.contains("This is a summary")));

    // Memory summary (a system message asking for 200 words): not stored either.
    let summary = json!({"messages": [
            {"role": "user", "content": "Hi Alice"},
            {"role": "system", "content": "Summarize the discussion briefly in 200 words or less to use as a prompt for future context."}],
        "stream": true, "model": "char-alice"});
    let r = nextchat_post(&s, &t, &summary).await;
    let (content, _) = sse_contents(&r.text().await.unwrap());
    assert!(content.starts_with("echo: "));

    let conv: Value = s
        .get(&format!("/api/conversations/{cid}"), Some(&t))
        .await
        .json()
        .await
        .unwrap();
    let stored: Vec<&str> = conv["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        stored,
        vec![
            "Hello, User!",
            "Hi Alice",
            "echo: Hi Alice",
            "How are you?",
            "echo: How are you?"
        ]
    );

    // A window with no earlier reply starts a new conversation; the header picks one explicitly.
    let r = nextchat_post(&s, &t, &json!({"messages": [{"role": "user", "content": "New chat"}], "stream": false, "model": "char-alice"})).await;
    let new_cid = cid_of(&r);
    assert_ne!(new_cid, cid);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: New chat");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let usage = &v["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(prompt > 0 && completion > 0, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&t)
        .header("x-taproom-conversation", &cid)
        .json(&json!({"messages": [{"role": "user", "content": "back to the first"}], "model": format!("char-{}", c["id"].as_str().unwrap())}))
        .send()
        .await
        .unwrap();
    assert_eq!(cid_of(&r), cid);
}

#[tokio::test]
async fn tools_and_odd_roles_are_tolerated() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    s.create_character(&t, json!({"name": "Tool User"})).await;
    let body = json!({"model": "char-tool-user", "stream": false,
        "tools": [{"type": "function", "function": {"name": "x", "parameters": {}}}],
        "messages": [{"role": "developer", "content": "be nice"}, {"role": "tool", "content": "42", "tool_call_id": "1"},
                     {"role": "user", "content": "hello"}]});
    let r = nextchat_post(&s, &t, &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello");
}

#[tokio::test]
async fn passthrough_reaches_the_upstream_unchanged() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    let body = json!({"model": "fake-model", "messages": [{"role": "user", "content": "plain chat"}], "temperature": 0.3});
    let r = nextchat_post(&s, &t, &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: plain chat");
    assert_eq!(fake.last_body().unwrap(), body);
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let r = nextchat_post(&s, &t, &stream_body).await;
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (content, chunks) = sse_contents(&r.text().await.unwrap());
    assert_eq!(content, "echo: plain chat");
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    // An allow-list refuses other models.
    let s2 = start(&fake, "[openai]\npassthrough_models = [\"only-this\"]\n").await;
    let r = nextchat_post(&s2, &t, &body).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn errors_have_the_openai_shape() {
    let fake = FakeUpstream::start().await;
    let s = start(&fake, "").await;
    let t = token("ann");
    // SillyTavern with no key set sends the literal `Bearer undefined`.
    let r = nextchat_post(&s, "undefined", &json!({"model": "x", "messages": []})).await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("undefined"));
    assert!(v["error"]["requestId"].is_string());
    let r = s.get("/v1/models", Some("garbage")).await;
    assert_eq!(r.status(), 401);
    // Unknown character.
    let r = nextchat_post(
        &s,
        &t,
        &json!({"model": "char-nobody", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(v["error"]["taproomCode"], "CHARACTER_NOT_FOUND");
    // Another user's private character is not usable (and not revealed).
    s.create_character(&token("bob"), json!({"name": "Secret"}))
        .await;
    let r = nextchat_post(
        &s,
        &t,
        &json!({"model": "char-secret", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 404);
    // Malformed body.
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");

    // Upstream down: after the breaker opens, 503 with x-should-retry: false.
    s.create_character(&t, json!({"name": "Down"})).await;
    fake.set_fault(Some(support::fake_upstream::Fault::Status(503)));
    let mut saw_open = false;
    for _ in 0..4 {
        let r = nextchat_post(
            &s,
            &t,
            &json!({"model": "char-down", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert!(r.status().is_server_error());
        if r.headers()
            .get("x-should-retry")
            .map(|v| v.to_str().unwrap())
            == Some("false")
        {
            assert_eq!(r.status(), 503);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["taproomCode"], "ST_API_UNAVAILABLE");
            saw_open = true;
            break;
        }
    }
    assert!(saw_open, "the breaker opened and said so");
    // A mid-stream failure ends the stream cleanly with an error event and [DONE].
    fake.set_fault(None);
}

#[tokio::test]
async fn mid_stream_errors_end_the_stream_cleanly() {
    let fake = FakeUpstream::start().await;
    fake.set_chunks(6);
    let s = start(&fake, "").await;
    let t = token("ann");
    s.create_character(&t, json!({"name": "Cutter"})).await;
    let r = nextchat_post(&s, &t, &json!({"model": "char-cutter", "stream": true, "messages": [{"role": "user", "content": "[[fault:cut:3]] story"}]})).await;
    assert_eq!(r.status(), 200);
    let (_, chunks) = sse_contents(&r.text().await.unwrap());
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let err = &chunks[chunks.len() - 2];
    assert!(err["error"]["message"].is_string(), "{err}");
}

#[tokio::test]
async fn shared_keys_map_to_a_configured_user() {
    use sha2::Digest;
    let fake = FakeUpstream::start().await;
    let digest: String = sha2::Sha256::digest(b"nk-party")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let s = start(
        &fake,
        &format!("[openai]\nkeys = [{{ sha256 = \"{digest}\", user = \"party\" }}]\n"),
    )
    .await;
    s.create_character(&token("party"), json!({"name": "Host"}))
        .await;
    let v: Value = s
        .get("/v1/models", Some("nk-party"))
        .await
        .json()
        .await
        .unwrap();
    assert!(v["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "char-host"));
    let r = s.get("/v1/models", Some("nk-wrong")).await;
    assert_eq!(r.status(), 401);
}
