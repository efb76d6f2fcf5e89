//! The cluster as this node takes part in it: what it answers its peers
//! ([`NodeService`]), what it says about the cluster ([`Cluster::status`]), and membership
//! changes, which only the leader makes (another node forwards them).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use sesame_projector::{PublishError, Publisher};
use sesame_proto::api::{ClusterStatus, MemberStatus};
use sesame_proto::LogIndex;
use thiserror::Error;

use crate::pages::projection::Projections;
use crate::pages::serve::Pages;
use crate::peer::link::{Link, LinkError};
use crate::peer::{
    MembershipChange, NodeStatus, ObjectKind, PeerError, PeerHandler, PeerRequest, PeerResponse,
    SnapshotChunks, SnapshotOffer,
};
use crate::raft::network::RaftHandler;
use crate::raft::{Member, NodeId, RaftHandle};
use crate::reads::{leader_read_index, Reads};
use crate::write::propose_local;

/// Longest a peer's `WaitProjected` is held.
const WAIT_PROJECTED_MS_MAX: u64 = 10_000;
/// Longest cluster status waits for each member's own answer.
const STATUS_TIMEOUT_MS: u64 = 1_000;
/// Longest a membership change may take (adding a learner waits for it to catch up).
const MEMBERSHIP_TIMEOUT_MS: u64 = 120_000;

/// What this node needs to take part in the cluster.
pub struct Cluster {
    pub raft: Arc<RaftHandle>,
    pub link: Arc<Link>,
    pub reads: Reads,
    pub pages: Arc<Pages>,
    pub projections: Arc<Projections>,
    pub publisher: Arc<Publisher>,
    /// This node's HTTP base URL, as others should use it.
    pub http_url: String,
}

/// Why a membership change failed.
#[derive(Debug, Error)]
pub enum MembershipError {
    #[error("{0}")]
    Refused(String),
    #[error("no leader is reachable to make the change: {0}")]
    NoLeader(String),
}

impl Cluster {
    /// This node's own status.
    pub fn own_status(&self) -> NodeStatus {
        let view = self.raft.view();
        let applied = self.reads.applied_index();
        NodeStatus {
            http: self.http_url.clone(),
            term: view.term,
            leader: view.leader,
            last_log_index: view.last_log_index,
            committed_index: applied,
            applied_index: applied,
            problem: self.raft.problem(),
        }
    }

    /// The cluster as this node sees it, with each member's own report where it answers.
    pub async fn status(&self) -> ClusterStatus {
        let view = self.raft.view();
        let (voters, members): (BTreeSet<NodeId>, Vec<(NodeId, Member)>) = {
            let raft = self.raft.get();
            let metrics = raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            (
                membership.voter_ids().collect(),
                membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
            )
        };
        let timeout = Duration::from_millis(STATUS_TIMEOUT_MS);
        let reports = futures::future::join_all(members.iter().map(|(id, _)| async move {
            if *id == view.id {
                return Ok(self.own_status());
            }
            match self
                .link
                .to_member(*id, &PeerRequest::Status, timeout)
                .await
            {
                Ok(PeerResponse::Status(s)) => Ok(s),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        }))
        .await;
        let leader_log = reports
            .iter()
            .zip(&members)
            .find(|(_, (id, _))| Some(*id) == view.leader)
            .and_then(|(r, _)| r.as_ref().ok())
            .map(|s| s.last_log_index);
        let members = members
            .into_iter()
            .zip(reports)
            .map(|((id, member), report)| {
                let role = if voters.contains(&id) {
                    "voter"
                } else {
                    "learner"
                };
                let mut status = MemberStatus {
                    id,
                    role: role.into(),
                    raft: member.raft,
                    http: (!member.http.is_empty()).then_some(member.http),
                    log_index: None,
                    committed_index: None,
                    applied_index: None,
                    lag: None,
                    problem: None,
                };
                match report {
                    Ok(s) => {
                        status.http = Some(s.http);
                        status.log_index = Some(s.last_log_index);
                        status.committed_index = Some(s.committed_index);
                        status.applied_index = Some(s.applied_index);
                        status.lag = leader_log.map(|l| l.saturating_sub(s.applied_index));
                        status.problem = s.problem;
                    }
                    Err(e) => status.problem = Some(format!("unreachable: {e}")),
                }
                status
            })
            .collect();
        ClusterStatus {
            leader: view.leader,
            term: view.term,
            members,
        }
    }

    /// Makes a membership change on the leader (this node, or forwarded to it).
    pub async fn change(&self, change: MembershipChange) -> Result<LogIndex, MembershipError> {
        if self.raft.view().is_leader() {
            return self.change_here(change).await;
        }
        let request = PeerRequest::ChangeMembership(change);
        match self
            .link
            .to_leader_within(&request, Duration::from_millis(MEMBERSHIP_TIMEOUT_MS))
            .await
        {
            Ok(PeerResponse::MembershipChanged(index)) => Ok(index),
            Ok(other) => Err(MembershipError::NoLeader(format!(
                "unexpected answer {other:?}"
            ))),
            Err(LinkError::Remote {
                error: PeerError::BadRequest(m) | PeerError::Failed(m),
                ..
            }) => Err(MembershipError::Refused(m)),
            Err(e) => Err(MembershipError::NoLeader(e.to_string())),
        }
    }

    async fn change_here(&self, change: MembershipChange) -> Result<LogIndex, MembershipError> {
        let raft = self.raft.get();
        let result = match change {
            MembershipChange::AddLearner { id, member } => {
                raft.add_learner(id, Member::new(member.raft, member.http), true)
                    .await
            }
            MembershipChange::Promote { id } => {
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
            }
            MembershipChange::Remove { id } => {
                let voter = raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == id);
                let change = if voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                raft.change_membership(change, false).await
            }
        };
        match result {
            Ok(resp) => Ok(resp.log_id.index),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(
                MembershipError::NoLeader("leadership moved during the change; retry".into()),
            ),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(MembershipError::Refused(e.to_string()))
            }
            Err(e) => Err(MembershipError::NoLeader(e.to_string())),
        }
    }
}

/// What this node answers its peers.
pub struct NodeService {
    cluster: Arc<Cluster>,
    raft_rpcs: RaftHandler,
}

impl NodeService {
    pub fn new(cluster: Arc<Cluster>) -> NodeService {
        let raft = cluster.raft.clone();
        NodeService {
            cluster,
            raft_rpcs: RaftHandler::current(move || raft.get()),
        }
    }

    async fn wait_projected(&self, site: String, index: LogIndex, wait_ms: u64) -> PeerResponse {
        let c = &self.cluster;
        let wait = Duration::from_millis(wait_ms.min(WAIT_PROJECTED_MS_MAX));
        let reached = c.projections.wait_projected(&site, index, wait).await;
        PeerResponse::Projected {
            reached,
            root_log_index: c.pages.root_log_index(&site),
        }
    }

    async fn fetch(
        &self,
        site: &str,
        kind: ObjectKind,
        hash: &str,
    ) -> Result<PeerResponse, PeerError> {
        let publisher = &self.cluster.publisher;
        let bytes = match kind {
            ObjectKind::Manifest => publisher.get_manifest_bytes(site, hash).await,
            ObjectKind::Blob => publisher.get_blob(site, hash).await,
            ObjectKind::Chunk => publisher.get_chunk_bytes(site, hash).await,
        };
        match bytes {
            Ok(b) => Ok(PeerResponse::Object(Some(b.to_vec()))),
            Err(PublishError::NotFound { .. }) => Ok(PeerResponse::Object(None)),
            Err(PublishError::InvalidName { what, value }) => {
                Err(PeerError::BadRequest(format!("invalid {what} {value:?}")))
            }
            Err(e) => Err(PeerError::Failed(e.to_string())),
        }
    }
}

impl PeerHandler for NodeService {
    async fn handle(&self, from: NodeId, request: PeerRequest) -> Result<PeerResponse, PeerError> {
        let c = &self.cluster;
        match request {
            PeerRequest::AppendEntries(_) | PeerRequest::Vote(_) => {
                self.raft_rpcs.handle_raft(request).await
            }
            PeerRequest::Propose(command) => Ok(PeerResponse::Proposed(
                propose_local(&c.raft.get(), command).await,
            )),
            PeerRequest::ReadIndex { lease } => {
                if !c.raft.view().is_leader() {
                    return Err(PeerError::Unavailable("this node is not the leader".into()));
                }
                leader_read_index(&c.raft, lease)
                    .await
                    .map(PeerResponse::ReadIndex)
                    .map_err(PeerError::Unavailable)
            }
            PeerRequest::WaitProjected {
                site,
                index,
                wait_ms,
            } => {
                if !c.projections.is_active() {
                    return Err(PeerError::Unavailable(
                        "this node does not project sites (it is not the leader)".into(),
                    ));
                }
                Ok(self.wait_projected(site, index, wait_ms).await)
            }
            PeerRequest::FetchObject { site, kind, hash } => self.fetch(&site, kind, &hash).await,
            PeerRequest::Status => Ok(PeerResponse::Status(c.own_status())),
            PeerRequest::ChangeMembership(change) => {
                tracing::info!(node = from, ?change, "membership change asked by a peer");
                if !c.raft.view().is_leader() {
                    return Err(PeerError::Unavailable("this node is not the leader".into()));
                }
                match c.change_here(change).await {
                    Ok(index) => Ok(PeerResponse::MembershipChanged(index)),
                    Err(MembershipError::Refused(m)) => Err(PeerError::BadRequest(m)),
                    Err(MembershipError::NoLeader(m)) => Err(PeerError::Unavailable(m)),
                }
            }
            PeerRequest::Ping(_) | PeerRequest::InstallSnapshot(_) => Err(PeerError::Unsupported(
                format!("{:?} is answered by the transport", request.kind()),
            )),
        }
    }

    async fn install_snapshot(
        &self,
        from: NodeId,
        offer: SnapshotOffer,
        chunks: &mut SnapshotChunks<'_>,
    ) -> Result<PeerResponse, PeerError> {
        self.raft_rpcs.receive_snapshot(from, offer, chunks).await
    }
}

/// Whether an error from a peer is about it not leading (so another node may be asked).
pub fn is_not_leader(e: &LinkError) -> bool {
    matches!(e, LinkError::NoLeader)
        || matches!(e, LinkError::Remote { error: PeerError::Unavailable(m), .. } if m.contains("not the leader"))
}
