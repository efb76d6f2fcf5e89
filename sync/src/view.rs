//! Reading the store: views over one connection, readers with their own connections, and a
//! small pool of readers for servers.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use sesame_proto::{codec, Home, LogIndex, Origin, Role, Tuple, Value};

use crate::store::{applied_index_key, decode_i64, get_meta, role_from_str, StoreError};
use crate::CHANGES_LIMIT_MAX;
#[cfg(doc)]
use crate::SCAN_LIMIT_MAX;

/// A site as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRecord {
    pub name: String,
    pub created_index: LogIndex,
    pub created_at_ms: u64,
}

/// Which sites changed after an index, and their newest change. The index is named: left
/// to itself the planner walks all of `tuples_by_site_version` for the grouping, a read of
/// every tuple on every commit.
const CHANGED_SITES_SQL: &str = "SELECT site, MAX(version) FROM tuples INDEXED BY tuples_by_version
     WHERE version > ?1 GROUP BY site ORDER BY site";

/// A published site version: the manifest a site's root points at, or pointed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRecord {
    pub site: String,
    pub manifest: String,
    /// The commit index the manifest reflects.
    pub index: LogIndex,
    /// The log index of the publish command.
    pub log_index: LogIndex,
    pub files: u64,
    pub published_at_ms: u64,
    /// True when this root re-pointed the site to an earlier version (a rollback).
    pub rollback: bool,
}

/// A site token as the store keeps it (the secret's hash stays inside the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// The log index that stored the token.
    pub id: LogIndex,
    pub site: String,
    pub role: Role,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    /// The parts of the site the token is limited to; empty: the whole site.
    pub scopes: Vec<sesame_proto::Scope>,
}

/// The latest change to one key: a put (with its value) or a delete (`value: None`).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub site: String,
    pub index: LogIndex,
    pub collection: String,
    pub key: String,
    pub value: Option<Value>,
    /// The client (and its sequence number) whose transaction made the change.
    pub origin: Option<Origin>,
    /// Where the tuple lives: the site, or one client's mailbox.
    pub home: Home,
}

/// A page of the change feed.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangesPage {
    pub changes: Vec<Change>,
    /// Every change at or below this index is in this page or an earlier one.
    pub next_since: LogIndex,
}

/// Queries over one connection. Consistent across calls when the connection is inside a
/// transaction (see [`Reader::snapshot`]).
#[derive(Clone, Copy)]
pub struct View<'c> {
    conn: &'c Connection,
}

impl<'c> View<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        View { conn }
    }

    /// The index of the last applied log entry.
    pub fn applied_index(&self) -> Result<LogIndex, StoreError> {
        match get_meta(self.conn, applied_index_key())? {
            None => Ok(0),
            Some(bytes) => Ok(decode_i64(&bytes)? as u64),
        }
    }

    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        get_meta(self.conn, key)
    }

    /// The current version of a key; 0 when absent or deleted.
    pub fn version(&self, site: &str, collection: &str, key: &str) -> Result<LogIndex, StoreError> {
        let version: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT version FROM tuples
                 WHERE site = ?1 AND collection = ?2 AND key = ?3 AND value IS NOT NULL",
            )?
            .query_row(params![site, collection, key], |r| r.get(0))
            .optional()?;
        Ok(version.unwrap_or(0) as u64)
    }

    pub fn get(
        &self,
        site: &str,
        collection: &str,
        key: &str,
    ) -> Result<Option<Tuple>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, collection, key, value, version, origin_client, origin_seq, home_mailbox
             FROM tuples WHERE site = ?1 AND collection = ?2 AND key = ?3 AND value IS NOT NULL",
        )?;
        let raw = stmt
            .query_row(params![site, collection, key], RawTuple::from_row)
            .optional()?;
        raw.map(RawTuple::decode).transpose()
    }

    /// Live tuples of a collection whose key starts with `prefix` and sorts after `after`, in
    /// key order, at most `limit`. The API caps `limit` at [`SCAN_LIMIT_MAX`]; the projector
    /// bounds its own reads.
    pub fn scan(
        &self,
        site: &str,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Tuple>, StoreError> {
        // Keys with a prefix form the range [prefix, successor(prefix)): SQLite compares
        // TEXT bytewise and UTF-8 preserves code point order.
        let lower = match after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let strict = after.is_some_and(|a| a >= prefix);
        let upper = prefix_successor(prefix);
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, collection, key, value, version, origin_client, origin_seq, home_mailbox
             FROM tuples
             WHERE site = ?1 AND collection = ?2
               AND (key > ?3 OR (key = ?3 AND NOT ?4))
               AND (?5 IS NULL OR key < ?5)
               AND value IS NOT NULL
             ORDER BY key LIMIT ?6",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(
            params![site, collection, lower, strict, upper, limit],
            RawTuple::from_row,
        )?;
        let mut out = Vec::new();
        for raw in rows {
            out.push(raw?.decode()?);
        }
        Ok(out)
    }

    /// Collections of a site that hold at least one live tuple, in name order.
    pub fn collections(&self, site: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT collection FROM tuples WHERE site = ?1 AND value IS NOT NULL ORDER BY collection")?;
        let rows = stmt.query_map(params![site], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How far back the site's change feed reaches: changes after this index are all in it
    /// (deletes included). Before it, tombstones were compacted away (or the site did not
    /// exist: a site made again starts a new feed), so a reader from further back must read
    /// the tuples whole. 0 for a site that does not exist.
    pub fn feed_horizon(&self, site: &str) -> Result<LogIndex, StoreError> {
        let created: Option<i64> = self
            .conn
            .prepare_cached("SELECT created_index FROM sites WHERE name = ?1")?
            .query_row(params![site], |r| r.get(0))
            .optional()?;
        let compacted: Option<i64> = self
            .conn
            .prepare_cached("SELECT horizon FROM feed_horizons WHERE site = ?1")?
            .query_row(params![site], |r| r.get(0))
            .optional()?;
        Ok(created.unwrap_or(0).max(compacted.unwrap_or(0)) as u64)
    }

    /// How many tombstones the site keeps, and the index of the `keep`-th newest (the
    /// `before` that would leave `keep` of them).
    pub fn tombstones(
        &self,
        site: &str,
        keep: usize,
    ) -> Result<(u64, Option<LogIndex>), StoreError> {
        let count: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM tuples WHERE site = ?1 AND value IS NULL")?
            .query_row(params![site], |r| r.get(0))?;
        let cut: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT version FROM tuples WHERE site = ?1 AND value IS NULL
                 ORDER BY version DESC LIMIT 1 OFFSET ?2",
            )?
            .query_row(params![site, keep as i64], |r| r.get(0))
            .optional()?;
        Ok((count as u64, cut.map(|c| c as u64 + 1)))
    }

    /// Live tuples of `site` in `collection` (every collection when `None`) whose key starts
    /// with `prefix`, living in `mailbox` (the site's own tuples when `None`), that sort after
    /// `after` (a `(collection, key)`), in `(collection, key)` order, at most `limit`: how a
    /// subscription's snapshot is read, page by page.
    pub fn scan_tuples(
        &self,
        site: &str,
        collection: Option<&str>,
        prefix: &str,
        mailbox: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Tuple>, StoreError> {
        let upper = prefix_successor(prefix);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // One statement per shape, each a plain range over the primary key (site,
        // collection, key): an OR of shapes would make SQLite scan from the start each page.
        let home = if mailbox.is_some() {
            "home_mailbox = ?5"
        } else {
            "home_mailbox IS NULL AND ?5 IS NULL"
        };
        let (coll_cond, after_cond) = match (collection.is_some(), after.is_some()) {
            (true, false) => ("collection = ?2", "?6 IS NULL AND ?7 IS NULL"),
            (true, true) => ("collection = ?2", "?6 = ?2 AND key > ?7"),
            (false, false) => ("?2 IS NULL", "?6 IS NULL AND ?7 IS NULL"),
            (false, true) => ("?2 IS NULL", "(collection, key) > (?6, ?7)"),
        };
        let sql = format!(
            "SELECT site, collection, key, value, version, origin_client, origin_seq, home_mailbox
             FROM tuples
             WHERE site = ?1 AND {coll_cond} AND {after_cond}
               AND key >= ?3 AND (?4 IS NULL OR key < ?4)
               AND {home} AND value IS NOT NULL
             ORDER BY collection, key LIMIT ?8"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let (after_coll, after_key) = match after {
            Some((c, k)) => (Some(c), Some(k)),
            None => (None, None),
        };
        let rows = stmt.query_map(
            params![site, collection, prefix, upper, mailbox, after_coll, after_key, limit],
            RawTuple::from_row,
        )?;
        let mut out = Vec::new();
        for raw in rows {
            out.push(raw?.decode()?);
        }
        Ok(out)
    }

    /// Changes after index `since`, oldest first: one entry per key, its latest change. With
    /// `site: None`, changes of every site. A page holds at most `limit` changes (capped at
    /// [`CHANGES_LIMIT_MAX`]) unless a single index holds more: a page never splits the
    /// changes of one commit.
    pub fn changes(
        &self,
        site: Option<&str>,
        since: LogIndex,
        limit: usize,
    ) -> Result<ChangesPage, StoreError> {
        let limit = limit.clamp(1, CHANGES_LIMIT_MAX);
        let applied = self.applied_index()?;
        if i64::try_from(since).is_err() {
            // Past every index the store can hold: nothing is newer.
            return Ok(ChangesPage {
                changes: Vec::new(),
                next_since: since,
            });
        }
        let mut changes = self.changes_where(site, since, None, limit + 1)?;
        if changes.len() <= limit {
            return Ok(ChangesPage {
                changes,
                next_since: applied.max(since),
            });
        }
        // Cut after the last index that is complete in this page; if one index fills the
        // page, take that index whole.
        let last = changes[limit].index;
        changes.retain(|c| c.index < last);
        let next_since = if changes.is_empty() {
            changes = self.changes_where(site, last - 1, Some(last), usize::MAX)?;
            last
        } else {
            last - 1
        };
        Ok(ChangesPage {
            changes,
            next_since,
        })
    }

    fn changes_where(
        &self,
        site: Option<&str>,
        since: LogIndex,
        only: Option<LogIndex>,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        let sql = if site.is_some() {
            "SELECT site, collection, key, value, version, origin_client, origin_seq, home_mailbox
             FROM tuples WHERE site = ?1 AND version > ?2 AND (?3 IS NULL OR version = ?3)
             ORDER BY version, collection, key LIMIT ?4"
        } else {
            "SELECT site, collection, key, value, version, origin_client, origin_seq, home_mailbox
             FROM tuples WHERE ?1 IS NULL AND version > ?2 AND (?3 IS NULL OR version = ?3)
             ORDER BY version, site, collection, key LIMIT ?4"
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(
            params![
                site,
                i64::try_from(since).unwrap_or(i64::MAX),
                only.map(|i| i64::try_from(i).unwrap_or(i64::MAX)),
                limit
            ],
            RawTuple::from_row,
        )?;
        let mut out = Vec::new();
        for raw in rows {
            let raw = raw?;
            let index = raw.version as u64;
            let value = raw.value.as_deref().map(decode_value).transpose()?;
            let origin = raw.origin();
            out.push(Change {
                site: raw.site,
                index,
                collection: raw.collection,
                key: raw.key,
                value,
                origin,
                home: raw.home_mailbox.map(Home::Mailbox).unwrap_or(Home::Site),
            });
        }
        Ok(out)
    }

    /// The keys of `site` written (put or deleted) after index `since`, in no particular
    /// order, or `None` when there are more than `max`: what the projector needs to find the
    /// pages a round must render, without reading the values.
    pub fn changed_keys(
        &self,
        site: &str,
        since: LogIndex,
        max: usize,
    ) -> Result<Option<Vec<(String, String)>>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT collection, key FROM tuples INDEXED BY tuples_by_site_version
             WHERE site = ?1 AND version > ?2 LIMIT ?3",
        )?;
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let limit = i64::try_from(max.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![site, since, limit], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let keys: Vec<(String, String)> = rows.collect::<Result<_, _>>()?;
        Ok((keys.len() <= max).then_some(keys))
    }

    /// The sites with changes after index `since`, each with the index of its newest change:
    /// how a follower of the log learns which sites a batch of commits touched without
    /// reading the changes themselves.
    pub fn changed_sites(&self, since: LogIndex) -> Result<Vec<(String, LogIndex)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(CHANGED_SITES_SQL)?;
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![since], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as LogIndex))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sites deleted at or before `deleted_before_ms` (the deleter's clock) and not created
    /// again: their published files may be removed.
    /// Each with the log index of its deletion.
    pub fn deleted_sites(
        &self,
        deleted_before_ms: u64,
    ) -> Result<Vec<(String, LogIndex)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, deleted_index FROM deleted_sites WHERE deleted_at_ms <= ?1 ORDER BY name",
        )?;
        let before = i64::try_from(deleted_before_ms).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![before], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as LogIndex))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn sites(&self) -> Result<Vec<SiteRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, created_index, created_at_ms FROM sites ORDER BY name")?;
        let rows = stmt.query_map([], site_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn site(&self, name: &str) -> Result<Option<SiteRecord>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT name, created_index, created_at_ms FROM sites WHERE name = ?1")?
            .query_row(params![name], site_from_row)
            .optional()?)
    }

    /// The current root of a site.
    pub fn root(&self, site: &str) -> Result<Option<RootRecord>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT r.site, r.manifest, r.idx, r.log_index, r.files, r.published_at_ms,
                        COALESCE(v.rollback, 0)
                 FROM roots r LEFT JOIN versions v ON v.site = r.site AND v.log_index = r.log_index
                 WHERE r.site = ?1",
            )?
            .query_row(params![site], root_from_row)
            .optional()?)
    }

    /// Roots published after log index `since`, in log order (how a server learns what to
    /// reload).
    pub fn roots_since(&self, since: LogIndex) -> Result<Vec<RootRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, manifest, idx, log_index, files, published_at_ms, 0 FROM roots
             WHERE log_index > ?1 ORDER BY log_index",
        )?;
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![since], root_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A site's published versions, newest first, at most `limit`.
    pub fn versions(&self, site: &str, limit: usize) -> Result<Vec<RootRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, manifest, idx, log_index, files, published_at_ms, rollback FROM versions
             WHERE site = ?1 ORDER BY log_index DESC LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![site, limit], root_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest version of a site that reflects commit `index`: the one published for it,
    /// or, once that left the history, a rollback to it.
    pub fn version_at(
        &self,
        site: &str,
        index: LogIndex,
    ) -> Result<Option<RootRecord>, StoreError> {
        let Ok(index) = i64::try_from(index) else {
            return Ok(None);
        };
        Ok(self
            .conn
            .prepare_cached(
                "SELECT site, manifest, idx, log_index, files, published_at_ms, rollback FROM versions
                 WHERE site = ?1 AND idx = ?2 ORDER BY rollback, log_index DESC LIMIT 1",
            )?
            .query_row(params![site, index], root_from_row)
            .optional()?)
    }

    /// Where a prune of `site`'s history would cut (`Command::PruneVersions { before }`):
    /// below the newest `keep` versions and below every version published at or after
    /// `cutoff_ms`. `None`: nothing to prune. The root's version is never pruned.
    pub fn prune_cut(
        &self,
        site: &str,
        keep: usize,
        cutoff_ms: u64,
    ) -> Result<Option<LogIndex>, StoreError> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let cutoff = i64::try_from(cutoff_ms).unwrap_or(i64::MAX);
        // The newest version that is both beyond the newest `keep` and older than the cutoff.
        let newest_old: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT MAX(log_index) FROM (
                     SELECT log_index, published_at_ms FROM versions WHERE site = ?1
                     ORDER BY log_index DESC LIMIT -1 OFFSET ?2)
                 WHERE published_at_ms < ?3",
            )?
            .query_row(params![site, keep, cutoff], |r| r.get(0))?;
        let Some(newest_old) = newest_old else {
            return Ok(None);
        };
        // Only worth a command when it removes a row other than the root's.
        let removable: bool = self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM versions WHERE site = ?1 AND log_index <= ?2
                   AND log_index NOT IN (SELECT log_index FROM roots WHERE site = ?1))",
            )?
            .query_row(params![site, newest_old], |r| r.get(0))?;
        Ok(removable.then_some(newest_old as u64 + 1))
    }

    /// Every manifest `site` still needs at `now_ms`: its root's, its history's and its live
    /// previews'. Files no manifest here names may be collected.
    pub fn retained_manifests(
        &self,
        site: &str,
        now_ms: u64,
    ) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(
            "SELECT manifest FROM roots WHERE site = ?1
             UNION SELECT manifest FROM versions WHERE site = ?1
             UNION SELECT manifest FROM previews WHERE site = ?1 AND expires_at_ms > ?2",
        )?;
        let rows = stmt.query_map(params![site, now], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The live preview of `site` whose secret id hashes to `id_hash`.
    pub fn preview(
        &self,
        site: &str,
        id_hash: &str,
        now_ms: u64,
    ) -> Result<Option<sesame_proto::PreviewRecord>, StoreError> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        Ok(self
            .conn
            .prepare_cached(
                "SELECT manifest, idx, created_at_ms, expires_at_ms FROM previews
                 WHERE site = ?1 AND id_hash = ?2 AND expires_at_ms > ?3",
            )?
            .query_row(params![site, id_hash, now], |r| {
                Ok(sesame_proto::PreviewRecord {
                    site: site.to_string(),
                    id_hash: id_hash.to_string(),
                    manifest: r.get(0)?,
                    index: r.get::<_, i64>(1)? as u64,
                    created_at_ms: r.get::<_, i64>(2)? as u64,
                    expires_at_ms: r.get::<_, i64>(3)? as u64,
                })
            })
            .optional()?)
    }

    /// An account's argon2id PHC string.
    pub fn account(&self, site: &str, username: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT password_hash FROM accounts WHERE site = ?1 AND username = ?2")?
            .query_row(params![site, username], |r| r.get(0))
            .optional()?)
    }

    /// The newest `limit` accounts of `site`: `(username, created_at_ms)`.
    pub fn accounts(&self, site: &str, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT username, created_at_ms FROM accounts WHERE site = ?1
             ORDER BY created_index DESC LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![site, limit], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The live session whose secret hashes to `hash`: `(site, username, expires_at_ms)`.
    pub fn session(
        &self,
        hash: &str,
        now_ms: u64,
    ) -> Result<Option<(String, String, u64)>, StoreError> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        Ok(self
            .conn
            .prepare_cached(
                "SELECT site, username, expires_at_ms FROM sessions
                 WHERE hash = ?1 AND ended_at_ms IS NULL AND expires_at_ms > ?2",
            )?
            .query_row(params![hash, now], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })
            .optional()?)
    }

    /// The token whose secret hashes to `hash`, revoked or not.
    pub fn token(&self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        let raw = self
            .conn
            .prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"
            ))?
            .query_row(params![hash], RawToken::from_row)
            .optional()?;
        raw.map(RawToken::decode).transpose()
    }

    /// A site's tokens that are not revoked (expired ones included), oldest first. At most
    /// `TOKENS_PER_SITE_MAX` live plus `DEAD_TOKENS_PER_SITE_MAX` dead ones exist.
    pub fn tokens(&self, site: &str) -> Result<Vec<TokenRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens
             WHERE site = ?1 AND revoked_at_ms IS NULL ORDER BY created_index"
        ))?;
        let rows = stmt.query_map(params![site], RawToken::from_row)?;
        let mut out = Vec::new();
        for raw in rows {
            out.push(raw?.decode()?);
        }
        Ok(out)
    }
}

const TOKEN_COLUMNS: &str =
    "created_index, site, role, created_at_ms, expires_at_ms, revoked_at_ms, scopes";

struct RawToken {
    id: i64,
    site: String,
    role: String,
    created_at_ms: i64,
    expires_at_ms: Option<i64>,
    revoked_at_ms: Option<i64>,
    scopes: Option<String>,
}

impl RawToken {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawToken> {
        Ok(RawToken {
            id: r.get(0)?,
            site: r.get(1)?,
            role: r.get(2)?,
            created_at_ms: r.get(3)?,
            expires_at_ms: r.get(4)?,
            revoked_at_ms: r.get(5)?,
            scopes: r.get(6)?,
        })
    }

    fn decode(self) -> Result<TokenRow, StoreError> {
        Ok(TokenRow {
            id: self.id as u64,
            site: self.site,
            role: role_from_str(&self.role)?,
            created_at_ms: self.created_at_ms as u64,
            expires_at_ms: self.expires_at_ms.map(|t| t as u64),
            revoked_at_ms: self.revoked_at_ms.map(|t| t as u64),
            scopes: match self.scopes {
                None => Vec::new(),
                Some(json) => serde_json::from_str(&json).map_err(|e| {
                    StoreError::Corrupt(format!("token {}: scopes {json:?}: {e}", self.id))
                })?,
            },
        })
    }
}

fn site_from_row(r: &Row<'_>) -> rusqlite::Result<SiteRecord> {
    Ok(SiteRecord {
        name: r.get(0)?,
        created_index: r.get::<_, i64>(1)? as u64,
        created_at_ms: r.get::<_, i64>(2)? as u64,
    })
}

fn root_from_row(r: &Row<'_>) -> rusqlite::Result<RootRecord> {
    Ok(RootRecord {
        site: r.get(0)?,
        manifest: r.get(1)?,
        index: r.get::<_, i64>(2)? as u64,
        log_index: r.get::<_, i64>(3)? as u64,
        files: r.get::<_, i64>(4)? as u64,
        published_at_ms: r.get::<_, i64>(5)? as u64,
        rollback: r.get(6)?,
    })
}

/// The smallest string greater than every string starting with `prefix`, or `None` when
/// there is none (empty prefix, or only U+10FFFF characters).
pub(crate) fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(c as u32 + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn decode_value(bytes: &[u8]) -> Result<Value, StoreError> {
    codec::decode(bytes).map_err(|e| StoreError::Corrupt(format!("tuple value: {e}")))
}

struct RawTuple {
    site: String,
    collection: String,
    key: String,
    value: Option<Vec<u8>>,
    version: i64,
    origin_client: Option<String>,
    origin_seq: Option<i64>,
    home_mailbox: Option<String>,
}

impl RawTuple {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawTuple> {
        Ok(RawTuple {
            site: r.get(0)?,
            collection: r.get(1)?,
            key: r.get(2)?,
            value: r.get(3)?,
            version: r.get(4)?,
            origin_client: r.get(5)?,
            origin_seq: r.get(6)?,
            home_mailbox: r.get(7)?,
        })
    }

    fn origin(&self) -> Option<Origin> {
        match (&self.origin_client, self.origin_seq) {
            (Some(client_id), Some(seq)) => Some(Origin {
                client_id: client_id.clone(),
                seq: seq as u64,
            }),
            _ => None,
        }
    }

    fn decode(self) -> Result<Tuple, StoreError> {
        let origin = self.origin();
        let bytes = self
            .value
            .ok_or_else(|| StoreError::Corrupt("live tuple without a value".into()))?;
        Ok(Tuple {
            site: self.site,
            collection: self.collection,
            key: self.key,
            value: decode_value(&bytes)?,
            version: self.version as u64,
            origin,
            home: self.home_mailbox.map(Home::Mailbox).unwrap_or(Home::Site),
        })
    }
}

/// A read-only connection to a store.
pub struct Reader {
    conn: Connection,
}

impl Reader {
    /// Opens a reader on the store at `path`; the store's writer must have created it.
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Reader { conn })
    }

    /// A consistent snapshot: every query through it sees the same committed state.
    pub fn snapshot(&mut self) -> Result<Snapshot<'_>, StoreError> {
        Ok(Snapshot {
            tx: self
                .conn
                .transaction_with_behavior(TransactionBehavior::Deferred)?,
        })
    }
}

/// A read transaction; dropping it ends the transaction.
pub struct Snapshot<'c> {
    tx: rusqlite::Transaction<'c>,
}

impl Snapshot<'_> {
    pub fn view(&self) -> View<'_> {
        View::new(&self.tx)
    }
}

/// Idle readers kept for reuse.
const POOL_IDLE_MAX_DEFAULT: usize = 16;

/// Reader connections for a server: borrow one, read through a snapshot, give it back.
/// Callers bound concurrency themselves (the node runs reads on tokio's bounded blocking
/// pool); the pool bounds how many idle connections it keeps.
pub struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Reader>>,
    idle_max: usize,
}

impl ReadPool {
    pub fn open(path: &Path, idle_max: usize) -> Result<ReadPool, StoreError> {
        let first = Reader::open(path)?;
        let idle_max = if idle_max == 0 {
            POOL_IDLE_MAX_DEFAULT
        } else {
            idle_max
        };
        Ok(ReadPool {
            path: path.to_path_buf(),
            idle: Mutex::new(vec![first]),
            idle_max,
        })
    }

    /// A reader of its own, for a long read (a client's catch-up streams from one snapshot).
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Reader::open(&self.path)
    }

    /// Runs `f` on a consistent snapshot. Blocking: call from a blocking context.
    pub fn read<T>(
        &self,
        f: impl FnOnce(View<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let reader = self.idle.lock().expect("read pool lock poisoned").pop();
        let mut reader = match reader {
            Some(r) => r,
            None => Reader::open(&self.path)?,
        };
        let result = {
            let snap = reader.snapshot()?;
            f(snap.view())
        };
        let mut idle = self.idle.lock().expect("read pool lock poisoned");
        if idle.len() < self.idle_max {
            idle.push(reader);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_successor;

    #[test]
    fn successor() {
        assert_eq!(prefix_successor(""), None);
        assert_eq!(prefix_successor("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
    }

    /// The projection asks which sites changed after every commit: that must be a range
    /// read of the newest changes, never a walk over every tuple of every site.
    #[test]
    fn changed_sites_reads_only_the_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(&dir.path().join("s.db")).unwrap();
        let view = store.view();
        let mut stmt = view
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", super::CHANGED_SITES_SQL))
            .unwrap();
        let plan: Vec<String> = stmt
            .query_map([5], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.contains("SEARCH") && p.contains("tuples_by_version")),
            "{plan:?}"
        );
        view.changed_sites(5).unwrap();
    }
}
