//! Node-to-node transport: QUIC with mutual TLS from the cluster CA.
//!
//! The path of a request, top to bottom:
//!
//! ```text
//! raft::network::Peer              an openraft RPC becomes a PeerRequest
//!   → PeerTransport::request       transport.rs: the seam (faults wrap it in fault.rs)
//!   → PeerEndpoint                 endpoint.rs: cached connection to the peer (re-dialled
//!                                  with backoff), one bidirectional stream per request
//!   → frame::encode / frame::read  frame.rs: magic, version, kind, length; a limit per kind
//!   … QUIC, TLS 1.3, client and server certificates both checked against the CA (tls.rs)
//!   → accept loop                  endpoint.rs: the caller's node id from its certificate
//!   → PeerHandler::handle          handler.rs: implemented by the node (raft::network has
//!                                  the Raft part); snapshots arrive as SnapshotChunks
//!   ← Result<PeerResponse, PeerError> in one response frame
//! ```
//!
//! Build a node's endpoint from its certificate folder and `--raft` address:
//! [`NodeCerts::load`], then [`PeerEndpoint::bind`] with a [`PeerConfig`], then
//! [`PeerEndpoint::serve`] with the node's handler once Raft runs.

pub mod backoff;
pub mod endpoint;
pub mod fault;
pub mod frame;
pub mod handler;
pub mod message;
pub mod tls;
pub mod transport;

#[cfg(test)]
mod tests;

pub use endpoint::{EndpointError, PeerConfig, PeerEndpoint};
pub use fault::{Fault, Faults, FaultyTransport, Partitions};
pub use handler::{PeerHandler, SnapshotChunks};
pub use message::{
    AppendEntries, PeerError, PeerRequest, PeerResponse, RequestKind, SnapshotEnd, SnapshotOffer,
};
pub use tls::NodeCerts;
pub use transport::{NoPeers, PeerTransport, SnapshotSendOptions, TransportError};
