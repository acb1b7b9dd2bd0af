//! JWT verification and minting. The accepted algorithm comes from config only, so a token whose
//! header names `none` or any other algorithm is rejected (no algorithm confusion).

use crate::config::{AuthConfig, ConfigError};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The claims Taproom reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// `"admin"` grants admin rights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Display name, used for `{{user}}` when the request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub admin: bool,
    pub name: Option<String>,
}

/// Verifying keys: one key, or a JWKS selected by `kid`.
enum Keys {
    Single(DecodingKey),
    Jwks(HashMap<String, DecodingKey>),
}

/// Verifies (and, with an HS secret, mints) tokens.
pub struct Authenticator {
    algorithm: Algorithm,
    keys: Keys,
    /// Present only for HS* algorithms: `taproom token` signs with it.
    encoding: Option<EncodingKey>,
    validation: Validation,
    /// Tokens verified before, with their `exp`: a client sends the same token on every
    /// request, and checking a signature (an RSA one especially) costs far more than a lookup.
    /// Keys hash with foldhash, several times cheaper than the default SipHash over a token of
    /// a few hundred bytes; only tokens whose signature checked out are ever inserted.
    verified: moka::sync::Cache<Box<str>, (User, u64), foldhash::quality::RandomState>,
}

/// How many distinct verified tokens are remembered.
const VERIFIED_TOKENS: u64 = 10_000;

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Path of the generated HS secret.
pub fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("jwt.secret")
}

impl Authenticator {
    /// Builds the verifier from config. With an HS algorithm and no configured secret, the secret
    /// at `<data_dir>/jwt.secret` is used, created (mode 0600) when missing.
    pub fn from_config(cfg: &AuthConfig, data_dir: &Path) -> Result<Self, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            message,
        };
        let algorithm: Algorithm = cfg
            .algorithm
            .parse()
            .map_err(|_| invalid("auth.algorithm", format!("unknown {}", cfg.algorithm)))?;
        let (keys, encoding) = if cfg.algorithm.starts_with("HS") {
            let secret = if cfg.jwt_secret.is_empty() {
                load_or_create_secret(data_dir)?
            } else {
                cfg.jwt_secret.clone().into_bytes()
            };
            (
                Keys::Single(DecodingKey::from_secret(&secret)),
                Some(EncodingKey::from_secret(&secret)),
            )
        } else if let Some(path) = &cfg.jwks_file {
            let text = read(path, "auth.jwks_file")?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| invalid("auth.jwks_file", format!("not a JWKS: {e}")))?;
            let mut map = HashMap::new();
            for jwk in &set.keys {
                let kid = jwk.common.key_id.clone().unwrap_or_default();
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| invalid("auth.jwks_file", format!("key {kid}: {e}")))?;
                map.insert(kid, key);
            }
            (Keys::Jwks(map), None)
        } else if let Some(path) = &cfg.public_key_file {
            let pem = read(path, "auth.public_key_file")?;
            let key = match algorithm {
                Algorithm::RS256 => DecodingKey::from_rsa_pem(pem.as_bytes()),
                Algorithm::ES256 => DecodingKey::from_ec_pem(pem.as_bytes()),
                _ => DecodingKey::from_ed_pem(pem.as_bytes()),
            }
            .map_err(|e| invalid("auth.public_key_file", format!("not a PEM public key: {e}")))?;
            (Keys::Single(key), None)
        } else {
            return Err(invalid(
                "auth.public_key_file",
                "an asymmetric algorithm needs auth.public_key_file or auth.jwks_file".into(),
            ));
        };

        let mut validation = Validation::new(algorithm);
        validation.leeway = cfg.leeway_secs;
        let mut required = vec!["exp", "sub"];
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            algorithm,
            keys,
            encoding,
            validation,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_TOKENS)
                // Bounded so a token is re-checked now and then even while in constant use.
                .time_to_live(Duration::from_secs(600))
                .build_with_hasher(foldhash::quality::RandomState::default()),
        })
    }

    /// Verifies a bearer token; the error says what was wrong with it.
    pub fn verify(&self, token: &str) -> Result<User, String> {
        if let Some((user, exp)) = self.verified.get(token) {
            // The same expiry rule as a full check: expired once exp + leeway has passed.
            if jsonwebtoken::get_current_timestamp() <= exp.saturating_add(self.validation.leeway) {
                return Ok(user);
            }
            self.verified.invalidate(token);
        }
        let (user, exp) = self.verify_signed(token)?;
        self.verified.insert(token.into(), (user.clone(), exp));
        Ok(user)
    }

    /// The full check of a token's header, signature and claims.
    fn verify_signed(&self, token: &str) -> Result<(User, u64), String> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "malformed token: not a JWT with a supported algorithm".to_string())?;
        if header.alg != self.algorithm {
            return Err(format!(
                "token algorithm {:?} is not accepted (expected {:?})",
                header.alg, self.algorithm
            ));
        }
        let key = match &self.keys {
            Keys::Single(key) => key,
            Keys::Jwks(map) => {
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| "token has no kid to select a key".to_string())?;
                map.get(kid)
                    .ok_or_else(|| format!("token kid {kid:?} is not a known key"))?
            }
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired".to_string(),
                    ErrorKind::InvalidSignature => "token signature is invalid".to_string(),
                    ErrorKind::InvalidAudience => "token audience is not accepted".to_string(),
                    ErrorKind::InvalidIssuer => "token issuer is not accepted".to_string(),
                    ErrorKind::ImmatureSignature => "token is not valid yet (nbf)".to_string(),
                    ErrorKind::MissingRequiredClaim(c) => format!("token has no {c} claim"),
                    ErrorKind::InvalidAlgorithm => "token algorithm is not accepted".to_string(),
                    ErrorKind::Json(e) => format!("token claims are invalid: {e}"),
                    _ => "malformed token".to_string(),
                }
            })?;
        let claims = data.claims;
        if claims.sub.trim().is_empty() {
            return Err("token sub claim is empty".into());
        }
        let user = User {
            admin: claims.role.as_deref() == Some("admin"),
            id: claims.sub,
            name: claims.name,
        };
        Ok((user, claims.exp))
    }

    /// Signs a token for `sub` (HS algorithms only: asymmetric setups mint elsewhere).
    pub fn mint(&self, sub: &str, admin: bool, ttl: Duration) -> Result<String, String> {
        let key = self.encoding.as_ref().ok_or_else(|| {
            "taproom token signs with an HS secret; this config verifies an asymmetric key only"
                .to_string()
        })?;
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: sub.to_string(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
            role: admin.then(|| "admin".to_string()),
            name: None,
            iss: self
                .validation
                .iss
                .as_ref()
                .and_then(|s| s.iter().next().cloned()),
            aud: self
                .validation
                .aud
                .as_ref()
                .and_then(|s| s.iter().next().cloned()),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key).map_err(|e| e.to_string())
    }
}

fn read(path: &Path, key: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key: key.into(),
        message: format!("cannot read {}: {e}", path.display()),
    })
}

/// Reads `<data_dir>/jwt.secret`, creating it with 32 random bytes (hex, mode 0600) if missing.
fn load_or_create_secret(data_dir: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Write;
    let path = secret_path(data_dir);
    let invalid = |message: String| ConfigError::Invalid {
        key: "auth.jwt_secret".into(),
        message,
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        let secret = text.trim();
        if secret.len() < 16 {
            return Err(invalid(format!("{} is too short", path.display())));
        }
        return Ok(secret.as_bytes().to_vec());
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| invalid(format!("cannot create {}: {e}", data_dir.display())))?;
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(&path) {
        Ok(mut file) => {
            file.write_all(hex.as_bytes())
                .and_then(|_| file.sync_all())
                .map_err(|e| invalid(format!("cannot write {}: {e}", path.display())))?;
            Ok(hex.into_bytes())
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
            Ok(text.trim().as_bytes().to_vec())
        }
        Err(e) => Err(invalid(format!("cannot create {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(secret: &str) -> Authenticator {
        let cfg = AuthConfig {
            jwt_secret: secret.into(),
            ..AuthConfig::default()
        };
        Authenticator::from_config(&cfg, Path::new("/nonexistent")).unwrap()
    }

    #[test]
    fn minted_token_verifies() {
        let a = hs("0123456789abcdef0123");
        let t = a.mint("alice", true, Duration::from_secs(60)).unwrap();
        let u = a.verify(&t).unwrap();
        assert_eq!(u.id, "alice");
        assert!(u.admin);
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let cfg = AuthConfig {
            jwt_secret: "0123456789abcdef0123".into(),
            leeway_secs: 0,
            ..AuthConfig::default()
        };
        let a = Authenticator::from_config(&cfg, Path::new("/nonexistent")).unwrap();
        let t = a.mint("alice", false, Duration::from_secs(1)).unwrap();
        assert_eq!(a.verify(&t).unwrap().id, "alice");
        assert_eq!(a.verify(&t).unwrap().id, "alice", "from the cache");
        std::thread::sleep(Duration::from_millis(2100));
        let err = a.verify(&t).unwrap_err();
        assert!(err.contains("expired"), "{err}");
    }

    #[test]
    fn other_secret_is_rejected() {
        let t = hs("0123456789abcdef0123")
            .mint("alice", false, Duration::from_secs(60))
            .unwrap();
        let err = hs("another-secret-entirely").verify(&t).unwrap_err();
        assert!(err.contains("signature"), "{err}");
    }

    #[test]
    fn alg_none_is_rejected() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let head = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(br#"{"sub":"eve","exp":99999999999,"role":"admin"}"#);
        let err = hs("0123456789abcdef0123")
            .verify(&format!("{head}.{body}."))
            .unwrap_err();
        assert!(
            err.contains("malformed") || err.contains("algorithm"),
            "{err}"
        );
    }

    #[test]
    fn secret_file_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authenticator::from_config(&AuthConfig::default(), dir.path()).unwrap();
        let t = a.mint("bob", false, Duration::from_secs(60)).unwrap();
        let b = Authenticator::from_config(&AuthConfig::default(), dir.path()).unwrap();
        assert_eq!(b.verify(&t).unwrap().id, "bob");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(secret_path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
