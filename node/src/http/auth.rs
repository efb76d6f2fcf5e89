//! Bearer tokens: who is calling and what they may do.
//!
//! Token secrets are 32 random bytes, hex-encoded with a prefix. Only their blake3 hash is
//! stored (site tokens in the replicated store, the admin token's in memory), so a leaked
//! database leaks no usable token. blake3 rather than argon2 because the secrets are
//! uniformly random: there is nothing to brute-force.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sesame_proto::Role;
use sesame_sync::TokenRow;

use crate::app::{now_ms, Node};
use crate::http::error::ApiError;

const TOKEN_PREFIX: &str = "ssm_";
const TOKEN_SECRET_BYTES: usize = 32;
/// Longest `Authorization` value we look at.
const TOKEN_BYTES_MAX: usize = 256;
/// Shortest admin token a node accepts (`--admin-token`): anything shorter can be guessed.
/// Generated tokens are 68 characters.
pub const ADMIN_TOKEN_CHARS_MIN: usize = 16;

/// Makes a new token secret.
pub fn new_token() -> String {
    let mut bytes = [0u8; TOKEN_SECRET_BYTES];
    getrandom::fill(&mut bytes).expect("read the operating system's random source");
    let mut s = String::with_capacity(TOKEN_PREFIX.len() + 2 * TOKEN_SECRET_BYTES);
    s.push_str(TOKEN_PREFIX);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The stored form of a token: hex blake3 of the secret.
pub fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// The caller of a `/v1` request, from its bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    /// A site token; limited to `scopes` when there are any.
    Site {
        site: String,
        role: Role,
        scopes: Vec<sesame_proto::Scope>,
    },
}

impl Caller {
    /// Succeeds if the caller holds at least `role` on all of `site` (a scoped token never
    /// does: see [`Caller::require_ops`] and [`Caller::require_read`]).
    pub fn require(&self, site: &str, role: Role) -> Result<(), ApiError> {
        self.require_role(site, role)?;
        match self {
            Caller::Site { scopes, .. } if !scopes.is_empty() => Err(ApiError::forbidden(format!(
                "this token is limited to {}; this needs a token for the whole site",
                sesame_proto::command::describe_scopes(scopes)
            ))),
            _ => Ok(()),
        }
    }

    /// Succeeds if the caller may apply `ops` to `site`: an editor, and every op inside the
    /// token's scopes.
    pub fn require_ops(&self, site: &str, ops: &[sesame_proto::Op]) -> Result<(), ApiError> {
        self.require_role(site, Role::Editor)?;
        sesame_proto::command::check_scoped_ops(self.scopes(), ops).map_err(ApiError::forbidden)
    }

    /// Succeeds if the caller may read the keys of `collection` starting with `prefix` (a
    /// whole key for one tuple) in `site`.
    pub fn require_read(
        &self,
        site: &str,
        collection: &str,
        key_or_prefix: &str,
        exact: bool,
    ) -> Result<(), ApiError> {
        self.require_role(site, Role::Reader)?;
        let scopes = self.scopes();
        if exact && scopes.iter().any(|s| s.covers(collection, key_or_prefix)) {
            return Ok(());
        }
        sesame_proto::command::check_scoped_read(scopes, collection, key_or_prefix)
            .map_err(ApiError::forbidden)
    }

    fn scopes(&self) -> &[sesame_proto::Scope] {
        match self {
            Caller::Site { scopes, .. } => scopes,
            Caller::Admin => &[],
        }
    }

    /// The site and role alone, scopes aside (for what checks the scopes itself).
    pub fn require_role(&self, site: &str, role: Role) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Site {
                site: s, role: r, ..
            } if s == site && *r >= role => Ok(()),
            Caller::Site {
                site: s, role: r, ..
            } if s == site => Err(ApiError::forbidden(format!(
                "this token is a {} token for site {s:?}; this needs {}",
                r.as_str(),
                role.as_str()
            ))),
            Caller::Site { site: s, .. } => Err(ApiError::forbidden(format!(
                "this token is for site {s:?}, not {site:?}"
            ))),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Site { .. } => Err(ApiError::forbidden("this needs the admin token")),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 9110 §11.1); the token is what follows the spaces after it.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether a site token may be used at `now_ms`, or why not.
pub fn check_token(token: &TokenRow, now_ms: u64) -> Result<(), ApiError> {
    if let Some(at) = token.revoked_at_ms {
        return Err(ApiError::unauthorized(format!(
            "this token (id {}) was revoked {}; ask the site's owner for a new one",
            token.id,
            ago(now_ms, at)
        )));
    }
    if let Some(at) = token.expires_at_ms.filter(|at| *at <= now_ms) {
        return Err(ApiError::unauthorized(format!(
            "this token (id {}) expired {}; ask the site's owner for a new one",
            token.id,
            ago(now_ms, at)
        )));
    }
    Ok(())
}

fn ago(now_ms: u64, at_ms: u64) -> String {
    format!(
        "{} s ago (at {at_ms} ms after the Unix epoch)",
        now_ms.saturating_sub(at_ms) / 1_000
    )
}

impl FromRequestParts<Arc<Node>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Caller, ApiError> {
        // A bearer token wins; without one, a studio session's cookie (CSRF-checked).
        if !parts.headers.contains_key(http::header::AUTHORIZATION) {
            if let Some(secret) = crate::http::accounts::session_cookie(&parts.headers) {
                let secret = secret.to_string();
                return crate::http::accounts::session_caller(
                    node,
                    &parts.method,
                    &parts.headers,
                    &secret,
                )
                .await;
            }
        }
        caller(node, &parts.headers).await
    }
}

/// The caller a request's `Authorization` header names.
pub async fn caller(node: &Node, headers: &http::HeaderMap) -> Result<Caller, ApiError> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> header"))?;
    let token = header
        .to_str()
        .ok()
        .filter(|v| v.len() <= TOKEN_BYTES_MAX)
        .and_then(bearer_token)
        .ok_or_else(|| ApiError::unauthorized("Authorization header must be 'Bearer <token>'"))?;
    let hash = hash_token(token);
    if node.is_admin_hash(&hash) {
        return Ok(Caller::Admin);
    }
    let record = node.read(move |v| v.token(&hash)).await?;
    match record {
        Some(r) => {
            check_token(&r, now_ms())?;
            Ok(Caller::Site {
                site: r.site,
                role: r.role,
                scopes: r.scopes,
            })
        }
        None => Err(ApiError::unauthorized("unknown token")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let a = new_token();
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == 4 + 64);
        assert_ne!(a, new_token());
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), a);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER   abc  "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn expired_and_revoked_tokens_are_refused_with_reasons() {
        let mut t = TokenRow {
            id: 7,
            site: "demo".into(),
            role: Role::Reader,
            created_at_ms: 1_000,
            expires_at_ms: Some(5_000),
            revoked_at_ms: None,
            scopes: Vec::new(),
        };
        assert!(check_token(&t, 4_999).is_ok());
        let e = check_token(&t, 5_000).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.message.contains("expired"), "{}", e.message);
        t.revoked_at_ms = Some(2_000);
        let e = check_token(&t, 3_000).unwrap_err();
        assert!(e.message.contains("revoked 1 s ago"), "{}", e.message);
    }

    #[test]
    fn roles_are_ordered() {
        let editor = Caller::Site {
            site: "demo".into(),
            role: Role::Editor,
            scopes: Vec::new(),
        };
        assert!(editor.require("demo", Role::Reader).is_ok());
        assert!(editor.require("demo", Role::Editor).is_ok());
        assert_eq!(editor.require("demo", Role::Owner).unwrap_err().status, 403);
        assert_eq!(
            editor.require("blog", Role::Reader).unwrap_err().status,
            403
        );
        assert!(editor.require_admin().is_err());
        assert!(Caller::Admin.require("any", Role::Owner).is_ok());
    }
}
