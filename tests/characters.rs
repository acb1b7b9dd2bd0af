//! The Character Management API against the real server: every endpoint, its errors, user
//! isolation, pagination, the optimistic-locking race and persistence across restarts.

mod support;

use serde_json::{json, Value};
use support::app::{admin_token, expect_error, fixture, token, Options, TestServer};

fn seraphina() -> Value {
    json!({
        "name": "Seraphina",
        "description": "Guardian of the forest of Eldoria",
        "personality": {
            "personality": "caring, protective",
            "scenario": "You woke in her glade",
            "firstMes": "Ah, you're awake at last.",
            "mesExample": "<START>\n{{user}}: Hi\n{{char}}: Hello",
            "systemPrompt": "{{original}} Stay gentle.",
            "alternateGreetings": ["Welcome back."],
            "extensions": {"talkativeness": "0.5", "depth_prompt": {"prompt": "x", "depth": 4}},
            "characterBook": {"entries": [{"keys": ["glade"], "content": "A sunny glade", "extensions": {"position": 0}}]}
        },
        "tags": ["Fantasy", "fantasy", " Healer "],
        "isPublic": false
    })
}

#[tokio::test]
async fn create_returns_the_full_character() {
    let s = TestServer::start().await;
    let t = token("alice");
    let c = s.create_character(&t, seraphina()).await;
    assert_eq!(c["created"], true);
    assert_eq!(c["name"], "Seraphina");
    assert_eq!(c["version"], 1);
    assert_eq!(c["creatorId"], "alice");
    assert_eq!(c["isActive"], true);
    assert_eq!(c["usageCount"], 0);
    assert_eq!(c["tags"], json!(["Fantasy", "Healer"]));
    assert_eq!(c["firstMes"], "Ah, you're awake at last.");
    assert_eq!(c["scenario"], "You woke in her glade");
    assert_eq!(
        c["personality"]["systemPrompt"],
        "{{original}} Stay gentle."
    );
    // Unknown extension data is kept verbatim.
    assert_eq!(c["personality"]["extensions"]["talkativeness"], "0.5");
    assert_eq!(c["personality"]["extensions"]["depth_prompt"]["depth"], 4);
    assert_eq!(
        c["personality"]["characterBook"]["entries"][0]["extensions"]["position"],
        0
    );
    let id = c["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    assert_eq!(
        c["uploadUrls"]["avatar"],
        format!("/api/characters/{id}/avatar")
    );
    assert!(chrono::DateTime::parse_from_rfc3339(c["createdAt"].as_str().unwrap()).is_ok());
}

#[tokio::test]
async fn create_validates_every_field() {
    let s = TestServer::start().await;
    let t = token("alice");
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": "   "}), "name"),
        (json!({"name": "x".repeat(129)}), "name"),
        (json!({"name": 5}), "name"),
        (
            json!({"name": "a", "description": "d".repeat(32 * 1024 + 1)}),
            "description",
        ),
        (
            json!({"name": "a", "tags": (0..33).map(|i| format!("t{i}")).collect::<Vec<_>>()}),
            "tags",
        ),
        (json!({"name": "a", "tags": ["x".repeat(65)]}), "tags"),
        (json!({"name": "a", "tags": "not-a-list"}), "tags"),
        (json!({"name": "a", "isPublic": "yes"}), "isPublic"),
        (json!({"name": "a", "avatar": "ftp://x"}), "avatar"),
        (
            json!({"name": "a", "avatar": "data:image/png;base64,aGVsbG8="}),
            "avatar",
        ),
        (json!({"name": "a", "bogus": 1}), "bogus"),
    ];
    for (body, field) in cases {
        let r = s.post_json("/api/characters", Some(&t), &body).await;
        let v = expect_error(r, 400, "VALIDATION_ERROR").await;
        let details = &v["error"]["details"];
        assert!(
            details["field"] == field || v["error"]["message"].as_str().unwrap().contains(field),
            "field {field} not named in {v}"
        );
    }
    // Nothing was stored.
    let list: Value = s
        .get("/api/characters", Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 0);
}

#[tokio::test]
async fn malformed_json_and_wrong_content_type() {
    let s = TestServer::start().await;
    let t = token("alice");
    let r = s
        .client
        .post(s.url("/api/characters"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    let v = expect_error(r, 400, "VALIDATION_ERROR").await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
    let r = s
        .client
        .post(s.url("/api/characters"))
        .bearer_auth(&t)
        .header("content-type", "text/plain")
        .body("name=x")
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "UNSUPPORTED_MEDIA_TYPE").await;
    let r = s
        .client
        .post(s.url("/api/characters"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body("[1,2]")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "VALIDATION_ERROR").await;
}

#[tokio::test]
async fn avatar_data_url_and_multipart_upload_are_served() {
    let s = TestServer::start().await;
    let t = token("alice");
    let png = std::fs::read(fixture("user-default.png")).unwrap();
    use base64::Engine;
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let c = s
        .create_character(&t, json!({"name": "Pic", "avatar": data_url}))
        .await;
    let id = c["id"].as_str().unwrap().to_string();
    assert_eq!(c["avatar"], format!("/api/characters/{id}/avatar"));
    let r = s
        .get(&format!("/api/characters/{id}/avatar"), Some(&t))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("private"));
    assert_eq!(r.bytes().await.unwrap().to_vec(), png);
    // Conditional GET.
    let r = s
        .client
        .get(s.url(&format!("/api/characters/{id}/avatar")))
        .bearer_auth(&t)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    // Multipart create with a character part and an avatar part.
    let form = reqwest::multipart::Form::new()
        .part(
            "character",
            reqwest::multipart::Part::text(json!({"name": "Multi", "isPublic": true}).to_string())
                .mime_str("application/json")
                .unwrap(),
        )
        .part(
            "avatar",
            reqwest::multipart::Part::bytes(png.clone()).file_name("a.png"),
        );
    let r = s
        .client
        .post(s.url("/api/characters"))
        .bearer_auth(&t)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let m: Value = r.json().await.unwrap();
    let mid = m["id"].as_str().unwrap();
    // Public character avatars need no token.
    let r = s.get(&format!("/api/characters/{mid}/avatar"), None).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("public"));

    // Raw PUT replaces the avatar and bumps the version; garbage is rejected.
    let r = s
        .client
        .put(s.url(&format!("/api/characters/{id}/avatar")))
        .bearer_auth(&t)
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], 2);
    let r = s
        .client
        .put(s.url(&format!("/api/characters/{id}/avatar")))
        .bearer_auth(&t)
        .body("not an image")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "VALIDATION_ERROR").await;
    // Another user cannot replace it.
    let r = s
        .client
        .put(s.url(&format!("/api/characters/{id}/avatar")))
        .bearer_auth(token("bob"))
        .body(png.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "CHARACTER_ACCESS_DENIED").await;
    // A character without an uploaded image has no avatar to serve.
    let plain = s.create_character(&t, json!({"name": "Plain"})).await;
    let r = s
        .get(
            &format!("/api/characters/{}/avatar", plain["id"].as_str().unwrap()),
            Some(&t),
        )
        .await;
    expect_error(r, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn oversized_avatar_is_413() {
    let s = TestServer::start_with(Options {
        config: Some("[limits]\nmax_avatar_bytes = 1000\n".into()),
        ..Options::default()
    })
    .await;
    let t = token("alice");
    let c = s.create_character(&t, json!({"name": "A"})).await;
    let png = std::fs::read(fixture("user-default.png")).unwrap();
    let r = s
        .client
        .put(s.url(&format!(
            "/api/characters/{}/avatar",
            c["id"].as_str().unwrap()
        )))
        .bearer_auth(&t)
        .body(png)
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "PAYLOAD_TOO_LARGE").await;
}

#[tokio::test]
async fn user_b_cannot_list_read_edit_or_delete_user_a_private_character() {
    let s = TestServer::start().await;
    let a = token("alice");
    let b = token("bob");
    let c = s.create_character(&a, seraphina()).await;
    let id = c["id"].as_str().unwrap();
    let path = format!("/api/characters/{id}");

    let list: Value = s
        .get("/api/characters", Some(&b))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 0);
    let list: Value = s
        .get("/api/characters?scope=all", Some(&b))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 0);

    expect_error(s.get(&path, Some(&b)).await, 403, "CHARACTER_ACCESS_DENIED").await;
    expect_error(
        s.put_json(&path, Some(&b), &json!({"version": 1, "name": "Mine"}))
            .await,
        403,
        "CHARACTER_ACCESS_DENIED",
    )
    .await;
    expect_error(
        s.delete(&path, Some(&b)).await,
        403,
        "CHARACTER_ACCESS_DENIED",
    )
    .await;
    // Anonymous access to a private character is refused too.
    expect_error(s.get(&path, None).await, 403, "CHARACTER_ACCESS_DENIED").await;

    // The owner still sees it unchanged.
    let v: Value = s.get(&path, Some(&a)).await.json().await.unwrap();
    assert_eq!(v["name"], "Seraphina");
    assert_eq!(v["version"], 1);
    assert_eq!(v["permissions"]["canEdit"], true);

    // An admin can read, edit and delete it.
    let admin = admin_token("root");
    let v: Value = s.get(&path, Some(&admin)).await.json().await.unwrap();
    assert_eq!(v["permissions"]["canDelete"], true);
    let r = s
        .put_json(
            &path,
            Some(&admin),
            &json!({"version": 1, "description": "moderated"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = s.delete(&path, Some(&admin)).await;
    assert_eq!(r.status(), 204);
    expect_error(s.get(&path, Some(&a)).await, 404, "CHARACTER_NOT_FOUND").await;
}

#[tokio::test]
async fn public_characters_are_readable_by_anyone() {
    let s = TestServer::start().await;
    let a = token("alice");
    let mut body = seraphina();
    body["isPublic"] = json!(true);
    let c = s.create_character(&a, body).await;
    let path = format!("/api/characters/{}", c["id"].as_str().unwrap());
    let v: Value = s.get(&path, None).await.json().await.unwrap();
    assert_eq!(v["name"], "Seraphina");
    assert_eq!(v["permissions"]["canView"], true);
    assert_eq!(v["permissions"]["canEdit"], false);
    assert_eq!(v["permissions"]["canInteract"], false);
    let v: Value = s
        .get(&path, Some(&token("bob")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["permissions"]["canInteract"], true);
    assert_eq!(v["permissions"]["canEdit"], false);
    // Public listings show it to others; own listing of bob does not.
    let list: Value = s
        .get("/api/characters?scope=public", Some(&token("bob")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 1);
    let list: Value = s
        .get("/api/characters", Some(&token("bob")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 0);
    // Listing itself needs a token.
    expect_error(s.get("/api/characters", None).await, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn unknown_or_malformed_id_is_404() {
    let s = TestServer::start().await;
    let t = token("alice");
    for id in ["not-a-uuid", "01a21778-ce6c-73e5-ab4e-bfcc620ba841"] {
        let path = format!("/api/characters/{id}");
        expect_error(s.get(&path, Some(&t)).await, 404, "CHARACTER_NOT_FOUND").await;
        expect_error(
            s.put_json(&path, Some(&t), &json!({"version": 1})).await,
            404,
            "CHARACTER_NOT_FOUND",
        )
        .await;
        expect_error(s.delete(&path, Some(&t)).await, 404, "CHARACTER_NOT_FOUND").await;
    }
}

#[tokio::test]
async fn detail_has_statistics_permissions_and_related_characters() {
    let s = TestServer::start().await;
    let t = token("alice");
    let main = s
        .create_character(&t, json!({"name": "Main", "tags": ["elf", "mage"]}))
        .await;
    let twin = s
        .create_character(&t, json!({"name": "Twin", "tags": ["elf", "mage"]}))
        .await;
    s.create_character(&t, json!({"name": "Cousin", "tags": ["elf"]}))
        .await;
    s.create_character(&t, json!({"name": "Stranger", "tags": ["robot"]}))
        .await;
    let grouped = s
        .create_character(&t, json!({"name": "Grouped", "groupId": "party"}))
        .await;
    s.put_json(
        &format!("/api/characters/{}", main["id"].as_str().unwrap()),
        Some(&t),
        &json!({"version": 1, "groupId": "party"}),
    )
    .await;
    // Other users' private characters are never suggested.
    s.create_character(
        &token("bob"),
        json!({"name": "Hidden", "tags": ["elf", "mage"]}),
    )
    .await;

    let v: Value = s
        .get(
            &format!("/api/characters/{}", main["id"].as_str().unwrap()),
            Some(&t),
        )
        .await
        .json()
        .await
        .unwrap();
    let stats = &v["statistics"];
    for k in [
        "conversationCount",
        "messageCount",
        "memoryCount",
        "usageCount",
    ] {
        assert_eq!(stats[k], 0, "{k}");
    }
    let names: Vec<&str> = v["relatedCharacters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["Grouped", "Twin", "Cousin"]);
    assert_eq!(v["relatedCharacters"][0]["id"], grouped["id"]);
    assert_eq!(v["relatedCharacters"][1]["id"], twin["id"]);
}

#[tokio::test]
async fn update_is_partial_versioned_and_owner_only() {
    let s = TestServer::start().await;
    let t = token("alice");
    let c = s.create_character(&t, seraphina()).await;
    let path = format!("/api/characters/{}", c["id"].as_str().unwrap());

    // version is required.
    let v = expect_error(
        s.put_json(&path, Some(&t), &json!({"name": "X"})).await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_eq!(v["error"]["details"]["field"], "version");

    let r = s
        .put_json(
            &path,
            Some(&t),
            &json!({"version": 1, "name": "Sera", "personality": {"postHistoryInstructions": "Be brief"}, "tags": ["a"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(v["name"], "Sera");
    assert_eq!(v["description"], "Guardian of the forest of Eldoria");
    assert_eq!(v["personality"]["postHistoryInstructions"], "Be brief");
    // Untouched profile fields stay.
    assert_eq!(
        v["personality"]["systemPrompt"],
        "{{original}} Stay gentle."
    );
    assert_eq!(v["personality"]["extensions"]["talkativeness"], "0.5");
    assert_ne!(v["updatedAt"], c["updatedAt"]);
    assert_eq!(v["createdAt"], c["createdAt"]);

    // A stale version gets 409 with the current version.
    let v = expect_error(
        s.put_json(&path, Some(&t), &json!({"version": 1, "name": "Old"}))
            .await,
        409,
        "VERSION_CONFLICT",
    )
    .await;
    assert_eq!(v["error"]["details"]["currentVersion"], 2);
    // Bad field values are named.
    let v = expect_error(
        s.put_json(&path, Some(&t), &json!({"version": 2, "isPublic": 3}))
            .await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_eq!(v["error"]["details"]["field"], "isPublic");
    // The character is unchanged by the failed updates.
    let v: Value = s.get(&path, Some(&t)).await.json().await.unwrap();
    assert_eq!(v["name"], "Sera");
    assert_eq!(v["version"], 2);
}

#[tokio::test]
async fn concurrent_puts_with_the_same_version_exactly_one_wins() {
    let s = TestServer::start().await;
    let t = token("alice");
    for round in 0..5 {
        let c = s
            .create_character(&t, json!({"name": format!("Race {round}")}))
            .await;
        let path = format!("/api/characters/{}", c["id"].as_str().unwrap());
        let mut tasks = Vec::new();
        for i in 0..8 {
            let client = s.client.clone();
            let url = s.url(&path);
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                client
                    .put(url)
                    .bearer_auth(t)
                    .json(&json!({"version": 1, "description": format!("writer {i}")}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.push(task.await.unwrap());
        }
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 409).count(),
            7,
            "{statuses:?}"
        );
        let v: Value = s.get(&path, Some(&t)).await.json().await.unwrap();
        assert_eq!(v["version"], 2);
    }
}

#[tokio::test]
async fn delete_removes_the_character_and_its_avatar() {
    let s = TestServer::start().await;
    let t = token("alice");
    let c = s.create_character(&t, json!({"name": "Gone"})).await;
    let id = c["id"].as_str().unwrap();
    let png = std::fs::read(fixture("user-default.png")).unwrap();
    s.client
        .put(s.url(&format!("/api/characters/{id}/avatar")))
        .bearer_auth(&t)
        .body(png)
        .send()
        .await
        .unwrap();
    let r = s.delete(&format!("/api/characters/{id}"), Some(&t)).await;
    assert_eq!(r.status(), 204);
    expect_error(
        s.get(&format!("/api/characters/{id}"), Some(&t)).await,
        404,
        "CHARACTER_NOT_FOUND",
    )
    .await;
    expect_error(
        s.get(&format!("/api/characters/{id}/avatar"), Some(&t))
            .await,
        404,
        "CHARACTER_NOT_FOUND",
    )
    .await;
    expect_error(
        s.delete(&format!("/api/characters/{id}"), Some(&t)).await,
        404,
        "CHARACTER_NOT_FOUND",
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
async fn quota_is_enforced_per_user() {
    let s = TestServer::start_with(Options {
        config: Some("[limits]\nmax_characters_per_user = 2\n".into()),
        ..Options::default()
    })
    .await;
    let t = token("alice");
    s.create_character(&t, json!({"name": "One"})).await;
    s.create_character(&t, json!({"name": "Two"})).await;
    let r = s
        .post_json("/api/characters", Some(&t), &json!({"name": "Three"}))
        .await;
    expect_error(r, 403, "CHARACTER_QUOTA_EXCEEDED").await;
    // Other users have their own quota; deleting frees a slot.
    s.create_character(&token("bob"), json!({"name": "Bob's"}))
        .await;
    let list: Value = s
        .get("/api/characters", Some(&t))
        .await
        .json()
        .await
        .unwrap();
    let id = list["characters"][0]["id"].as_str().unwrap();
    s.delete(&format!("/api/characters/{id}"), Some(&t)).await;
    s.create_character(&t, json!({"name": "Three"})).await;
}

async fn all_pages(s: &TestServer, t: &str, query: &str, limit: usize) -> (Vec<String>, u64) {
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let v: Value = s
            .get(
                &format!("/api/characters?{query}&limit={limit}&offset={offset}"),
                Some(t),
            )
            .await
            .json()
            .await
            .unwrap();
        let total = v["total"].as_u64().unwrap();
        let page = v["characters"].as_array().unwrap();
        names.extend(page.iter().map(|c| c["name"].as_str().unwrap().to_string()));
        offset += page.len();
        assert_eq!(v["hasMore"], offset < total as usize, "{query} {v}");
        if page.is_empty() || offset >= total as usize {
            return (names, total);
        }
    }
}

#[tokio::test]
async fn pages_concatenate_to_the_full_sorted_list() {
    let s = TestServer::start().await;
    let t = token("alice");
    let names = [
        "delta", "Alpha", "charlie", "Bravo", "echo", "foxtrot", "golf",
    ];
    for (i, n) in names.iter().enumerate() {
        let tags = if i % 2 == 0 {
            json!(["even", "x"])
        } else {
            json!(["odd"])
        };
        s.create_character(
            &t,
            json!({"name": n, "tags": tags, "description": format!("number {i}")}),
        )
        .await;
    }
    s.create_character(
        &token("bob"),
        json!({"name": "bob-public", "isPublic": true}),
    )
    .await;

    // Default: modified desc = reverse creation order here.
    let (got, total) = all_pages(&s, &t, "", 3).await;
    assert_eq!(total, 7);
    let mut expected: Vec<String> = names.iter().rev().map(|s| s.to_string()).collect();
    assert_eq!(got, expected);
    let (got, _) = all_pages(&s, &t, "order=asc", 2).await;
    expected.reverse();
    assert_eq!(got, expected);

    let (got, _) = all_pages(&s, &t, "sort=name&order=asc", 2).await;
    let mut by_name: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    by_name.sort_by_key(|s| s.to_lowercase());
    assert_eq!(got, by_name);

    let (got, total) = all_pages(&s, &t, "sort=created&order=asc&tags=even,X", 1).await;
    assert_eq!(total, 4);
    assert_eq!(got, vec!["delta", "charlie", "echo", "golf"]);

    let (got, total) = all_pages(&s, &t, "search=NUMBER%203", 10).await;
    assert_eq!((got, total), (vec!["Bravo".to_string()], 1));
    let (got, _) = all_pages(&s, &t, "search=ALP", 10).await;
    assert_eq!(got, vec!["Alpha"]);
    let (got, _) = all_pages(&s, &t, "search=odd", 10).await;
    assert_eq!(got.len(), 3, "tags are searched");

    let (got, total) = all_pages(&s, &t, "scope=all&sort=name", 4).await;
    assert_eq!(total, 8);
    assert!(got.contains(&"bob-public".to_string()));

    let v: Value = s
        .get(
            "/api/characters?limit=2&sort=usage&order=asc&tags=odd&search=b",
            Some(&t),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["filters"],
        json!({"limit": 2, "offset": 0, "search": "b", "tags": ["odd"], "sort": "usage", "order": "asc", "scope": "own"})
    );
}

#[tokio::test]
async fn invalid_list_parameters_are_named() {
    let s = TestServer::start().await;
    let t = token("alice");
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=abc", "limit"),
        ("offset=-1", "offset"),
        ("sort=size", "sort"),
        ("order=up", "order"),
        ("scope=mine", "scope"),
        ("colour=red", "colour"),
    ] {
        let v = expect_error(
            s.get(&format!("/api/characters?{q}"), Some(&t)).await,
            400,
            "VALIDATION_ERROR",
        )
        .await;
        assert_eq!(v["error"]["details"]["field"], field, "{q}");
    }
}

#[tokio::test]
async fn data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        data_dir: Some(dir.path().to_path_buf()),
        ..Options::default()
    };
    let t = token("alice");
    let s = TestServer::start_with(opts.clone()).await;
    let c = s.create_character(&t, seraphina()).await;
    let path = format!("/api/characters/{}", c["id"].as_str().unwrap());
    s.put_json(&path, Some(&t), &json!({"version": 1, "name": "Renamed"}))
        .await;
    let status = s.terminate();
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");

    let s = TestServer::start_with(opts).await;
    let v: Value = s.get(&path, Some(&t)).await.json().await.unwrap();
    assert_eq!(v["name"], "Renamed");
    assert_eq!(v["version"], 2);
    assert_eq!(v["personality"]["extensions"]["talkativeness"], "0.5");
    let list: Value = s
        .get("/api/characters", Some(&t))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 1);
}

#[tokio::test]
async fn searches_see_every_write_at_once() {
    // Searches and non-default sorts read cached summary rows; each write must show up in the
    // very next search, for the owner and for other users of public characters.
    let s = TestServer::start().await;
    let (ann, bob) = (token("ann"), token("bob"));
    let search = |t: String, q: &'static str| {
        let s = &s;
        async move { all_pages(s, &t, q, 50).await }
    };
    assert_eq!(search(ann.clone(), "search=lantern").await.1, 0);
    let c = s
        .create_character(
            &ann,
            json!({"name": "Keeper", "description": "a lantern keeper"}),
        )
        .await;
    let id = c["id"].as_str().unwrap();
    assert_eq!(
        search(ann.clone(), "search=lantern").await.0,
        vec!["Keeper"]
    );
    assert_eq!(
        search(bob.clone(), "search=lantern&scope=public").await.1,
        0
    );

    let r = s
        .put_json(
            &format!("/api/characters/{id}"),
            Some(&ann),
            &json!({"version": c["version"], "isPublic": true, "description": "a candle keeper"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(search(ann.clone(), "search=lantern").await.1, 0);
    assert_eq!(search(ann.clone(), "search=candle").await.0, vec!["Keeper"]);
    assert_eq!(
        search(bob.clone(), "search=candle&scope=public").await.0,
        vec!["Keeper"]
    );
    assert_eq!(search(ann.clone(), "sort=name").await.0, vec!["Keeper"]);

    let r = s
        .put_json(
            &format!("/api/characters/{id}"),
            Some(&ann),
            &json!({"version": v["version"], "name": "Warden"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(search(ann.clone(), "sort=name").await.0, vec!["Warden"]);

    assert_eq!(
        s.delete(&format!("/api/characters/{id}"), Some(&ann))
            .await
            .status(),
        204
    );
    assert_eq!(search(ann.clone(), "search=candle").await.1, 0);
    assert_eq!(search(bob.clone(), "search=candle&scope=public").await.1, 0);
    assert_eq!(search(ann.clone(), "sort=name").await.1, 0);
}
