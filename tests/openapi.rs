//! `GET /openapi.json` against the running server: a valid OpenAPI 3.1 document whose every
//! documented operation answers, whose documented paths refuse the methods it does not list, and
//! which documents every route the README's API table names.

mod support;

use serde_json::{json, Value};
use std::collections::{BTreeSet, HashSet};
use support::app::{admin_token, TestServer};

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

async fn document(s: &TestServer) -> Value {
    let r = s.get("/openapi.json", None).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    r.json().await.unwrap()
}

/// Every `$ref` string anywhere in `v`.
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// The path with each `{param}` replaced by a well-formed id that names nothing.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') {
                "0190f5a0-0000-7000-8000-000000000000"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_self_consistent() {
    let s = TestServer::start().await;
    let doc = document(&s).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    assert_eq!(doc["info"]["title"], "Taproom");
    assert!(!doc["info"]["version"].as_str().unwrap().is_empty());
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "Character",
        "CharacterPage",
        "CharacterDetail",
        "CreateCharacterRequest",
        "UpdateCharacterRequest",
        "CharacterInteractionRequest",
        "ConversationMemory",
        "ErrorEnvelope",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    // Every reference resolves.
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(schemas.contains_key(name), "dangling $ref {r}");
    }
    // Operation ids are unique; every operation has a tag, a summary and responses; every
    // operation that takes a token says so.
    let mut ids = HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
            assert!(op["tags"].as_array().is_some_and(|t| !t.is_empty()));
            assert!(op["summary"].is_string(), "{method} {path} has no summary");
            assert!(!op["responses"].as_object().unwrap().is_empty());
            if path.starts_with("/api/") {
                assert!(op["security"].is_array(), "{method} {path} has no security");
            }
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer");
    // The error envelope's shape is the spec's.
    let body = &schemas["ErrorBody"]["properties"];
    for f in ["code", "message", "details", "timestamp", "requestId"] {
        assert!(body.get(f).is_some(), "ErrorBody lacks {f}");
    }
}

#[tokio::test]
async fn every_documented_operation_answers_and_undocumented_methods_are_405() {
    let s = TestServer::start().await;
    let doc = document(&s).await;
    let admin = admin_token("root");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 25, "only {} paths documented", paths.len());
    for (path, item) in paths {
        let url = s.url(&concrete(path));
        let documented: BTreeSet<&str> = item
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for method in METHODS {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut req = s.client.request(m, &url).bearer_auth(&admin);
            if method == "post" || method == "put" || method == "patch" {
                req = req.json(&json!({}));
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            if documented.contains(method) {
                // Answered by the handler: anything but the router's own 404 and 405.
                assert_ne!(status, 405, "{method} {path}: {body}");
                assert!(
                    !(status == 404 && body.contains("no such route")),
                    "{method} {path} is documented but not routed: {body}"
                );
                assert!(
                    status < 500 || status == 503,
                    "{method} {path}: {status} {body}"
                );
            } else {
                assert_eq!(
                    status, 405,
                    "{method} {path} answers but is not documented: {body}"
                );
            }
        }
    }
}

#[tokio::test]
async fn every_route_in_the_readme_is_documented() {
    let s = TestServer::start().await;
    let doc = document(&s).await;
    let paths = doc["paths"].as_object().unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table_start = readme
        .find("| method | path | who |")
        .expect("README API table");
    let table: Vec<&str> = readme[table_start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    let mut seen = 0;
    for line in table {
        // Each backticked `/…` in the row is a route; `…/{mid}/swipe` abbreviations are skipped.
        for (i, chunk) in line.split('`').enumerate() {
            if i % 2 == 0 || !chunk.starts_with('/') {
                continue;
            }
            let route = chunk.split(['?', '[']).next().unwrap().trim();
            assert!(
                paths.contains_key(route),
                "README route {route} is not in /openapi.json"
            );
            seen += 1;
        }
    }
    assert!(seen >= 25, "read only {seen} routes from the README");
    // And the other way round: every documented path is in the README.
    for path in paths.keys() {
        assert!(
            readme.contains(&format!("`{path}")) || readme.contains(&format!("{path}`")),
            "{path} is documented but not in the README's API table"
        );
    }
}
