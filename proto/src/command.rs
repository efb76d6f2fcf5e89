//! Raft commands: what the log orders and the state machine applies, and their results.
//!
//! Commands are deterministic: anything that varies between nodes (time, randomness) is
//! decided by the proposer and carried inside the command.

use serde::{Deserialize, Serialize};

use crate::tuple::Transaction;
use crate::LogIndex;

/// A token's right on one site. Admin tokens are node configuration, not log state.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    bincode::Encode,
    bincode::Decode,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read tuples and site status.
    Reader,
    /// Also write tuples and publish.
    Editor,
    /// Also make tokens for the site.
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Editor => "editor",
            Role::Owner => "owner",
        }
    }
}

/// Most live tokens (neither revoked nor expired) one site may have; making one more is
/// refused until some are revoked.
pub const TOKENS_PER_SITE_MAX: usize = 1_000;
/// Revoked and expired tokens kept per site, so that using one is answered "revoked" or
/// "expired" rather than "unknown". Past this the oldest are forgotten.
pub const DEAD_TOKENS_PER_SITE_MAX: usize = 1_000;
/// Longest lifetime a token may be given, in seconds (ten years).
pub const TOKEN_TTL_S_MAX: u64 = 10 * 365 * 24 * 3_600;

/// A site token as stored: only the hash of the secret is kept. Its id is the log index of
/// the command that stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct TokenRecord {
    /// Hex blake3 hash of the token secret.
    pub hash: String,
    pub site: String,
    pub role: Role,
    /// The proposer's clock when the token was made.
    pub created_at_ms: u64,
    /// When the token stops working (the proposer's clock plus the lifetime); `None`: never.
    pub expires_at_ms: Option<u64>,
}

/// Most scopes one token may carry.
pub const SCOPES_PER_TOKEN_MAX: usize = 8;

/// A part of a site a token is limited to: one collection, and in it one key (`prefix`
/// false) or every key starting with `key` (`prefix` true). A token with scopes may read
/// and write only tuples inside one of them, and nothing site-wide (status, history,
/// tokens, rollback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Scope {
    pub collection: String,
    pub key: String,
    #[serde(default)]
    pub prefix: bool,
}

impl Scope {
    /// Whether `(collection, key)` is inside this scope.
    pub fn covers(&self, collection: &str, key: &str) -> bool {
        self.collection == collection
            && if self.prefix {
                key.starts_with(&self.key)
            } else {
                key == self.key
            }
    }

    /// Whether every key of `collection` starting with `prefix` is inside this scope.
    pub fn covers_prefix(&self, collection: &str, prefix: &str) -> bool {
        self.collection == collection && self.prefix && prefix.starts_with(&self.key)
    }

    /// Checks the names: a valid collection, and a valid key (or, for a prefix, at most a
    /// key's length).
    pub fn validate(&self) -> Result<(), String> {
        crate::names::validate_collection(&self.collection).map_err(|e| e.to_string())?;
        if self.prefix {
            if self.key.len() > crate::names::KEY_BYTES_MAX {
                return Err(format!(
                    "scope key prefix is {} bytes, the limit is {}",
                    self.key.len(),
                    crate::names::KEY_BYTES_MAX
                ));
            }
        } else {
            crate::names::validate_key(&self.key).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The scopes as people read them: `profiles/alice, _assets/avatars/alice*`.
pub fn describe_scopes(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| {
            format!(
                "{}/{}{}",
                s.collection,
                s.key,
                if s.prefix { "*" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a token limited to `scopes` may not apply `ops`, if it may not (no scopes: the
/// whole site, anything goes).
pub fn check_scoped_ops(scopes: &[Scope], ops: &[crate::tuple::Op]) -> Result<(), String> {
    if scopes.is_empty() {
        return Ok(());
    }
    for (i, op) in ops.iter().enumerate() {
        let (collection, key) = (op.collection(), op.key());
        if !scopes.iter().any(|s| s.covers(collection, key)) {
            return Err(format!(
                "op {i}: {collection}/{key} is outside this token's scope ({})",
                describe_scopes(scopes)
            ));
        }
    }
    Ok(())
}

/// Why a token limited to `scopes` may not read the keys of `collection` starting with
/// `prefix`, if it may not.
pub fn check_scoped_read(scopes: &[Scope], collection: &str, prefix: &str) -> Result<(), String> {
    if scopes.is_empty() || scopes.iter().any(|s| s.covers_prefix(collection, prefix)) {
        return Ok(());
    }
    Err(format!(
        "{collection}/{prefix}* is outside this token's scope ({})",
        describe_scopes(scopes)
    ))
}

/// A command in the Raft log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub enum Command {
    /// Create a site. `created_at_ms` is the proposer's clock.
    CreateSite { name: String, created_at_ms: u64 },
    /// Store a site token. Refused past [`TOKENS_PER_SITE_MAX`] live tokens ("live" at
    /// `created_at_ms`); tokens dead by then past [`DEAD_TOKENS_PER_SITE_MAX`] are forgotten.
    PutToken(TokenRecord),
    /// Apply transactions, in order, each atomically. The node groups transactions that
    /// arrive while the previous entry is being made durable into one entry (group commit):
    /// they share its log index, and one fsync.
    Txs(Vec<Transaction>),
    /// Point a site's root at a manifest: publish a new version, or roll back to an old one.
    Publish(Publish),
    /// Revoke a site token by id (the log index that stored it). `revoked_at_ms` is the
    /// proposer's clock.
    RevokeToken {
        site: String,
        id: LogIndex,
        revoked_at_ms: u64,
    },
    /// Delete a site and everything the store holds for it: tuples, tokens, versions, the
    /// root and its clients' sequence numbers. A site created later under the same name
    /// starts empty. The site's published files stay in the object store until
    /// `deleted_at_ms` (the proposer's clock) plus the node's retention has passed, unless
    /// the name is taken again first.
    DeleteSite { name: String, deleted_at_ms: u64 },
    /// Forget the site's tombstones (records of deletes) below index `before`: the change
    /// feed then reaches back to `before` only (the site's feed horizon), and a reader of
    /// changes from further back must read the site's tuples whole instead.
    CompactFeed { site: String, before: LogIndex },
    /// Forget the site's published versions recorded below log index `before`, except the
    /// one the root points at: they leave the history (and can no longer be rolled back
    /// to), and garbage collection may then delete the files only they used. The proposer
    /// decides the cut from its retention settings and clock.
    PruneVersions { site: String, before: LogIndex },
    /// Record a preview: a version rendered from a proposed change that is served only
    /// under its private id until `expires_at_ms`, and never becomes the root. Expired
    /// previews of the site are forgotten; past [`PREVIEWS_PER_SITE_MAX`] live ones the
    /// oldest goes.
    PutPreview(PreviewRecord),
    /// Store a site token limited to `scopes` (see [`Scope`]); otherwise as `PutToken`.
    PutScopedToken {
        token: TokenRecord,
        scopes: Vec<Scope>,
    },
    /// Create a person's account on a site (the studio's): refused when the name is taken.
    /// `password_hash` is an argon2id PHC string, made by the proposer.
    PutAccount {
        site: String,
        username: String,
        password_hash: String,
        created_at_ms: u64,
    },
    /// Start a session of an account: `hash` is the blake3 hash of the session's secret
    /// (the secret is only in the person's cookie). Past [`SESSIONS_PER_ACCOUNT_MAX`] live
    /// sessions the oldest ends.
    PutSession {
        site: String,
        username: String,
        hash: String,
        created_at_ms: u64,
        expires_at_ms: u64,
    },
    /// End a session (log out).
    EndSession { hash: String, ended_at_ms: u64 },
}

/// Most live sessions one account keeps.
pub const SESSIONS_PER_ACCOUNT_MAX: usize = 16;

/// Most live previews one site keeps.
pub const PREVIEWS_PER_SITE_MAX: usize = 32;

/// A preview as the log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct PreviewRecord {
    pub site: String,
    /// The blake3 hash (hex) of the preview's secret id; the id itself is only in its URL.
    pub id_hash: String,
    /// The manifest id of the preview's files.
    pub manifest: String,
    /// The commit index the change was rendered on top of.
    pub index: LogIndex,
    /// The proposer's clock.
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// A site's new root. Publishing through the log means every node agrees on the current
/// version, and a projector that lost leadership cannot publish (its proposal fails).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Publish {
    pub site: String,
    /// The manifest id (hex blake3 of the manifest's bytes).
    pub manifest: String,
    /// The commit index the manifest reflects.
    pub index: LogIndex,
    /// Files in the manifest.
    pub files: u64,
    pub published_at_ms: u64,
    /// Compare-and-set: the manifest the root must point at now (`None`: no root yet). Two
    /// projectors racing cannot both win.
    pub expected: Option<String>,
    /// True when this re-points to an earlier manifest.
    pub rollback: bool,
}

/// The current version of a key that made a transaction fail its `if_version` guard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Conflict {
    pub op: usize,
    pub collection: String,
    pub key: String,
    /// What the op expected.
    pub expected: LogIndex,
    /// What the store holds (0: absent).
    pub current: LogIndex,
}

/// What applying a command did. Every node computes the same result for the same entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub enum CommandResult {
    /// Nothing to report (membership and blank entries).
    Ok,
    SiteCreated,
    SiteExists,
    TokenStored,
    /// The transaction committed at `index`.
    Committed {
        index: LogIndex,
    },
    /// This `(client_id, seq)` was applied before, at `index`; nothing changed now.
    Duplicate {
        index: LogIndex,
    },
    /// The client has applied up to `highest`, and this lower `seq` is not among the last
    /// [`crate::tuple::CLIENT_SEQ_WINDOW`] sequence numbers remembered: an old retry (whose
    /// index is no longer known) or a write out of order. Nothing changed.
    StaleSeq {
        highest: u64,
    },
    /// A guard failed; nothing changed.
    Conflict(Conflict),
    UnknownSite {
        site: String,
    },
    /// One result per transaction of a [`Command::Txs`], in order.
    Txs(Vec<CommandResult>),
    /// The root moved.
    Published,
    /// The root was not at `expected`; nothing changed.
    RootMoved {
        current: Option<String>,
    },
    /// The site has [`TOKENS_PER_SITE_MAX`] live tokens already; nothing changed.
    TooManyTokens,
    TokenRevoked,
    /// The site has no token with this id (or it was revoked already); nothing changed.
    UnknownToken {
        id: LogIndex,
    },
    SiteDeleted,
    /// `removed` tombstones are gone; the site's feed reaches back to `horizon`.
    FeedCompacted {
        removed: u64,
        horizon: LogIndex,
    },
    /// `removed` versions left the site's history.
    VersionsPruned {
        removed: u64,
    },
    /// A rollback named a version that is no longer in the site's history; nothing changed.
    VersionGone,
    PreviewStored,
    AccountCreated,
    /// The account name is taken; nothing changed.
    AccountExists,
    /// A session started (`PutSession`) or ended (`EndSession`).
    SessionStored,
    /// `PutSession` named an account that does not exist; nothing changed.
    UnknownAccount,
}
