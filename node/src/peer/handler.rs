//! The receiving side: what a node implements to answer its peers.
//!
//! The endpoint authenticates the caller (its node id comes from its certificate), reads and
//! decodes the request, and hands it to a [`PeerHandler`]. A snapshot arrives as a stream of
//! chunks the handler pulls one at a time from [`SnapshotChunks`], so it is never held whole in
//! memory.

use std::future::Future;
use std::time::Duration;

use tokio::io::AsyncRead;

use super::frame::{self, FrameError, FrameKind};
use super::message::{PeerError, PeerRequest, PeerResponse, SnapshotEnd, SnapshotOffer};
use crate::raft::NodeId;

/// Answers requests from peers. One instance serves every connection, concurrently.
pub trait PeerHandler: Send + Sync + 'static {
    /// Answers one request from node `from` (as its certificate proves).
    /// [`PeerRequest::Ping`] and [`PeerRequest::InstallSnapshot`] never come here.
    fn handle(
        &self,
        from: NodeId,
        request: PeerRequest,
    ) -> impl Future<Output = Result<PeerResponse, PeerError>> + Send;

    /// Receives the snapshot `offer` describes from node `from`: pull its bytes from `chunks`
    /// until it returns `None` (by then length and hash are checked), install it, answer.
    fn install_snapshot(
        &self,
        from: NodeId,
        offer: SnapshotOffer,
        chunks: &mut SnapshotChunks<'_>,
    ) -> impl Future<Output = Result<PeerResponse, PeerError>> + Send;
}

/// The chunks of a snapshot arriving on a stream, checked as they come.
pub struct SnapshotChunks<'a> {
    stream: &'a mut (dyn AsyncRead + Send + Unpin),
    /// Longest wait for the next frame: a stalled sender does not hold the receiver forever.
    wait: Duration,
    bytes: u64,
    hasher: blake3::Hasher,
    done: bool,
}

impl<'a> SnapshotChunks<'a> {
    pub(crate) fn new(
        stream: &'a mut (dyn AsyncRead + Send + Unpin),
        wait: Duration,
    ) -> SnapshotChunks<'a> {
        SnapshotChunks {
            stream,
            wait,
            bytes: 0,
            hasher: blake3::Hasher::new(),
            done: false,
        }
    }

    /// The next chunk, or `None` after the last one once the sender's length and hash match
    /// what arrived. An error means the snapshot is incomplete or damaged: discard it.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, PeerError> {
        if self.done {
            return Ok(None);
        }
        const EXPECTED: &[FrameKind] = &[FrameKind::SnapshotChunk, FrameKind::SnapshotEnd];
        let read = tokio::time::timeout(self.wait, frame::read(self.stream, EXPECTED)).await;
        let (kind, payload) = match read {
            Err(_) => {
                return Err(PeerError::BadRequest(format!(
                    "no snapshot chunk within {:?}",
                    self.wait
                )))
            }
            Ok(Err(e)) => return Err(chunk_error(&e)),
            Ok(Ok(frame)) => frame,
        };
        match kind {
            FrameKind::SnapshotChunk => {
                self.bytes += payload.len() as u64;
                self.hasher.update(&payload);
                Ok(Some(payload))
            }
            FrameKind::SnapshotEnd => {
                let end: SnapshotEnd =
                    frame::decode(kind, &payload).map_err(|e| chunk_error(&e))?;
                let hash = *self.hasher.finalize().as_bytes();
                if end.bytes != self.bytes || end.hash != hash {
                    return Err(PeerError::BadRequest(format!(
                        "snapshot damaged: the sender sent {} bytes, {} arrived, hashes {}",
                        end.bytes,
                        self.bytes,
                        if end.hash == hash { "match" } else { "differ" }
                    )));
                }
                self.done = true;
                Ok(None)
            }
            other => unreachable!("frame::read returned an unexpected kind {other:?}"),
        }
    }

    /// Bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn chunk_error(e: &FrameError) -> PeerError {
    PeerError::BadRequest(format!("snapshot stream: {e}"))
}
