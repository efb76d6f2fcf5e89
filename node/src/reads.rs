//! Reads of the tuple store, and the consistency a read asks for.
//!
//! Every read runs on one consistent SQLite snapshot of this node's store, off the async
//! runtime ([`Reads::read`]). What a read may see depends on how far this node has applied
//! the log, so before reading, [`ReadGate::ready`] waits for the index the asked consistency
//! needs:
//! - `linearizable` (the default): the leader confirms it still leads with a round of
//!   heartbeats (ReadIndex) and names its commit point; the read waits until this node has
//!   applied it. Never older than a write acknowledged before the read began, on any node.
//! - `lease`: as linearizable, but a leader heard from by a quorum within its lease (shorter
//!   than any election timeout) names its log end without the heartbeat round.
//! - `stale`: this node's applied state as it is, optionally no older than `min_index`.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sesame_proto::LogIndex;
use sesame_sync::{ReadPool, StoreError, View};
use thiserror::Error;
use tokio::sync::watch;

use crate::peer::link::{Link, LinkError};
use crate::peer::{PeerRequest, PeerResponse};
use crate::raft::{Landmarks, RaftHandle};

/// Longest a read waits for this node to apply the index it needs.
pub const READ_WAIT_MS_MAX: u64 = 5_000;

/// Why a read failed.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the read task failed: {0}")]
    Task(String),
}

/// Consistent reads of the tuple store, and the applied index they reflect.
#[derive(Clone)]
pub struct Reads {
    pool: Arc<ReadPool>,
    applied: watch::Receiver<LogIndex>,
    landmarks: watch::Receiver<Landmarks>,
}

impl Reads {
    pub fn new(
        pool: Arc<ReadPool>,
        applied: watch::Receiver<LogIndex>,
        landmarks: watch::Receiver<Landmarks>,
    ) -> Reads {
        Reads {
            pool,
            applied,
            landmarks,
        }
    }

    /// Follows where the set of sites and the sites' roots last changed.
    pub fn landmarks(&self) -> watch::Receiver<Landmarks> {
        self.landmarks.clone()
    }

    /// Runs `f` on a consistent snapshot of the tuple store, on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T, ReadError>
    where
        T: Send + 'static,
        F: FnOnce(View<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.read(f))
            .await
            .map_err(|e| ReadError::Task(e.to_string()))?
            .map_err(ReadError::from)
    }

    /// The pool of store readers (for a long streamed read on a reader of its own).
    pub fn pool(&self) -> Arc<ReadPool> {
        self.pool.clone()
    }

    /// Follows the applied index of the state machine.
    pub fn applied(&self) -> watch::Receiver<LogIndex> {
        self.applied.clone()
    }

    pub fn applied_index(&self) -> LogIndex {
        *self.applied.borrow()
    }

    /// Waits until this node has applied `index`, at most `timeout`; whether it did.
    pub async fn wait_applied(&self, index: LogIndex, timeout: Duration) -> bool {
        let mut applied = self.applied.clone();
        tokio::time::timeout(timeout, applied.wait_for(|a| *a >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    #[default]
    Linearizable,
    Lease,
    Stale,
}

/// Why a read could not be made as fresh as asked.
#[derive(Debug, Error)]
pub enum GateError {
    #[error("no leader is reachable to confirm a {0} read: {1}")]
    NoLeader(&'static str, String),
    #[error(
        "this node has not applied index {wanted} within {waited:?} (it has applied {applied})"
    )]
    Behind {
        wanted: LogIndex,
        applied: LogIndex,
        waited: Duration,
    },
}

/// Makes reads wait for the index their consistency needs.
pub struct ReadGate {
    raft: Arc<RaftHandle>,
    reads: Reads,
    link: Arc<Link>,
}

impl ReadGate {
    pub fn new(raft: Arc<RaftHandle>, reads: Reads, link: Arc<Link>) -> ReadGate {
        ReadGate { raft, reads, link }
    }

    /// Returns once a read on this node may be made with `consistency`, no older than
    /// `min_index`.
    pub async fn ready(
        &self,
        consistency: Consistency,
        min_index: Option<LogIndex>,
    ) -> Result<(), GateError> {
        let needed = match consistency {
            Consistency::Stale => 0,
            Consistency::Linearizable => self.read_index(false).await?,
            Consistency::Lease => self.read_index(true).await?,
        };
        let wanted = needed.max(min_index.unwrap_or(0));
        let waited = Duration::from_millis(READ_WAIT_MS_MAX);
        if self.reads.applied_index() >= wanted || self.reads.wait_applied(wanted, waited).await {
            return Ok(());
        }
        Err(GateError::Behind {
            wanted,
            applied: self.reads.applied_index(),
            waited,
        })
    }

    /// The index a read must wait for: asked of the leader (this node, or over the link).
    async fn read_index(&self, lease: bool) -> Result<LogIndex, GateError> {
        let name = if lease { "lease" } else { "linearizable" };
        if self.raft.view().is_leader() {
            return leader_read_index(&self.raft, lease)
                .await
                .map_err(|e| GateError::NoLeader(name, e));
        }
        let request = PeerRequest::ReadIndex { lease };
        match self.link.to_leader(&request).await {
            Ok(PeerResponse::ReadIndex(index)) => Ok(index),
            Ok(other) => Err(GateError::NoLeader(
                name,
                format!("unexpected answer {other:?}"),
            )),
            Err(LinkError::NoLeader) => Err(GateError::NoLeader(name, "no leader known".into())),
            Err(e) => Err(GateError::NoLeader(name, e.to_string())),
        }
    }
}

/// On the leader: the index a read must wait for. With `lease`, and a quorum heard from
/// within the lease, the log's end; otherwise the commit point confirmed by a round of
/// heartbeats (ReadIndex).
pub async fn leader_read_index(raft: &RaftHandle, lease: bool) -> Result<LogIndex, String> {
    if lease {
        let view = raft.view();
        let lease_ms = raft.timing().lease().as_millis() as u64;
        if view.is_leader() && view.millis_since_quorum_ack.is_some_and(|ms| ms < lease_ms) {
            return Ok(view.last_log_index);
        }
    }
    let (read_log_id, _applied) = raft
        .get()
        .get_read_log_id()
        .await
        .map_err(|e| e.to_string())?;
    Ok(read_log_id.map_or(0, |l| l.index))
}
