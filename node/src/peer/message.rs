//! What peers say to each other: requests, responses and errors, as they go on the wire.
//!
//! Every message is bincode 2. openraft's own types travel through their serde form
//! (`#[bincode(with_serde)]`), except log entries: a [`Command`]'s serde form is JSON-shaped
//! and bincode's serde path cannot read it back, so entries are mirrored by [`WireEntry`],
//! whose command uses its native bincode encoding (the one the log store uses too).
//!
//! New kinds of request go at the end of [`PeerRequest`] (and their answers at the end of
//! [`PeerResponse`]): older variants keep their encoding, and a peer that does not know a kind
//! answers [`PeerError::BadRequest`] instead of misreading it.

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Entry, EntryPayload};
use sesame_proto::{Command, CommandResult, LogIndex};
use thiserror::Error;

use crate::raft::{LogId, Member, NodeId, SnapshotMeta, TypeConfig, Vote};
use crate::write::WriteError;

/// A request from one peer to another. Each travels on a stream of its own.
#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub enum PeerRequest {
    /// Answered by the transport itself with [`PeerResponse::Pong`]: a liveness probe.
    Ping(u64),
    AppendEntries(AppendEntries),
    Vote(#[bincode(with_serde)] VoteRequest<NodeId>),
    /// Offers a snapshot; its bytes follow on the same stream as chunk frames, then an end
    /// frame ([`SnapshotEnd`]).
    InstallSnapshot(SnapshotOffer),
    /// Any other command a follower was asked to order (sites, tokens, rollbacks).
    Propose(Command),
    /// A linearizable read point: the index a reader must wait for on its own node.
    /// `lease: true` lets a leader within its lease answer without a round of heartbeats.
    ReadIndex {
        lease: bool,
    },
    /// Waits (at most `wait_ms`) until the leader has published `site` as of `index`; answers
    /// which root the reader's node must have installed to serve that.
    WaitProjected {
        site: String,
        index: LogIndex,
        wait_ms: u64,
    },
    /// A published object (a manifest, a chunk of a file tree, or a blob) the asking node
    /// lacks.
    FetchObject {
        site: String,
        kind: ObjectKind,
        hash: String,
    },
    /// The node's own view of itself, for cluster status.
    Status,
    /// A membership change, which only the leader can make.
    ChangeMembership(MembershipChange),
}

/// Which kind of published object a [`PeerRequest::FetchObject`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub enum ObjectKind {
    Manifest,
    Blob,
    /// A node of a version's file tree (`sites/<site>/chunks/<id>.json`).
    Chunk,
}

/// A change of the cluster's members.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub enum MembershipChange {
    /// Add a learner (it receives a snapshot and the log, but does not vote).
    AddLearner { id: NodeId, member: MemberWire },
    /// Make a learner a voter.
    Promote { id: NodeId },
    /// Take a node out of the cluster (voter or learner).
    Remove { id: NodeId },
}

/// A [`Member`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct MemberWire {
    pub raft: String,
    pub http: String,
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct NodeStatus {
    /// The node's HTTP base URL.
    pub http: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    /// Why the node cannot work now (its Raft stopped on a storage failure), if so.
    pub problem: Option<String>,
}

/// How a forwarded write ended: its log index and result, or why it did not commit.
pub type WriteOutcome = Result<(LogIndex, CommandResult), WriteError>;

/// What kind of request a [`PeerRequest`] is, for logs, metrics and fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Ping,
    AppendEntries,
    Vote,
    InstallSnapshot,
    Propose,
    ReadIndex,
    WaitProjected,
    FetchObject,
    Status,
    ChangeMembership,
}

impl PeerRequest {
    pub fn kind(&self) -> RequestKind {
        match self {
            PeerRequest::Ping(_) => RequestKind::Ping,
            PeerRequest::AppendEntries(_) => RequestKind::AppendEntries,
            PeerRequest::Vote(_) => RequestKind::Vote,
            PeerRequest::InstallSnapshot(_) => RequestKind::InstallSnapshot,
            PeerRequest::Propose(_) => RequestKind::Propose,
            PeerRequest::ReadIndex { .. } => RequestKind::ReadIndex,
            PeerRequest::WaitProjected { .. } => RequestKind::WaitProjected,
            PeerRequest::FetchObject { .. } => RequestKind::FetchObject,
            PeerRequest::Status => RequestKind::Status,
            PeerRequest::ChangeMembership(_) => RequestKind::ChangeMembership,
        }
    }
}

/// The answer to a [`PeerRequest`] of the same name.
#[derive(Debug, PartialEq, bincode::Encode, bincode::Decode)]
pub enum PeerResponse {
    Pong(u64),
    AppendEntries(#[bincode(with_serde)] AppendEntriesResponse<NodeId>),
    Vote(#[bincode(with_serde)] VoteResponse<NodeId>),
    InstallSnapshot(#[bincode(with_serde)] SnapshotResponse<NodeId>),
    Proposed(WriteOutcome),
    ReadIndex(LogIndex),
    Projected {
        /// Whether the leader's pages reached the index within the wait.
        reached: bool,
        /// The log index of the root the leader serves for the site (0: none).
        root_log_index: LogIndex,
    },
    /// The object's bytes, or `None` when the node does not have it.
    Object(Option<Vec<u8>>),
    Status(NodeStatus),
    /// The membership change was committed at this log index.
    MembershipChanged(LogIndex),
}

/// Why a peer did not answer a request. Travels in the response frame.
#[derive(Debug, Clone, PartialEq, Eq, Error, bincode::Encode, bincode::Decode)]
pub enum PeerError {
    /// The peer cannot serve now (Raft stopped, shutting down, busy): back off and retry.
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// The request was malformed or too large; retrying it unchanged will not help.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The peer's handler does not serve this kind of request.
    #[error("unsupported request: {0}")]
    Unsupported(String),
    /// Serving the request failed on the peer.
    #[error("request failed: {0}")]
    Failed(String),
}

/// An append-entries request as it goes on the wire; converts to and from openraft's.
#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub struct AppendEntries {
    #[bincode(with_serde)]
    pub vote: Vote,
    #[bincode(with_serde)]
    pub prev_log_id: Option<LogId>,
    #[bincode(with_serde)]
    pub leader_commit: Option<LogId>,
    pub entries: Vec<WireEntry>,
}

/// A log entry as it goes on the wire.
#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub struct WireEntry {
    #[bincode(with_serde)]
    pub log_id: LogId,
    pub payload: WirePayload,
}

#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub enum WirePayload {
    Blank,
    Normal(Command),
    Membership(#[bincode(with_serde)] openraft::Membership<NodeId, Member>),
}

impl From<AppendEntriesRequest<TypeConfig>> for AppendEntries {
    fn from(rpc: AppendEntriesRequest<TypeConfig>) -> AppendEntries {
        AppendEntries {
            vote: rpc.vote,
            prev_log_id: rpc.prev_log_id,
            leader_commit: rpc.leader_commit,
            entries: rpc.entries.into_iter().map(WireEntry::from).collect(),
        }
    }
}

impl From<AppendEntries> for AppendEntriesRequest<TypeConfig> {
    fn from(wire: AppendEntries) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: wire.vote,
            prev_log_id: wire.prev_log_id,
            leader_commit: wire.leader_commit,
            entries: wire.entries.into_iter().map(Entry::from).collect(),
        }
    }
}

impl From<Entry<TypeConfig>> for WireEntry {
    fn from(entry: Entry<TypeConfig>) -> WireEntry {
        WireEntry {
            log_id: entry.log_id,
            payload: match entry.payload {
                EntryPayload::Blank => WirePayload::Blank,
                EntryPayload::Normal(command) => WirePayload::Normal(command),
                EntryPayload::Membership(m) => WirePayload::Membership(m),
            },
        }
    }
}

impl From<WireEntry> for Entry<TypeConfig> {
    fn from(wire: WireEntry) -> Entry<TypeConfig> {
        Entry {
            log_id: wire.log_id,
            payload: match wire.payload {
                WirePayload::Blank => EntryPayload::Blank,
                WirePayload::Normal(command) => EntryPayload::Normal(command),
                WirePayload::Membership(m) => EntryPayload::Membership(m),
            },
        }
    }
}

/// The head of a streamed snapshot: the leader's vote and the snapshot's metadata.
#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub struct SnapshotOffer {
    #[bincode(with_serde)]
    pub vote: Vote,
    #[bincode(with_serde)]
    pub meta: SnapshotMeta,
}

/// The tail of a streamed snapshot: how many bytes were sent and their blake3 hash, so the
/// receiver knows it has all of them and only them.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct SnapshotEnd {
    pub bytes: u64,
    pub hash: [u8; 32],
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::CommittedLeaderId;
    use sesame_proto::{Op, Transaction, Value};

    use super::*;
    use crate::peer::frame::{self, FrameKind};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn append_entries_round_trip_through_a_frame() -> anyhow::Result<()> {
        let membership = openraft::Membership::new(
            vec![BTreeSet::from([1, 2])],
            BTreeMap::from([
                (1, Member::new("127.0.0.1:1", "http://a")),
                (2, Member::new("127.0.0.1:2", "http://b")),
            ]),
        );
        let command = Command::Txs(vec![Transaction {
            site: "demo".into(),
            ops: vec![Op::Put {
                collection: "profiles".into(),
                key: "alice".into(),
                value: Value::from_json(serde_json::json!({"name": "Alice", "n": [1, 2.5]}))
                    .map_err(anyhow::Error::msg)?,
                if_version: None,
            }],
            origin: None,
        }]);
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(2, 4)),
            leader_commit: Some(log_id(2, 4)),
            entries: vec![
                Entry {
                    log_id: log_id(3, 5),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: log_id(3, 6),
                    payload: EntryPayload::Membership(membership),
                },
                Entry {
                    log_id: log_id(3, 7),
                    payload: EntryPayload::Normal(command),
                },
            ],
        };
        let request = PeerRequest::AppendEntries(rpc.clone().into());
        let bytes = frame::encode(FrameKind::Request, &request)?;
        let back: PeerRequest = frame::decode(FrameKind::Request, &bytes[frame::HEADER_BYTES..])?;
        let PeerRequest::AppendEntries(back) = back else {
            anyhow::bail!("decoded another kind: {back:?}");
        };
        // openraft's request has Debug but no PartialEq; its Debug shows every field.
        assert_eq!(
            format!("{:?}", AppendEntriesRequest::from(back)),
            format!("{rpc:?}")
        );
        Ok(())
    }

    #[test]
    fn responses_and_errors_round_trip() -> anyhow::Result<()> {
        let answers: Vec<Result<PeerResponse, PeerError>> = vec![
            Ok(PeerResponse::AppendEntries(
                AppendEntriesResponse::PartialSuccess(Some(log_id(1, 2))),
            )),
            Ok(PeerResponse::Vote(VoteResponse::new(
                Vote::new(4, 2),
                Some(log_id(3, 9)),
                true,
            ))),
            Ok(PeerResponse::InstallSnapshot(SnapshotResponse::new(
                Vote::new_committed(4, 2),
            ))),
            Err(PeerError::Unavailable("raft stopped".into())),
        ];
        for answer in answers {
            let bytes = frame::encode(FrameKind::Response, &answer)?;
            let back: Result<PeerResponse, PeerError> =
                frame::decode(FrameKind::Response, &bytes[frame::HEADER_BYTES..])?;
            assert_eq!(back, answer);
        }
        Ok(())
    }
}
