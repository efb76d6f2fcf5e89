//! The Raft network: openraft's RPCs over the peer transport, and their receiving side.
//!
//! Sending: [`Network`] makes a [`Peer`] for each node openraft replicates to; a `Peer` turns
//! append-entries and vote calls into [`PeerRequest`]s and streams snapshots chunk by chunk
//! from the snapshot file, never holding one whole in memory. Transport failures become the
//! openraft errors that make it back off ([`Unreachable`]) or retry ([`NetworkError`]).
//!
//! Receiving: [`RaftHandler`] answers those requests with the local [`Raft`]; a snapshot is
//! written into a file from `Raft::begin_receiving_snapshot` as its chunks arrive, then
//! installed with `Raft::install_full_snapshot`.
//!
//! The transport is an `Arc<dyn PeerTransport>`: the QUIC endpoint in a cluster, [`NoPeers`]
//! for a single voter, or either wrapped in a [`crate::peer::FaultyTransport`] in tests.

use std::future::Future;
use std::io::SeekFrom;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, NetworkError, PayloadTooLarge, RPCError, RaftError, ReplicationClosed, StreamingError,
    Timeout, Unreachable,
};
use openraft::network::{Backoff as RaftBackoff, RPCOption, RPCTypes};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetwork, RaftNetworkFactory, StorageIOError};
use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;

use super::{Member, NodeId, Raft, Snapshot, TypeConfig, Vote};
use crate::peer::backoff::Backoff;
use crate::peer::frame::{self, FrameError};
use crate::peer::{
    AppendEntries, NoPeers, PeerError, PeerHandler, PeerRequest, PeerResponse, PeerTransport,
    SnapshotChunks, SnapshotOffer, SnapshotSendOptions, TransportError,
};

/// Bytes per snapshot chunk sent, unless openraft asks for smaller ones.
pub const SNAPSHOT_CHUNK_BYTES_DEFAULT: usize = 1 << 20;
/// Largest snapshot a node accepts from a peer.
pub const SNAPSHOT_BYTES_MAX: u64 = 16 << 30;
/// Snapshots received at once; another sender is told to back off.
pub const SNAPSHOT_RECEIVES_MAX: usize = 2;
/// Longest a sender waits, after the last chunk, for the peer to install the snapshot.
pub const SNAPSHOT_INSTALL_TIMEOUT_MS: u64 = 600_000;
/// The shortest per-chunk timeout used, whatever openraft's `install_snapshot_timeout`.
const SNAPSHOT_CHUNK_TIMEOUT_MS_MIN: u64 = 1_000;
/// Room for the framing of an append-entries request around its entries.
const APPEND_OVERHEAD_BYTES: usize = 4_096;

/// How the Raft network sends.
#[derive(Debug, Clone, Copy)]
pub struct NetworkConfig {
    /// Bytes per snapshot chunk; at most [`frame::SNAPSHOT_CHUNK_BYTES_MAX`].
    pub snapshot_chunk_bytes: usize,
    pub snapshot_install_timeout: Duration,
    /// openraft's wait before retrying an unreachable peer.
    pub backoff: Backoff,
}

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            snapshot_chunk_bytes: SNAPSHOT_CHUNK_BYTES_DEFAULT,
            snapshot_install_timeout: Duration::from_millis(SNAPSHOT_INSTALL_TIMEOUT_MS),
            backoff: Backoff::default(),
        }
    }
}

/// Makes a [`Peer`] for each node openraft wants to reach.
#[derive(Clone)]
pub struct Network {
    id: NodeId,
    transport: Arc<dyn PeerTransport>,
    config: NetworkConfig,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("id", &self.id)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// The network of node `id` over `transport`.
    pub fn new(id: NodeId, transport: Arc<dyn PeerTransport>) -> Network {
        Network {
            id,
            transport,
            config: NetworkConfig::default(),
        }
    }

    /// The network of a single voter: there are no peers, and every RPC is unreachable.
    pub fn unconnected(id: NodeId) -> Network {
        Network::new(id, Arc::new(NoPeers))
    }

    pub fn with_config(mut self, config: NetworkConfig) -> Network {
        assert!(
            (1..=frame::SNAPSHOT_CHUNK_BYTES_MAX).contains(&config.snapshot_chunk_bytes),
            "snapshot chunks of {} bytes are outside 1..={}",
            config.snapshot_chunk_bytes,
            frame::SNAPSHOT_CHUNK_BYTES_MAX
        );
        self.config = config;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Peer {
        Peer {
            from: self.id,
            target,
            member: node.clone(),
            transport: self.transport.clone(),
            config: self.config,
        }
    }
}

/// openraft's connection to one peer.
pub struct Peer {
    from: NodeId,
    target: NodeId,
    member: Member,
    transport: Arc<dyn PeerTransport>,
    config: NetworkConfig,
}

type RpcError = RPCError<NodeId, Member, RaftError<NodeId>>;

impl Peer {
    fn rpc_error(&self, action: RPCTypes, e: TransportError) -> RpcError {
        match e {
            TransportError::Timeout { after, .. } => RPCError::Timeout(Timeout {
                action,
                id: self.from,
                target: self.target,
                timeout: after,
            }),
            TransportError::Unreachable { .. }
            | TransportError::Remote {
                error: PeerError::Unavailable(_),
                ..
            } => RPCError::Unreachable(Unreachable::new(&e)),
            _ => RPCError::Network(NetworkError::new(&e)),
        }
    }

    async fn call(
        &self,
        request: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, TransportError> {
        self.transport
            .request(self.target, &self.member.raft, request, timeout)
            .await
    }

    fn unexpected(&self, answer: &PeerResponse) -> NetworkError {
        NetworkError::new(&std::io::Error::other(format!(
            "node {} answered with the wrong kind of response: {answer:?}",
            self.target
        )))
    }
}

/// How many of `rpc`'s leading entries fit in one request frame (at least one).
fn entries_that_fit(rpc: &AppendEntries) -> u64 {
    let budget = frame::REQUEST_BYTES_MAX.saturating_sub(APPEND_OVERHEAD_BYTES);
    let mut total = 0usize;
    let mut fit = 0u64;
    for entry in &rpc.entries {
        total = total.saturating_add(frame::encoded_len(entry));
        if total > budget {
            break;
        }
        fit += 1;
    }
    fit.max(1)
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        let request = PeerRequest::AppendEntries(rpc.into());
        match self.call(&request, option.hard_ttl()).await {
            Ok(PeerResponse::AppendEntries(answer)) => Ok(answer),
            Ok(other) => Err(RPCError::Network(self.unexpected(&other))),
            Err(TransportError::TooLarge(e @ FrameError::TooLarge { .. })) => {
                let PeerRequest::AppendEntries(rpc) = &request else {
                    unreachable!("built as append-entries above")
                };
                let fit = entries_that_fit(rpc);
                tracing::warn!(
                    node = self.target,
                    entries = rpc.entries.len(),
                    fit,
                    "append-entries too large: {e}"
                );
                Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(fit).with_source_error(&e),
                ))
            }
            Err(e) => Err(self.rpc_error(RPCTypes::AppendEntries, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError> {
        match self.call(&PeerRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Vote(answer)) => Ok(answer),
            Ok(other) => Err(RPCError::Network(self.unexpected(&other))),
            Err(e) => Err(self.rpc_error(RPCTypes::Vote, e)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let Snapshot {
            meta,
            snapshot: mut file,
        } = snapshot;
        let signature = meta.signature();
        // openraft hands over an open file; read it from the start whoever touched it before.
        file.seek(SeekFrom::Start(0)).await.map_err(|e| {
            StreamingError::StorageError(
                StorageIOError::read_snapshot(Some(signature.clone()), &e).into(),
            )
        })?;
        let chunk_bytes = option
            .snapshot_chunk_size()
            .unwrap_or(self.config.snapshot_chunk_bytes)
            .clamp(1, self.config.snapshot_chunk_bytes);
        let options = SnapshotSendOptions {
            chunk_bytes,
            // openraft's snapshot timeout bounds each step, not the whole transfer, whose
            // length depends on the snapshot's size.
            chunk_timeout: option
                .hard_ttl()
                .max(Duration::from_millis(SNAPSHOT_CHUNK_TIMEOUT_MS_MIN)),
            install_timeout: self.config.snapshot_install_timeout,
        };
        let offer = SnapshotOffer { vote, meta };
        let sent = self.transport.send_snapshot(
            self.target,
            &self.member.raft,
            &offer,
            &mut *file,
            options,
        );
        let answer = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            answer = sent => answer,
        };
        match answer {
            Ok(PeerResponse::InstallSnapshot(answer)) => Ok(answer),
            Ok(other) => Err(StreamingError::Network(self.unexpected(&other))),
            Err(TransportError::Snapshot(e)) => Err(StreamingError::StorageError(
                StorageIOError::read_snapshot(Some(signature), &e).into(),
            )),
            Err(e) => Err(match self.rpc_error(RPCTypes::InstallSnapshot, e) {
                RPCError::Timeout(e) => StreamingError::Timeout(e),
                RPCError::Unreachable(e) => StreamingError::Unreachable(e),
                RPCError::Network(e) => StreamingError::Network(e),
                other => StreamingError::Network(NetworkError::new(&other)),
            }),
        }
    }

    fn backoff(&self) -> RaftBackoff {
        RaftBackoff::new(self.config.backoff.schedule())
    }
}

/// Answers Raft's requests from peers with the local Raft node.
///
/// The node's own [`PeerHandler`] delegates Raft kinds to [`RaftHandler::handle_raft`] and
/// snapshots to [`RaftHandler::receive_snapshot`]; used alone, it serves Raft only.
pub struct RaftHandler {
    raft: Raft,
    snapshots: Semaphore,
}

impl RaftHandler {
    pub fn new(raft: Raft) -> RaftHandler {
        RaftHandler {
            raft,
            snapshots: Semaphore::new(SNAPSHOT_RECEIVES_MAX),
        }
    }

    /// Answers an append-entries or vote request; any other kind is unsupported.
    pub async fn handle_raft(&self, request: PeerRequest) -> Result<PeerResponse, PeerError> {
        match request {
            PeerRequest::AppendEntries(rpc) => self
                .raft
                .append_entries(rpc.into())
                .await
                .map(PeerResponse::AppendEntries)
                .map_err(stopped),
            PeerRequest::Vote(rpc) => self
                .raft
                .vote(rpc)
                .await
                .map(PeerResponse::Vote)
                .map_err(stopped),
            other => Err(PeerError::Unsupported(format!("{:?}", other.kind()))),
        }
    }

    /// Writes the snapshot arriving in `chunks` into a new snapshot file, then installs it.
    /// An incomplete or refused snapshot's file is removed.
    pub async fn receive_snapshot(
        &self,
        from: NodeId,
        offer: SnapshotOffer,
        chunks: &mut SnapshotChunks<'_>,
    ) -> Result<PeerResponse, PeerError> {
        let Ok(_permit) = self.snapshots.try_acquire() else {
            return Err(PeerError::Unavailable(format!(
                "already receiving {SNAPSHOT_RECEIVES_MAX} snapshots"
            )));
        };
        let mut file = self
            .raft
            .begin_receiving_snapshot()
            .await
            .map_err(|e| PeerError::Unavailable(format!("cannot receive a snapshot: {e}")))?;
        let written = async {
            while let Some(chunk) = chunks.next().await? {
                if chunks.bytes() > SNAPSHOT_BYTES_MAX {
                    return Err(PeerError::BadRequest(format!(
                        "snapshot larger than {SNAPSHOT_BYTES_MAX} bytes"
                    )));
                }
                file.write_all(&chunk)
                    .await
                    .map_err(|e| PeerError::Failed(format!("write the snapshot: {e}")))?;
            }
            file.flush()
                .await
                .map_err(|e| PeerError::Failed(format!("flush the snapshot: {e}")))
        };
        if let Err(e) = written.await {
            let path = file.path().to_path_buf();
            drop(file);
            if let Err(rm) = tokio::fs::remove_file(&path).await {
                tracing::warn!(
                    "cannot remove the incomplete snapshot {}: {rm}",
                    path.display()
                );
            }
            tracing::warn!(node = from, "snapshot transfer failed: {e}");
            return Err(e);
        }
        tracing::info!(
            node = from,
            bytes = chunks.bytes(),
            snapshot = %offer.meta.snapshot_id,
            "installing a snapshot"
        );
        let snapshot = Snapshot {
            meta: offer.meta,
            snapshot: file,
        };
        self.raft
            .install_full_snapshot(offer.vote, snapshot)
            .await
            .map(PeerResponse::InstallSnapshot)
            .map_err(|e| PeerError::Unavailable(format!("raft has stopped: {e}")))
    }
}

fn stopped(e: RaftError<NodeId>) -> PeerError {
    PeerError::Unavailable(format!("raft has stopped: {e}"))
}

impl PeerHandler for RaftHandler {
    async fn handle(&self, _from: NodeId, request: PeerRequest) -> Result<PeerResponse, PeerError> {
        self.handle_raft(request).await
    }

    async fn install_snapshot(
        &self,
        from: NodeId,
        offer: SnapshotOffer,
        chunks: &mut SnapshotChunks<'_>,
    ) -> Result<PeerResponse, PeerError> {
        self.receive_snapshot(from, offer, chunks).await
    }
}
