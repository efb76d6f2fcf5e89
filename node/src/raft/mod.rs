//! Raft replication: openraft's type configuration and the storage it runs on.
//!
//! Where a write goes, in order: the leader's [`LogStore`] appends the [`Command`] to the Raft
//! log (`<dir>/raft-log.db`), openraft replicates and commits it, and the [`StateMachine`]
//! applies committed entries to the tuple store (`sesame_sync::Store`) in one SQLite
//! transaction per batch, moving openraft's last-applied log id along with the data.
//! Snapshots are whole copies of the tuple store, kept under `<dir>/snapshots/`.
//!
//! Build both stores from one data directory with [`open_storage`] and hand them to
//! [`Raft::new`](openraft::Raft::new) together with a [`network::Network`].
//!
//! [`Command`]: sesame_proto::Command

mod blocking;
pub mod handle;
pub mod log_store;
mod member;
pub mod network;
pub mod snapshot;
pub mod state_machine;

use std::path::Path;

use thiserror::Error;

pub use handle::{RaftHandle, RaftParts, RaftTuning, RaftView};
pub use log_store::{LogReader, LogStore, LogStoreError};
pub use member::Member;
pub use network::Network;
pub use snapshot::SnapshotFile;
pub use state_machine::{Landmarks, SnapshotBuilder, StateMachine, StateMachineError};

openraft::declare_raft_types!(
    /// Sesame's openraft types: the log carries [`sesame_proto::Command`]s and applying one
    /// yields a [`sesame_proto::CommandResult`].
    pub TypeConfig:
        D = sesame_proto::Command,
        R = sesame_proto::CommandResult,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A node's id in the Raft cluster.
pub type NodeId = u64;
/// A running Raft node.
pub type Raft = openraft::Raft<TypeConfig>;
/// An entry of the Raft log.
pub type Entry = openraft::Entry<TypeConfig>;
/// A Raft log id: the index of an entry and the leader that proposed it.
pub type LogId = openraft::LogId<NodeId>;
/// A vote: the term and the candidate voted for.
pub type Vote = openraft::Vote<NodeId>;
/// A membership config together with the log id that introduced it.
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
/// What every storage call fails with; openraft shuts the node down on any of these.
pub type StorageError = openraft::StorageError<NodeId>;
/// A snapshot: its metadata and its file.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
/// A snapshot's metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;

/// Why the node's Raft storage did not open.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("open the Raft log")]
    Log(#[source] LogStoreError),
    #[error("open the state machine")]
    StateMachine(#[source] StateMachineError),
}

/// Opens the Raft log and the state machine kept under a node's data directory `dir`.
///
/// This blocks on SQLite (opening, checking the formats, and finishing an interrupted snapshot
/// install), so call it at startup or inside `spawn_blocking`.
pub fn open_storage(dir: &Path) -> Result<(LogStore, StateMachine), OpenError> {
    let log_store = LogStore::open(dir).map_err(OpenError::Log)?;
    let state_machine = StateMachine::open(dir).map_err(OpenError::StateMachine)?;
    Ok((log_store, state_machine))
}
