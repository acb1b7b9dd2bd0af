//! Crash durability of the real binary: several clients write concurrently, the process is
//! killed with SIGKILL at a random moment, and after a restart on the same data directory every
//! write that was answered 2xx must be there (at its acknowledged version or later) and the
//! database must open cleanly. Twenty rounds over one data directory.

mod support;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::app::{bin, signal, token, Options, TestServer, SECRET};

const ROUNDS: usize = 20;
const CLIENTS: usize = 4;

/// Acknowledged writes: character id → (owner, highest version answered 2xx).
type Acks = Arc<Mutex<HashMap<String, (String, u64)>>>;

/// One kind of write a client performs. Adding a kind (e.g. interact) is one variant, one arm
/// in `pick` and one in `perform`.
#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    Update,
}

fn pick(own: &[(String, u64)]) -> Op {
    if own.is_empty() || rand::random_bool(0.35) {
        Op::Create
    } else {
        Op::Update
    }
}

/// Runs one op; `Err` when the connection broke (the server is gone).
async fn perform(
    client: &reqwest::Client,
    base: &str,
    tok: &str,
    op: Op,
    own: &mut Vec<(String, u64)>,
    n: usize,
) -> Result<Option<(String, u64)>, reqwest::Error> {
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
            Ok(Some((id, version)))
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
            Ok(Some((id, version)))
        }
    }
}

/// Writes until the server stops answering.
async fn writer(client: reqwest::Client, base: String, user: String, acks: Acks) {
    let tok = token(&user);
    // Characters this client already owns from earlier rounds, at their acknowledged versions.
    let mut own: Vec<(String, u64)> = acks
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, (owner, _))| *owner == user)
        .map(|(id, (_, v))| (id.clone(), *v))
        .collect();
    for n in 0.. {
        let op = pick(&own);
        match perform(&client, &base, &tok, op, &mut own, n).await {
            Ok(Some((id, version))) => {
                let mut a = acks.lock().unwrap();
                let e = a.entry(id).or_insert((user.clone(), 0));
                e.1 = e.1.max(version);
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// Every acknowledged write is present at its version or later.
async fn verify(s: &TestServer, acks: &Acks) {
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
    for (id, version, status, v) in checks {
        assert_eq!(status, 200, "acknowledged character {id} is missing: {v}");
        let got = v["version"].as_u64().unwrap_or(0);
        assert!(
            got >= version,
            "character {id}: acknowledged version {version}, found {got}"
        );
    }
}

fn start(dir: &Path) -> impl std::future::Future<Output = TestServer> {
    TestServer::start_with(Options {
        data_dir: Some(dir.to_path_buf()),
        ..Options::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let acks: Acks = Arc::default();
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(CLIENTS)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for round in 0..ROUNDS {
        let s = start(dir.path()).await;
        verify(&s, &acks).await;
        let writers: Vec<_> = (0..CLIENTS)
            .map(|c| {
                tokio::spawn(writer(
                    client.clone(),
                    s.base.clone(),
                    format!("user{c}"),
                    acks.clone(),
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
        eprintln!("round {round}: killed after {delay} ms, {count} characters acknowledged");
    }
    let s = start(dir.path()).await;
    verify(&s, &acks).await;
    assert_eq!(s.get("/readyz", None).await.status(), 200);
    assert!(s.terminate().success());
    assert!(
        !acks.lock().unwrap().is_empty(),
        "no write was acknowledged"
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
