//! Garbage collection of published files: blobs, tree chunks and manifests that no retained
//! version needs are deleted.
//!
//! What a site retains is decided through the log: the leader prunes each site's history
//! (`Command::PruneVersions`) to the newest [`HistoryConfig::keep`] versions, and never
//! prunes a version younger than [`HistoryConfig::max_age`] or the one the root names.
//! A pruned version can no longer be rolled back to (the state machine refuses it), so after
//! the prune no command can bring its files back into use.
//!
//! Then every node that owns a store sweeps it (each node its own folder; with a shared
//! store, the leader): a file may go only when no retained version reaches it (its manifest,
//! every chunk of its file tree, every blob a leaf names) — the root's,
//! the history's, live previews', and the version this node serves right now (a follower
//! may still serve an older one) — and it was written more than [`HistoryConfig::grace`]
//! ago. The decision and the deletes happen under [`Publisher::exclusive`], which waits for
//! every publish, follower install, preview and backup in flight ([`Publisher::pin`]): a
//! publish that skipped writing a blob because it was present cannot commit a version
//! naming it while the blob is being judged unused.
//!
//! A sweep reads every retained manifest, so a site is swept only when its retained set
//! changed since its last sweep on this node (and once after start-up). Versions share most
//! of their chunks: each is read on top of the one read before it (unchanged chunks are not
//! read again) and a subtree already referenced is not walked again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sesame_projector::{FileTree, Manifest, ObjectKind, PublishError, Publisher};
use sesame_proto::{Command, CommandResult};
use tokio_util::sync::CancellationToken;

use crate::app::now_ms;
use crate::pages::serve::Pages;
use crate::raft::RaftHandle;
use crate::reads::Reads;
use crate::write::Writer;

/// Versions of each site kept in the history by default.
pub const HISTORY_KEEP_DEFAULT: usize = 100;
/// Versions younger than this many days are kept by default, however many there are.
pub const HISTORY_DAYS_DEFAULT: u64 = 30;
/// Files written less than this long ago are never collected (by default): a margin for
/// writers outside this process, such as a deposed leader on a shared store.
pub const GRACE_SECS_DEFAULT: u64 = 3_600;
/// Time between two collections by default.
pub const INTERVAL_SECS_DEFAULT: u64 = 600;
/// Most objects deleted in one call to the store.
const DELETE_BATCH_MAX: usize = 1_000;

/// How much history is kept and how often files are collected.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Newest versions of each site that stay in its history.
    pub keep: usize,
    /// Versions younger than this stay in the history, however many there are.
    pub max_age: Duration,
    /// Files younger than this are never collected.
    pub grace: Duration,
    /// Time between two collections.
    pub interval: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            keep: HISTORY_KEEP_DEFAULT,
            max_age: Duration::from_secs(HISTORY_DAYS_DEFAULT * 24 * 3600),
            grace: Duration::from_secs(GRACE_SECS_DEFAULT),
            interval: Duration::from_secs(INTERVAL_SECS_DEFAULT),
        }
    }
}

/// What one sweep of one site did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub blobs: usize,
    pub chunks: usize,
    pub manifests: usize,
    /// Unreferenced files kept because they are younger than the grace period.
    pub young: usize,
}

pub struct Collector {
    pub reads: Reads,
    pub publisher: Arc<Publisher>,
    pub pages: Arc<Pages>,
    pub raft: Arc<RaftHandle>,
    pub writer: Arc<Writer>,
    /// The store is shared by every node: only the leader sweeps it.
    pub shared_store: bool,
    pub config: HistoryConfig,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Collector {
    /// Prunes and sweeps every so often until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        // Each site's retained manifests at its last sweep: unchanged means nothing new
        // to collect.
        let mut last: HashMap<String, BTreeSet<String>> = HashMap::new();
        loop {
            if let Err(e) = self.collect(&mut last).await {
                tracing::warn!("garbage collection: {e:#}; retrying later");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.config.interval) => {}
            }
        }
    }

    /// One pass over every site: prune (leader), then sweep (owner of the store).
    pub async fn collect(
        &self,
        last: &mut HashMap<String, BTreeSet<String>>,
    ) -> anyhow::Result<()> {
        let leader = self.raft.view().is_leader();
        if leader {
            self.prune().await?;
        }
        if self.shared_store && !leader {
            return Ok(());
        }
        let sites: Vec<String> = self
            .reads
            .read(|v| Ok(v.sites()?.into_iter().map(|s| s.name).collect()))
            .await?;
        last.retain(|site, _| sites.contains(site));
        for site in sites {
            let name = site.clone();
            let now = now_ms();
            let mut retained = self
                .reads
                .read(move |v| v.retained_manifests(&name, now))
                .await?;
            if let Some(served) = self.pages.manifest(&site) {
                retained.insert(served.id());
            }
            if last.get(&site) == Some(&retained) {
                continue;
            }
            let swept = self
                .sweep(&site)
                .await
                .with_context(|| format!("sweep site {site}"))?;
            if swept.young == 0 {
                last.insert(site, retained);
            }
        }
        Ok(())
    }

    /// Proposes the prune of every site whose history reaches past the retention.
    async fn prune(&self) -> anyhow::Result<()> {
        let keep = self.config.keep;
        let cutoff = now_ms().saturating_sub(self.config.max_age.as_millis() as u64);
        let due = self
            .reads
            .read(move |v| {
                let mut due = Vec::new();
                for site in v.sites()? {
                    if let Some(before) = v.prune_cut(&site.name, keep, cutoff)? {
                        due.push((site.name, before));
                    }
                }
                Ok(due)
            })
            .await?;
        for (site, before) in due {
            let (_, result) = self
                .writer
                .propose(Command::PruneVersions {
                    site: site.clone(),
                    before,
                })
                .await?;
            match result {
                CommandResult::VersionsPruned { removed } => {
                    tracing::info!("site {site}: {removed} versions older than log index {before} left the history");
                }
                CommandResult::UnknownSite { .. } => {}
                other => anyhow::bail!("prune the history of {site}: unexpected result {other:?}"),
            }
        }
        Ok(())
    }

    /// Deletes the files of `site` that no retained manifest names.
    pub async fn sweep(&self, site: &str) -> anyhow::Result<Swept> {
        let listed = self.publisher.list_objects(site).await?;
        let young_after = now_ms().saturating_sub(self.config.grace.as_millis() as u64);
        // Judge unused files without holding anything up, then again under the exclusive
        // guard for what changed meanwhile.
        let (mut referenced, mut seen) = (HashSet::new(), BTreeSet::new());
        self.reference(site, &mut referenced, &mut seen).await?;
        let unused = |referenced: &HashSet<(ObjectKind, String)>| -> Vec<_> {
            listed
                .iter()
                .filter(|o| !referenced.contains(&(o.kind, o.name.clone())))
                .cloned()
                .collect()
        };
        if unused(&referenced).is_empty() {
            return Ok(Swept::default());
        }
        let _exclusive = self.publisher.exclusive().await;
        self.reference(site, &mut referenced, &mut seen).await?;
        let mut swept = Swept::default();
        let mut doomed = Vec::new();
        for o in unused(&referenced) {
            if o.last_modified_ms > young_after {
                swept.young += 1;
                continue;
            }
            match o.kind {
                ObjectKind::Blob => swept.blobs += 1,
                ObjectKind::Chunk => swept.chunks += 1,
                ObjectKind::Manifest => swept.manifests += 1,
            }
            doomed.push((o.kind, o.name));
        }
        for batch in doomed.chunks(DELETE_BATCH_MAX) {
            self.publisher.delete_objects(site, batch).await?;
        }
        let deleted = swept.blobs + swept.chunks + swept.manifests;
        if deleted > 0 {
            tracing::info!(
                "site {site}: collected {} blobs, {} chunks and {} manifests no retained version uses",
                swept.blobs,
                swept.chunks,
                swept.manifests
            );
            self.metrics.gc_objects_deleted.inc_by(deleted as u64);
        }
        Ok(swept)
    }

    /// Adds to `referenced` the chunks and files of every manifest `site` retains now that
    /// is not in `seen` yet (the manifests themselves included).
    async fn reference(
        &self,
        site: &str,
        referenced: &mut HashSet<(ObjectKind, String)>,
        seen: &mut BTreeSet<String>,
    ) -> anyhow::Result<()> {
        let name = site.to_string();
        let now = now_ms();
        let retained = self
            .reads
            .read(move |v| v.retained_manifests(&name, now))
            .await?;
        let served = self.pages.manifest(site);
        if let Some(served) = &served {
            let id = served.id();
            if seen.insert(id.clone()) {
                referenced.insert((ObjectKind::Manifest, id));
                reference_tree(&served.files, referenced);
            }
        }
        // Each version is read on top of the last one read: shared chunks are reused.
        let mut base: Option<Arc<Manifest>> = served;
        for id in retained {
            if seen.contains(&id) {
                continue;
            }
            referenced.insert((ObjectKind::Manifest, id.clone()));
            match self
                .publisher
                .get_manifest(site, &id, base.as_deref())
                .await
            {
                Ok(m) => {
                    reference_tree(&m.files, referenced);
                    base = Some(Arc::new(m));
                }
                // Not in this node's store (the manifest or a chunk): a follower that needs
                // it (a rollback) fetches it and then every file it lacks, pinned, so
                // deleting its files now only means fetching them then. Looked for again
                // under the exclusive guard.
                Err(PublishError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
            seen.insert(id);
        }
        Ok(())
    }
}

/// Adds every chunk of `files` and every blob its leaves name to `referenced`, skipping the
/// subtrees of chunks referenced already (the same id is the same subtree).
fn reference_tree(files: &FileTree, referenced: &mut HashSet<(ObjectKind, String)>) {
    let mut blobs = Vec::new();
    files.walk(
        &mut |chunk| referenced.insert((ObjectKind::Chunk, chunk.to_string())),
        &mut |_, f| blobs.push(f.hash.clone()),
    );
    referenced.extend(blobs.into_iter().map(|hash| (ObjectKind::Blob, hash)));
}
