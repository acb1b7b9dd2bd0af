//! Memory: the Memory Management API against the real server (CRUD, validation naming fields,
//! isolation between users and scopes, statistics), and the memory service directly against
//! the fake upstream (recall into the prompt block, rolling summaries every N turns, a failing
//! summarizer that is retried later, fact extraction).

mod support;

use serde_json::{json, Value};
use std::sync::Arc;
use support::app::{admin_token, expect_error, token, TestServer};
use support::fake_upstream::{FakeUpstream, Fault};
use taproom::auth::User;
use taproom::characters::{CharacterService, NewCharacter};
use taproom::config::LimitsConfig;
use taproom::memory::types::{MemoryKind, MemoryScope, MemorySource};
use taproom::memory::{
    MemoryConfig, MemoryInput, MemoryOperation, MemoryQuery, MemoryService, PluginMemory,
};
use taproom::model::{Character, MessageRole, StoredMessage};
use taproom::prompt::tokens::Tokenizer;
use taproom::store::Store;
use taproom::upstream::{UpstreamConfig, UpstreamKind, Upstreams, UpstreamsConfig};

// ---- HTTP -------------------------------------------------------------------------------------

async fn character(s: &TestServer, owner: &str, public: bool) -> String {
    let c = s
        .create_character(
            &token(owner),
            json!({"name": "Mira", "description": "A librarian", "isPublic": public}),
        )
        .await;
    c["id"].as_str().expect("id").to_string()
}

fn path(id: &str) -> String {
    format!("/api/characters/{id}/memory")
}

async fn post(s: &TestServer, t: &str, id: &str, body: Value) -> reqwest::Response {
    s.post_json(&path(id), Some(t), &body).await
}

async fn add(s: &TestServer, t: &str, id: &str, memory: Value) -> Value {
    let r = post(s, t, id, json!({"operation": "add", "memory": memory})).await;
    let status = r.status();
    let v: Value = r.json().await.expect("json");
    assert_eq!(status, 201, "add failed: {v}");
    v["memory"].clone()
}

async fn list(s: &TestServer, t: &str, id: &str, query: &str) -> Value {
    let r = s.get(&format!("{}{query}", path(id)), Some(t)).await;
    assert_eq!(r.status(), 200);
    r.json().await.expect("json")
}

fn ids(v: &Value) -> Vec<String> {
    v["memory"]
        .as_array()
        .expect("memory array")
        .iter()
        .map(|m| m["id"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn add_list_update_remove_round_trip_with_statistics() {
    let s = TestServer::start().await;
    let t = token("alice");
    let id = character(&s, "alice", false).await;

    let m = add(
        &s,
        &t,
        &id,
        json!({"content": "Alice has a dog named Rex", "kind": "fact", "importance": 0.8, "tags": ["pets"]}),
    )
    .await;
    assert_eq!(m["content"], "Alice has a dog named Rex");
    assert_eq!(m["kind"], "fact");
    assert_eq!(m["importance"], 0.8);
    assert_eq!(m["tags"], json!(["pets"]));
    assert_eq!(m["scope"], "user");
    assert_eq!(m["source"], "user");
    assert_eq!(m["recallCount"], 0);
    assert_eq!(m["lastRecalledAt"], Value::Null);
    assert!(m["createdAt"].as_str().is_some() && m["updatedAt"].as_str().is_some());
    let mid = m["id"].as_str().expect("id").to_string();
    add(
        &s,
        &t,
        &id,
        json!({"content": "Alice prefers tea", "kind": "preference"}),
    )
    .await;

    let v = list(&s, &t, &id, "").await;
    assert_eq!(v["memory"].as_array().map(Vec::len), Some(2));
    let st = &v["statistics"];
    assert_eq!(st["total"], 2);
    assert_eq!(st["byKind"]["fact"], 1);
    assert_eq!(st["byKind"]["preference"], 1);
    assert_eq!(st["byKind"]["event"], 0);
    assert_eq!(st["byScope"]["user"], 2);
    assert!(st["totalTokens"].as_u64().unwrap_or(0) > 5);
    assert_eq!(st["lastRecallAt"], Value::Null);
    assert_eq!(v["summary"]["content"], "");

    // Filters and search.
    assert_eq!(
        ids(&list(&s, &t, &id, "?kind=fact").await),
        vec![mid.clone()]
    );
    assert_eq!(
        ids(&list(&s, &t, &id, "?search=dogs").await),
        vec![mid.clone()]
    );
    assert_eq!(
        ids(&list(&s, &t, &id, "?query=pets").await),
        vec![mid.clone()]
    );
    assert_eq!(
        list(&s, &t, &id, "?scope=character").await["memory"],
        json!([])
    );
    assert_eq!(
        list(&s, &t, &id, "?limit=1&offset=1").await["memory"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // The character detail counts memories.
    let detail: Value = s
        .get(&format!("/api/characters/{id}"), Some(&t))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(detail["statistics"]["memoryCount"], 2);

    let r = post(&s, &t, &id, json!({"operation": "update", "memory": {"id": mid, "content": "Alice has two dogs", "importance": 1}})).await;
    assert_eq!(r.status(), 200);
    let updated: Value = r.json().await.expect("json");
    assert_eq!(updated["memory"]["content"], "Alice has two dogs");
    assert_eq!(updated["memory"]["importance"], 1.0);
    assert_eq!(updated["memory"]["kind"], "fact");

    let r = post(
        &s,
        &t,
        &id,
        json!({"operation": "remove", "memory": {"id": mid}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v = list(&s, &t, &id, "").await;
    assert_eq!(v["statistics"]["total"], 1);
    let detail: Value = s
        .get(&format!("/api/characters/{id}"), Some(&t))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(detail["statistics"]["memoryCount"], 1);

    let r = post(
        &s,
        &t,
        &id,
        json!({"operation": "remove", "memory": {"id": mid}}),
    )
    .await;
    expect_error(r, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn every_validation_error_names_its_field() {
    let s = TestServer::start().await;
    let t = token("alice");
    let id = character(&s, "alice", false).await;
    let long = "x".repeat(8 * 1024 + 1);
    let tags: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"operation": "add", "memory": {"content": ""}}),
            "memory.content",
        ),
        (
            json!({"operation": "add", "memory": {"content": "   "}}),
            "memory.content",
        ),
        (
            json!({"operation": "add", "memory": {"content": long}}),
            "memory.content",
        ),
        (
            json!({"operation": "add", "memory": {"content": "x", "kind": "gossip"}}),
            "memory.kind",
        ),
        (
            json!({"operation": "add", "memory": {"content": "x", "importance": 1.5}}),
            "memory.importance",
        ),
        (
            json!({"operation": "add", "memory": {"content": "x", "importance": -0.1}}),
            "memory.importance",
        ),
        (
            json!({"operation": "add", "memory": {"content": "x", "importance": "high"}}),
            "memory.importance",
        ),
        (
            json!({"operation": "add", "memory": {"content": "x", "tags": tags}}),
            "memory.tags",
        ),
        (
            json!({"operation": "add", "memory": {"content": "x", "tags": [""]}}),
            "memory.tags",
        ),
        (
            json!({"operation": "add", "memory": {"content": "x", "scope": "world"}}),
            "memory.scope",
        ),
        (
            json!({"operation": "add", "memory": {"content": "x", "conversationId": "nope"}}),
            "memory.conversationId",
        ),
        (
            json!({"operation": "add", "memory": {"content": "x", "colour": "red"}}),
            "memory",
        ),
        (
            json!({"operation": "merge", "memory": {"content": "x"}}),
            "operation",
        ),
        (json!({"memory": {"content": "x"}}), "operation"),
        (json!({"operation": "add"}), "memory"),
        (
            json!({"operation": "update", "memory": {"content": "x"}}),
            "memory.id",
        ),
        (
            json!({"operation": "remove", "memory": {"id": "not-a-uuid"}}),
            "memory.id",
        ),
    ];
    for (body, field) in cases {
        let r = post(&s, &t, &id, body.clone()).await;
        let v = expect_error(r, 400, "VALIDATION_ERROR").await;
        let got = v["error"]["details"]["field"].as_str().unwrap_or("");
        assert!(
            got.starts_with(field),
            "body {body}: field {got:?}, expected {field:?}"
        );
    }
    for (query, field) in [
        ("?kind=gossip", "kind"),
        ("?scope=world", "scope"),
        ("?limit=0", "limit"),
        ("?limit=x", "limit"),
    ] {
        let r = s.get(&format!("{}{query}", path(&id)), Some(&t)).await;
        let v = expect_error(r, 400, "VALIDATION_ERROR").await;
        assert_eq!(v["error"]["details"]["field"], field, "{query}");
    }
    let r = s.get(&path(&id), None).await;
    expect_error(r, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn user_b_cannot_read_or_modify_user_a_private_memories_even_as_owner() {
    let s = TestServer::start().await;
    let (a, b) = (token("alice"), token("bob"));
    // Bob owns the public character Alice chats with.
    let id = character(&s, "bob", true).await;
    let secret = add(
        &s,
        &a,
        &id,
        json!({"content": "Alice's secret diary entry"}),
    )
    .await;
    let sid = secret["id"].as_str().expect("id").to_string();
    add(&s, &b, &id, json!({"content": "Bob's own note"})).await;

    for t in [&b, &admin_token("root")] {
        let v = list(&s, t, &id, "").await;
        assert!(
            !ids(&v).contains(&sid),
            "another user saw Alice's private memory"
        );
        assert!(!v.to_string().contains("secret diary"));
        assert!(list(&s, t, &id, "?search=secret").await["memory"]
            .as_array()
            .is_some_and(Vec::is_empty));
        let r = post(
            &s,
            t,
            &id,
            json!({"operation": "update", "memory": {"id": sid, "content": "hacked"}}),
        )
        .await;
        expect_error(r, 404, "NOT_FOUND").await;
        let r = post(
            &s,
            t,
            &id,
            json!({"operation": "remove", "memory": {"id": sid, "scope": "user"}}),
        )
        .await;
        expect_error(r, 404, "NOT_FOUND").await;
    }
    let v = list(&s, &a, &id, "").await;
    assert_eq!(ids(&v), vec![sid]);
    assert_eq!(v["memory"][0]["content"], "Alice's secret diary entry");
    assert_eq!(
        v["statistics"]["total"], 1,
        "Bob's private note must not count for Alice"
    );
}

#[tokio::test]
async fn owner_manages_shared_memory_a_non_owner_cannot_and_an_admin_can() {
    let s = TestServer::start().await;
    let (owner, other, admin) = (token("olga"), token("pete"), admin_token("root"));
    let id = character(&s, "olga", true).await;

    let shared = add(
        &s,
        &owner,
        &id,
        json!({"content": "Mira works at the city library", "scope": "character"}),
    )
    .await;
    assert_eq!(shared["scope"], "character");
    let sid = shared["id"].as_str().expect("id").to_string();

    // Every user's view includes the shared memory.
    let v = list(&s, &other, &id, "?scope=character").await;
    assert_eq!(ids(&v), vec![sid.clone()]);
    assert_eq!(v["statistics"]["byScope"]["character"], 1);

    let r = post(
        &s,
        &other,
        &id,
        json!({"operation": "add", "memory": {"content": "x", "scope": "character"}}),
    )
    .await;
    expect_error(r, 403, "CHARACTER_ACCESS_DENIED").await;
    let r = post(
        &s,
        &other,
        &id,
        json!({"operation": "update", "memory": {"id": sid, "content": "vandalized"}}),
    )
    .await;
    expect_error(r, 403, "CHARACTER_ACCESS_DENIED").await;
    let r = post(
        &s,
        &other,
        &id,
        json!({"operation": "remove", "memory": {"id": sid}}),
    )
    .await;
    expect_error(r, 403, "CHARACTER_ACCESS_DENIED").await;

    let r = post(&s, &admin, &id, json!({"operation": "update", "memory": {"id": sid, "content": "Mira runs the city library", "scope": "character"}})).await;
    assert_eq!(r.status(), 200);
    let v = list(&s, &owner, &id, "").await;
    assert_eq!(v["memory"][0]["content"], "Mira runs the city library");
    let r = post(
        &s,
        &owner,
        &id,
        json!({"operation": "remove", "memory": {"id": sid}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(list(&s, &other, &id, "").await["statistics"]["total"], 0);
}

#[tokio::test]
async fn a_private_character_s_memory_is_closed_to_others_and_deleted_with_it() {
    let s = TestServer::start().await;
    let (owner, other) = (token("olga"), token("pete"));
    let id = character(&s, "olga", false).await;
    add(&s, &owner, &id, json!({"content": "note"})).await;
    let r = s.get(&path(&id), Some(&other)).await;
    expect_error(r, 403, "CHARACTER_ACCESS_DENIED").await;
    let r = post(
        &s,
        &other,
        &id,
        json!({"operation": "add", "memory": {"content": "x"}}),
    )
    .await;
    expect_error(r, 403, "CHARACTER_ACCESS_DENIED").await;
    let r = s
        .delete(&format!("/api/characters/{id}"), Some(&owner))
        .await;
    assert!(r.status().is_success());
    let r = s.get(&path(&id), Some(&owner)).await;
    expect_error(r, 404, "CHARACTER_NOT_FOUND").await;
}

// ---- service level against the fake upstream --------------------------------------------------

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    memory: MemoryService,
    character: Character,
    user: User,
    fake: FakeUpstream,
}

fn user(id: &str) -> User {
    User {
        id: id.into(),
        admin: false,
        name: None,
    }
}

async fn fixture(config: MemoryConfig) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("t.redb"), &Default::default()).expect("store");
    let characters = CharacterService::new(store.clone(), LimitsConfig::default(), 1024);
    let fake = FakeUpstream::start().await;
    let mut u = UpstreamConfig {
        kind: UpstreamKind::Openai,
        url: fake.openai_url(),
        model: "fake-model".into(),
        timeout_ms: 2_000,
        ..UpstreamConfig::default()
    };
    // One attempt and a breaker that never opens: these tests count summarizer calls.
    u.retry.max_attempts = 1;
    u.circuit_breaker.consecutive_failures = 0;
    u.circuit_breaker.min_calls = 1_000;
    let mut cfg = UpstreamsConfig::default();
    cfg.upstreams.insert("main".into(), u);
    let upstreams = Arc::new(Upstreams::new(&cfg).expect("upstreams"));
    let tokenizer = Tokenizer::cl100k().expect("tokenizer");
    let owner = user("alice");
    let character = characters
        .create(
            &owner,
            NewCharacter {
                name: "Mira".into(),
                description: "A librarian".into(),
                ..NewCharacter::default()
            },
        )
        .await
        .expect("character");
    let memory = MemoryService::new(store.clone(), characters, upstreams, tokenizer, config);
    Fixture {
        _dir: dir,
        store,
        memory,
        character,
        user: owner,
        fake,
    }
}

impl Fixture {
    async fn add(&self, content: &str, importance: f64, scope: &str) -> String {
        let m = self
            .memory
            .apply(
                &self.user,
                &self.character.id,
                MemoryOperation::Add,
                MemoryInput {
                    content: Some(content.into()),
                    importance: Some(importance),
                    scope: Some(scope.into()),
                    ..MemoryInput::default()
                },
            )
            .await
            .expect("add");
        m.id
    }

    async fn view(&self) -> taproom::memory::MemoryView {
        self.memory
            .list(&self.user, &self.character.id, MemoryQuery::default())
            .await
            .expect("list")
    }
}

/// A conversation of `turns` user/character exchanges, seqs from 0.
fn history(turns: usize) -> Vec<Arc<StoredMessage>> {
    let mut out = Vec::new();
    for i in 0..turns {
        let seq = (2 * i) as u64;
        out.push(Arc::new(taproom::conversations::new_message(
            seq,
            MessageRole::User,
            "Alice",
            format!("user turn {i}"),
        )));
        out.push(Arc::new(taproom::conversations::new_message(
            seq + 1,
            MessageRole::Character,
            "Mira",
            format!("reply {i}"),
        )));
    }
    out
}

const CONV: &str = "01900000-0000-7000-8000-000000000001";

#[tokio::test]
async fn recall_fills_the_prompt_block_with_relevant_memories_and_counts_them() {
    let f = fixture(MemoryConfig::default()).await;
    let dog = f.add("Alice has a dog named Rex", 0.5, "user").await;
    f.add("Alice is learning the violin", 0.5, "user").await;
    let shared = f
        .add("Mira guards the restricted archive", 0.5, "character")
        .await;

    let r = f
        .memory
        .recall(
            &f.user,
            &f.character,
            Some(CONV),
            "How is Rex the dog?",
            512,
            8,
        )
        .await
        .expect("recall");
    assert_eq!(
        r.memories.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![dog.clone()]
    );
    assert_eq!(
        r.block.recalled,
        vec!["Alice has a dog named Rex".to_string()]
    );
    assert_eq!(r.summary, None);

    let r = f
        .memory
        .recall_preview(&f.user, &f.character, None, "the archive", 512, 8)
        .await
        .expect("recall");
    assert_eq!(r.memories[0].id, shared);
    assert_eq!(r.memories[0].scope, MemoryScope::Character);

    // Another user sees the shared memory but never Alice's private one.
    let bob = user("bob");
    let mut public = f.character.clone();
    public.is_public = true;
    let r = f
        .memory
        .recall_preview(&bob, &public, None, "Rex the dog and the archive", 512, 8)
        .await
        .expect("recall");
    assert_eq!(
        r.memories.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![shared]
    );

    // recallCount / lastRecalledAt are written in the background; wait for them.
    let mut counted = None;
    for _ in 0..200 {
        let v = f.view().await;
        counted = v
            .memory
            .into_iter()
            .find(|m| m.id == dog && m.recall_count == 1);
        if counted.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let counted = counted.expect("recall was counted");
    assert!(counted.last_recalled_at.is_some());
    assert!(f.view().await.statistics.last_recall_at.is_some());
}

#[tokio::test]
async fn recall_respects_the_token_budget_and_top_k() {
    let f = fixture(MemoryConfig::default()).await;
    let long = format!("The garden {}", "has many flowers and trees ".repeat(40));
    f.add(&long, 1.0, "user").await;
    let short = f.add("The garden gate is blue", 0.1, "user").await;
    f.add("The garden shed is old", 0.1, "user").await;
    // The long memory ranks first but does not fit in 30 tokens.
    let r = f
        .memory
        .recall_preview(&f.user, &f.character, None, "garden", 30, 8)
        .await
        .expect("recall");
    assert!(r.memories.iter().all(|m| m.content.len() < 100));
    assert_eq!(r.memories.len(), 2);
    let r = f
        .memory
        .recall_preview(&f.user, &f.character, None, "garden gate", 1_000, 1)
        .await
        .expect("recall");
    assert_eq!(r.memories.len(), 1);
    assert_eq!(
        r.memories[0].id, short,
        "the only memory matching both terms ranks first"
    );
}

#[tokio::test]
async fn a_summary_appears_after_n_turns_and_joins_the_recall() {
    let config = MemoryConfig {
        summarize_every_turns: 3,
        ..MemoryConfig::default()
    };
    let f = fixture(config).await;
    assert!(f
        .memory
        .note_turn(&f.user, &f.character, CONV, &history(2))
        .is_none());
    assert_eq!(f.fake.request_count(), 0);

    let handle = f
        .memory
        .note_turn(&f.user, &f.character, CONV, &history(3))
        .expect("summarizer started");
    handle.await.expect("summarizer task");
    assert_eq!(f.fake.request_count(), 1);
    let sent = f.fake.last_body().expect("request body").to_string();
    assert!(
        sent.contains("Alice: user turn 2") && sent.contains("Mira: reply 0"),
        "{sent}"
    );

    let v = f.view().await;
    assert!(
        v.summary.content.starts_with("echo: Update the summary"),
        "{:?}",
        v.summary
    );
    assert_eq!(v.summary.conversation_id, CONV);
    assert_eq!(v.summary.last_summarized_message, 5);
    assert!(v.summary.tokens > 0);
    assert_eq!(v.statistics.last_summarized_message, Some(5));

    // The next summary waits for three more user turns, and carries the previous one forward.
    assert!(f
        .memory
        .note_turn(&f.user, &f.character, CONV, &history(5))
        .is_none());
    let handle = f
        .memory
        .note_turn(&f.user, &f.character, CONV, &history(6))
        .expect("second summary");
    handle.await.expect("summarizer task");
    let sent = f.fake.last_body().expect("request body").to_string();
    assert!(
        sent.contains("Summary so far") && !sent.contains("user turn 2"),
        "{sent}"
    );
    assert_eq!(f.view().await.summary.last_summarized_message, 11);

    let r = f
        .memory
        .recall(&f.user, &f.character, Some(CONV), "anything", 512, 8)
        .await
        .expect("recall");
    assert!(r.block.summary.starts_with("echo:"));
    assert_eq!(r.summary.as_deref(), Some(r.block.summary.as_str()));
}

#[tokio::test]
async fn a_failing_summarizer_changes_nothing_and_is_retried_on_a_later_turn() {
    let config = MemoryConfig {
        summarize_every_turns: 2,
        ..MemoryConfig::default()
    };
    let f = fixture(config).await;
    let before = f.add("Alice has a dog named Rex", 0.5, "user").await;
    f.fake.set_fault(Some(Fault::Status(503)));
    let handle = f
        .memory
        .note_turn(&f.user, &f.character, CONV, &history(2))
        .expect("started");
    handle.await.expect("task must not panic");
    let v = f.view().await;
    assert_eq!(v.summary.content, "");
    assert_eq!(v.statistics.last_summarized_message, None);
    assert_eq!(v.memory.len(), 1);
    // Recall still works while the summarizer is failing.
    let r = f
        .memory
        .recall_preview(&f.user, &f.character, Some(CONV), "dog", 512, 8)
        .await
        .expect("recall");
    assert_eq!(r.memories[0].id, before);

    f.fake.clear_faults();
    let handle = f
        .memory
        .note_turn(&f.user, &f.character, CONV, &history(3))
        .expect("retried");
    handle.await.expect("task");
    let v = f.view().await;
    assert!(v.summary.content.starts_with("echo:"));
    assert_eq!(v.summary.last_summarized_message, 5);
}

#[tokio::test]
async fn extracted_facts_are_stored_as_automatic_fact_memories() {
    let config = MemoryConfig {
        summarize_every_turns: 1,
        extract_facts: true,
        ..MemoryConfig::default()
    };
    let f = fixture(config).await;
    let handle = f
        .memory
        .note_turn(&f.user, &f.character, CONV, &history(1))
        .expect("started");
    handle.await.expect("task");
    assert_eq!(f.fake.request_count(), 2);
    let v = f.view().await;
    assert_eq!(v.memory.len(), 1);
    let fact = &v.memory[0];
    assert_eq!(fact.kind, MemoryKind::Fact);
    assert_eq!(fact.source, MemorySource::Auto);
    assert_eq!(fact.conversation_id.as_deref(), Some(CONV));
    assert!(fact.content.starts_with("echo: List at most"));
    let stats = f
        .store
        .character_stats(taproom::store::parse_id(&f.character.id).expect("id"))
        .expect("stats");
    assert_eq!(stats.memory_count, 1);
}

#[tokio::test]
async fn plugin_memories_are_private_and_marked_as_plugin() {
    let f = fixture(MemoryConfig::default()).await;
    let m = f
        .memory
        .add_from_plugin(
            &f.user,
            &f.character,
            Some(CONV),
            PluginMemory {
                content: "Alice said the password is swordfish".into(),
                kind: MemoryKind::Event,
                importance: 0.7,
                tags: vec!["plugin".into()],
            },
        )
        .await
        .expect("plugin add");
    assert_eq!(m.source, MemorySource::Plugin);
    assert_eq!(m.scope, MemoryScope::User);
    let r = f
        .memory
        .recall_preview(&f.user, &f.character, None, "password", 512, 8)
        .await
        .expect("recall");
    assert_eq!(r.memories[0].id, m.id);
}

/// Assembles the prompt for `text` with the given memory block and sends it to the fake
/// upstream, as the interact endpoint does; returns the request body the fake received.
async fn send_turn(
    f: &Fixture,
    upstreams: &Upstreams,
    text: &str,
    block: Option<&taproom::prompt::assemble::MemoryBlock>,
) -> String {
    use taproom::prompt::assemble::{assemble, Budget, PromptInput, PromptOptions};
    use taproom::prompt::lorebook::LoreState;
    use taproom::prompt::{HistoryMessage, Role};
    use taproom::upstream::{ChatMessage, GenerateRequest};
    let history = vec![HistoryMessage {
        role: Role::User,
        name: "Alice".into(),
        content: text.into(),
        tokens: None,
    }];
    let options = PromptOptions::default();
    let lore = LoreState::default();
    let tokenizer = Tokenizer::cl100k().expect("tokenizer");
    let prompt = assemble(
        &PromptInput {
            character: &f.character,
            lorebook: None,
            user_name: "Alice",
            persona: "",
            history: &history,
            memory: block,
            budget: Budget {
                max_context_tokens: 4096,
                max_reply_tokens: 256,
            },
            lore_state: &lore,
            rng_seed: 1,
            conversation_seed: 2,
            now: chrono::Utc::now().fixed_offset(),
            extra_sections: &[],
            options: &options,
        },
        &tokenizer,
    );
    let messages: Vec<ChatMessage> = prompt
        .messages
        .iter()
        .map(|m| {
            let role = serde_json::to_value(m.role).expect("role");
            ChatMessage::new(role.as_str().unwrap_or("user"), m.content.clone())
        })
        .collect();
    let req = GenerateRequest {
        character_id: f.character.id.clone(),
        messages,
        user_input: text.into(),
        ..GenerateRequest::default()
    };
    upstreams
        .get(None)
        .expect("upstream")
        .generate(&req)
        .await
        .expect("generate");
    f.fake.last_body().expect("body").to_string()
}

#[tokio::test]
async fn recall_changes_the_prompt_the_upstream_receives() {
    let f = fixture(MemoryConfig::default()).await;
    f.add("Alice's dog Rex is afraid of thunder", 0.5, "user")
        .await;
    f.add("Alice collects stamps", 0.5, "user").await;
    let mut u = UpstreamConfig {
        kind: UpstreamKind::Openai,
        url: f.fake.openai_url(),
        ..UpstreamConfig::default()
    };
    u.retry.max_attempts = 1;
    let mut cfg = UpstreamsConfig::default();
    cfg.upstreams.insert("main".into(), u);
    let upstreams = Upstreams::new(&cfg).expect("upstreams");

    let text = "There is a storm coming, how will Rex cope with the thunder?";
    let without = send_turn(&f, &upstreams, text, None).await;
    assert!(!without.contains("afraid of thunder"));

    let r = f
        .memory
        .recall(&f.user, &f.character, Some(CONV), text, 512, 8)
        .await
        .expect("recall");
    let with = send_turn(&f, &upstreams, text, Some(&r.block)).await;
    assert!(
        with.contains("Alice's dog Rex is afraid of thunder"),
        "{with}"
    );
    assert!(
        !with.contains("collects stamps"),
        "irrelevant memory recalled: {with}"
    );
}

#[tokio::test]
async fn a_summary_finishing_after_its_character_was_deleted_is_dropped() {
    let config = MemoryConfig {
        summarize_every_turns: 1,
        ..MemoryConfig::default()
    };
    let f = fixture(config).await;
    f.add("something to delete", 0.5, "user").await;
    let key = taproom::store::parse_id(&f.character.id).expect("id");
    // The upstream answers slowly; the character is deleted meanwhile.
    f.fake
        .set_latency(support::fake_upstream::Latency::Fixed(300));
    let handle = f
        .memory
        .note_turn(&f.user, &f.character, CONV, &history(1))
        .expect("started");
    f.store.delete_character(key).expect("delete");
    handle.await.expect("task");
    let cid = taproom::store::parse_id(CONV).expect("conversation id");
    assert_eq!(
        f.store.summary_state(key, "alice", cid).expect("state"),
        Default::default()
    );
    assert!(f
        .store
        .list_memories(key, "alice")
        .expect("list")
        .is_empty());
}

#[tokio::test]
async fn with_an_embeddings_upstream_semantic_similarity_joins_recall() {
    let config = MemoryConfig {
        embeddings_upstream: Some("main".into()),
        ..MemoryConfig::default()
    };
    let f = fixture(config).await;
    // Only stop words: BM25 cannot match it, an embedding of the same text can.
    let text = "it is what it is";
    let id = f.add(text, 0.1, "user").await;
    let key = taproom::store::parse_id(&f.character.id).expect("id");
    let mid = taproom::store::parse_id(&id).expect("memory id");
    // The vector is written in the background; wait for it.
    let mut stored = false;
    for _ in 0..200 {
        let vectors = f.store.list_memory_vectors(key, "alice").expect("vectors");
        if vectors.iter().any(|(v, vec)| *v == mid && !vec.is_empty()) {
            stored = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(stored, "the memory's embedding was stored");
    let r = f
        .memory
        .recall_preview(&f.user, &f.character, None, text, 512, 8)
        .await
        .expect("recall");
    assert_eq!(r.memories.first().map(|m| m.id.clone()), Some(id.clone()));
    assert!(f
        .fake
        .requests()
        .iter()
        .any(|r| r.path.ends_with("/embeddings")));

    // Without embeddings the same recall finds nothing.
    let plain = fixture(MemoryConfig::default()).await;
    plain.add(text, 0.1, "user").await;
    let r = plain
        .memory
        .recall_preview(&plain.user, &plain.character, None, text, 512, 8)
        .await
        .expect("recall");
    assert!(r.memories.is_empty());

    // Removing the memory removes its vector.
    f.memory
        .apply(
            &f.user,
            &f.character.id,
            MemoryOperation::Remove,
            MemoryInput {
                id: Some(id),
                ..MemoryInput::default()
            },
        )
        .await
        .expect("remove");
    assert!(f
        .store
        .list_memory_vectors(key, "alice")
        .expect("vectors")
        .is_empty());
}
