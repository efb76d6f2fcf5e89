//! The change feed, read once for all client sessions: when the applied index moves, one
//! read of the store's change feed since the last batch, handed to every session's bounded
//! queue. A full queue drops the batch for that session only (its session sees the gap and
//! resyncs its subscriptions); the feed never waits for a session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sesame_proto::LogIndex;
use sesame_sync::server::Batch;
use sesame_sync::CHANGES_LIMIT_MAX;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::reads::Reads;

/// Batches a session may have waiting; past this it loses them and resyncs.
pub const SESSION_QUEUE_MAX: usize = 1_024;

/// The fan-out of applied changes to sessions.
pub struct Feed {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Every change up to here has been handed out.
    at: LogIndex,
    next_id: u64,
    sessions: HashMap<u64, mpsc::Sender<Arc<Batch>>>,
}

/// A session's place in the feed; it leaves the feed when dropped.
pub struct Membership {
    feed: Arc<Feed>,
    id: u64,
    /// Batches for this session start here.
    pub at: LogIndex,
    pub batches: mpsc::Receiver<Arc<Batch>>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.feed
            .inner
            .lock()
            .expect("feed lock poisoned")
            .sessions
            .remove(&self.id);
    }
}

impl Feed {
    pub fn new(at: LogIndex) -> Arc<Feed> {
        Arc::new(Feed {
            inner: Mutex::new(Inner {
                at,
                next_id: 0,
                sessions: HashMap::new(),
            }),
        })
    }

    /// Joins the feed: batches after `Membership::at` will come.
    pub fn join(self: &Arc<Feed>) -> Membership {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE_MAX);
        let mut inner = self.inner.lock().expect("feed lock poisoned");
        let id = inner.next_id;
        inner.next_id += 1;
        inner.sessions.insert(id, tx);
        Membership {
            feed: self.clone(),
            id,
            at: inner.at,
            batches: rx,
        }
    }

    /// How many sessions follow the feed.
    pub fn sessions(&self) -> usize {
        self.inner
            .lock()
            .expect("feed lock poisoned")
            .sessions
            .len()
    }

    /// Follows the applied index until `cancel`, handing out each batch of changes.
    pub async fn run(self: Arc<Feed>, reads: Reads, cancel: CancellationToken) {
        let mut applied = reads.applied();
        loop {
            let target = *applied.borrow_and_update();
            let (at, idle) = {
                let mut inner = self.inner.lock().expect("feed lock poisoned");
                let idle = inner.sessions.is_empty();
                if idle {
                    // Nobody to tell: skip ahead without reading.
                    inner.at = inner.at.max(target);
                }
                (inner.at, idle)
            };
            if target > at && !idle {
                if let Err(e) = self.step(&reads, at).await {
                    tracing::warn!("client feed: read changes after {at}: {e}");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    }
                    continue;
                }
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = applied.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Reads one page of changes after `from` and hands it out.
    async fn step(&self, reads: &Reads, from: LogIndex) -> Result<(), String> {
        let page = reads
            .read(move |v| v.changes(None, from, CHANGES_LIMIT_MAX))
            .await
            .map_err(|e| e.to_string())?;
        let batch = Arc::new(Batch {
            from,
            through: page.next_since,
            changes: page.changes,
        });
        let mut inner = self.inner.lock().expect("feed lock poisoned");
        if inner.at != from {
            return Ok(()); // skipped ahead meanwhile (no sessions): read again from there
        }
        inner.at = batch.through;
        // A session whose queue is full misses this batch; it notices the gap itself.
        inner.sessions.retain(|_, tx| {
            !matches!(
                tx.try_send(batch.clone()),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
        Ok(())
    }
}
