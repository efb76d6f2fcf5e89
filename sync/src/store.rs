//! The writer: applies Raft commands to the tuple store at their log index.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Transaction as SqlTx};
use sesame_proto::command::{DEAD_TOKENS_PER_SITE_MAX, TOKENS_PER_SITE_MAX};
use sesame_proto::tuple::CLIENT_SEQ_WINDOW;
use sesame_proto::{
    codec, Command, CommandResult, Conflict, LogIndex, Op, PreviewRecord, Publish, Role, Scope,
    TokenRecord, Transaction, PREVIEWS_PER_SITE_MAX,
};
use thiserror::Error;

use crate::checkpoint::Checkpointer;
use crate::schema::{self, SCHEMA_VERSION};
use crate::view::View;

const META_SCHEMA_VERSION: &str = "sesame.schema_version";
const META_APPLIED_INDEX: &str = "sesame.applied_index";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "store at {path} has schema version {found}, this build reads version {SCHEMA_VERSION}"
    )]
    SchemaVersion { path: PathBuf, found: i64 },
    /// Bytes on disk that do not decode: the store is damaged.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// An entry at or below the applied index, or out of order: a caller bug.
    #[error("entry {index} applied out of order (store is at {applied})")]
    OutOfOrder { index: LogIndex, applied: LogIndex },
    #[error("snapshot {path}: {message}")]
    Snapshot { path: PathBuf, message: String },
    #[error("start the store's checkpoint thread: {0}")]
    Thread(std::io::Error),
}

/// The single writer of a tuple store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path)?;
        schema::configure(&conn)?;
        let tx = conn.transaction()?;
        tx.execute_batch(schema::CREATE)?;
        schema::migrate(&tx)?;
        let found: Option<Vec<u8>> = get_meta(&tx, META_SCHEMA_VERSION)?;
        match found {
            None => put_meta(&tx, META_SCHEMA_VERSION, &SCHEMA_VERSION.to_le_bytes())?,
            Some(bytes) => {
                let found = decode_i64(&bytes)?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::SchemaVersion {
                        path: path.to_path_buf(),
                        found,
                    });
                }
            }
        }
        tx.commit()?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves this store's log checkpoints to a thread of their own (see [`crate::checkpoint`]):
    /// this writer checkpoints itself only past [`crate::checkpoint::WRITER_CHECKPOINT_PAGES`]
    /// of log. The thread runs until the returned [`Checkpointer`] is dropped.
    pub fn checkpoint_in_background(&self) -> Result<Checkpointer, StoreError> {
        let checkpointer = Checkpointer::start(&self.path)?;
        self.conn.pragma_update(
            None,
            "wal_autocheckpoint",
            crate::checkpoint::WRITER_CHECKPOINT_PAGES,
        )?;
        Ok(checkpointer)
    }

    /// A view through the writer's own connection (tests and single-threaded tools).
    pub fn view(&self) -> View<'_> {
        View::new(&self.conn)
    }

    /// The index of the last applied entry (0 for a new store).
    pub fn applied_index(&self) -> Result<LogIndex, StoreError> {
        self.view().applied_index()
    }

    /// Writes a consistent copy of the store file at `src` to `dest` (which must not
    /// exist) from a connection of its own, while the store's writer goes on: the copy is
    /// one read snapshot (an online backup).
    pub fn copy_file(src: &Path, dest: &Path) -> Result<(), StoreError> {
        let dest_str = dest.to_str().ok_or_else(|| StoreError::Snapshot {
            path: dest.to_path_buf(),
            message: "path is not UTF-8".into(),
        })?;
        let conn = Connection::open_with_flags(src, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute("VACUUM INTO ?1", params![dest_str])?;
        Ok(())
    }

    /// Every `(site, manifest)` a store file still names: roots, history and previews.
    pub fn published_manifests(path: &Path) -> Result<Vec<(String, String)>, StoreError> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut stmt = conn.prepare(
            "SELECT site, manifest FROM roots UNION SELECT site, manifest FROM versions
             UNION SELECT site, manifest FROM previews ORDER BY 1, 2",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets a metadata value outside [`Store::apply`]: only for tools that rewrite a store
    /// that no node runs on (restoring a backup as a new node).
    pub fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        put_meta(&self.conn, key, value)
    }

    /// A metadata value written by [`Store::apply`].
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        get_meta(&self.conn, key)
    }

    /// Applies log entries in one SQLite transaction, in order. `None` is an entry without a
    /// command (blank or membership): it only advances the applied index. `meta` pairs are
    /// written in the same transaction, so callers can keep their own progress in step.
    /// Returns one result per entry; a rejected command (conflict, unknown site) changes
    /// nothing but still consumes its index.
    pub fn apply(
        &mut self,
        entries: &[(LogIndex, Option<&Command>)],
        meta: &[(&str, &[u8])],
    ) -> Result<Vec<CommandResult>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut applied = View::new(&tx).applied_index()?;
        let mut results = Vec::with_capacity(entries.len());
        for &(index, command) in entries {
            if index <= applied {
                return Err(StoreError::OutOfOrder { index, applied });
            }
            let result = match command {
                None => CommandResult::Ok,
                Some(command) => apply_command(&tx, index, command)?,
            };
            results.push(result);
            applied = index;
        }
        put_meta(&tx, META_APPLIED_INDEX, &applied.to_le_bytes())?;
        for (key, value) in meta {
            put_meta(&tx, key, value)?;
        }
        tx.commit()?;
        debug_assert_eq!(results.len(), entries.len());
        Ok(results)
    }

    /// Writes a consistent copy of the whole store to `dest`, which must not exist.
    pub fn export(&self, dest: &Path) -> Result<(), StoreError> {
        let dest_str = dest.to_str().ok_or_else(|| StoreError::Snapshot {
            path: dest.to_path_buf(),
            message: "path is not UTF-8".into(),
        })?;
        self.conn.execute("VACUUM INTO ?1", params![dest_str])?;
        Ok(())
    }

    /// Replaces the whole content of this store with the copy at `src` (made by
    /// [`Store::export`]), atomically: readers see the old state or the new one.
    pub fn replace_with(&mut self, src: &Path) -> Result<(), StoreError> {
        let src_str = src.to_str().ok_or_else(|| StoreError::Snapshot {
            path: src.to_path_buf(),
            message: "path is not UTF-8".into(),
        })?;
        {
            let snap =
                Connection::open_with_flags(src, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let found: Option<Vec<u8>> = get_meta(&snap, META_SCHEMA_VERSION)?;
            let found = found.map(|b| decode_i64(&b)).transpose()?;
            if found != Some(SCHEMA_VERSION) {
                return Err(StoreError::Snapshot {
                    path: src.to_path_buf(),
                    message: format!("schema version {found:?}, expected {SCHEMA_VERSION}"),
                });
            }
        }
        self.conn
            .execute("ATTACH DATABASE ?1 AS snap", params![src_str])?;
        let copied = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction()?;
            for table in [
                "meta",
                "sites",
                "tokens",
                "tuples",
                "client_seqs",
                "client_txs",
                "roots",
                "versions",
                "deleted_sites",
                "feed_horizons",
                "previews",
                "accounts",
                "sessions",
            ] {
                // A snapshot from an older build may lack a newer (empty) table.
                let present: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM snap.sqlite_master WHERE type = 'table' AND name = ?1)",
                    params![table],
                    |r| r.get(0),
                )?;
                if !present {
                    tx.execute_batch(&format!("DELETE FROM main.{table};"))?;
                    continue;
                }
                tx.execute_batch(&format!(
                    "DELETE FROM main.{table}; INSERT INTO main.{table} SELECT * FROM snap.{table};"
                ))?;
            }
            tx.commit()?;
            Ok(())
        })();
        self.conn.execute("DETACH DATABASE snap", [])?;
        copied
    }
}

fn apply_command(
    tx: &SqlTx<'_>,
    index: LogIndex,
    command: &Command,
) -> Result<CommandResult, StoreError> {
    match command {
        Command::CreateSite {
            name,
            created_at_ms,
        } => {
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO sites (name, created_index, created_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO NOTHING",
                )?
                .execute(params![name, index as i64, *created_at_ms as i64])?;
            if inserted == 1 {
                // The name is taken again: the old site's files are no longer the deleted
                // site's to remove (the new site may publish the same blobs).
                tx.prepare_cached("DELETE FROM deleted_sites WHERE name = ?1")?
                    .execute(params![name])?;
            }
            Ok(if inserted == 1 {
                CommandResult::SiteCreated
            } else {
                CommandResult::SiteExists
            })
        }
        Command::PutToken(record) => put_token(tx, index, record, &[]),
        Command::PutScopedToken { token, scopes } => put_token(tx, index, token, scopes),
        Command::PutAccount {
            site,
            username,
            password_hash,
            created_at_ms,
        } => put_account(tx, index, site, username, password_hash, *created_at_ms),
        Command::PutSession {
            site,
            username,
            hash,
            created_at_ms,
            expires_at_ms,
        } => put_session(tx, site, username, hash, *created_at_ms, *expires_at_ms),
        Command::EndSession { hash, ended_at_ms } => {
            tx.prepare_cached(
                "UPDATE sessions SET ended_at_ms = ?2 WHERE hash = ?1 AND ended_at_ms IS NULL",
            )?
            .execute(params![hash, sql_int(*ended_at_ms)])?;
            Ok(CommandResult::SessionStored)
        }
        Command::RevokeToken {
            site,
            id,
            revoked_at_ms,
        } => revoke_token(tx, site, *id, *revoked_at_ms),
        Command::DeleteSite {
            name,
            deleted_at_ms,
        } => delete_site(tx, index, name, *deleted_at_ms),
        Command::Txs(txs) => Ok(CommandResult::Txs(
            txs.iter()
                .map(|t| apply_tx(tx, index, t))
                .collect::<Result<_, _>>()?,
        )),
        Command::Publish(p) => apply_publish(tx, index, p),
        Command::CompactFeed { site, before } => compact_feed(tx, site, *before),
        Command::PruneVersions { site, before } => prune_versions(tx, site, *before),
        Command::PutPreview(p) => put_preview(tx, p),
    }
}

fn put_account(
    tx: &SqlTx<'_>,
    index: LogIndex,
    site: &str,
    username: &str,
    password_hash: &str,
    created_at_ms: u64,
) -> Result<CommandResult, StoreError> {
    if !site_exists(tx, site)? {
        return Ok(CommandResult::UnknownSite {
            site: site.to_string(),
        });
    }
    let inserted = tx
        .prepare_cached(
            "INSERT INTO accounts (site, username, password_hash, created_index, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (site, username) DO NOTHING",
        )?
        .execute(params![
            site,
            username,
            password_hash,
            sql_int(index),
            sql_int(created_at_ms)
        ])?;
    Ok(if inserted == 1 {
        CommandResult::AccountCreated
    } else {
        CommandResult::AccountExists
    })
}

fn put_session(
    tx: &SqlTx<'_>,
    site: &str,
    username: &str,
    hash: &str,
    created_at_ms: u64,
    expires_at_ms: u64,
) -> Result<CommandResult, StoreError> {
    let exists: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM accounts WHERE site = ?1 AND username = ?2)")?
        .query_row(params![site, username], |r| r.get(0))?;
    if !exists {
        return Ok(CommandResult::UnknownAccount);
    }
    let now = sql_int(created_at_ms);
    // Ended and expired sessions are forgotten; past the limit, the oldest live ones end.
    tx.prepare_cached(
        "DELETE FROM sessions WHERE site = ?1 AND username = ?2
           AND (ended_at_ms IS NOT NULL OR expires_at_ms <= ?3)",
    )?
    .execute(params![site, username, now])?;
    tx.prepare_cached(
        "DELETE FROM sessions WHERE hash IN (
             SELECT hash FROM sessions WHERE site = ?1 AND username = ?2
             ORDER BY created_at_ms DESC, hash LIMIT -1 OFFSET ?3)",
    )?
    .execute(params![
        site,
        username,
        (sesame_proto::command::SESSIONS_PER_ACCOUNT_MAX - 1) as i64
    ])?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO sessions (hash, site, username, created_at_ms, expires_at_ms, ended_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
    )?
    .execute(params![hash, site, username, now, sql_int(expires_at_ms)])?;
    Ok(CommandResult::SessionStored)
}

fn prune_versions(
    tx: &SqlTx<'_>,
    site: &str,
    before: LogIndex,
) -> Result<CommandResult, StoreError> {
    if !site_exists(tx, site)? {
        return Ok(CommandResult::UnknownSite {
            site: site.to_string(),
        });
    }
    // The root's own version row stays, whatever its age: the history always holds what
    // is served.
    let removed = tx
        .prepare_cached(
            "DELETE FROM versions WHERE site = ?1 AND log_index < ?2
               AND log_index NOT IN (SELECT log_index FROM roots WHERE site = ?1)",
        )?
        .execute(params![site, sql_int(before)])?;
    Ok(CommandResult::VersionsPruned {
        removed: removed as u64,
    })
}

fn put_preview(tx: &SqlTx<'_>, p: &PreviewRecord) -> Result<CommandResult, StoreError> {
    if !site_exists(tx, &p.site)? {
        return Ok(CommandResult::UnknownSite {
            site: p.site.clone(),
        });
    }
    let now = sql_int(p.created_at_ms);
    tx.prepare_cached("DELETE FROM previews WHERE site = ?1 AND expires_at_ms <= ?2")?
        .execute(params![p.site, now])?;
    // Room for the new one: the oldest live previews go first.
    tx.prepare_cached(
        "DELETE FROM previews WHERE site = ?1 AND id_hash IN (
             SELECT id_hash FROM previews WHERE site = ?1
             ORDER BY created_at_ms DESC, id_hash LIMIT -1 OFFSET ?2)",
    )?
    .execute(params![p.site, (PREVIEWS_PER_SITE_MAX - 1) as i64])?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO previews (site, id_hash, manifest, idx, created_at_ms, expires_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        p.site,
        p.id_hash,
        p.manifest,
        sql_int(p.index),
        now,
        sql_int(p.expires_at_ms)
    ])?;
    Ok(CommandResult::PreviewStored)
}

fn compact_feed(tx: &SqlTx<'_>, site: &str, before: LogIndex) -> Result<CommandResult, StoreError> {
    if !site_exists(tx, site)? {
        return Ok(CommandResult::UnknownSite {
            site: site.to_string(),
        });
    }
    let removed = tx
        .prepare_cached("DELETE FROM tuples WHERE site = ?1 AND value IS NULL AND version < ?2")?
        .execute(params![site, sql_int(before)])?;
    tx.prepare_cached(
        "INSERT INTO feed_horizons (site, horizon) VALUES (?1, ?2)
         ON CONFLICT (site) DO UPDATE SET horizon = MAX(horizon, excluded.horizon)",
    )?
    .execute(params![site, sql_int(before)])?;
    let horizon = View::new(tx).feed_horizon(site)?;
    Ok(CommandResult::FeedCompacted {
        removed: removed as u64,
        horizon,
    })
}

fn put_token(
    tx: &SqlTx<'_>,
    index: LogIndex,
    record: &TokenRecord,
    scopes: &[Scope],
) -> Result<CommandResult, StoreError> {
    let TokenRecord {
        hash,
        site,
        role,
        created_at_ms,
        expires_at_ms,
    } = record;
    if !site_exists(tx, site)? {
        return Ok(CommandResult::UnknownSite { site: site.clone() });
    }
    let now = sql_int(*created_at_ms);
    let live: i64 = tx
        .prepare_cached(
            "SELECT COUNT(*) FROM tokens WHERE site = ?1 AND revoked_at_ms IS NULL
               AND (expires_at_ms IS NULL OR expires_at_ms > ?2)",
        )?
        .query_row(params![site, now], |r| r.get(0))?;
    if live as u64 >= TOKENS_PER_SITE_MAX as u64 {
        return Ok(CommandResult::TooManyTokens);
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO tokens
           (hash, site, role, created_index, created_at_ms, expires_at_ms, revoked_at_ms, scopes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7)",
    )?
    .execute(params![
        hash,
        site,
        role.as_str(),
        sql_int(index),
        now,
        expires_at_ms.map(sql_int),
        (!scopes.is_empty())
            .then(|| serde_json::to_string(scopes).expect("scopes always encode as JSON"))
    ])?;
    forget_dead_tokens(tx, site, now)?;
    Ok(CommandResult::TokenStored)
}

fn revoke_token(
    tx: &SqlTx<'_>,
    site: &str,
    id: LogIndex,
    revoked_at_ms: u64,
) -> Result<CommandResult, StoreError> {
    if !site_exists(tx, site)? {
        return Ok(CommandResult::UnknownSite {
            site: site.to_string(),
        });
    }
    let Ok(id_sql) = i64::try_from(id) else {
        return Ok(CommandResult::UnknownToken { id });
    };
    let changed = tx
        .prepare_cached(
            "UPDATE tokens SET revoked_at_ms = ?3
             WHERE site = ?1 AND created_index = ?2 AND revoked_at_ms IS NULL",
        )?
        .execute(params![site, id_sql, sql_int(revoked_at_ms)])?;
    if changed == 0 {
        return Ok(CommandResult::UnknownToken { id });
    }
    forget_dead_tokens(tx, site, sql_int(revoked_at_ms))?;
    Ok(CommandResult::TokenRevoked)
}

/// Keeps at most [`DEAD_TOKENS_PER_SITE_MAX`] of a site's revoked or (at `now_ms`, the
/// command's clock) expired tokens, the newest.
fn forget_dead_tokens(tx: &SqlTx<'_>, site: &str, now_ms: i64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "DELETE FROM tokens WHERE site = ?1 AND hash IN (
           SELECT hash FROM tokens
           WHERE site = ?1 AND (revoked_at_ms IS NOT NULL
                                OR (expires_at_ms IS NOT NULL AND expires_at_ms <= ?2))
           ORDER BY created_index DESC LIMIT -1 OFFSET ?3)",
    )?
    .execute(params![site, now_ms, DEAD_TOKENS_PER_SITE_MAX as i64])?;
    Ok(())
}

fn delete_site(
    tx: &SqlTx<'_>,
    index: LogIndex,
    name: &str,
    deleted_at_ms: u64,
) -> Result<CommandResult, StoreError> {
    if !site_exists(tx, name)? {
        return Ok(CommandResult::UnknownSite {
            site: name.to_string(),
        });
    }
    for table in [
        "tuples",
        "tokens",
        "roots",
        "versions",
        "client_seqs",
        "client_txs",
        "feed_horizons",
        "previews",
        "accounts",
        "sessions",
    ] {
        tx.prepare_cached(&format!("DELETE FROM {table} WHERE site = ?1"))?
            .execute(params![name])?;
    }
    tx.prepare_cached("DELETE FROM sites WHERE name = ?1")?
        .execute(params![name])?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO deleted_sites (name, deleted_index, deleted_at_ms) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![name, sql_int(index), sql_int(deleted_at_ms)])?;
    Ok(CommandResult::SiteDeleted)
}

/// A number for SQLite. Indexes, sequence numbers and times that reach the store were
/// checked against [`sesame_proto::INDEX_MAX`] (or come from the log and the clock, far
/// below it); one past it is a bug upstream. It must not wrap around into a negative, and
/// must not stop the state machine either (every node would stop on the same entry), so it
/// saturates.
fn sql_int(v: u64) -> i64 {
    debug_assert!(
        v <= sesame_proto::INDEX_MAX,
        "{v} reached the store unchecked"
    );
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn apply_publish(
    tx: &SqlTx<'_>,
    index: LogIndex,
    p: &Publish,
) -> Result<CommandResult, StoreError> {
    if !site_exists(tx, &p.site)? {
        return Ok(CommandResult::UnknownSite {
            site: p.site.clone(),
        });
    }
    let current = View::new(tx).root(&p.site)?.map(|r| r.manifest);
    if current != p.expected {
        return Ok(CommandResult::RootMoved { current });
    }
    // A rollback may only point at a version still in the history: a pruned version's
    // files may be gone already.
    if p.rollback {
        let retained: bool = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM versions WHERE site = ?1 AND manifest = ?2)",
            )?
            .query_row(params![p.site, p.manifest], |r| r.get(0))?;
        if !retained {
            return Ok(CommandResult::VersionGone);
        }
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO roots (site, manifest, idx, log_index, files, published_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        p.site,
        p.manifest,
        p.index as i64,
        index as i64,
        p.files as i64,
        p.published_at_ms as i64
    ])?;
    tx.prepare_cached(
        "INSERT INTO versions (site, log_index, manifest, idx, files, published_at_ms, rollback)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        p.site,
        index as i64,
        p.manifest,
        p.index as i64,
        p.files as i64,
        p.published_at_ms as i64,
        p.rollback
    ])?;
    Ok(CommandResult::Published)
}

fn apply_tx(tx: &SqlTx<'_>, index: LogIndex, t: &Transaction) -> Result<CommandResult, StoreError> {
    if !site_exists(tx, &t.site)? {
        return Ok(CommandResult::UnknownSite {
            site: t.site.clone(),
        });
    }
    if let Some(origin) = &t.origin {
        let seq = sql_int(origin.seq);
        let applied: Option<i64> = tx
            .prepare_cached(
                "SELECT idx FROM client_txs WHERE site = ?1 AND client_id = ?2 AND seq = ?3",
            )?
            .query_row(params![t.site, origin.client_id, seq], |r| r.get(0))
            .optional()?;
        if let Some(idx) = applied {
            return Ok(CommandResult::Duplicate { index: idx as u64 });
        }
        let highest: Option<i64> = tx
            .prepare_cached("SELECT seq FROM client_seqs WHERE site = ?1 AND client_id = ?2")?
            .query_row(params![t.site, origin.client_id], |r| r.get(0))
            .optional()?;
        // Sequence numbers only grow per client: one at or below the highest applied that
        // is not remembered is an old retry or out of order. Either way it is not applied,
        // and its index is not known: say so rather than guess.
        if let Some(highest) = highest.filter(|h| seq <= *h) {
            return Ok(CommandResult::StaleSeq {
                highest: highest as u64,
            });
        }
    }
    // Check every guard against the state before the transaction, then write: a failed
    // guard leaves nothing half-applied.
    let view = View::new(tx);
    for (op_index, op) in t.ops.iter().enumerate() {
        if let Some(expected) = op.if_version() {
            let current = view.version(&t.site, op.collection(), op.key())?;
            if current != expected {
                return Ok(CommandResult::Conflict(Conflict {
                    op: op_index,
                    collection: op.collection().to_string(),
                    key: op.key().to_string(),
                    expected,
                    current,
                }));
            }
        }
    }
    let (origin_client, origin_seq) = match &t.origin {
        Some(o) => (Some(o.client_id.as_str()), Some(sql_int(o.seq))),
        None => (None, None),
    };
    // Statements taken from the cache once per transaction, not once per op.
    let mut put = tx.prepare_cached(
        "INSERT OR REPLACE INTO tuples
           (site, collection, key, value, version, origin_client, origin_seq, home_mailbox)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut delete = tx.prepare_cached(
        "UPDATE tuples SET value = NULL, version = ?4, origin_client = ?5, origin_seq = ?6
         WHERE site = ?1 AND collection = ?2 AND key = ?3 AND value IS NOT NULL",
    )?;
    let mut bytes = Vec::new();
    for op in &t.ops {
        match op {
            Op::Put {
                collection,
                key,
                value,
                ..
            }
            | Op::Send {
                collection,
                key,
                value,
                ..
            } => {
                bytes.clear();
                codec::encode_into(value, &mut bytes);
                let home = match op {
                    Op::Send { to, .. } => Some(to.as_str()),
                    _ => None,
                };
                put.execute(params![
                    t.site,
                    collection,
                    key,
                    bytes,
                    index as i64,
                    origin_client,
                    origin_seq,
                    home
                ])?;
            }
            Op::Delete {
                collection, key, ..
            } => {
                // Deleting leaves a tombstone so the change feed can report it; deleting
                // what is not there changes nothing.
                delete.execute(params![
                    t.site,
                    collection,
                    key,
                    index as i64,
                    origin_client,
                    origin_seq
                ])?;
            }
        }
    }
    if let Some(origin) = &t.origin {
        let (seq, idx) = (sql_int(origin.seq), sql_int(index));
        tx.prepare_cached("INSERT OR REPLACE INTO client_seqs (site, client_id, seq, idx) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![t.site, origin.client_id, seq, idx])?;
        tx.prepare_cached(
            "INSERT INTO client_txs (site, client_id, seq, idx) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![t.site, origin.client_id, seq, idx])?;
        // Remember the last CLIENT_SEQ_WINDOW sequence numbers: (seq - window, seq].
        tx.prepare_cached(
            "DELETE FROM client_txs WHERE site = ?1 AND client_id = ?2 AND seq <= ?3",
        )?
        .execute(params![
            t.site,
            origin.client_id,
            seq.saturating_sub(CLIENT_SEQ_WINDOW as i64)
        ])?;
    }
    Ok(CommandResult::Committed { index })
}

fn site_exists(conn: &Connection, site: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM sites WHERE name = ?1")?
        .exists(params![site])?)
}

pub(crate) fn get_meta(conn: &Connection, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row(params![key], |r| r.get(0))
        .optional()?)
}

fn put_meta(conn: &Connection, key: &str, value: &[u8]) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
        .execute(params![key, value])?;
    Ok(())
}

pub(crate) fn decode_i64(bytes: &[u8]) -> Result<i64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "meta integer has {} bytes, expected 8",
            bytes.len()
        ))
    })?;
    Ok(i64::from_le_bytes(arr))
}

pub(crate) fn applied_index_key() -> &'static str {
    META_APPLIED_INDEX
}

pub(crate) fn role_from_str(s: &str) -> Result<Role, StoreError> {
    match s {
        "reader" => Ok(Role::Reader),
        "editor" => Ok(Role::Editor),
        "owner" => Ok(Role::Owner),
        other => Err(StoreError::Corrupt(format!(
            "unknown role {other:?} in tokens"
        ))),
    }
}
