//! Removes the published files of deleted sites once their retention has passed, and
//! compacts change feeds whose tombstones pile up.
//!
//! A delete leaves a tombstone so that readers of the change feed (app clients catching up,
//! `GET /changes`) learn of it. A site keeps its newest [`TOMBSTONES_KEEP`] tombstones; past
//! twice that, the leader proposes `Command::CompactFeed` for the older ones, and a reader
//! from before the new feed horizon reads the site's tuples whole instead.
//!
//! Deleting a site removes its data at once (one Raft command) and stops serving it; its
//! blobs, manifests and root mirror stay in the object store for the retention period, so a
//! mistaken deletion can still be recovered by hand. Afterwards this task removes the
//! `sites/<site>/` prefix — unless the name was taken again meanwhile (the store then
//! forgets the deletion: the new site may publish the same blobs). With per-node folders
//! every node cleans its own; with a shared store (S3, R2) the leader does.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sesame_projector::Publisher;
use sesame_proto::LogIndex;
use tokio_util::sync::CancellationToken;

use crate::app::now_ms;
use crate::raft::RaftHandle;
use crate::reads::Reads;

/// Shortest and longest time between two looks at the deleted sites.
const INTERVAL_MS_MIN: u64 = 100;
const INTERVAL_MS_MAX: u64 = 600_000;
/// How long deleted sites' files are kept by default: a week.
pub const RETENTION_HOURS_DEFAULT: u64 = 7 * 24;
/// Tombstones a site keeps after a compaction; one starts past twice this many.
pub const TOMBSTONES_KEEP: usize = 100_000;
/// Longest between two looks at the sites' tombstones.
const COMPACT_INTERVAL_MS: u64 = 60_000;

pub struct Janitor {
    pub reads: Reads,
    pub publisher: Arc<Publisher>,
    pub raft: Arc<RaftHandle>,
    /// The store is shared by every node: only the leader cleans it.
    pub shared_store: bool,
    pub retention: Duration,
    pub writer: Arc<crate::write::Writer>,
}

impl Janitor {
    /// Looks for deleted sites past their retention, every so often, until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let interval = Duration::from_millis(
            (self.retention.as_millis() as u64 / 4)
                .clamp(INTERVAL_MS_MIN, INTERVAL_MS_MAX)
                .min(COMPACT_INTERVAL_MS),
        );
        // Deletions (by the log index that made them) whose files this node removed.
        let mut removed: HashSet<(String, LogIndex)> = HashSet::new();
        loop {
            if !self.shared_store || self.raft.view().is_leader() {
                if let Err(e) = self.sweep(&mut removed).await {
                    tracing::warn!("remove deleted sites' files: {e:#}; retrying later");
                }
            }
            if self.raft.view().is_leader() {
                if let Err(e) = self.compact().await {
                    tracing::warn!("compact change feeds: {e:#}; retrying later");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Compacts the feed of every site holding more than twice [`TOMBSTONES_KEEP`]
    /// tombstones down to that many.
    async fn compact(&self) -> anyhow::Result<()> {
        let due = self
            .reads
            .read(|v| {
                let mut due = Vec::new();
                for site in v.sites()? {
                    let (count, cut) = v.tombstones(&site.name, TOMBSTONES_KEEP)?;
                    if count as usize > 2 * TOMBSTONES_KEEP {
                        if let Some(before) = cut {
                            due.push((site.name, before));
                        }
                    }
                }
                Ok(due)
            })
            .await?;
        for (site, before) in due {
            let (_, result) = self
                .writer
                .propose(sesame_proto::Command::CompactFeed {
                    site: site.clone(),
                    before,
                })
                .await?;
            tracing::info!("compacted the change feed of {site} below {before}: {result:?}");
        }
        Ok(())
    }

    async fn sweep(&self, removed: &mut HashSet<(String, LogIndex)>) -> anyhow::Result<()> {
        let cutoff = now_ms().saturating_sub(self.retention.as_millis() as u64);
        let due = self.reads.read(move |v| v.deleted_sites(cutoff)).await?;
        for (site, deleted_at) in due {
            if removed.contains(&(site.clone(), deleted_at)) {
                continue;
            }
            let n = self.publisher.remove_site(&site).await?;
            tracing::info!("removed {n} published files of deleted site {site}");
            removed.insert((site, deleted_at));
        }
        Ok(())
    }
}
