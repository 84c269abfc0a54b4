//! API keys: who may ingest, read, or operate.
//!
//! Keys are configured as SHA-256 digests (`auth.api_keys` or the TOML file
//! `auth.keys_file`), never in clear; `tidemark hash-key` makes a key and its entry. A
//! request presents its key as `Authorization: Bearer KEY` or `X-API-Key: KEY`. Scopes:
//! `ingest` (`POST /api/events`), `read` (the query API), `admin` (everything, including
//! `/metrics` and `/api/status`). `/health` and `/ready` stay open for probes. With no
//! key configured, authentication is off — allowed only on a loopback address unless
//! `http.allow_unauthenticated = true`.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Ingest,
    Read,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

/// One configured key: a name for logs and errors, the SHA-256 of the key (hex), and
/// what it may do.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    pub sha256: String,
    pub scopes: Vec<Scope>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    api_keys: Vec<ApiKeyConfig>,
}

/// The hex SHA-256 of `key`, as configured.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key (`tdm_` and 64 hex digits).
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("tdm_{}", hex::encode(bytes))
}

struct Identity {
    name: String,
    scopes: Vec<Scope>,
}

/// The keys an instance accepts.
#[derive(Default)]
pub struct KeyRing {
    by_digest: HashMap<[u8; 32], Identity>,
    jwt: Option<JwtVerifier>,
}

/// Checks JWT bearer tokens: signature (HS256 or RS256), `exp`, `nbf`, `iss`, `aud`.
pub struct JwtVerifier {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    scope: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

impl JwtVerifier {
    /// `None` when no JWT key is configured; every problem is listed.
    pub fn from_config(auth: &crate::config::AuthConfig) -> Result<Option<Self>, Vec<String>> {
        use jsonwebtoken::{Algorithm, DecodingKey, Validation};
        let (key, algorithm) = match (auth.jwt_hs256_secret_file.is_empty(), auth.jwt_rs256_public_key_file.is_empty())
        {
            (true, true) => return Ok(None),
            (false, false) => {
                return Err(vec!["auth.jwt_hs256_secret_file and auth.jwt_rs256_public_key_file: set one".into()]);
            }
            (false, true) => {
                let secret = std::fs::read(&auth.jwt_hs256_secret_file).map_err(|error| {
                    vec![format!("auth.jwt_hs256_secret_file {}: {error}", auth.jwt_hs256_secret_file)]
                })?;
                let secret = secret.trim_ascii();
                if secret.len() < 32 {
                    return Err(vec!["auth.jwt_hs256_secret_file: the secret must be at least 32 bytes".into()]);
                }
                (DecodingKey::from_secret(secret), Algorithm::HS256)
            }
            (true, false) => {
                let pem = std::fs::read(&auth.jwt_rs256_public_key_file).map_err(|error| {
                    vec![format!("auth.jwt_rs256_public_key_file {}: {error}", auth.jwt_rs256_public_key_file)]
                })?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|error| {
                    vec![format!("auth.jwt_rs256_public_key_file {}: {error}", auth.jwt_rs256_public_key_file)]
                })?;
                (key, Algorithm::RS256)
            }
        };
        let mut errors = Vec::new();
        if auth.jwt_issuer.is_empty() {
            errors.push("auth.jwt_issuer: required with JWT (the \"iss\" tokens must carry)".to_string());
        }
        if auth.jwt_audience.is_empty() {
            errors.push("auth.jwt_audience: required with JWT (the \"aud\" tokens must carry)".to_string());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&auth.jwt_issuer]);
        validation.set_audience(&[&auth.jwt_audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        Ok(Some(Self { key, validation }))
    }

    /// The token's holder and scopes.
    fn verify(&self, token: &str) -> Result<(String, Vec<Scope>), AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|error| {
            AuthError::InvalidToken(match error.kind() {
                ErrorKind::ExpiredSignature => "it has expired",
                ErrorKind::ImmatureSignature => "it is not valid yet (nbf)",
                ErrorKind::InvalidIssuer => "its issuer (iss) is not the one configured",
                ErrorKind::InvalidAudience => "its audience (aud) is not the one configured",
                ErrorKind::InvalidSignature => "its signature does not verify",
                ErrorKind::InvalidAlgorithm => "it is signed with another algorithm",
                ErrorKind::MissingRequiredClaim(_) => "it lacks a required claim (exp, iss, aud)",
                _ => "it is not a well-formed JWT",
            })
        })?;
        let claims = data.claims;
        let names =
            claims.scope.iter().flat_map(|s| s.split_whitespace()).chain(claims.scopes.iter().map(String::as_str));
        let scopes = names
            .filter_map(|name| match name.strip_prefix("tidemark:").unwrap_or(name) {
                "ingest" => Some(Scope::Ingest),
                "read" => Some(Scope::Read),
                "admin" => Some(Scope::Admin),
                _ => None,
            })
            .collect();
        Ok((claims.sub.unwrap_or_else(|| "jwt".to_string()), scopes))
    }
}

/// Whether a bearer credential is shaped like a JWT (three base64url parts).
fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|&b| b == b'.').count() == 2
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this endpoint needs an API key with scope {0:?}: send Authorization: Bearer KEY or X-API-Key: KEY")]
    Missing(&'static str),
    #[error("the API key is not valid")]
    Invalid,
    #[error("the bearer token is not accepted: {0}")]
    InvalidToken(&'static str),
    #[error("the API key {name:?} does not have scope {scope:?}")]
    Forbidden { name: String, scope: &'static str },
}

impl KeyRing {
    /// The API keys and the JWT verifier `auth` configures; every problem is listed.
    pub fn from_config(auth: &crate::config::AuthConfig) -> Result<Self, Vec<String>> {
        let keys = Self::load(&auth.api_keys, &auth.keys_file);
        let jwt = JwtVerifier::from_config(auth);
        match (keys, jwt) {
            (Ok(mut ring), Ok(jwt)) => {
                ring.jwt = jwt;
                Ok(ring)
            }
            (keys, jwt) => Err(keys.err().into_iter().chain(jwt.err()).flatten().collect()),
        }
    }

    /// The keys of `configured` plus those of `keys_file` (if set); every problem is
    /// listed.
    pub fn load(configured: &[ApiKeyConfig], keys_file: &str) -> Result<Self, Vec<String>> {
        let mut entries = configured.to_vec();
        let mut errors = Vec::new();
        if !keys_file.is_empty() {
            match std::fs::read_to_string(Path::new(keys_file)) {
                Ok(text) => match toml::from_str::<KeysFile>(&text) {
                    Ok(file) => entries.extend(file.api_keys),
                    Err(error) => errors.push(format!("auth.keys_file {keys_file}: {error}")),
                },
                Err(error) => errors.push(format!("auth.keys_file {keys_file}: {error}")),
            }
        }
        let mut ring = Self::default();
        for entry in entries {
            let digest = hex::decode(entry.sha256.trim()).ok().and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
            let Some(digest) = digest else {
                errors.push(format!(
                    "auth.api_keys {:?}: sha256 must be 64 hex digits (tidemark hash-key prints it)",
                    entry.name
                ));
                continue;
            };
            if entry.scopes.is_empty() {
                errors.push(format!(
                    "auth.api_keys {:?}: scopes must name at least one of ingest, read, admin",
                    entry.name
                ));
                continue;
            }
            if ring.by_digest.values().any(|identity| identity.name == entry.name) {
                errors.push(format!("auth.api_keys {:?}: the name is used twice", entry.name));
                continue;
            }
            ring.by_digest.insert(digest, Identity { name: entry.name, scopes: entry.scopes });
        }
        if errors.is_empty() { Ok(ring) } else { Err(errors) }
    }

    pub fn is_enabled(&self) -> bool {
        !self.by_digest.is_empty() || self.jwt.is_some()
    }

    /// Whether `presented` (the key from the request, if any) may use `scope`; the
    /// key's name when it may (`None`: authentication is off).
    pub fn authorize(&self, presented: Option<&str>, scope: Scope) -> Result<Option<String>, AuthError> {
        if !self.is_enabled() {
            return Ok(None);
        }
        let presented = presented.ok_or(AuthError::Missing(scope.as_str()))?;
        if let Some(jwt) = &self.jwt
            && looks_like_jwt(presented)
        {
            let (name, scopes) = jwt.verify(presented)?;
            return if scopes.contains(&scope) || scopes.contains(&Scope::Admin) {
                Ok(Some(name))
            } else {
                Err(AuthError::Forbidden { name, scope: scope.as_str() })
            };
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let identity = self.by_digest.get(&digest).ok_or(AuthError::Invalid)?;
        if identity.scopes.contains(&scope) || identity.scopes.contains(&Scope::Admin) {
            Ok(Some(identity.name.clone()))
        } else {
            Err(AuthError::Forbidden { name: identity.name.clone(), scope: scope.as_str() })
        }
    }
}

/// The scope a request needs; `None`: open (probes).
pub fn required_scope(method: &http::Method, path: &str) -> Option<Scope> {
    match path {
        // The dashboard page holds no data: it asks for a key when the API needs one.
        "/health" | "/ready" | "/api/openapi.json" | "/" | "/dashboard.js" | "/dashboard.css" => None,
        "/metrics" | "/api/status" => Some(Scope::Admin),
        "/api/events" if method == http::Method::POST => Some(Scope::Ingest),
        _ => Some(Scope::Read),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        let keys = [
            ApiKeyConfig { name: "devices".into(), sha256: hash_key("k-ingest"), scopes: vec![Scope::Ingest] },
            ApiKeyConfig { name: "grafana".into(), sha256: hash_key("k-read"), scopes: vec![Scope::Read] },
            ApiKeyConfig { name: "ops".into(), sha256: hash_key("k-admin"), scopes: vec![Scope::Admin] },
        ];
        KeyRing::load(&keys, "").expect("keys")
    }

    #[test]
    fn keys_grant_their_scopes_and_admin_grants_all() {
        let ring = ring();
        assert_eq!(ring.authorize(Some("k-ingest"), Scope::Ingest), Ok(Some("devices".into())));
        assert_eq!(
            ring.authorize(Some("k-ingest"), Scope::Read),
            Err(AuthError::Forbidden { name: "devices".into(), scope: "read" })
        );
        assert_eq!(ring.authorize(Some("k-admin"), Scope::Read), Ok(Some("ops".into())));
        assert_eq!(ring.authorize(Some("nope"), Scope::Read), Err(AuthError::Invalid));
        assert_eq!(ring.authorize(None, Scope::Ingest), Err(AuthError::Missing("ingest")));
        assert_eq!(KeyRing::default().authorize(None, Scope::Admin), Ok(None), "no keys: off");
    }

    #[test]
    fn bad_entries_are_all_listed() {
        let keys = [
            ApiKeyConfig { name: "a".into(), sha256: "abc".into(), scopes: vec![Scope::Read] },
            ApiKeyConfig { name: "b".into(), sha256: hash_key("x"), scopes: vec![] },
        ];
        let errors = KeyRing::load(&keys, "/nonexistent/keys.toml").err().expect("refused");
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("64 hex digits")), "{errors:?}");
    }

    fn jwt_ring(dir: &Path) -> KeyRing {
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef").expect("write");
        let auth = crate::config::AuthConfig {
            api_keys: Vec::new(),
            keys_file: String::new(),
            jwt_hs256_secret_file: secret.to_string_lossy().to_string(),
            jwt_rs256_public_key_file: String::new(),
            jwt_issuer: "https://idp.example".into(),
            jwt_audience: "tidemark".into(),
        };
        KeyRing::from_config(&auth).expect("jwt")
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(secret))
            .expect("token")
    }

    #[test]
    fn jwt_tokens_are_checked_for_signature_expiry_issuer_audience_and_scope() {
        let dir = tempfile::tempdir().expect("dir");
        let ring = jwt_ring(dir.path());
        let secret = b"0123456789abcdef0123456789abcdef";
        let now = chrono::Utc::now().timestamp();
        let base = |exp: i64, iss: &str, aud: &str, scope: &str| serde_json::json!({"sub": "grafana", "exp": exp, "iss": iss, "aud": aud, "scope": scope});
        let good = token(base(now + 600, "https://idp.example", "tidemark", "openid tidemark:read"), secret);
        assert_eq!(ring.authorize(Some(&good), Scope::Read), Ok(Some("grafana".into())));
        assert_eq!(
            ring.authorize(Some(&good), Scope::Ingest),
            Err(AuthError::Forbidden { name: "grafana".into(), scope: "ingest" })
        );
        let cases = [
            (token(base(now - 600, "https://idp.example", "tidemark", "read"), secret), "expired"),
            (token(base(now + 600, "https://evil.example", "tidemark", "read"), secret), "issuer"),
            (token(base(now + 600, "https://idp.example", "other", "read"), secret), "audience"),
            (
                token(base(now + 600, "https://idp.example", "tidemark", "read"), b"another secret, 32 bytes long!!"),
                "signature",
            ),
            (token(serde_json::json!({"sub": "x", "iss": "https://idp.example", "aud": "tidemark"}), secret), "claim"),
        ];
        for (token, expected) in cases {
            let error = ring.authorize(Some(&token), Scope::Read).expect_err(expected);
            assert!(error.to_string().contains(expected), "{error}");
            assert!(!error.to_string().contains(&token), "the token is not echoed");
        }
        let admin = token(
            serde_json::json!({"sub": "ops", "exp": now + 60, "iss": "https://idp.example", "aud": "tidemark", "scopes": ["admin"]}),
            secret,
        );
        assert_eq!(ring.authorize(Some(&admin), Scope::Ingest), Ok(Some("ops".into())));
    }

    #[test]
    fn generated_keys_are_long_and_distinct() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 68);
        assert_eq!(hash_key(&a).len(), 64);
    }
}
