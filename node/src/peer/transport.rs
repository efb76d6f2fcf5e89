//! The seam between Raft and the wire: [`PeerTransport`] sends one request, or streams one
//! snapshot, to a peer.
//!
//! [`super::PeerEndpoint`] is the real one (QUIC with mutual TLS); [`super::FaultyTransport`]
//! wraps any transport to drop, delay, duplicate or refuse messages in tests; [`NoPeers`]
//! serves a single-voter node that has no peers to reach. The Raft network
//! ([`crate::raft::Network`]) holds an `Arc<dyn PeerTransport>` and knows nothing else.

use std::time::Duration;

use futures::future::BoxFuture;
use thiserror::Error;
use tokio::io::AsyncRead;

use super::frame::FrameError;
use super::message::{PeerError, PeerRequest, PeerResponse, SnapshotOffer};
use crate::raft::NodeId;

/// Why a request got no answer from the peer's handler.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The peer cannot be reached now (dial failed, connection lost, backing off after
    /// failures). Retry later.
    #[error("node {to} is unreachable: {reason}")]
    Unreachable { to: NodeId, reason: String },
    /// No answer within the time allowed.
    #[error("no answer from node {to} within {after:?}")]
    Timeout { to: NodeId, after: Duration },
    /// The request is larger than a frame of its kind may be; it was not sent.
    #[error("not sent: {0}")]
    TooLarge(FrameError),
    /// The peer broke the protocol (bad frame, undecodable answer).
    #[error("protocol error talking to node {to}: {source}")]
    Protocol { to: NodeId, source: FrameError },
    /// The peer answered with an error.
    #[error("node {to} answered: {error}")]
    Remote { to: NodeId, error: PeerError },
    /// Reading the local snapshot data to send failed.
    #[error("read the snapshot to send: {0}")]
    Snapshot(std::io::Error),
}

/// How to stream one snapshot.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotSendOptions {
    /// Bytes per chunk frame; at most [`super::frame::SNAPSHOT_CHUNK_BYTES_MAX`].
    pub chunk_bytes: usize,
    /// Longest wait for connecting, or for one frame to be accepted by the stream.
    pub chunk_timeout: Duration,
    /// Longest wait, after the last chunk, for the peer to install the snapshot and answer.
    pub install_timeout: Duration,
}

/// Sends requests to peers by node id and address.
///
/// Implementations reuse connections, bound their own resources, and never panic on what a
/// peer sends. Methods return boxed futures so the transport can be a trait object.
pub trait PeerTransport: Send + Sync + 'static {
    /// Sends `request` to node `to` at `addr` (`host:port`) and waits at most `timeout` for
    /// its answer. A [`PeerRequest::InstallSnapshot`] is refused here: use `send_snapshot`.
    fn request<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
        request: &'a PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<PeerResponse, TransportError>>;

    /// Streams the snapshot `offer` describes to node `to`, reading its bytes from `data` one
    /// chunk at a time (never all at once), and returns the peer's answer once it installed
    /// the snapshot. Dropping the future abandons the transfer; the peer discards it.
    fn send_snapshot<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
        offer: &'a SnapshotOffer,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
        options: SnapshotSendOptions,
    ) -> BoxFuture<'a, Result<PeerResponse, TransportError>>;
}

/// The transport of a node without peers (a single voter): every request is unreachable.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPeers;

impl NoPeers {
    fn unreachable(to: NodeId) -> TransportError {
        TransportError::Unreachable {
            to,
            reason: "this node has no peer transport (single voter)".into(),
        }
    }
}

impl PeerTransport for NoPeers {
    fn request<'a>(
        &'a self,
        to: NodeId,
        _addr: &'a str,
        _request: &'a PeerRequest,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<PeerResponse, TransportError>> {
        Box::pin(async move { Err(NoPeers::unreachable(to)) })
    }

    fn send_snapshot<'a>(
        &'a self,
        to: NodeId,
        _addr: &'a str,
        _offer: &'a SnapshotOffer,
        _data: &'a mut (dyn AsyncRead + Send + Unpin),
        _options: SnapshotSendOptions,
    ) -> BoxFuture<'a, Result<PeerResponse, TransportError>> {
        Box::pin(async move { Err(NoPeers::unreachable(to)) })
    }
}
