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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this endpoint needs an API key with scope {0:?}: send Authorization: Bearer KEY or X-API-Key: KEY")]
    Missing(&'static str),
    #[error("the API key is not valid")]
    Invalid,
    #[error("the API key {name:?} does not have scope {scope:?}")]
    Forbidden { name: String, scope: &'static str },
}

impl KeyRing {
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
        !self.by_digest.is_empty()
    }

    /// Whether `presented` (the key from the request, if any) may use `scope`; the
    /// key's name when it may (`None`: authentication is off).
    pub fn authorize(&self, presented: Option<&str>, scope: Scope) -> Result<Option<&str>, AuthError> {
        if !self.is_enabled() {
            return Ok(None);
        }
        let presented = presented.ok_or(AuthError::Missing(scope.as_str()))?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let identity = self.by_digest.get(&digest).ok_or(AuthError::Invalid)?;
        if identity.scopes.contains(&scope) || identity.scopes.contains(&Scope::Admin) {
            Ok(Some(&identity.name))
        } else {
            Err(AuthError::Forbidden { name: identity.name.clone(), scope: scope.as_str() })
        }
    }
}

/// The scope a request needs; `None`: open (probes).
pub fn required_scope(method: &http::Method, path: &str) -> Option<Scope> {
    match path {
        "/health" | "/ready" => None,
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
        assert_eq!(ring.authorize(Some("k-ingest"), Scope::Ingest), Ok(Some("devices")));
        assert_eq!(
            ring.authorize(Some("k-ingest"), Scope::Read),
            Err(AuthError::Forbidden { name: "devices".into(), scope: "read" })
        );
        assert_eq!(ring.authorize(Some("k-admin"), Scope::Read), Ok(Some("ops")));
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

    #[test]
    fn generated_keys_are_long_and_distinct() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 68);
        assert_eq!(hash_key(&a).len(), 64);
    }
}
