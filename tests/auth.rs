//! JWT attacks against the real server: every bad token is a 401 that says what was wrong.

mod support;

use base64::Engine;
use serde_json::{json, Value};
use support::app::{claims, expect_error, fixture, sign_hs, token, Options, TestServer, SECRET};

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

async fn rejected(s: &TestServer, tok: &str, needle: &str) {
    let r = s.get("/api/characters", Some(tok)).await;
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer")
    );
    let v = expect_error(r, 401, "UNAUTHENTICATED").await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
}

#[tokio::test]
async fn hs256_attacks_are_rejected_with_a_reason() {
    let s = TestServer::start().await;
    assert_eq!(
        s.get("/api/characters", Some(&token("ok"))).await.status(),
        200
    );

    rejected(&s, &sign_hs(&claims("a", false, -3600), SECRET), "expired").await;
    rejected(
        &s,
        &sign_hs(&claims("a", false, 3600), "some-other-secret-xx"),
        "signature",
    )
    .await;
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(json!({"sub":"eve","exp":9999999999u64,"role":"admin"})
            .to_string()
            .as_bytes())
    );
    rejected(&s, &none, "malformed").await;
    rejected(&s, "garbage", "malformed").await;
    rejected(&s, "a.b.c", "malformed").await;
    let no_exp = sign_hs(&json!({"sub": "a"}), SECRET);
    rejected(&s, &no_exp, "exp").await;
    // HS384 is not the configured algorithm.
    let hs384 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
        &claims("a", false, 3600),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    rejected(&s, &hs384, "algorithm").await;

    // Missing header and a non-bearer scheme.
    let v = expect_error(s.get("/api/characters", None).await, 401, "UNAUTHENTICATED").await;
    assert!(v["error"]["message"].as_str().unwrap().contains("missing"));
    let r = s
        .client
        .get(s.url("/api/characters"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "UNAUTHENTICATED").await;
    // What SillyTavern sends with no key configured.
    let r = s
        .client
        .get(s.url("/api/characters"))
        .header("authorization", "Bearer undefined")
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn leeway_tolerates_small_clock_skew() {
    let s = TestServer::start().await;
    let just_expired = sign_hs(&claims("a", false, -10), SECRET);
    assert_eq!(
        s.get("/api/characters", Some(&just_expired)).await.status(),
        200
    );
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let s = TestServer::start_with(Options {
        config: Some("[auth]\nissuer = \"https://id.example\"\naudience = \"taproom\"\n".into()),
        ..Options::default()
    })
    .await;
    let mut good = claims("a", false, 3600);
    good["iss"] = "https://id.example".into();
    good["aud"] = "taproom".into();
    assert_eq!(
        s.get("/api/characters", Some(&sign_hs(&good, SECRET)))
            .await
            .status(),
        200
    );
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = "someone-else".into();
    rejected(&s, &sign_hs(&wrong_aud, SECRET), "audience").await;
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = "https://evil.example".into();
    rejected(&s, &sign_hs(&wrong_iss, SECRET), "issuer").await;
    let mut no_aud = good.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    rejected(&s, &sign_hs(&no_aud, SECRET), "aud").await;
}

fn rs256(claims: &Value, key_file: &str, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture(&format!("keys/{key_file}"))).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn rs256_rejects_hs256_tokens_and_foreign_keys() {
    let public = fixture("keys/rsa_public.pem");
    let s = TestServer::start_with(Options {
        config: Some(format!(
            "[auth]\nalgorithm = \"RS256\"\npublic_key_file = \"{}\"\n",
            public.display()
        )),
        ..Options::default()
    })
    .await;
    let good = rs256(&claims("rsa-user", true, 3600), "rsa_private.pem", None);
    let r = s.get("/api/characters", Some(&good)).await;
    assert_eq!(r.status(), 200);
    // Algorithm confusion: an HS256 token signed with the public key's bytes.
    let pem = std::fs::read_to_string(&public).unwrap();
    rejected(&s, &sign_hs(&claims("eve", true, 3600), &pem), "algorithm").await;
    rejected(
        &s,
        &sign_hs(&claims("eve", true, 3600), SECRET),
        "algorithm",
    )
    .await;
    let foreign = rs256(&claims("eve", true, 3600), "rsa_other_private.pem", None);
    rejected(&s, &foreign, "signature").await;
}

#[tokio::test]
async fn jwks_selects_the_key_by_kid() {
    // Build a JWKS from the public key's modulus and exponent.
    let pem = std::fs::read(fixture("keys/rsa_public.pem")).unwrap();
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(&pem).unwrap();
    let (n, e) = match key.kind() {
        jsonwebtoken::DecodingKeyKind::RsaModulusExponent { n, e } => (b64(n), b64(e)),
        jsonwebtoken::DecodingKeyKind::SecretOrDer(der) => rsa_components_from_der(der),
    };
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256", "n": n, "e": e}]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks.to_string()).unwrap();
    let s = TestServer::start_with(Options {
        config: Some(format!(
            "[auth]\nalgorithm = \"RS256\"\njwks_file = \"{}\"\n",
            path.display()
        )),
        ..Options::default()
    })
    .await;
    let good = rs256(
        &claims("jwks-user", false, 3600),
        "rsa_private.pem",
        Some("k1"),
    );
    assert_eq!(s.get("/api/characters", Some(&good)).await.status(), 200);
    let unknown = rs256(
        &claims("jwks-user", false, 3600),
        "rsa_private.pem",
        Some("k2"),
    );
    rejected(&s, &unknown, "kid").await;
    let none = rs256(&claims("jwks-user", false, 3600), "rsa_private.pem", None);
    rejected(&s, &none, "kid").await;
}

/// Reads n and e out of a PKCS#1 RSAPublicKey DER (SEQUENCE { INTEGER n, INTEGER e }).
fn rsa_components_from_der(der: &[u8]) -> (String, String) {
    fn read_len(d: &[u8], i: &mut usize) -> usize {
        let b = d[*i] as usize;
        *i += 1;
        if b < 0x80 {
            return b;
        }
        let n = b & 0x7f;
        let mut len = 0;
        for _ in 0..n {
            len = (len << 8) | d[*i] as usize;
            *i += 1;
        }
        len
    }
    let mut i = 0;
    assert_eq!(der[i], 0x30);
    i += 1;
    read_len(der, &mut i);
    let mut ints = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[i], 0x02);
        i += 1;
        let len = read_len(der, &mut i);
        let mut v = &der[i..i + len];
        while v.len() > 1 && v[0] == 0 {
            v = &v[1..];
        }
        ints.push(b64(v));
        i += len;
    }
    (ints[0].clone(), ints[1].clone())
}
