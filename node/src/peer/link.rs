//! The node's way to its peers for its own requests (not Raft's): forwarding writes to the
//! leader, asking it for read points and published versions, fetching objects, status.
//!
//! It finds peers in the membership this node knows (the leader's address included) and
//! sends through the same [`PeerTransport`] as Raft, so fault injection covers it too.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::{PeerError, PeerRequest, PeerResponse, PeerTransport, TransportError};
use crate::raft::{Member, NodeId, RaftHandle};

/// Longest a request to a peer waits for its answer unless told otherwise.
pub const LINK_TIMEOUT_MS: u64 = 10_000;

/// Why a request to a peer got no answer.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("no leader is known now")]
    NoLeader,
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    #[error(transparent)]
    Transport(TransportError),
    #[error("node {to} answered: {error}")]
    Remote { to: NodeId, error: PeerError },
}

impl From<TransportError> for LinkError {
    fn from(e: TransportError) -> LinkError {
        match e {
            TransportError::Remote { to, error } => LinkError::Remote { to, error },
            other => LinkError::Transport(other),
        }
    }
}

/// Requests from this node to its peers.
pub struct Link {
    raft: Arc<RaftHandle>,
    transport: Arc<dyn PeerTransport>,
}

impl Link {
    pub fn new(raft: Arc<RaftHandle>, transport: Arc<dyn PeerTransport>) -> Link {
        Link { raft, transport }
    }

    /// Sends `request` to the current leader (which may be this node).
    pub async fn to_leader(&self, request: &PeerRequest) -> Result<PeerResponse, LinkError> {
        self.to_leader_within(request, Duration::from_millis(LINK_TIMEOUT_MS))
            .await
    }

    /// Sends `request` to the current leader, waiting at most `timeout` for the answer.
    pub async fn to_leader_within(
        &self,
        request: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, LinkError> {
        let view = self.raft.view();
        let (Some(id), Some(member)) = (view.leader, view.leader_member) else {
            return Err(LinkError::NoLeader);
        };
        self.send(id, &member, request, timeout).await
    }

    /// Sends `request` to member `id`.
    pub async fn to_member(
        &self,
        id: NodeId,
        request: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, LinkError> {
        let member = self
            .members()
            .into_iter()
            .find(|(m, _)| *m == id)
            .map(|(_, member)| member)
            .ok_or(LinkError::NotMember(id))?;
        self.send(id, &member, request, timeout).await
    }

    async fn send(
        &self,
        id: NodeId,
        member: &Member,
        request: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, LinkError> {
        Ok(self
            .transport
            .request(id, &member.raft, request, timeout)
            .await?)
    }

    /// This node's id.
    pub fn self_id(&self) -> NodeId {
        self.raft.id()
    }

    /// The leader this node knows of, if any.
    pub fn leader_id(&self) -> Option<NodeId> {
        self.raft.view().leader
    }

    /// Every member this node knows of (voters and learners), by id.
    pub fn members(&self) -> Vec<(NodeId, Member)> {
        let raft = self.raft.get();
        let metrics = raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, member)| (*id, member.clone()))
            .collect()
    }
}
