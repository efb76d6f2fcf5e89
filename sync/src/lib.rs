//! The Sesame tuple store on SQLite, used by nodes and clients alike, and the two sides of the
//! client sync protocol, sans I/O: [`server::ServerSession`] (a node's) and
//! [`client::ClientSession`] (a client's, over its [`Replica`]).
//!
//! A [`Store`] is the single writer: it applies Raft commands (site creation, tokens,
//! transactions) at their log index, atomically per batch, together with whatever metadata
//! the caller needs to move in step (openraft's last-applied log id). Readers open their own
//! connections ([`ReadPool`], [`Reader`]) and see committed state through a [`View`]; WAL mode
//! lets them read while the writer writes.
//!
//! The change feed is compacted: each key keeps only its latest change (a delete leaves a
//! tombstone row), so "what changed since index N" is one indexed range scan.

pub mod checkpoint;
pub mod client;
pub mod replica;
mod schema;
pub mod server;
mod store;
mod view;

pub use checkpoint::Checkpointer;
pub use replica::Replica;
pub use store::{Store, StoreError};
pub use view::{
    Change, ChangesPage, ReadPool, Reader, RootRecord, SiteRecord, Snapshot, TokenRow, View,
};

/// Most tuples one scan returns.
pub const SCAN_LIMIT_MAX: usize = 10_000;
/// Most changes one change-feed page returns (a single transaction may exceed it: a page
/// never splits a transaction).
pub const CHANGES_LIMIT_MAX: usize = 10_000;
