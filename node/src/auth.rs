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

use crate::error::ApiError;
use crate::node::Node;

const TOKEN_PREFIX: &str = "ssm_";
const TOKEN_SECRET_BYTES: usize = 32;
/// Longest `Authorization` value we look at.
const TOKEN_BYTES_MAX: usize = 256;

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
    Site { site: String, role: Role },
}

impl Caller {
    /// Succeeds if the caller holds at least `role` on `site`.
    pub fn require(&self, site: &str, role: Role) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Site { site: s, role: r } if s == site && *r >= role => Ok(()),
            Caller::Site { site: s, role: r } if s == site => Err(ApiError::forbidden(format!(
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

impl FromRequestParts<Arc<Node>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Caller, ApiError> {
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized("missing Authorization: Bearer <token> header")
            })?;
        let token = header
            .to_str()
            .ok()
            .filter(|v| v.len() <= TOKEN_BYTES_MAX)
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("Authorization header must be 'Bearer <token>'")
            })?;
        let hash = hash_token(token);
        if node.is_admin_hash(&hash) {
            return Ok(Caller::Admin);
        }
        let record = node.read(move |v| v.token(&hash)).await?;
        match record {
            Some(r) => Ok(Caller::Site {
                site: r.site,
                role: r.role,
            }),
            None => Err(ApiError::unauthorized("unknown token")),
        }
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
    fn roles_are_ordered() {
        let editor = Caller::Site {
            site: "demo".into(),
            role: Role::Editor,
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
