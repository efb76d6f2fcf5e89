//! The Raft state machine: committed commands applied to the tuple store.
//!
//! Each batch openraft hands over becomes one `sesame_sync::Store::apply` call, so one SQLite
//! transaction writes the tuples together with openraft's last-applied log id and last
//! membership (in the store's meta table). State and progress therefore move together: after
//! a crash the store is at some batch boundary and says which one.
//!
//! A snapshot is a full copy of the store ([`Store::export`], SQLite `VACUUM INTO`); installing
//! one replaces the store's content ([`Store::replace_with`]), its meta rows included, so the
//! snapshot's last-applied log id and membership come along. See [`super::snapshot`] for how
//! snapshot files are kept.
//!
//! The rest of the node follows progress through [`StateMachine::applied_index`], a watch of
//! the applied log index, and reads through a [`ReadPool`] on the same file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sesame_proto::{Command, CommandResult};
use sesame_sync::{ReadPool, Store, StoreError};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::snapshot::{self, SnapshotDir, SnapshotError, SnapshotFile, SNAPSHOT_DIR_NAME};
use super::{
    blocking, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// The tuple store's file name inside the node's data directory.
pub const STATE_FILE_NAME: &str = "state.db";

/// Store meta key of openraft's last-applied log id (JSON).
const META_LAST_APPLIED: &str = "raft.last_applied";
/// Store meta key of the last applied membership (JSON `StoredMembership`).
const META_LAST_MEMBERSHIP: &str = "raft.last_membership";

#[derive(Debug, Error)]
pub enum StateMachineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot decode store meta {key:?}: {source}")]
    DecodeMeta {
        key: &'static str,
        source: serde_json::Error,
    },
    #[error("entry 0 carries a command; index 0 never holds one")]
    CommandAtIndexZero,
    #[error("store applied index {store} disagrees with openraft's last-applied log id {raft:?}")]
    AppliedMismatch { store: u64, raft: Option<LogId> },
    #[error("snapshot {snapshot_id} holds last-applied {found:?} and membership {found_membership:?}, its metadata says {expected:?} and {expected_membership:?}")]
    SnapshotMismatch {
        snapshot_id: String,
        found: Option<LogId>,
        expected: Option<LogId>,
        found_membership: Box<StoredMembership>,
        expected_membership: Box<StoredMembership>,
    },
}

fn encode_meta<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("openraft log ids and memberships always encode as JSON")
}

fn decode_meta<T: DeserializeOwned>(
    store: &Store,
    key: &'static str,
) -> Result<Option<T>, StateMachineError> {
    match store.meta(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateMachineError::DecodeMeta { key, source }),
    }
}

/// Openraft's last-applied log id and membership as the store records them, checked against
/// the store's own applied index (they are written in one transaction, so they must agree).
fn applied_state(store: &Store) -> Result<(Option<LogId>, StoredMembership), StateMachineError> {
    let last_applied: Option<LogId> = decode_meta(store, META_LAST_APPLIED)?;
    let membership: StoredMembership =
        decode_meta(store, META_LAST_MEMBERSHIP)?.unwrap_or_default();
    let store_applied = store.applied_index()?;
    if store_applied != last_applied.as_ref().map_or(0, |id| id.index) {
        return Err(StateMachineError::AppliedMismatch {
            store: store_applied,
            raft: last_applied,
        });
    }
    Ok((last_applied, membership))
}

/// The last-applied log id of the store in `dir` (for restore).
pub fn last_applied(dir: &Path) -> Result<Option<LogId>, StateMachineError> {
    let store = Store::open(&dir.join(STATE_FILE_NAME))?;
    Ok(applied_state(&store)?.0)
}

/// Makes the store in `dir` (a restored copy that no node runs on) the state of a new
/// cluster of one voter, `node_id`: its data and last-applied id stay, its membership
/// becomes that one node (addresses are learned when it starts). For restore only.
pub fn reseat_single_voter(dir: &Path, node_id: super::NodeId) -> Result<(), StateMachineError> {
    let mut store = Store::open(&dir.join(STATE_FILE_NAME))?;
    let (last_applied, _) = applied_state(&store)?;
    let membership = openraft::Membership::new(
        vec![std::collections::BTreeSet::from([node_id])],
        std::collections::BTreeMap::from([(node_id, super::Member::new("", ""))]),
    );
    let stored = StoredMembership::new(last_applied, membership);
    store.set_meta(META_LAST_MEMBERSHIP, &encode_meta(&stored))?;
    Ok(())
}

/// Applies one batch in one store transaction; returns one result per entry.
fn apply_batch(
    store: &mut Store,
    entries: &[Entry],
) -> Result<Vec<CommandResult>, StateMachineError> {
    let last = &entries
        .last()
        .expect("apply_batch is called with entries")
        .log_id;
    let mut meta = vec![(META_LAST_APPLIED, encode_meta(last))];
    let membership = entries.iter().rev().find_map(|e| match &e.payload {
        EntryPayload::Membership(m) => Some(StoredMembership::new(Some(e.log_id), m.clone())),
        _ => None,
    });
    if let Some(membership) = membership {
        meta.push((META_LAST_MEMBERSHIP, encode_meta(&membership)));
    }

    // Openraft's first entry, the initial membership, sits at index 0. The store counts
    // applied entries from 1 (0 means "nothing applied") and refuses index 0, so that entry
    // is recorded only through the meta rows above. It never carries a command.
    let mut at_zero = false;
    let mut commands: Vec<(u64, Option<&Command>)> = Vec::with_capacity(entries.len());
    for entry in entries {
        let command = match &entry.payload {
            EntryPayload::Normal(command) => Some(command),
            EntryPayload::Blank | EntryPayload::Membership(_) => None,
        };
        if entry.log_id.index == 0 {
            if command.is_some() {
                return Err(StateMachineError::CommandAtIndexZero);
            }
            at_zero = true;
        } else {
            commands.push((entry.log_id.index, command));
        }
    }

    let meta_refs: Vec<(&str, &[u8])> = meta.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    let mut results = store.apply(&commands, &meta_refs)?;
    if at_zero {
        results.insert(0, CommandResult::Ok);
    }
    assert_eq!(results.len(), entries.len(), "one result per applied entry");
    Ok(results)
}

/// Replaces the store's content with the snapshot at `src` and checks that what arrived is
/// what `meta` describes.
fn install(store: &mut Store, meta: &SnapshotMeta, src: &Path) -> Result<(), StateMachineError> {
    store.replace_with(src)?;
    let (found, found_membership) = applied_state(store)?;
    if found != meta.last_log_id || found_membership != meta.last_membership {
        return Err(StateMachineError::SnapshotMismatch {
            snapshot_id: meta.snapshot_id.clone(),
            found,
            expected: meta.last_log_id,
            found_membership: Box::new(found_membership),
            expected_membership: Box::new(meta.last_membership.clone()),
        });
    }
    Ok(())
}

fn write_snapshot_error(meta: Option<&SnapshotMeta>, e: StateMachineError) -> StorageError {
    StorageIOError::write_snapshot(meta.map(|m| m.signature()), &e).into()
}

/// Where the last entries that changed the set of sites, or a site's root, were applied: so
/// the parts of the node that follow only those wake only for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Landmarks {
    /// Log index of the last site creation or deletion.
    pub sites_at: u64,
    /// Log index of the last root change (publish, rollback, site deletion).
    pub roots_at: u64,
}

impl Landmarks {
    /// Moves the landmarks past what `entries` change.
    fn advance(&mut self, entries: &[Entry]) {
        for e in entries {
            let EntryPayload::Normal(command) = &e.payload else {
                continue;
            };
            match command {
                Command::CreateSite { .. } => self.sites_at = e.log_id.index,
                Command::DeleteSite { .. } => {
                    self.sites_at = e.log_id.index;
                    self.roots_at = e.log_id.index;
                }
                Command::Publish(_) => self.roots_at = e.log_id.index,
                _ => {}
            }
        }
    }
}

/// The state machine openraft applies committed entries to.
pub struct StateMachine {
    store: Arc<Mutex<Store>>,
    store_path: PathBuf,
    /// Lock order: `store` before `snapshots`, never the other way round.
    snapshots: Arc<Mutex<SnapshotDir>>,
    snapshot_dir: PathBuf,
    applied_index: Arc<watch::Sender<u64>>,
    landmarks: Arc<watch::Sender<Landmarks>>,
    /// Checkpoints the store's log on a thread of its own, off the apply path; stops when
    /// the last handle to this state machine goes.
    _checkpointer: Arc<sesame_sync::Checkpointer>,
}

impl StateMachine {
    /// Opens (creating if absent) the tuple store `<dir>/state.db` and the snapshots under
    /// `<dir>/snapshots/`.
    ///
    /// If the current snapshot is ahead of the store, it is installed first, so the store is
    /// never behind the snapshot the log was purged to. That happens after a power cut: the
    /// store commits without fsync (the Raft log is the durability point), so it can lose a
    /// tail that an fsynced snapshot already holds.
    ///
    /// Blocks on SQLite: call it at startup or inside `spawn_blocking`.
    pub fn open(dir: &Path) -> Result<StateMachine, StateMachineError> {
        let snapshots = SnapshotDir::open(&dir.join(SNAPSHOT_DIR_NAME))?;
        let store_path = dir.join(STATE_FILE_NAME);
        let mut store = Store::open(&store_path)?;
        let (mut last_applied, _) = applied_state(&store)?;
        if let Some((meta, path)) = snapshots.current() {
            if meta.last_log_id > last_applied {
                install(&mut store, meta, &path)?;
                last_applied = meta.last_log_id;
            }
        }
        let (applied_index, _) = watch::channel(last_applied.map_or(0, |id| id.index));
        let checkpointer = store.checkpoint_in_background()?;
        Ok(StateMachine {
            _checkpointer: Arc::new(checkpointer),
            store: Arc::new(Mutex::new(store)),
            store_path,
            snapshot_dir: snapshots.path().to_path_buf(),
            snapshots: Arc::new(Mutex::new(snapshots)),
            applied_index: Arc::new(applied_index),
            landmarks: Arc::new(watch::channel(Landmarks::default()).0),
        })
    }

    /// Reports the applied index through `applied` (which it sets to the current value)
    /// instead of a watch of its own: the node keeps one across restarts of Raft.
    pub fn with_applied_watch(mut self, applied: Arc<watch::Sender<u64>>) -> StateMachine {
        applied.send_replace(*self.applied_index.borrow());
        self.applied_index = applied;
        self
    }

    /// Reports [`Landmarks`] through `landmarks`, which the node keeps across restarts of
    /// Raft. On open they are set to the applied index: whatever came before is there.
    pub fn with_landmarks_watch(
        mut self,
        landmarks: Arc<watch::Sender<Landmarks>>,
    ) -> StateMachine {
        let applied = *self.applied_index.borrow();
        landmarks.send_modify(|l| {
            l.sites_at = l.sites_at.max(applied);
            l.roots_at = l.roots_at.max(applied);
        });
        self.landmarks = landmarks;
        self
    }

    /// The index of the last applied entry, updated after every applied batch and installed
    /// snapshot. Wait on it to read your own writes.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_index.subscribe()
    }

    /// The tuple store's SQLite file, for readers that open their own connections.
    pub fn store_path(&self) -> &Path {
        &self.store_path
    }

    /// A pool of read-only connections on the tuple store, keeping at most `idle_max` idle
    /// (0: the pool's default). Readers never block the writer (WAL), and an installed snapshot
    /// replaces the store's content inside the same file, so the pool stays valid.
    pub fn read_pool(&self, idle_max: usize) -> Result<ReadPool, StoreError> {
        ReadPool::open(&self.store_path, idle_max)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        blocking::run(&self.store, |store| applied_state(store))
            .await
            .map_err(|e| StorageIOError::read_state_machine(&e).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let mut landmarks = *self.landmarks.borrow();
        landmarks.advance(&entries);
        let results = blocking::run(&self.store, move |store| apply_batch(store, &entries))
            .await
            .map_err(|e| StorageIOError::apply(last, &e))?;
        self.landmarks.send_if_modified(|l| {
            let moved = *l != landmarks;
            *l = landmarks;
            moved
        });
        self.applied_index.send_replace(last.index);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            store: Arc::clone(&self.store),
            snapshots: Arc::clone(&self.snapshots),
            snapshot_dir: self.snapshot_dir.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        blocking::run(&self.snapshots, |snapshots| snapshots.create_incoming())
            .await
            .map(Box::new)
            .map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        // Whoever wrote the file may have left bytes in the async file's buffer.
        if let Err(source) = snapshot.flush().await {
            let e = SnapshotError::Io {
                action: "flush",
                path: snapshot.path().to_path_buf(),
                source,
            };
            return Err(write_snapshot_error(Some(meta), e.into()));
        }
        let src = snapshot.path().to_path_buf();
        drop(snapshot);

        let installing = meta.clone();
        let snapshots = Arc::clone(&self.snapshots);
        blocking::run(&self.store, move |store| -> Result<(), StateMachineError> {
            // Install first, then record the snapshot as current: if we stop in between, the
            // store is merely ahead of the current snapshot, which is harmless.
            install(store, &installing, &src)?;
            let mut snapshots = snapshots
                .lock()
                .expect("snapshot mutex is poisoned only after a panic");
            let switched = snapshots.set_current(&installing, &src)?;
            // The current snapshot never passes the applied index, and openraft installs only
            // snapshots past it.
            assert!(switched, "installed a snapshot older than the current one");
            Ok(())
        })
        .await
        .map_err(|e| write_snapshot_error(Some(meta), e))?;
        let installed_index = meta.last_log_id.map_or(0, |id| id.index);
        // A snapshot may change anything.
        self.landmarks.send_replace(Landmarks {
            sites_at: installed_index,
            roots_at: installed_index,
        });
        self.applied_index.send_replace(installed_index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = blocking::run(&self.snapshots, |snapshots| snapshots.open_current())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(current.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}

/// Builds a snapshot while the state machine keeps applying.
pub struct SnapshotBuilder {
    store: Arc<Mutex<Store>>,
    snapshots: Arc<Mutex<SnapshotDir>>,
    snapshot_dir: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        // Export under the store lock, reading the applied state under the same lock, so the
        // copy and its metadata describe the same moment. Applying waits meanwhile.
        let path = snapshot::new_file_path(&self.snapshot_dir);
        let export_path = path.clone();
        let (last_log_id, last_membership) = blocking::run(&self.store, move |store| {
            let state = applied_state(store)?;
            store.export(&export_path)?;
            Ok(state)
        })
        .await
        .map_err(|e| write_snapshot_error(None, e))?;
        let meta = SnapshotMeta {
            snapshot_id: snapshot::new_snapshot_id(last_log_id.as_ref()),
            last_log_id,
            last_membership,
        };

        let built = meta.clone();
        let (meta, file) = blocking::run(&self.snapshots, move |snapshots| {
            if !snapshots.set_current(&built, &path)? {
                // An install made a newer snapshot current while we exported; that one stands.
                snapshots.discard(&path)?;
            }
            let current = snapshots.open_current()?;
            Ok(current.expect("a snapshot is current after set_current"))
        })
        .await
        .map_err(|e| write_snapshot_error(Some(&meta), StateMachineError::Snapshot(e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}
