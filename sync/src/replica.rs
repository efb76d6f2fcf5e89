//! A client's local replica: the tuples of its subscriptions, in the same SQLite schema the
//! node keeps (and read through the same [`View`]), plus what only a client has: where each
//! subscription has reached, and the queue of its own transactions not yet acknowledged.
//!
//! Reads see pending writes over committed tuples: a client's own write shows at once, and
//! goes away if the node rejects it.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use sesame_proto::sync::{SyncTuple, Target};
use sesame_proto::{codec, Home, LogIndex, Op, Origin, Transaction, Value};

use crate::schema;
use crate::store::StoreError;
use crate::view::{prefix_successor, View};

/// Most transactions a replica queues while they wait for the node; past it `enqueue`
/// fails and the application must wait (or go online).
pub const PENDING_MAX: u64 = 1_000_000;

const REPLICA_TABLES: &str = "
CREATE TABLE IF NOT EXISTS replica_subs (
    id      INTEGER PRIMARY KEY,
    target  BLOB NOT NULL UNIQUE,
    through INTEGER NOT NULL
);
-- The client's own transactions, in the order they were made, until acknowledged.
CREATE TABLE IF NOT EXISTS replica_pending (
    n    INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    seq  INTEGER NOT NULL,
    tx   BLOB NOT NULL
);
";

const META_CLIENT_ID: &str = "replica.client_id";

/// A subscription as the replica keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSub {
    pub id: u32,
    pub target: Target,
    /// Every change of the target up to this index is in the replica (0: nothing yet).
    pub through: LogIndex,
}

/// A transaction waiting for its acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingTx {
    /// Its place in the queue (increasing).
    pub n: u64,
    pub tx: Transaction,
}

/// A tuple as the replica's reader sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub collection: String,
    pub key: String,
    pub value: Value,
    /// The committed version; 0 for a pending write.
    pub version: LogIndex,
    /// Written by this client and not acknowledged yet.
    pub pending: bool,
}

/// The local replica of a client.
pub struct Replica {
    conn: Connection,
    /// Rows of `replica_pending` (counted once at open, then kept).
    pending: u64,
}

impl Replica {
    /// Opens (creating if needed) a replica file.
    pub fn open(path: &Path) -> Result<Replica, StoreError> {
        Replica::init(Connection::open(path)?)
    }

    /// A replica that lives in memory only (gone with the process).
    pub fn in_memory() -> Result<Replica, StoreError> {
        Replica::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Replica, StoreError> {
        schema::configure(&conn)?;
        let tx = conn.transaction()?;
        tx.execute_batch(schema::CREATE)?;
        tx.execute_batch(REPLICA_TABLES)?;
        tx.commit()?;
        let pending: i64 =
            conn.query_row("SELECT COUNT(*) FROM replica_pending", [], |r| r.get(0))?;
        Ok(Replica {
            conn,
            pending: pending as u64,
        })
    }

    /// Reads through the same queries a node uses (committed tuples only).
    pub fn view(&self) -> View<'_> {
        View::new(&self.conn)
    }

    /// The client id this replica belongs to, chosen on first use (`wanted`, else a random
    /// one) and kept: sequence numbers are per client id, so one replica is one client.
    pub fn client_id(&mut self, wanted: Option<&str>) -> Result<String, StoreError> {
        let saved: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                params![META_CLIENT_ID],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(saved) = saved {
            let saved = String::from_utf8(saved)
                .map_err(|_| StoreError::Corrupt("client id is not UTF-8".into()))?;
            return match wanted {
                Some(w) if w != saved => Err(StoreError::Corrupt(format!(
                    "this replica belongs to client {saved:?}, not {w:?}: use another replica file"
                ))),
                _ => Ok(saved),
            };
        }
        let id = match wanted {
            Some(w) => w.to_string(),
            None => {
                let mut bytes = [0u8; 8];
                getrandom::fill(&mut bytes).expect("read the operating system's random source");
                format!("c-{}", u64::from_le_bytes(bytes))
            }
        };
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)",
            params![META_CLIENT_ID, id.as_bytes()],
        )?;
        Ok(id)
    }

    /// Every subscription, in id order.
    pub fn subscriptions(&self) -> Result<Vec<ReplicaSub>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, target, through FROM replica_subs ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, target, through) = row?;
            out.push(ReplicaSub {
                id: id as u32,
                target: codec::decode(&target)
                    .map_err(|e| StoreError::Corrupt(format!("subscription target: {e}")))?,
                through: through as u64,
            });
        }
        Ok(out)
    }

    /// The subscription for `target`, made if new (from `since`: 0 for everything).
    pub fn subscribe(
        &mut self,
        target: &Target,
        since: LogIndex,
    ) -> Result<ReplicaSub, StoreError> {
        let bytes = codec::encode(target);
        self.conn.execute(
            "INSERT OR IGNORE INTO replica_subs (target, through) VALUES (?1, ?2)",
            params![bytes, since as i64],
        )?;
        let (id, through): (i64, i64) = self.conn.query_row(
            "SELECT id, through FROM replica_subs WHERE target = ?1",
            params![bytes],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(ReplicaSub {
            id: id as u32,
            target: target.clone(),
            through: through as u64,
        })
    }

    /// Part of a snapshot of `sub` at index `at`. The first part first drops what the
    /// replica holds of the target at or below `at` (the snapshot replaces it); the last
    /// moves the subscription to `at`.
    pub fn apply_snapshot(
        &mut self,
        sub: &ReplicaSub,
        at: LogIndex,
        tuples: &[SyncTuple],
        first: bool,
        last: bool,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        if first {
            let (site, collection, prefix, mailbox) = target_parts(&sub.target);
            let upper = prefix_successor(prefix);
            tx.execute(
                "DELETE FROM tuples WHERE site = ?1 AND (?2 IS NULL OR collection = ?2)
                   AND key >= ?3 AND (?4 IS NULL OR key < ?4)
                   AND (home_mailbox IS NOT NULL) = ?5
                   AND version <= ?6",
                params![site, collection, prefix, upper, mailbox, at as i64],
            )?;
        }
        for t in tuples {
            upsert(&tx, sub.target.site(), t)?;
        }
        if last {
            set_through(&tx, sub.id, at)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Changes of `sub`; with `through`, the subscription has reached it.
    pub fn apply_changes(
        &mut self,
        sub: &ReplicaSub,
        through: Option<LogIndex>,
        tuples: &[SyncTuple],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for t in tuples {
            upsert(&tx, sub.target.site(), t)?;
        }
        if let Some(through) = through {
            set_through(&tx, sub.id, through)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Queues a transaction of this client: gives it the next sequence number (per site) and
    /// keeps it until [`Replica::settle`]. Returns it as it will be pushed.
    pub fn enqueue(
        &mut self,
        client_id: &str,
        site: &str,
        ops: Vec<Op>,
    ) -> Result<PendingTx, StoreError> {
        if self.pending >= PENDING_MAX {
            return Err(StoreError::Corrupt(format!(
                "{} transactions already wait for the node; the limit is {PENDING_MAX}",
                self.pending
            )));
        }
        let tx = self.conn.transaction()?;
        let key = format!("replica.seq.{site}");
        let last: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?;
        let seq = match last {
            Some(b) => {
                u64::from_le_bytes(
                    b.try_into()
                        .map_err(|_| StoreError::Corrupt("sequence number".into()))?,
                ) + 1
            }
            None => 1,
        };
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, seq.to_le_bytes().to_vec()],
        )?;
        let transaction = Transaction {
            site: site.to_string(),
            ops,
            origin: Some(Origin {
                client_id: client_id.to_string(),
                seq,
            }),
        };
        tx.execute(
            "INSERT INTO replica_pending (site, seq, tx) VALUES (?1, ?2, ?3)",
            params![site, seq as i64, codec::encode(&transaction)],
        )?;
        let n = tx.last_insert_rowid() as u64;
        tx.commit()?;
        self.pending += 1;
        Ok(PendingTx { n, tx: transaction })
    }

    /// Pending transactions after queue position `after`, oldest first, at most `limit`.
    pub fn pending(&self, after: u64, limit: usize) -> Result<Vec<PendingTx>, StoreError> {
        self.pending_rows(
            "SELECT n, tx FROM replica_pending WHERE n > ?1 ORDER BY n LIMIT ?2",
            params![after as i64, limit as i64],
        )
    }

    /// How many transactions wait for their acknowledgement.
    pub fn pending_count(&self) -> Result<u64, StoreError> {
        Ok(self.pending)
    }

    /// Removes pending transaction `n` (acknowledged or rejected). With `committed_at`, its
    /// writes to tuples a subscription follows go into the replica at that index, so the
    /// client's own reads do not flicker before the change itself arrives.
    pub fn settle(
        &mut self,
        n: u64,
        committed_at: Option<LogIndex>,
        client_id: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        let tx = self.conn.transaction()?;
        let bytes: Option<Vec<u8>> = tx
            .query_row(
                "SELECT tx FROM replica_pending WHERE n = ?1",
                params![n as i64],
                |r| r.get(0),
            )
            .optional()?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let transaction: Transaction = codec::decode(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("pending transaction: {e}")))?;
        tx.execute(
            "DELETE FROM replica_pending WHERE n = ?1",
            params![n as i64],
        )?;
        if let Some(index) = committed_at {
            let targets: Vec<Target> =
                {
                    let mut stmt = tx.prepare_cached("SELECT target FROM replica_subs")?;
                    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
                    let mut targets = Vec::new();
                    for row in rows {
                        targets.push(codec::decode(&row?).map_err(|e| {
                            StoreError::Corrupt(format!("subscription target: {e}"))
                        })?);
                    }
                    targets
                };
            for op in &transaction.ops {
                let home = op.home();
                let covered = targets.iter().any(|t| {
                    covers(
                        t,
                        &transaction.site,
                        op.collection(),
                        op.key(),
                        &home,
                        client_id,
                    )
                });
                if covered {
                    let t = SyncTuple {
                        collection: op.collection().to_string(),
                        key: op.key().to_string(),
                        value: op.value().cloned(),
                        version: index,
                        origin: transaction.origin.clone(),
                        home,
                    };
                    upsert(&tx, &transaction.site, &t)?;
                }
            }
        }
        tx.commit()?;
        self.pending = self.pending.saturating_sub(1);
        Ok(Some(transaction))
    }

    /// A tuple as this client sees it: its latest pending write, else the committed one.
    pub fn get(
        &self,
        site: &str,
        collection: &str,
        key: &str,
    ) -> Result<Option<Entry>, StoreError> {
        let mut found = self.view().get(site, collection, key)?.map(|t| Entry {
            collection: t.collection,
            key: t.key,
            value: t.value,
            version: t.version,
            pending: false,
        });
        for p in self.pending_of(site)? {
            for op in &p.tx.ops {
                if op.collection() == collection && op.key() == key && op.home() == Home::Site {
                    found = op.value().map(|v| pending_entry(op, v));
                }
            }
        }
        Ok(found)
    }

    /// Tuples of a collection whose key starts with `prefix`, as this client sees them
    /// (pending over committed), in key order, at most `limit`.
    pub fn scan(
        &self,
        site: &str,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let pending = self.pending_of(site)?;
        // Pending deletes may hide committed tuples: read as many more.
        let extra = pending.iter().map(|p| p.tx.ops.len()).sum::<usize>();
        let committed =
            self.view()
                .scan_tuples(site, Some(collection), prefix, None, None, limit + extra)?;
        let mut merged: BTreeMap<String, Entry> = committed
            .into_iter()
            .map(|t| {
                (
                    t.key.clone(),
                    Entry {
                        collection: t.collection,
                        key: t.key,
                        value: t.value,
                        version: t.version,
                        pending: false,
                    },
                )
            })
            .collect();
        for p in &pending {
            for op in &p.tx.ops {
                if op.collection() != collection
                    || !op.key().starts_with(prefix)
                    || op.home() != Home::Site
                {
                    continue;
                }
                match op.value() {
                    Some(v) => {
                        merged.insert(op.key().to_string(), pending_entry(op, v));
                    }
                    None => {
                        merged.remove(op.key());
                    }
                }
            }
        }
        Ok(merged.into_values().take(limit).collect())
    }

    fn pending_of(&self, site: &str) -> Result<Vec<PendingTx>, StoreError> {
        self.pending_rows(
            "SELECT n, tx FROM replica_pending WHERE site = ?1 ORDER BY n",
            params![site],
        )
    }

    /// Queued transactions a query (`n`, `tx`) selects, decoded.
    fn pending_rows(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<PendingTx>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(args, |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (n, tx) = row?;
            out.push(PendingTx {
                n: n as u64,
                tx: codec::decode(&tx)
                    .map_err(|e| StoreError::Corrupt(format!("pending transaction: {e}")))?,
            });
        }
        Ok(out)
    }
}

fn pending_entry(op: &Op, value: &Value) -> Entry {
    Entry {
        collection: op.collection().to_string(),
        key: op.key().to_string(),
        value: value.clone(),
        version: 0,
        pending: true,
    }
}

/// Whether `target` (of client `client_id`) follows this tuple.
pub fn covers(
    target: &Target,
    site: &str,
    collection: &str,
    key: &str,
    home: &Home,
    client_id: &str,
) -> bool {
    match target {
        Target::Site {
            site: s,
            collection: c,
            prefix,
        } => {
            s == site
                && *home == Home::Site
                && c.as_deref().is_none_or(|c| c == collection)
                && key.starts_with(prefix.as_str())
        }
        Target::Mailbox { site: s } => {
            s == site && matches!(home, Home::Mailbox(to) if to == client_id)
        }
    }
}

/// Site, collection, key prefix, and whether the target is the mailbox (a replica holds only
/// its own client's mailbox tuples).
fn target_parts(target: &Target) -> (&str, Option<&str>, &str, bool) {
    match target {
        Target::Site {
            site,
            collection,
            prefix,
        } => (site, collection.as_deref(), prefix, false),
        Target::Mailbox { site } => (site, None, "", true),
    }
}

/// Writes a tuple (or a tombstone) unless the replica has a newer version of it.
fn upsert(conn: &Connection, site: &str, t: &SyncTuple) -> Result<(), StoreError> {
    let value = t.value.as_ref().map(codec::encode);
    let (origin_client, origin_seq) = match &t.origin {
        Some(o) => (Some(o.client_id.as_str()), Some(o.seq as i64)),
        None => (None, None),
    };
    let home = match &t.home {
        Home::Site => None,
        Home::Mailbox(to) => Some(to.as_str()),
    };
    conn.prepare_cached(
        "INSERT INTO tuples
           (site, collection, key, value, version, origin_client, origin_seq, home_mailbox)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (site, collection, key) DO UPDATE SET
           value = excluded.value, version = excluded.version,
           origin_client = excluded.origin_client, origin_seq = excluded.origin_seq,
           home_mailbox = excluded.home_mailbox
         WHERE excluded.version >= tuples.version",
    )?
    .execute(params![
        site,
        t.collection,
        t.key,
        value,
        t.version as i64,
        origin_client,
        origin_seq,
        home
    ])?;
    Ok(())
}

fn set_through(conn: &Connection, sub: u32, through: LogIndex) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE replica_subs SET through = MAX(through, ?2) WHERE id = ?1",
        params![sub as i64, through as i64],
    )?;
    Ok(())
}
