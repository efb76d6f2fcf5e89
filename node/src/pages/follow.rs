//! Every node serves the site versions its log has committed: this task follows the roots
//! the state machine applies and installs each new one in [`Pages`].
//!
//! On the leader the projector installs a version itself as soon as its root commits, so
//! here it is already in place and skipped. On a follower the version's files may not be in
//! its object store: with a shared store (S3, R2) the leader wrote them there; with per-node
//! folders (the default) the follower fetches the manifest, the chunks of its file tree and
//! every file it lacks from a peer over the cluster link, checks each against its hash,
//! stores it, and only then installs the version, so a reader never sees half a version on
//! any node. Chunks the served version has at the same place are reused, not read, so a
//! one-page edit costs a few chunks and one blob whatever the size of the site.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use sesame_projector::{content_hash, ChunkSource, Delta, Manifest, PublishError, Publisher};
use sesame_proto::LogIndex;
use sesame_sync::RootRecord;
use tokio_util::sync::CancellationToken;

use crate::pages::serve::Pages;
use crate::peer::link::Link;
use crate::peer::{ObjectKind, PeerRequest, PeerResponse};
use crate::reads::Reads;

/// Wait after a version could not be installed before trying again.
const RETRY_MS: u64 = 500;
/// Longest one fetch of an object from a peer may take.
const FETCH_TIMEOUT_MS: u64 = 10_000;

/// What the root follower needs.
pub struct Follower {
    pub reads: Reads,
    pub pages: Arc<Pages>,
    pub publisher: Arc<Publisher>,
    pub link: Arc<Link>,
    /// The object store is shared by every node (S3, R2): what the leader published is there.
    pub shared_store: bool,
}

impl Follower {
    /// Installs committed roots as they are applied, until `cancel` fires, starting after
    /// the root at log index `installed` (0: every site's current root).
    pub async fn run(self, installed: LogIndex, cancel: CancellationToken) {
        // Only entries that move a root or delete a site concern this task.
        let mut landmarks = self.reads.landmarks();
        let mut seen_root: LogIndex = installed;
        let mut handled: Option<LogIndex> = None;
        loop {
            if let Some(at) = handled {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = landmarks.wait_for(|l| l.roots_at > at) => if r.is_err() { return },
                }
            }
            let now = landmarks.borrow().roots_at;
            match self.catch_up(seen_root).await {
                Ok(root) => {
                    seen_root = root;
                    handled = Some(now);
                }
                Err(e) => {
                    tracing::warn!("install published versions: {e:#}; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(RETRY_MS)) => {}
                    }
                }
            }
        }
    }

    /// Installs the roots committed after log index `since`; returns the newest one seen.
    /// Stops at the first root that cannot be installed, so it is retried.
    pub async fn catch_up(&self, since: LogIndex) -> anyhow::Result<LogIndex> {
        let (roots, sites, applied) = self
            .reads
            .read(move |v| {
                let sites: std::collections::HashSet<String> =
                    v.sites()?.into_iter().map(|s| s.name).collect();
                Ok((v.roots_since(since)?, sites, v.applied_index()?))
            })
            .await
            .context("read committed roots")?;
        // A deleted site stops being served here too.
        for site in self.pages.served_sites() {
            if !sites.contains(&site) {
                self.pages.remove(&site, applied);
            }
        }
        let mut seen = since;
        for root in roots {
            if self.pages.root_log_index(&root.site) < root.log_index {
                // Garbage collection waits until the version is installed (see gc.rs).
                let _pin = self.publisher.pin().await;
                let manifest = self.fetch_version(&root).await.with_context(|| {
                    format!(
                        "install version {} of site {} (root at log index {})",
                        root.index, root.site, root.log_index
                    )
                })?;
                self.pages.install(Arc::new(manifest), root.log_index);
            }
            seen = root.log_index;
        }
        Ok(seen)
    }

    /// Makes sure the manifest a root names, and every file in it, are in this node's
    /// object store; returns the manifest.
    async fn fetch_version(&self, root: &RootRecord) -> anyhow::Result<Manifest> {
        self.ensure_version(&root.site, &root.manifest).await
    }

    /// Makes sure manifest `id` of `site`, every chunk of its file tree and every file it
    /// names are in this node's object store (fetched from peers when this node has a
    /// folder of its own); returns the manifest. Only what differs from the version served
    /// now is looked for: its chunks are reused in memory, unread, and its files are there.
    /// The caller pins the publisher while it relies on the files.
    pub async fn ensure_version(&self, site: &str, id: &str) -> anyhow::Result<Manifest> {
        if !self.shared_store {
            match self.publisher.get_manifest_bytes(site, id).await {
                Ok(_) => {}
                Err(PublishError::NotFound { .. }) => {
                    let bytes = self.fetch(site, ObjectKind::Manifest, id).await?;
                    self.publisher.put_manifest_bytes(site, id, bytes).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let served = self.pages.manifest(site);
        let manifest = self
            .publisher
            .get_manifest_with(site, id, served.as_deref(), &PeerChunks(self))
            .await?;
        if self.shared_store {
            return Ok(manifest);
        }
        // Only files that differ from the version served now can be missing.
        let delta = match &served {
            Some(served) => Delta::between(&served.files, &manifest.files),
            None => Delta {
                added: manifest.files.keys().cloned().collect(),
                ..Delta::default()
            },
        };
        let wanted: BTreeSet<&str> = delta
            .added
            .iter()
            .chain(&delta.changed)
            .filter_map(|path| manifest.files.get(path))
            .map(|f| f.hash.as_str())
            .collect();
        for hash in wanted {
            if self.publisher.has_blob(site, hash).await? {
                continue;
            }
            let bytes = self.fetch(site, ObjectKind::Blob, hash).await?;
            self.publisher
                .put_blobs(site, &[(hash.to_string(), bytes)])
                .await?;
        }
        Ok(manifest)
    }

    /// Fetches one object from the leader, or else from any other member that has it; its
    /// bytes are checked against `hash` before they are returned.
    async fn fetch(&self, site: &str, kind: ObjectKind, hash: &str) -> anyhow::Result<Bytes> {
        let request = PeerRequest::FetchObject {
            site: site.to_string(),
            kind,
            hash: hash.to_string(),
        };
        let timeout = Duration::from_millis(FETCH_TIMEOUT_MS);
        // The leader published it; any other member may have fetched it since.
        let me = self.link.self_id();
        let leader = self.link.leader_id();
        let mut candidates: Vec<_> = leader.into_iter().collect();
        for (id, _) in self.link.members() {
            if id != me && Some(id) != leader {
                candidates.push(id);
            }
        }
        let mut tried = Vec::new();
        for id in candidates.into_iter().filter(|id| *id != me) {
            match self.link.to_member(id, &request, timeout).await {
                Ok(PeerResponse::Object(Some(bytes))) => {
                    let actual = content_hash(&bytes);
                    anyhow::ensure!(
                        actual == hash,
                        "node {id} sent {kind:?} {hash} of site {site} with bytes hashing to {actual}"
                    );
                    return Ok(Bytes::from(bytes));
                }
                Ok(PeerResponse::Object(None)) => tried.push(format!("node {id}: not there")),
                Ok(other) => tried.push(format!("node {id}: unexpected answer {other:?}")),
                Err(e) => tried.push(format!("node {id}: {e}")),
            }
        }
        anyhow::bail!(
            "no peer has {kind:?} {hash} of site {site}: {}",
            tried.join("; ")
        )
    }
}

/// A follower's chunks: from this node's store, else fetched from a peer (hash-checked) and
/// stored.
struct PeerChunks<'a>(&'a Follower);

impl ChunkSource for PeerChunks<'_> {
    fn chunk<'a>(
        &'a self,
        site: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Bytes, PublishError>> {
        Box::pin(async move {
            let follower = self.0;
            match follower.publisher.get_chunk_bytes(site, id).await {
                Err(PublishError::NotFound { .. }) if !follower.shared_store => {}
                other => return other,
            }
            let bytes = follower
                .fetch(site, ObjectKind::Chunk, id)
                .await
                .map_err(|e| PublishError::Fetch {
                    what: format!("chunk {id} of site {site}"),
                    reason: format!("{e:#}"),
                })?;
            follower
                .publisher
                .put_chunk_bytes(site, id, bytes.clone())
                .await?;
            Ok(bytes)
        })
    }
}
