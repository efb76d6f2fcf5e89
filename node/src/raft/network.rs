//! The Raft network for a single-node cluster: there are no peers to reach.
//!
//! A one-voter cluster never sends an RPC, so every call here answers `Unreachable`. If one
//! is made anyway (someone added a member), openraft backs off and retries, and the error says
//! why. Node-to-node traffic (QUIC with mutual TLS) replaces this module.

use std::future::Future;

use openraft::error::{Fatal, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetwork, RaftNetworkFactory};

use super::{Member, NodeId, Snapshot, TypeConfig, Vote};

/// What every RPC fails with.
const NOT_BUILT: &str = "multi-node networking is not built yet";

/// Makes a [`Peer`] for each node openraft wants to reach.
#[derive(Debug, Clone, Default)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Peer {
        Peer {
            target,
            addr: node.raft.clone(),
        }
    }
}

/// A connection to one peer that cannot be made.
#[derive(Debug, Clone)]
pub struct Peer {
    target: NodeId,
    addr: String,
}

impl Peer {
    fn unreachable(&self) -> Unreachable {
        let message = format!(
            "cannot reach node {} at {:?}: {NOT_BUILT}",
            self.target, self.addr
        );
        Unreachable::new(&std::io::Error::other(message))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        Err(StreamingError::Unreachable(self.unreachable()))
    }
}
