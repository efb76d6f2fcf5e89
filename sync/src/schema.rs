//! The SQLite schema and connection settings shared by the writer and the readers.

use rusqlite::Connection;

/// Bumped whenever the schema changes incompatibly; checked on open. 2: token ids, times and
/// revocation; the window of applied client sequence numbers.
pub const SCHEMA_VERSION: i64 = 3;

/// Adds what later builds added to the tables of an older store, in the same schema
/// version (columns that default to NULL, meaning what the older store meant).
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_scopes: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('tokens') WHERE name = 'scopes')",
        [],
        |r| r.get(0),
    )?;
    if !has_scopes {
        conn.execute_batch("ALTER TABLE tokens ADD COLUMN scopes TEXT")?;
    }
    Ok(())
}

/// How long a connection waits on a lock held by another before giving up.
const BUSY_TIMEOUT_MS: u64 = 5_000;

pub const CREATE: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS sites (
    name          TEXT PRIMARY KEY,
    created_index INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- Site tokens: only the hash of the secret. `created_index` (the log index that stored the
-- token) is its id. Revoked and expired rows are kept, bounded, to say why a token fails.
-- Sites deleted and not created again, with when: their published files are removed from
-- the object store once the retention period after `deleted_at_ms` has passed.
CREATE TABLE IF NOT EXISTS deleted_sites (
    name          TEXT PRIMARY KEY,
    deleted_index INTEGER NOT NULL,
    deleted_at_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS tokens (
    hash          TEXT PRIMARY KEY,
    site          TEXT NOT NULL,
    role          TEXT NOT NULL,
    created_index INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    revoked_at_ms INTEGER,
    -- JSON list of proto::Scope; NULL: the whole site.
    scopes        TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tokens_by_site ON tokens (site, created_index);

-- value NULL marks a tombstone: the key was deleted at `version`.
CREATE TABLE IF NOT EXISTS tuples (
    site          TEXT NOT NULL,
    collection    TEXT NOT NULL,
    key           TEXT NOT NULL,
    value         BLOB,
    version       INTEGER NOT NULL,
    origin_client TEXT,
    origin_seq    INTEGER,
    home_mailbox  TEXT,
    PRIMARY KEY (site, collection, key)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS tuples_by_site_version ON tuples (site, version);
CREATE INDEX IF NOT EXISTS tuples_by_version ON tuples (version);

-- The published version of each site: which manifest, reflecting which commit index,
-- committed at which log index.
CREATE TABLE IF NOT EXISTS roots (
    site            TEXT PRIMARY KEY,
    manifest        TEXT NOT NULL,
    idx             INTEGER NOT NULL,
    log_index       INTEGER NOT NULL,
    files           INTEGER NOT NULL,
    published_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS roots_by_log_index ON roots (log_index);

-- Every root a site has had, for history and rollback.
CREATE TABLE IF NOT EXISTS versions (
    site            TEXT NOT NULL,
    log_index       INTEGER NOT NULL,
    manifest        TEXT NOT NULL,
    idx             INTEGER NOT NULL,
    files           INTEGER NOT NULL,
    published_at_ms INTEGER NOT NULL,
    rollback        INTEGER NOT NULL,
    PRIMARY KEY (site, log_index)
) WITHOUT ROWID;

-- How far back each site's change feed reaches: tombstones below `horizon` were
-- compacted away (Command::CompactFeed). Absent: to the site's creation.
CREATE TABLE IF NOT EXISTS feed_horizons (
    site    TEXT PRIMARY KEY,
    horizon INTEGER NOT NULL
) WITHOUT ROWID;

-- Previews: versions rendered from a proposed change, served only under their secret id
-- (stored as its hash) until they expire; never a root (Command::PutPreview).
CREATE TABLE IF NOT EXISTS previews (
    site          TEXT NOT NULL,
    id_hash       TEXT NOT NULL,
    manifest      TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (site, id_hash)
) WITHOUT ROWID;

-- People's accounts on a site (the studio's): an argon2id PHC string, never a password.
CREATE TABLE IF NOT EXISTS accounts (
    site          TEXT NOT NULL,
    username      TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_index INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (site, username)
) WITHOUT ROWID;

-- Sessions of accounts: only the hash of the cookie's secret.
CREATE TABLE IF NOT EXISTS sessions (
    hash          TEXT PRIMARY KEY,
    site          TEXT NOT NULL,
    username      TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    ended_at_ms   INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_account ON sessions (site, username, created_at_ms);

-- At-most-once: the highest sequence number applied per client and site, and where.
CREATE TABLE IF NOT EXISTS client_seqs (
    site      TEXT NOT NULL,
    client_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    idx       INTEGER NOT NULL,
    PRIMARY KEY (site, client_id)
) WITHOUT ROWID;

-- At-most-once, answered truthfully: the index each of a client's latest sequence numbers
-- was applied at (the last CLIENT_SEQ_WINDOW of them per client and site).
CREATE TABLE IF NOT EXISTS client_txs (
    site      TEXT NOT NULL,
    client_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    idx       INTEGER NOT NULL,
    PRIMARY KEY (site, client_id, seq)
) WITHOUT ROWID;
";

/// Settings every connection gets. The writer relaxes fsync to NORMAL: the Raft log is the
/// durability point, and a state machine that loses its tail on power loss re-applies it
/// from the log.
pub fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}
