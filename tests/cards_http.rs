//! Card import/export and lorebooks over HTTP with the real server and SillyTavern's own files.

mod support;

use serde_json::{json, Value};
use support::app::{expect_error, fixture, token, Options, TestServer};

async fn import_raw(s: &TestServer, t: &str, bytes: Vec<u8>, ct: &str) -> reqwest::Response {
    s.client
        .post(s.url("/api/characters/import"))
        .bearer_auth(t)
        .header("content-type", ct)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

fn strip(mut c: Value) -> Value {
    for k in [
        "id",
        "createdAt",
        "updatedAt",
        "avatar",
        "slug",
        "import",
        "version",
    ] {
        c.as_object_mut().unwrap().remove(k);
    }
    c
}

#[tokio::test]
async fn seraphina_png_imports_exports_and_reimports_equal() {
    let s = TestServer::start().await;
    let t = token("ann");
    let png = std::fs::read(fixture("default_Seraphina.png")).unwrap();
    let r = import_raw(&s, &t, png.clone(), "image/png").await;
    assert_eq!(r.status(), 201);
    let c: Value = r.json().await.unwrap();
    assert_eq!(c["name"], "Seraphina");
    assert_eq!(c["import"]["format"], "png");
    assert_eq!(c["import"]["spec"], "v2");
    assert_eq!(c["creatorId"], "ann");
    assert_eq!(
        c["personality"]["characterBook"]["entries"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(c["personality"]["extensions"]["talkativeness"], "0.5");
    let id = c["id"].as_str().unwrap();
    // The PNG became the avatar.
    let r = s
        .get(&format!("/api/characters/{id}/avatar"), Some(&t))
        .await;
    assert_eq!(r.status(), 200);
    let avatar = r.bytes().await.unwrap().to_vec();
    assert!(avatar.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(
        avatar.len() + 50_000 > png.len() && avatar.len() <= png.len(),
        "the card's image, without its card chunks"
    );

    for (format, ct) in [
        ("png", "image/png"),
        ("json", "application/json"),
        ("charx", "application/zip"),
    ] {
        let r = s
            .get(
                &format!("/api/characters/{id}/export?format={format}"),
                Some(&t),
            )
            .await;
        assert_eq!(r.status(), 200, "{format}");
        assert_eq!(r.headers()["content-type"], ct);
        assert!(r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("Seraphina."));
        let bytes = r.bytes().await.unwrap().to_vec();
        let r = import_raw(&s, &t, bytes, "application/octet-stream").await;
        assert_eq!(r.status(), 201, "{format}");
        let again: Value = r.json().await.unwrap();
        assert_eq!(strip(again), strip(c.clone()), "{format} round trip");
    }
    let v: Value = s
        .get(
            &format!("/api/characters/{id}/export?format=json&spec=v2"),
            Some(&t),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["spec"], "chara_card_v2");
    let mask: Value = s
        .get(
            &format!("/api/characters/{id}/export?format=nextchat-mask"),
            Some(&t),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(mask["modelConfig"]["model"], "char-seraphina");
    assert_eq!(mask["hideContext"], true);
    // Others cannot export a private character.
    expect_error(
        s.get(
            &format!("/api/characters/{id}/export?format=json"),
            Some(&token("bob")),
        )
        .await,
        403,
        "CHARACTER_ACCESS_DENIED",
    )
    .await;
}

#[tokio::test]
async fn bad_cards_are_422_and_store_nothing() {
    let s = TestServer::start_with(Options {
        config: Some("[http]\nbody_limit_bytes = 200000\n".into()),
        ..Options::default()
    })
    .await;
    let t = token("ann");
    let plain = std::fs::read(fixture("user-default.png")).unwrap();
    let v = expect_error(
        import_raw(&s, &t, plain, "image/png").await,
        422,
        "CHARACTER_INVALID_DATA",
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("character data"),
        "{v}"
    );
    expect_error(
        import_raw(&s, &t, b"[1,2]".to_vec(), "application/json").await,
        422,
        "CHARACTER_INVALID_DATA",
    )
    .await;
    expect_error(
        import_raw(
            &s,
            &t,
            b"{\"description\":\"no name\"}".to_vec(),
            "application/json",
        )
        .await,
        422,
        "CHARACTER_INVALID_DATA",
    )
    .await;
    let big = std::fs::read(fixture("default_Seraphina.png")).unwrap();
    expect_error(
        import_raw(&s, &t, big, "image/png").await,
        413,
        "PAYLOAD_TOO_LARGE",
    )
    .await;
    let list: Value = s
        .get("/api/characters", Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 0);
}

#[tokio::test]
async fn several_files_in_one_request_succeed_or_fail_on_their_own() {
    let s = TestServer::start().await;
    let t = token("ann");
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(std::fs::read(fixture("v1_Aqua.png")).unwrap())
                .file_name("aqua.png"),
        )
        .part(
            "file",
            reqwest::multipart::Part::bytes(std::fs::read(fixture("user-default.png")).unwrap())
                .file_name("plain.png"),
        )
        .part(
            "avatar",
            reqwest::multipart::Part::bytes(
                json!({"name": "Json Girl", "description": "v1"})
                    .to_string()
                    .into_bytes(),
            )
            .file_name("j.json"),
        );
    let r = s
        .client
        .post(s.url("/api/characters/import"))
        .bearer_auth(&t)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 207);
    let v: Value = r.json().await.unwrap();
    let statuses: Vec<u64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![201, 422, 201]);
    assert_eq!(v["results"][0]["character"]["import"]["spec"], "v1");
    assert_eq!(v["results"][1]["error"]["code"], "CHARACTER_INVALID_DATA");
    let list: Value = s
        .get("/api/characters", Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 2);
}

#[tokio::test]
async fn lorebook_replace_merge_and_world_info_export() {
    let s = TestServer::start().await;
    let t = token("ann");
    let c = s.create_character(&t, json!({"name": "Lore Keeper"})).await;
    let id = c["id"].as_str().unwrap();
    let world: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("Eldoria.json")).unwrap()).unwrap();
    let r = s
        .put_json(&format!("/api/characters/{id}/lorebook"), Some(&t), &world)
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["entries"], 4);
    assert_eq!(v["version"], 2);
    let extra = json!({"spec": "lorebook_v3", "data": {"entries": [{"keys": ["dragon"], "content": "Dragons sleep.", "id": 99, "enabled": true, "insertion_order": 10, "extensions": {}}]}});
    let v: Value = s
        .put_json(
            &format!("/api/characters/{id}/lorebook?mode=merge"),
            Some(&t),
            &extra,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["entries"], 5);
    let wi: Value = s
        .get(
            &format!("/api/characters/{id}/lorebook?format=worldinfo"),
            Some(&t),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(wi["entries"].as_object().unwrap().len(), 5);
    assert_eq!(wi["entries"]["0"]["key"][0], "eldoria");
    let v: Value = s
        .put_json(
            &format!("/api/characters/{id}/lorebook?mode=replace"),
            Some(&t),
            &extra,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["entries"], 1);
    // Owner only; bad input is refused.
    expect_error(
        s.put_json(
            &format!("/api/characters/{id}/lorebook"),
            Some(&token("bob")),
            &extra,
        )
        .await,
        403,
        "CHARACTER_ACCESS_DENIED",
    )
    .await;
    expect_error(
        s.put_json(
            &format!("/api/characters/{id}/lorebook"),
            Some(&t),
            &json!("nope"),
        )
        .await,
        422,
        "CHARACTER_INVALID_DATA",
    )
    .await;
}

#[tokio::test]
async fn cli_imports_card_files_and_directories_offline() {
    let data = tempfile::tempdir().unwrap();
    let cards = tempfile::tempdir().unwrap();
    for f in ["v1_Aqua.png", "default_FluxTheCat.png"] {
        std::fs::copy(fixture(f), cards.path().join(f)).unwrap();
    }
    std::fs::write(cards.path().join("notes.txt"), "not a card").unwrap();
    let run = |args: Vec<std::ffi::OsString>| {
        std::process::Command::new(support::app::bin())
            .arg("import")
            .arg("--data-dir")
            .arg(data.path())
            .args(args)
            .env("TAPROOM_JWT_SECRET", support::app::SECRET)
            .output()
            .unwrap()
    };
    let out = run(vec!["--user".into(), "ann".into(), cards.path().into()]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 imported, 0 failed"), "{stdout}");
    let out = run(vec![
        "--user".into(),
        "ann".into(),
        fixture("default_Seraphina.png").into(),
        fixture("user-default.png").into(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 imported, 1 failed"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("user-default.png"));
    // Card files need an owner.
    let out = run(vec![fixture("v1_Aqua.png").into()]);
    assert_eq!(out.status.code(), Some(2));

    let s = TestServer::start_with(Options {
        data_dir: Some(data.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let list: Value = s
        .get("/api/characters?sort=name&order=asc", Some(&token("ann")))
        .await
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["characters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.contains(&"Seraphina"));
}
