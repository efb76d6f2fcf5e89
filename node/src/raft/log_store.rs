//! The Raft log on SQLite: openraft's [`RaftLogStorage`] over `<dir>/raft-log.db`.
//!
//! One row per entry, encoded by hand: `(idx, term, leader_node_id, kind, payload)`. A normal
//! entry's payload is the [`Command`] in Sesame's framed bincode ([`sesame_proto::codec`]), a
//! membership entry's payload is JSON, a blank entry has none. The vote, the committed log id
//! and the last purged log id live in a `meta` table as JSON.
//!
//! [`Command`]: sesame_proto::Command
//!
//! Durability: the file is in WAL mode with `synchronous=FULL`, so a COMMIT returns only after
//! the WAL is fsynced. The flush callback of an `append` runs after the commit that holds its
//! entries. The one write that skips the fsync is `save_committed`; see there why.
//!
//! Every write goes, in order, through one writer thread ([`Writer`]). `append` does not wait
//! for it: the entries go into an in-memory cache of recent entries ([`Recent`]), readers see
//! them at once, and the writer commits them (appends queued meanwhile share one transaction,
//! and one fsync) and then runs their callbacks. So a leader replicates an entry to its
//! followers while its own fsync of it is still under way, and a commit costs one fsync on
//! the leader in parallel with one on the followers, not one after the other.
//!
//! A durable entry stays in the cache until the core reads it to apply it (it is moved out
//! then, not copied) or the cache passes [`RECENT_DURABLE_BYTES_MAX`]: the state machine gets
//! each entry as it was appended, without reading the file and decoding it back. The cache is
//! always a run of consecutive indexes ending at the last entry, so a read takes the cache's
//! part of its range and reads the part before it through a second, read-only connection: WAL
//! readers never wait for the writer.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, RaftLogReader, StorageIOError};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sesame_proto::codec::{self, CodecError};
use thiserror::Error;

use super::{blocking, Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

/// The log's file name inside the node's data directory.
pub const LOG_FILE_NAME: &str = "raft-log.db";

/// Most entries one [`RaftLogReader::limited_get_log_entries`] call returns: bounds the size of
/// one replication message.
pub const READ_ENTRIES_MAX: u64 = 4096;
/// Most payload bytes one [`RaftLogReader::limited_get_log_entries`] call returns. The first
/// entry is returned whatever its size, so a read always makes progress.
pub const READ_PAYLOAD_BYTES_MAX: usize = 16 << 20;
/// Most encoded payload bytes of durable entries the cache keeps for the core to apply
/// (entries not yet durable stay whatever their size: openraft bounds those).
pub const RECENT_DURABLE_BYTES_MAX: usize = 32 << 20;

/// Marks the SQLite file as a Sesame Raft log (`PRAGMA application_id`): ASCII "SSRL".
const APPLICATION_ID: i32 = i32::from_be_bytes(*b"SSRL");
/// Version of the tables below (`PRAGMA user_version`); bumped on any incompatible change.
const SCHEMA_VERSION: i32 = 1;
/// How long a statement waits for the other connection's lock (a WAL checkpoint) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// SQLite integers are signed; log indexes and terms past this do not fit (nor ever occur).
const SQL_INTEGER_MAX: u64 = i64::MAX as u64;

const SCHEMA: &str = "
    CREATE TABLE log (
        idx            INTEGER PRIMARY KEY,
        term           INTEGER NOT NULL,
        leader_node_id INTEGER NOT NULL,
        kind           INTEGER NOT NULL,
        payload        BLOB    NOT NULL
    );
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
";

const META_VOTE: &str = "vote";
const META_COMMITTED: &str = "committed";
const META_LAST_PURGED: &str = "last_purged";

/// What a row's `payload` column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadKind {
    /// No payload: the entry a new leader appends to commit its term.
    Blank = 0,
    /// A [`Command`] in framed bincode.
    Normal = 1,
    /// A membership config as JSON.
    Membership = 2,
}

impl PayloadKind {
    fn from_sql(kind: i64) -> Option<PayloadKind> {
        match kind {
            0 => Some(PayloadKind::Blank),
            1 => Some(PayloadKind::Normal),
            2 => Some(PayloadKind::Membership),
            _ => None,
        }
    }
}

/// Why reading or writing the log failed. Converted to openraft's [`StorageError`] at the
/// trait boundary, where the subject (logs, vote, one entry) is known.
#[derive(Debug, Error)]
pub enum LogStoreError {
    #[error("cannot create the log directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot start the log's writer thread: {0}")]
    Thread(io::Error),
    #[error("{path} is not a Sesame Raft log (application_id {found:#x})")]
    NotALog { path: PathBuf, found: i32 },
    #[error(
        "{path} has Raft log schema version {found}, this build reads version {SCHEMA_VERSION}"
    )]
    Version { path: PathBuf, found: i32 },
    #[error("cannot switch the log to WAL mode, SQLite kept journal mode {0:?}")]
    NoWal(String),
    #[error("entry {index}: unknown payload kind {kind}")]
    UnknownKind { index: u64, kind: i64 },
    #[error("entry {index}: payload column is not a blob")]
    PayloadNotBlob { index: u64 },
    #[error("entry {index}: blank entry carries {bytes} payload bytes")]
    BlankWithPayload { index: u64, bytes: usize },
    #[error("entry {index}: cannot decode command: {source}")]
    DecodeCommand { index: u64, source: CodecError },
    #[error("entry {index}: cannot decode membership: {source}")]
    DecodeMembership {
        index: u64,
        source: serde_json::Error,
    },
    #[error("entry {index}: cannot encode membership: {source}")]
    EncodeMembership {
        index: u64,
        source: serde_json::Error,
    },
    #[error("cannot decode meta {key:?}: {source}")]
    DecodeMeta {
        key: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot encode meta {key:?}: {source}")]
    EncodeMeta {
        key: &'static str,
        source: serde_json::Error,
    },
}

fn read_logs_error(e: LogStoreError) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_logs_error(e: LogStoreError) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

/// The Raft log of one node. Openraft owns it and calls it from its core task only.
pub struct LogStore {
    path: PathBuf,
    /// Every write, in order.
    writer: Writer,
    /// Entries appended and not yet durable, and durable ones not yet applied; readers see
    /// them.
    recent: Recent,
    /// The reads (the core's and the [`LogReader`]s').
    reader_conn: Arc<Mutex<Connection>>,
}

/// The log's newest entries, in memory: those appended whose transaction may not have
/// committed yet, and durable ones the core has not read to apply, within
/// [`RECENT_DURABLE_BYTES_MAX`]. Always consecutive indexes up to the last entry appended
/// (entries become durable in index order, and only the oldest durable ones leave), so a read
/// of a range finds a suffix of it here and the rest in the file.
#[derive(Clone, Default)]
struct Recent(Arc<Mutex<RecentEntries>>);

#[derive(Default)]
struct RecentEntries {
    /// By index. The writer thread holds a second reference to an entry until it is durable.
    entries: std::collections::BTreeMap<u64, RecentEntry>,
    /// Sum of the encoded payload sizes of the durable entries.
    durable_bytes: usize,
}

struct RecentEntry {
    entry: Arc<Entry>,
    /// Its encoded payload size, once it is durable.
    durable: Option<usize>,
}

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        self.0.lock().expect("recent log entries lock poisoned")
    }
}

impl RecentEntries {
    fn last_log_id(&self) -> Option<LogId> {
        self.entries.last_key_value().map(|(_, e)| e.entry.log_id)
    }

    /// Marks an entry durable (unless a truncation replaced it meanwhile); [`Self::trim`]
    /// then keeps the durable ones within the byte bound.
    fn durable(&mut self, log_id: &LogId, bytes: usize) {
        if let Some(e) = self.entries.get_mut(&log_id.index) {
            if e.entry.log_id == *log_id && e.durable.is_none() {
                e.durable = Some(bytes);
                self.durable_bytes += bytes;
            }
        }
    }

    /// Removes the oldest entry if it is durable and `keep(durable_bytes, its index)` says no.
    fn pop_durable(&mut self, keep: impl Fn(usize, u64) -> bool) -> Option<Arc<Entry>> {
        let first = self.entries.first_entry()?;
        let bytes = first.get().durable?;
        if keep(self.durable_bytes, *first.key()) {
            return None;
        }
        self.durable_bytes -= bytes;
        Some(first.remove().entry)
    }

    /// Drops the oldest durable entries while they pass the byte bound.
    fn trim(&mut self) -> Vec<Arc<Entry>> {
        let mut dropped = Vec::new();
        while let Some(e) = self.pop_durable(|bytes, _| bytes <= RECENT_DURABLE_BYTES_MAX) {
            dropped.push(e);
        }
        dropped
    }

    /// Removes the entries at `index` and after.
    fn truncate(&mut self, index: u64) -> Vec<Arc<Entry>> {
        let removed = self.entries.split_off(&index);
        self.forget(removed)
    }

    /// Removes the entries at `index` and before.
    fn purge(&mut self, index: u64) -> Vec<Arc<Entry>> {
        let keep = self.entries.split_off(&index.saturating_add(1));
        let removed = std::mem::replace(&mut self.entries, keep);
        self.forget(removed)
    }

    fn forget(&mut self, removed: std::collections::BTreeMap<u64, RecentEntry>) -> Vec<Arc<Entry>> {
        removed
            .into_values()
            .map(|e| {
                self.durable_bytes -= e.durable.unwrap_or(0);
                e.entry
            })
            .collect()
    }
}

/// An entry out of the cache: moved when nothing else holds it, else copied.
fn unshare(entry: Arc<Entry>) -> Entry {
    Arc::try_unwrap(entry).unwrap_or_else(|shared| Entry::clone(&shared))
}

/// One write for the writer thread, with where to answer.
enum WriteOp {
    Append {
        entries: Vec<Arc<Entry>>,
        callback: LogFlushed<TypeConfig>,
    },
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// The writer thread's queue. Ops run in the order they were sent.
struct Writer {
    ops: std::sync::mpsc::Sender<WriteOp>,
}

impl Writer {
    fn start(mut conn: Connection, recent: Recent) -> io::Result<Writer> {
        let (ops, queue) = std::sync::mpsc::channel::<WriteOp>();
        std::thread::Builder::new()
            .name("sesame-raft-log".into())
            .spawn(move || writer_loop(&mut conn, &queue, &recent))?;
        Ok(Writer { ops })
    }

    /// Runs `work` on the writer's connection after every write queued before it; its answer.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> T {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let op = WriteOp::Run(Box::new(move |conn| {
            // The asker may be gone (its task was dropped); nothing to do then.
            let _ = reply.send(work(conn));
        }));
        self.ops
            .send(op)
            .expect("the raft log writer thread ends only when the log store is dropped");
        answer
            .await
            .expect("the raft log writer thread answers every op it takes")
    }
}

/// The writer thread: ops in order; appends that queued up together share one transaction.
fn writer_loop(conn: &mut Connection, queue: &std::sync::mpsc::Receiver<WriteOp>, recent: &Recent) {
    let mut next = queue.recv().ok();
    while let Some(op) = next.take() {
        match op {
            WriteOp::Run(work) => work(conn),
            WriteOp::Append { entries, callback } => {
                let mut batch = vec![(entries, callback)];
                // Take every append already waiting, up to the first other op (which must
                // run after them).
                loop {
                    match queue.try_recv() {
                        Ok(WriteOp::Append { entries, callback }) => {
                            batch.push((entries, callback))
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let written = append_batch(conn, batch.iter().flat_map(|(e, _)| e.iter()));
                if let Ok(sizes) = &written {
                    let entries = batch.iter().flat_map(|(e, _)| e.iter());
                    let dropped = {
                        let mut recent = recent.lock();
                        for (e, bytes) in entries.zip(sizes) {
                            recent.durable(&e.log_id, *bytes);
                        }
                        recent.trim()
                    };
                    drop(dropped);
                }
                let written = written.map(|_| ());
                for (entries, callback) in batch {
                    // The cache holds them now; the core may take them without copying.
                    drop(entries);
                    callback.log_io_completed(match &written {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::other(e.to_string())),
                    });
                }
            }
        }
        if next.is_none() {
            next = queue.recv().ok();
        }
    }
}

impl LogStore {
    /// Opens (creating if absent) the log `<dir>/raft-log.db`.
    ///
    /// Blocks on SQLite: call it at startup or inside `spawn_blocking`.
    pub fn open(dir: &Path) -> Result<LogStore, LogStoreError> {
        std::fs::create_dir_all(dir).map_err(|source| LogStoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(LOG_FILE_NAME);

        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let journal_mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !journal_mode.eq_ignore_ascii_case("wal") {
            return Err(LogStoreError::NoWal(journal_mode));
        }
        // Every COMMIT fsyncs the WAL: an append is on disk before openraft hears it is.
        conn.pragma_update(None, "synchronous", "FULL")?;
        init_schema(&mut conn, &path)?;

        // Opened after the schema exists, so it never sees a half-made file.
        let reader_conn = Connection::open(&path)?;
        reader_conn.busy_timeout(BUSY_TIMEOUT)?;
        reader_conn.pragma_update(None, "query_only", true)?;

        let recent = Recent::default();
        let writer = Writer::start(conn, recent.clone()).map_err(LogStoreError::Thread)?;
        Ok(LogStore {
            path,
            writer,
            recent,
            reader_conn: Arc::new(Mutex::new(reader_conn)),
        })
    }

    /// The log's SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates the tables in a new file, or checks that an existing file is a log this build reads.
fn init_schema(conn: &mut Connection, path: &Path) -> Result<(), LogStoreError> {
    let tx = conn.transaction()?;
    let application_id: i32 = tx.query_row("PRAGMA application_id", [], |row| row.get(0))?;
    let version: i32 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    match (application_id, version) {
        (0, 0) => {
            // A new file, unless it is some other SQLite database that happens to sit here.
            let tables: i64 =
                tx.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
            if tables != 0 {
                return Err(LogStoreError::NotALog {
                    path: path.to_path_buf(),
                    found: application_id,
                });
            }
            tx.execute_batch(SCHEMA)?;
            // PRAGMA takes no bound parameters; both values are our own constants.
            tx.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
            ))?;
        }
        (APPLICATION_ID, SCHEMA_VERSION) => {}
        (APPLICATION_ID, found) => {
            return Err(LogStoreError::Version {
                path: path.to_path_buf(),
                found,
            })
        }
        (found, _) => {
            return Err(LogStoreError::NotALog {
                path: path.to_path_buf(),
                found,
            })
        }
    }
    tx.commit()?;
    Ok(())
}

/// Node ids are arbitrary `u64`s and are never compared in SQL, so they are stored bit for bit
/// in SQLite's signed integers.
fn node_id_to_sql(node_id: NodeId) -> i64 {
    i64::from_ne_bytes(node_id.to_ne_bytes())
}

fn node_id_from_sql(stored: i64) -> NodeId {
    NodeId::from_ne_bytes(stored.to_ne_bytes())
}

fn make_log_id(term: u64, leader_node_id: NodeId, index: u64) -> LogId {
    LogId::new(
        openraft::CommittedLeaderId::new(term, leader_node_id),
        index,
    )
}

fn read_meta<T: DeserializeOwned>(
    conn: &Connection,
    key: &'static str,
) -> Result<Option<T>, LogStoreError> {
    let bytes: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()?;
    match bytes {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LogStoreError::DecodeMeta { key, source }),
    }
}

fn write_meta<T: Serialize>(
    conn: &Connection,
    key: &'static str,
    value: &T,
) -> Result<(), LogStoreError> {
    let bytes =
        serde_json::to_vec(value).map_err(|source| LogStoreError::EncodeMeta { key, source })?;
    conn.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
        .execute(params![key, bytes])?;
    Ok(())
}

/// Encodes a payload into its `(kind, payload)` columns.
fn encode_payload(entry: &Entry) -> Result<(PayloadKind, Vec<u8>), LogStoreError> {
    Ok(match &entry.payload {
        EntryPayload::Blank => (PayloadKind::Blank, Vec::new()),
        EntryPayload::Normal(command) => (PayloadKind::Normal, codec::encode(command)),
        EntryPayload::Membership(membership) => {
            let bytes = serde_json::to_vec(membership).map_err(|source| {
                LogStoreError::EncodeMembership {
                    index: entry.log_id.index,
                    source,
                }
            })?;
            (PayloadKind::Membership, bytes)
        }
    })
}

/// Decodes a row's `(kind, payload)` columns. Bytes from disk are checked, never trusted.
fn decode_payload(
    index: u64,
    kind: i64,
    payload: &[u8],
) -> Result<EntryPayload<TypeConfig>, LogStoreError> {
    match PayloadKind::from_sql(kind) {
        Some(PayloadKind::Blank) if payload.is_empty() => Ok(EntryPayload::Blank),
        Some(PayloadKind::Blank) => Err(LogStoreError::BlankWithPayload {
            index,
            bytes: payload.len(),
        }),
        Some(PayloadKind::Normal) => codec::decode(payload)
            .map(EntryPayload::Normal)
            .map_err(|source| LogStoreError::DecodeCommand { index, source }),
        Some(PayloadKind::Membership) => serde_json::from_slice(payload)
            .map(EntryPayload::Membership)
            .map_err(|source| LogStoreError::DecodeMembership { index, source }),
        None => Err(LogStoreError::UnknownKind { index, kind }),
    }
}

/// Writes the entries of several appends in one transaction; one fsync when it commits.
/// The encoded payload size of each entry, in order.
fn append_batch<'a>(
    conn: &mut Connection,
    entries: impl Iterator<Item = &'a Arc<Entry>>,
) -> Result<Vec<usize>, LogStoreError> {
    let tx = conn.transaction()?;
    let mut sizes = Vec::new();
    {
        // REPLACE, not INSERT: openraft truncates conflicting entries before appending, so an
        // index already present can only hold the very same entry again.
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO log (idx, term, leader_node_id, kind, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for entry in entries {
            let (kind, payload) = encode_payload(entry)?;
            sizes.push(payload.len());
            let leader = &entry.log_id.leader_id;
            insert.execute(params![
                entry.log_id.index,
                leader.term,
                node_id_to_sql(leader.node_id),
                kind as i64,
                payload
            ])?;
        }
    }
    tx.commit()?;
    Ok(sizes)
}

/// A read's size limits; `None` in [`read_entries`] reads the whole range.
#[derive(Debug, Clone, Copy)]
struct ReadLimit {
    entries_max: u64,
    payload_bytes_max: usize,
}

const REPLICATION_READ_LIMIT: ReadLimit = ReadLimit {
    entries_max: READ_ENTRIES_MAX,
    payload_bytes_max: READ_PAYLOAD_BYTES_MAX,
};

/// Turns any range of indexes into `[start, end)` clamped to what SQLite integers hold.
fn half_open(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start.min(SQL_INTEGER_MAX), end.min(SQL_INTEGER_MAX))
}

/// Reads the entries present in `[start, end)`, in index order, and whether `limit` cut the
/// read short of `end`.
fn read_entries(
    conn: &Connection,
    start: u64,
    end: u64,
    limit: Option<ReadLimit>,
) -> Result<(Vec<Entry>, bool), LogStoreError> {
    let mut entries = Vec::new();
    if start >= end {
        return Ok((entries, false));
    }
    let rows_max = limit.map_or(SQL_INTEGER_MAX, |l| l.entries_max);
    let mut select = conn.prepare_cached(
        "SELECT idx, term, leader_node_id, kind, payload FROM log
         WHERE idx >= ?1 AND idx < ?2 ORDER BY idx LIMIT ?3",
    )?;
    let mut rows = select.query(params![start, end, rows_max])?;
    let mut payload_bytes = 0usize;
    while let Some(row) = rows.next()? {
        let index: u64 = row.get(0)?;
        let term: u64 = row.get(1)?;
        let leader_node_id = node_id_from_sql(row.get(2)?);
        let kind: i64 = row.get(3)?;
        let ValueRef::Blob(payload) = row.get_ref(4)? else {
            return Err(LogStoreError::PayloadNotBlob { index });
        };
        let payload_len = payload.len();
        let entry = Entry {
            log_id: make_log_id(term, leader_node_id, index),
            payload: decode_payload(index, kind, payload)?,
        };
        assert!(
            (start..end).contains(&entry.log_id.index),
            "SQLite returned entry {index} outside [{start}, {end})"
        );
        entries.push(entry);

        payload_bytes = payload_bytes.saturating_add(payload_len);
        if limit.is_some_and(|l| payload_bytes >= l.payload_bytes_max) {
            return Ok((entries, true));
        }
    }
    let cut_short = entries.len() as u64 == rows_max
        && entries.last().is_some_and(|e| e.log_id.index + 1 < end);
    Ok((entries, cut_short))
}

fn log_state(conn: &Connection) -> Result<LogState<TypeConfig>, LogStoreError> {
    let last_purged_log_id: Option<LogId> = read_meta(conn, META_LAST_PURGED)?;
    let last_row = conn
        .prepare_cached("SELECT idx, term, leader_node_id FROM log ORDER BY idx DESC LIMIT 1")?
        .query_row([], |row| {
            Ok((
                row.get::<_, u64>(0)?,
                row.get::<_, u64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .optional()?;
    // The last entry present, else where purging left off. Not checked against the purge
    // point: openraft's own storage suite appends below it and expects to read that entry back.
    let last_log_id = match last_row {
        Some((index, term, node)) => Some(make_log_id(term, node_id_from_sql(node), index)),
        None => last_purged_log_id,
    };
    Ok(LogState {
        last_purged_log_id,
        last_log_id,
    })
}

/// Removes entries from `log_id` on, after a conflict with the leader's log.
fn truncate(conn: &Connection, log_id: &LogId) -> Result<(), LogStoreError> {
    conn.prepare_cached("DELETE FROM log WHERE idx >= ?1")?
        .execute([log_id.index.min(SQL_INTEGER_MAX)])?;
    Ok(())
}

/// Removes entries up to `log_id` inclusive and records how far the log was purged, together.
fn purge(conn: &mut Connection, log_id: &LogId) -> Result<(), LogStoreError> {
    let tx = conn.transaction()?;
    write_meta(&tx, META_LAST_PURGED, log_id)?;
    tx.prepare_cached("DELETE FROM log WHERE idx <= ?1")?
        .execute([log_id.index.min(SQL_INTEGER_MAX)])?;
    tx.commit()?;
    Ok(())
}

/// Saves the committed log id without waiting for an fsync.
///
/// Openraft needs the saved value never to be ahead of what was truly committed. Being behind
/// is harmless: the state machine records its own last-applied log id atomically with the data,
/// and a leader commits its log again once elected. So this write may be lost in a crash; it
/// becomes durable with the next fsynced commit (WAL frames reach the disk in order). That
/// saves one fsync per advance of the commit index.
fn save_committed(conn: &mut Connection, committed: &Option<LogId>) -> Result<(), LogStoreError> {
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let written = write_meta(conn, META_COMMITTED, committed);
    // If restoring FULL fails the error stops the node, so no append ever goes un-fsynced.
    conn.pragma_update(None, "synchronous", "FULL")?;
    written
}

/// Whether a read may move durable entries out of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// The core's reads, which are (nearly all) of committed entries to apply: the durable
    /// entries the read reaches are moved out of the cache, with any durable ones before them
    /// (the file has them all).
    Take,
    /// The replication tasks' reads: copies.
    Copy,
}

/// Reads `range`: the cache's part of it from `recent`, the rest through `conn` on the
/// blocking pool.
async fn get_entries(
    conn: &Arc<Mutex<Connection>>,
    recent: &Recent,
    (start, end): (u64, u64),
    limit: Option<ReadLimit>,
    read: Read,
) -> Result<Vec<Entry>, StorageError> {
    if start >= end {
        return Ok(Vec::new());
    }
    // The cache first: an entry the writer commits after this is then in the file when it is
    // read below; one it committed before is in the file already. Either way, none is missed.
    let mut taken = Vec::new();
    let (shared, dropped): (Vec<Arc<Entry>>, Vec<Arc<Entry>>) = {
        let mut recent = recent.lock();
        let mut dropped = Vec::new();
        if read == Read::Take {
            while let Some(e) = recent.pop_durable(|_, index| index >= end) {
                if e.log_id.index >= start {
                    taken.push(e);
                } else {
                    dropped.push(e);
                }
            }
        }
        let shared = recent
            .entries
            .range(start..end)
            .map(|(_, e)| Arc::clone(&e.entry))
            .collect();
        (shared, dropped)
    };
    drop(dropped);
    let cached: Vec<Entry> = taken.into_iter().chain(shared).map(unshare).collect();
    // Entries in the cache are newer than what the file may still hold at those indexes.
    let file_end = cached.first().map_or(end, |e| e.log_id.index);
    let (mut entries, cut_short) = if start < file_end {
        blocking::run(conn, move |conn| read_entries(conn, start, file_end, limit))
            .await
            .map_err(read_logs_error)?
    } else {
        (Vec::new(), false)
    };
    // The cache's part follows only a file part read whole (which may hold fewer entries than
    // its range: those before the first entry the file has, purged, are not there).
    if !cut_short {
        let room = limit.map_or(usize::MAX, |l| {
            (l.entries_max as usize).saturating_sub(entries.len())
        });
        // At least one entry per read, so replication always makes progress.
        let room = if entries.is_empty() {
            room.max(1)
        } else {
            room
        };
        entries.extend(cached.into_iter().take(room));
    }
    Ok(entries)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        get_entries(
            &self.reader_conn,
            &self.recent,
            half_open(&range),
            None,
            Read::Take,
        )
        .await
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        get_entries(
            &self.reader_conn,
            &self.recent,
            half_open(&(start..end)),
            Some(REPLICATION_READ_LIMIT),
            Read::Copy,
        )
        .await
    }
}

/// Reads the log for one replication task.
#[derive(Clone)]
pub struct LogReader {
    conn: Arc<Mutex<Connection>>,
    recent: Recent,
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        get_entries(
            &self.conn,
            &self.recent,
            half_open(&range),
            None,
            Read::Copy,
        )
        .await
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        get_entries(
            &self.conn,
            &self.recent,
            half_open(&(start..end)),
            Some(REPLICATION_READ_LIMIT),
            Read::Copy,
        )
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mut state = self
            .writer
            .run(|conn| log_state(conn))
            .await
            .map_err(read_logs_error)?;
        // Entries appended and not yet committed to the file are part of the log too.
        let cached = self.recent.lock().last_log_id();
        if cached > state.last_log_id {
            state.last_log_id = cached;
        }
        Ok(state)
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            conn: Arc::clone(&self.reader_conn),
            recent: self.recent.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.writer
            .run(move |conn| write_meta(conn, META_VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.writer
            .run(|conn| read_meta(conn, META_VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.writer
            .run(move |conn| save_committed(conn, &committed))
            .await
            .map_err(write_logs_error)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        // Stored as JSON `null` once openraft saved "nothing committed".
        let stored: Option<Option<LogId>> = self
            .writer
            .run(|conn| read_meta(conn, META_COMMITTED))
            .await
            .map_err(read_logs_error)?;
        Ok(stored.flatten())
    }

    /// Queues the entries for the writer and returns: readers see them at once, and the
    /// callback runs once they are durable.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // Openraft hands over consecutive entries; anything else is a bug upstream of us.
        for pair in entries.windows(2) {
            assert_eq!(
                pair[0].log_id.index + 1,
                pair[1].log_id.index,
                "append got non-consecutive entries"
            );
        }
        let entries: Vec<Arc<Entry>> = entries.into_iter().map(Arc::new).collect();
        let dropped = match entries.first() {
            None => Vec::new(),
            Some(first) => {
                let first = first.log_id.index;
                let mut recent = self.recent.lock();
                // Keep the cache consecutive: whatever it holds from `first` on is replaced
                // (as the file's rows are), and after a gap (a snapshot installed) nothing
                // older stays.
                let mut dropped = recent.truncate(first);
                if recent.last_log_id().is_some_and(|l| l.index + 1 < first) {
                    dropped.extend(recent.purge(first - 1));
                }
                for e in &entries {
                    let entry = Arc::clone(e);
                    recent.entries.insert(
                        e.log_id.index,
                        RecentEntry {
                            entry,
                            durable: None,
                        },
                    );
                }
                dropped
            }
        };
        drop(dropped);
        self.writer
            .ops
            .send(WriteOp::Append { entries, callback })
            .expect("the raft log writer thread ends only when the log store is dropped");
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Readers must not see the removed entries from here on.
        let removed = self.recent.lock().truncate(log_id.index);
        drop(removed);
        self.writer
            .run(move |conn| truncate(conn, &log_id))
            .await
            .map_err(write_logs_error)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let removed = self.recent.lock().purge(log_id.index);
        drop(removed);
        self.writer
            .run(move |conn| purge(conn, &log_id))
            .await
            .map_err(write_logs_error)
    }
}

/// Makes an empty Raft log in `dir` that continues after `last` (the last-applied id of a
/// restored store): the log counts as purged up to it, and the vote is `last`'s term, so
/// `node_id` is elected in a later term and appends from the next index. For restore only.
pub async fn start_after(
    dir: &Path,
    node_id: NodeId,
    last: Option<LogId>,
) -> Result<(), StorageError> {
    let mut log =
        LogStore::open(dir).map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?;
    if let Some(last) = last {
        log.save_vote(&Vote::new(last.leader_id.term, node_id))
            .await?;
        log.purge(last).await?;
        log.save_committed(Some(last)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_round_trip_through_sql_bit_for_bit() {
        for id in [0, 1, u64::MAX, i64::MAX as u64 + 1] {
            assert_eq!(node_id_from_sql(node_id_to_sql(id)), id);
        }
    }

    #[test]
    fn ranges_become_half_open_and_clamped() {
        assert_eq!(half_open(&(3..7)), (3, 7));
        assert_eq!(half_open(&(3..=7)), (3, 8));
        assert_eq!(half_open(&(..)), (0, SQL_INTEGER_MAX));
        assert_eq!(half_open(&(5..=u64::MAX)), (5, SQL_INTEGER_MAX));
    }

    #[test]
    fn garbage_payloads_are_errors() {
        assert!(matches!(
            decode_payload(1, 9, b""),
            Err(LogStoreError::UnknownKind { index: 1, kind: 9 })
        ));
        assert!(matches!(
            decode_payload(2, PayloadKind::Blank as i64, b"x"),
            Err(LogStoreError::BlankWithPayload { index: 2, bytes: 1 })
        ));
        assert!(matches!(
            decode_payload(3, PayloadKind::Normal as i64, b"SSM\x01\xff\xff"),
            Err(LogStoreError::DecodeCommand { index: 3, .. })
        ));
        assert!(matches!(
            decode_payload(4, PayloadKind::Membership as i64, b"{"),
            Err(LogStoreError::DecodeMembership { index: 4, .. })
        ));
    }
}
