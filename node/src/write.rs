//! The write path: every command the node orders through the Raft log goes through here.
//!
//! A transaction enters with [`Writer::write_tx`] and waits in a queue for group commit:
//! transactions that arrive while one log entry is in flight go together into the next (one
//! entry, one fsync, each transaction still atomic on its own). The entry then goes to the
//! leader: proposed to the local Raft when this node leads ([`propose_local`]), forwarded
//! over the peer link when another node does (the client never needs to know which). The
//! leader appends it to its log, replicates it to a quorum, commits it, and every node's
//! state machine applies it; the results computed there travel back to each request. A
//! forwarded write is answered once this node has applied it too, so the client's next read
//! here sees it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use sesame_proto::{codec, Command, CommandResult, LogIndex, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::peer::link::{Link, LinkError};
use crate::peer::{PeerRequest, PeerResponse, TransportError};
use crate::raft::{NodeId, Raft, RaftHandle};
use crate::reads::Reads;

/// Transactions waiting for the next log entry; past this, writers wait (backpressure).
const TX_QUEUE_MAX: usize = 4_096;
/// Most transactions grouped into one log entry.
pub const TXS_PER_ENTRY_MAX: usize = 512;
/// Encoded bytes after which no more transactions join an entry. One transaction may
/// overshoot it by at most its own size (itself at most `TX_BYTES_MAX`), well inside the
/// codec's and the peer link's frame limits.
const ENTRY_BYTES_MAX: usize = 16 << 20;
/// Longest a write waits for a leader to be elected or found before giving up.
const LEADER_WAIT_MS: u64 = 5_000;
/// Longest a forwarded write waits for this node to apply it before answering anyway.
const FORWARD_APPLY_WAIT_MS: u64 = 5_000;
/// Longest the leader waits for a proposed entry to commit and apply. A leader cut off from
/// its followers still leads in its own eyes and would wait until the cut heals; past this
/// the outcome is unknown. As long as a forwarded write waits for the leader's answer.
pub const COMMIT_WAIT_MS: u64 = crate::peer::link::LINK_TIMEOUT_MS;

/// Why a write did not commit. Callers branch on it: only `OutcomeUnknown` may have been
/// applied, and a retry with the same `(client_id, seq)` settles it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, bincode::Encode, bincode::Decode)]
pub enum WriteError {
    #[error("this node is not the leader; node {id} at {addr} is")]
    NotLeader { id: NodeId, addr: String },
    #[error("no leader is known now; retry shortly")]
    NoLeader,
    /// Nothing was written.
    #[error("{0}; nothing was written")]
    Unavailable(String),
    /// The node failed while the write was in flight: it may or may not have committed.
    #[error("{0}")]
    OutcomeUnknown(String),
    #[error("unexpected result {0}")]
    Unexpected(String),
}

/// A log index and what applying the entry there did.
pub type Written = Result<(LogIndex, CommandResult), WriteError>;

/// Transactions waiting for group commit to put them in a log entry: one, or several that
/// must share an entry (see [`Writer::write_txs`]).
struct PendingTxs {
    txs: Vec<Transaction>,
    bytes: usize,
    reply: oneshot::Sender<Result<(LogIndex, Vec<CommandResult>), WriteError>>,
}

/// Orders commands through the Raft log, from this node.
pub struct Writer {
    queue: mpsc::Sender<PendingTxs>,
    metrics: Arc<crate::metrics::Metrics>,
    router: Arc<Router>,
}

/// Finds the leader for each entry and hands the entry to it.
struct Router {
    raft: Arc<RaftHandle>,
    link: Arc<Link>,
    reads: Reads,
}

impl Writer {
    /// Starts the group-commit task; it ends when the writer is dropped.
    pub fn start(
        raft: Arc<RaftHandle>,
        link: Arc<Link>,
        reads: Reads,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Writer {
        let (queue, pending) = mpsc::channel(TX_QUEUE_MAX);
        let router = Arc::new(Router { raft, link, reads });
        tokio::spawn(group_commit(router.clone(), pending, metrics.clone()));
        Writer {
            queue,
            router,
            metrics,
        }
    }

    /// Commits a validated transaction and returns its log index and result (committed,
    /// duplicate, conflict, unknown site). Returns once the transaction is durable on a
    /// quorum and applied on this node.
    pub async fn write_tx(&self, tx: Transaction) -> Written {
        let (index, mut results) = self.write_txs(vec![tx]).await?;
        match results.pop() {
            Some(result) if results.is_empty() => Ok((index, result)),
            _ => Err(WriteError::Unexpected("one result per transaction".into())),
        }
    }

    /// Commits transactions in one log entry, in this order (each atomic on its own, with
    /// its own result): either the entry commits, or none of them does. A client session
    /// pushing its queue uses it so that a later transaction never commits without an
    /// earlier one. Keep them within a log entry's limits ([`TXS_PER_ENTRY_MAX`]).
    pub async fn write_txs(
        &self,
        txs: Vec<Transaction>,
    ) -> Result<(LogIndex, Vec<CommandResult>), WriteError> {
        let started = Instant::now();
        let (reply, answer) = oneshot::channel();
        let bytes = txs.iter().map(codec::encoded_len).sum();
        self.queue
            .send(PendingTxs { txs, bytes, reply })
            .await
            .map_err(|_| WriteError::Unavailable("the node is shutting down".into()))?;
        let written = answer.await.map_err(|_| {
            WriteError::OutcomeUnknown("the node shut down during the write".into())
        })?;
        self.metrics
            .write_seconds
            .observe(started.elapsed().as_secs_f64());
        written
    }

    /// Orders one command on its own (sites, tokens, publishes, rollbacks).
    pub async fn propose(&self, command: Command) -> Written {
        self.router.commit(command).await
    }
}

impl Router {
    /// Commits `command` through the current leader, waiting (boundedly) for one when there
    /// is none, and following a change of leader when the one asked refuses before writing.
    async fn commit(&self, command: Command) -> Written {
        let deadline = Instant::now() + Duration::from_millis(LEADER_WAIT_MS);
        loop {
            let view = self.raft.view();
            let result = match (view.leader, view.leader_member) {
                (Some(id), _) if id == view.id => {
                    propose_local(&self.raft.get(), command.clone()).await
                }
                (Some(id), Some(_)) => self.forward(id, command.clone()).await,
                _ => Err(WriteError::NoLeader),
            };
            match result {
                // Refused before anything was written: another leader may take it.
                Err(WriteError::NotLeader { .. } | WriteError::NoLeader)
                    if Instant::now() < deadline =>
                {
                    self.raft.changed(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Sends `command` to leader `id` over the peer link, then waits until this node has
    /// applied it.
    async fn forward(&self, id: NodeId, command: Command) -> Written {
        let request = PeerRequest::Propose(command);
        // A leader that dies does not answer; the rest of the cluster notices within an
        // election timeout and moves on, and so does this write.
        let deposed = async {
            loop {
                self.raft.changed(Duration::from_millis(100)).await;
                if self.raft.view().leader != Some(id) {
                    break;
                }
            }
        };
        let answer = tokio::select! {
            answer = self.link.to_leader(&request) => answer,
            () = deposed => {
                return Err(WriteError::OutcomeUnknown(format!(
                    "the leader (node {id}) was replaced before it answered"
                )))
            }
        };
        let (index, result) = match answer {
            Ok(PeerResponse::Proposed(outcome)) => outcome?,
            Ok(other) => return Err(WriteError::Unexpected(format!("{other:?}"))),
            Err(LinkError::NoLeader | LinkError::NotMember(_)) => return Err(WriteError::NoLeader),
            Err(LinkError::Transport(TransportError::TooLarge(e))) => {
                return Err(WriteError::Unavailable(format!(
                    "the entry is too large to forward: {e}"
                )))
            }
            Err(e) => {
                return Err(WriteError::OutcomeUnknown(format!(
                    "forwarding to the leader (node {id}) failed: {e}"
                )))
            }
        };
        let wait = Duration::from_millis(FORWARD_APPLY_WAIT_MS);
        if !self.reads.wait_applied(index, wait).await {
            tracing::warn!("committed index {index} is not applied here after {wait:?}");
        }
        Ok((index, result))
    }
}

/// On the leader: orders `command` through the local Raft and returns its log index and
/// what applying it did, once the entry is committed (durable on a quorum) and applied.
///
/// `NotLeader` and `NoLeader` mean nothing was written, and callers retry on them: they are
/// answered only when this node does not lead, before Raft sees the command. Raft's own
/// "forward to leader" comes back both when it turns a write away and when a newer leader
/// truncated the entry after it was appended here, and a truncated entry may still commit
/// from a copy on another node (with five voters or more: a majority that elects the newer
/// leader need not include every node that holds the copy, and a later leader may be one of
/// those). Openraft does not say which it was, so that answer is `OutcomeUnknown`.
pub async fn propose_local(raft: &Raft, command: Command) -> Written {
    let (me, state, leader) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        if let Err(e) = &m.running_state {
            return Err(WriteError::Unavailable(format!("raft has stopped: {e}")));
        }
        let leader = m
            .current_leader
            .and_then(|id| Some((id, m.membership_config.membership().get_node(&id)?.clone())));
        (m.id, m.state, leader)
    };
    if state != ServerState::Leader {
        return Err(match leader {
            Some((id, member)) if id != me => WriteError::NotLeader {
                id,
                addr: member.http,
            },
            _ => WriteError::NoLeader,
        });
    }
    let commit_wait = Duration::from_millis(COMMIT_WAIT_MS);
    let Ok(written) = tokio::time::timeout(commit_wait, raft.client_write(command)).await else {
        return Err(WriteError::OutcomeUnknown(format!(
            "the entry did not commit within {commit_wait:?}: this node may be cut off from \
             its followers"
        )));
    };
    match written {
        Ok(resp) => Ok((resp.log_id.index, resp.data)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            let to = f.leader_id.map_or_else(
                || "no leader known yet".to_string(),
                |id| format!("node {id}"),
            );
            Err(WriteError::OutcomeUnknown(format!(
                "leadership moved ({to}) while the write was in flight"
            )))
        }
        Err(RaftError::APIError(e)) => Err(WriteError::Unavailable(format!("cannot write: {e}"))),
        Err(RaftError::Fatal(e)) => {
            tracing::error!("raft stopped during a write: {e}");
            Err(WriteError::OutcomeUnknown(format!(
                "raft stopped while the write was in flight: {e}"
            )))
        }
    }
}

/// Group commit: takes every transaction queued while the previous entry was in flight (up
/// to the entry limits) and commits them as one [`Command::Txs`]. A lone writer gets an
/// entry of its own at once; many writers share entries, and fsyncs. Ends when the writer
/// is dropped.
async fn group_commit(
    router: Arc<Router>,
    mut queue: mpsc::Receiver<PendingTxs>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut next: Option<PendingTxs> = None;
    loop {
        let first = match next.take() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.bytes;
        let mut count = first.txs.len();
        let mut batch = vec![first];
        while count < TXS_PER_ENTRY_MAX && bytes < ENTRY_BYTES_MAX {
            match queue.try_recv() {
                // A group joins whole, or waits for the next entry.
                Ok(more) if count + more.txs.len() > TXS_PER_ENTRY_MAX => {
                    next = Some(more);
                    break;
                }
                Ok(more) => {
                    bytes += more.bytes;
                    count += more.txs.len();
                    batch.push(more);
                }
                Err(_) => break,
            }
        }
        metrics.write_batch.observe(count as f64);
        let mut txs = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(batch.len());
        for p in batch {
            replies.push((p.txs.len(), p.reply));
            txs.extend(p.txs);
        }
        match router.commit(Command::Txs(txs)).await {
            Ok((index, CommandResult::Txs(results))) if results.len() == count => {
                let mut results = results.into_iter();
                for (n, reply) in replies {
                    // A requester that went away (client disconnected) needs no answer.
                    let _ = reply.send(Ok((index, results.by_ref().take(n).collect())));
                }
            }
            Ok((_, other)) => {
                let e = WriteError::Unexpected(format!("{other:?}"));
                for (_, reply) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for (_, reply) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
