//! Crash durability of the real binary: several clients write concurrently, the process is
//! killed with SIGKILL at a random moment, and after a restart on the same data directory every
//! write that was answered 2xx must be there (at its acknowledged version or later) and the
//! database must open cleanly. Twenty rounds over one data directory. The writes are character
//! creates and updates and interact turns (user message plus stored reply) against the fake
//! upstream.

mod support;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::app::{admin_token, bin, cli, signal, token, Options, TestServer, SECRET};
use support::fake_upstream::FakeUpstream;

const ROUNDS: usize = 20;
const CLIENTS: usize = 4;

/// Acknowledged writes: character id → (owner, highest version answered 2xx).
type Acks = Arc<Mutex<HashMap<String, (String, u64)>>>;

/// Acknowledged interact replies: reply message id → (owner, conversation id).
type Replies = Arc<Mutex<HashMap<String, (String, String)>>>;

/// What a 2xx answer acknowledged.
enum Ack {
    Character(String, u64),
    Reply {
        conversation: String,
        message: String,
    },
}

/// One kind of write a client performs. Adding a kind (e.g. interact) is one variant, one arm
/// in `pick` and one in `perform`.
#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    Update,
    Interact,
}

fn pick(own: &[(String, u64)]) -> Op {
    if own.is_empty() || rand::random_bool(0.3) {
        Op::Create
    } else if rand::random_bool(0.5) {
        Op::Update
    } else {
        Op::Interact
    }
}

/// Runs one op; `Err` when the connection broke (the server is gone).
async fn perform(
    client: &reqwest::Client,
    base: &str,
    tok: &str,
    op: Op,
    own: &mut Vec<(String, u64)>,
    conversations: &mut Vec<(String, String)>,
    n: usize,
) -> Result<Option<Ack>, reqwest::Error> {
    match op {
        Op::Create => {
            let r = client
                .post(format!("{base}/api/characters"))
                .bearer_auth(tok)
                .json(&json!({"name": format!("C{n}"), "description": format!("created {n}")}))
                .send()
                .await?;
            if !r.status().is_success() {
                return Ok(None);
            }
            let v: Value = r.json().await?;
            let id = v["id"].as_str().unwrap_or_default().to_string();
            let version = v["version"].as_u64().unwrap_or(0);
            own.push((id.clone(), version));
            Ok(Some(Ack::Character(id, version)))
        }
        Op::Update => {
            let i = rand::random_range(0..own.len());
            let (id, version) = own[i].clone();
            let r = client
                .put(format!("{base}/api/characters/{id}"))
                .bearer_auth(tok)
                .json(&json!({"version": version, "description": format!("updated {n}")}))
                .send()
                .await?;
            if !r.status().is_success() {
                return Ok(None);
            }
            let v: Value = r.json().await?;
            let version = v["version"].as_u64().unwrap_or(0);
            own[i].1 = version;
            Ok(Some(Ack::Character(id, version)))
        }
        Op::Interact => {
            // Half the turns continue one of this client's conversations, half start one.
            let (id, conversation) = match conversations.len() {
                0 => (own[rand::random_range(0..own.len())].0.clone(), None),
                len if rand::random_bool(0.5) => {
                    let (c, cid) = conversations[rand::random_range(0..len)].clone();
                    (c, Some(cid))
                }
                _ => (own[rand::random_range(0..own.len())].0.clone(), None),
            };
            let r = client
                .post(format!("{base}/api/characters/{id}/interact"))
                .bearer_auth(tok)
                .json(&json!({"message": format!("turn {n}"), "conversationId": conversation}))
                .send()
                .await?;
            if !r.status().is_success() {
                return Ok(None);
            }
            let v: Value = r.json().await?;
            let cid = v["conversationId"].as_str().unwrap_or_default().to_string();
            let mid = v["response"]["id"].as_str().unwrap_or_default().to_string();
            if conversation.is_none() {
                conversations.push((id, cid.clone()));
            }
            Ok(Some(Ack::Reply {
                conversation: cid,
                message: mid,
            }))
        }
    }
}

/// Writes until the server stops answering.
async fn writer(client: reqwest::Client, base: String, user: String, acks: Acks, replies: Replies) {
    let tok = token(&user);
    // Characters this client already owns from earlier rounds, at their acknowledged versions.
    let mut own: Vec<(String, u64)> = acks
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, (owner, _))| *owner == user)
        .map(|(id, (_, v))| (id.clone(), *v))
        .collect();
    // Conversations are started afresh each round: (character id, conversation id).
    let mut conversations = Vec::new();
    for n in 0.. {
        let op = pick(&own);
        match perform(&client, &base, &tok, op, &mut own, &mut conversations, n).await {
            Ok(Some(Ack::Character(id, version))) => {
                let mut a = acks.lock().unwrap();
                let e = a.entry(id).or_insert((user.clone(), 0));
                e.1 = e.1.max(version);
            }
            Ok(Some(Ack::Reply {
                conversation,
                message,
            })) => {
                replies
                    .lock()
                    .unwrap()
                    .insert(message, (user.clone(), conversation));
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// Every acknowledged write is present at its version or later, and every acknowledged reply is
/// in its conversation.
async fn verify(s: &TestServer, acks: &Acks, replies: &Replies) {
    let expected: Vec<(String, (String, u64))> = acks.lock().unwrap().clone().into_iter().collect();
    let checks = futures_util::stream::iter(expected)
        .map(|(id, (owner, version))| async move {
            let r = s
                .get(&format!("/api/characters/{id}"), Some(&token(&owner)))
                .await;
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (id, version, status, v)
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for (id, version, status, v) in &checks {
        assert_eq!(*status, 200, "acknowledged character {id} is missing: {v}");
        let got = v["version"].as_u64().unwrap_or(0);
        assert!(
            got >= *version,
            "character {id}: acknowledged version {version}, found {got}"
        );
    }
    // The counters move in the same commits as the rows they count, so after any crash and
    // recovery they still match: a commit recovered twice from the turn log would not.
    let owners: HashMap<String, String> = acks
        .lock()
        .unwrap()
        .iter()
        .map(|(id, (owner, _))| (id.clone(), owner.clone()))
        .collect();
    let counted = futures_util::stream::iter(checks.iter().filter(|c| c.2 == 200))
        .map(|(id, _, _, v)| {
            let owner = owners[id].clone();
            async move { (id, v, count_conversations(s, id, &owner).await) }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for (id, v, (conversations, messages)) in counted {
        let stats = &v["statistics"];
        assert_eq!(
            stats["conversationCount"].as_u64(),
            Some(conversations),
            "character {id}: statistics {stats} against {conversations} conversations"
        );
        assert_eq!(
            stats["messageCount"].as_u64(),
            Some(messages),
            "character {id}: statistics {stats} against {messages} stored messages"
        );
    }
    let mut by_conversation: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for (mid, (owner, cid)) in replies.lock().unwrap().clone() {
        by_conversation
            .entry(cid)
            .or_insert((owner, Vec::new()))
            .1
            .push(mid);
    }
    let checks = futures_util::stream::iter(by_conversation)
        .map(|(cid, (owner, mids))| async move {
            let r = s
                .get(
                    &format!("/api/conversations/{cid}?limit=200"),
                    Some(&token(&owner)),
                )
                .await;
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (cid, mids, status, v)
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for (cid, mids, status, v) in checks {
        assert_eq!(
            status, 200,
            "conversation {cid} with acknowledged replies is missing: {v}"
        );
        let stored: Vec<&str> = v["messages"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["id"].as_str()).collect())
            .unwrap_or_default();
        for mid in mids {
            assert!(
                stored.contains(&mid.as_str()),
                "acknowledged reply {mid} is missing from conversation {cid}"
            );
        }
    }
}

/// The number of `owner`'s conversations with character `id`, and their messages in total.
async fn count_conversations(s: &TestServer, id: &str, owner: &str) -> (u64, u64) {
    let (mut conversations, mut messages) = (0, 0);
    let mut cursor: Option<String> = None;
    loop {
        let page = match &cursor {
            Some(c) => format!("/api/characters/{id}/conversations?limit=100&before={c}"),
            None => format!("/api/characters/{id}/conversations?limit=100"),
        };
        let v: Value = s
            .get(&page, Some(&token(owner)))
            .await
            .json()
            .await
            .unwrap();
        for c in v["conversations"]
            .as_array()
            .expect("a page of conversations")
        {
            conversations += 1;
            messages += c["messageCount"].as_u64().expect("messageCount");
        }
        match v["nextCursor"].as_str() {
            Some(c) if v["hasMore"] == true => cursor = Some(c.to_string()),
            _ => return (conversations, messages),
        }
    }
}

fn start(dir: &Path, fake: &FakeUpstream) -> impl std::future::Future<Output = TestServer> {
    TestServer::start_with(Options {
        data_dir: Some(dir.to_path_buf()),
        config: Some(format!(
            "[upstreams.main]\nurl = \"{}\"\n[rate_limit]\ninteract_per_minute = 0\nother_per_minute = 0\n",
            fake.openai_url()
        )),
        ..Options::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let acks: Acks = Arc::default();
    let replies: Replies = Arc::default();
    let fake = FakeUpstream::start().await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(CLIENTS)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for round in 0..ROUNDS {
        let s = start(dir.path(), &fake).await;
        verify(&s, &acks, &replies).await;
        let writers: Vec<_> = (0..CLIENTS)
            .map(|c| {
                tokio::spawn(writer(
                    client.clone(),
                    s.base.clone(),
                    format!("user{c}"),
                    acks.clone(),
                    replies.clone(),
                ))
            })
            .collect();
        let delay = rand::random_range(50..=400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        signal(s.pid(), "KILL");
        for w in writers {
            w.await.unwrap();
        }
        drop(s);
        let count = acks.lock().unwrap().len();
        let turns = replies.lock().unwrap().len();
        eprintln!(
            "round {round}: killed after {delay} ms, {count} characters and {turns} replies acknowledged"
        );
    }
    let s = start(dir.path(), &fake).await;
    verify(&s, &acks, &replies).await;
    assert_eq!(s.get("/readyz", None).await.status(), 200);
    assert!(s.terminate().success());
    assert!(
        !acks.lock().unwrap().is_empty(),
        "no write was acknowledged"
    );
    assert!(
        !replies.lock().unwrap().is_empty(),
        "no interact turn was acknowledged"
    );

    // The file opens cleanly on its own too: an offline backup opens it and validates the copy.
    let out = dir.path().join("after-crashes.redb");
    let o = std::process::Command::new(bin())
        .args(["backup", "--out"])
        .arg(&out)
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("TAPROOM_CONFIG")
        .env("TAPROOM_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Starts a new conversation with `character` and returns its id.
async fn new_conversation(s: &TestServer, tok: &str, character: &str, message: &str) -> String {
    let r = s
        .post_json(
            &format!("/api/characters/{character}/interact"),
            Some(tok),
            &json!({ "message": message }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["conversationId"].as_str().unwrap().to_string()
}

/// The `statistics` of GET /api/characters/{id}.
async fn character_statistics(s: &TestServer, tok: &str, character: &str) -> Value {
    let v: Value = s
        .get(&format!("/api/characters/{character}"), Some(tok))
        .await
        .json()
        .await
        .unwrap();
    v["statistics"].clone()
}

/// Status of GET /api/conversations/{cid}.
async fn conversation_status(s: &TestServer, tok: &str, cid: &str) -> u16 {
    s.get(&format!("/api/conversations/{cid}"), Some(tok))
        .await
        .status()
        .as_u16()
}

/// Turns that only the turn log holds (the server was killed before any checkpoint) reach an
/// offline backup; a restored backup never gets another database's log applied to it.
#[tokio::test]
async fn the_turn_log_reaches_offline_backups_but_never_a_restored_one() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start().await;
    let tok = token("alice");
    let s = start(data.path(), &fake).await;
    let character = s
        .create_character(&tok, json!({"name": "Logged", "description": "d"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = new_conversation(&s, &tok, &character, "before the backup").await;
    let snapshot = work.path().join("snapshot.redb");
    let r = s
        .client
        .post(s.url("/api/admin/backup"))
        .bearer_auth(admin_token("root"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let o = cli(
        &[
            "backup",
            "--out",
            snapshot.to_str().unwrap(),
            "--url",
            &s.base,
        ],
        data.path(),
    );
    assert!(o.status.success(), "{o:?}");
    let after = new_conversation(&s, &tok, &character, "after the backup").await;
    s.kill();

    // The backup predates `after`; the data dir's turn log holds `after` and must stay out.
    let o = cli(&["restore", snapshot.to_str().unwrap()], data.path());
    assert!(o.status.success(), "{o:?}");
    let s = start(data.path(), &fake).await;
    assert_eq!(conversation_status(&s, &tok, &before).await, 200);
    assert_eq!(conversation_status(&s, &tok, &after).await, 404);
    let r = character_statistics(&s, &tok, &character).await;
    assert_eq!(r["conversationCount"], 1, "{r}");

    // A turn after the restore, then a crash: an offline backup applies the log first.
    let logged = new_conversation(&s, &tok, &character, "only in the log").await;
    s.kill();
    let offline = work.path().join("offline.redb");
    let o = cli(&["backup", "--out", offline.to_str().unwrap()], data.path());
    assert!(o.status.success(), "{o:?}");
    let fresh = tempfile::tempdir().unwrap();
    let o = cli(&["restore", offline.to_str().unwrap()], fresh.path());
    assert!(o.status.success(), "{o:?}");
    let s = start(fresh.path(), &fake).await;
    assert_eq!(conversation_status(&s, &tok, &logged).await, 200);
    assert_eq!(conversation_status(&s, &tok, &before).await, 200);
    assert_eq!(conversation_status(&s, &tok, &after).await, 404);
    let r = character_statistics(&s, &tok, &character).await;
    assert_eq!(r["conversationCount"], 2, "{r}");
    assert_eq!(r["messageCount"], 4, "{r}");

    // After a clean stop the database file alone is complete: copied without its log.
    let last = new_conversation(&s, &tok, &character, "before a clean stop").await;
    assert!(s.terminate().success());
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(
        fresh.path().join("taproom.redb"),
        copy.path().join("taproom.redb"),
    )
    .unwrap();
    let s = start(copy.path(), &fake).await;
    assert_eq!(conversation_status(&s, &tok, &last).await, 200);
    assert_eq!(conversation_status(&s, &tok, &logged).await, 200);
}
