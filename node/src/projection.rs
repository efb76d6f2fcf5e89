//! The projection loop: committed changes become published site versions.
//!
//! It follows the state machine's applied index. Rounds are throttled: a commit that finds
//! the projector idle is rendered at once, and commits arriving within the debounce window
//! after a round are coalesced into the next one (so a burst costs at most two renders per
//! affected page, however long it is). Each round opens one consistent snapshot of the
//! tuple store, reads the change feed since the last round, and asks each affected site's
//! [`SiteProjector`] to re-render what those keys touched. Each changed site version is
//! published in order: blobs and manifest to the object store, then the new root through the
//! Raft log (compare-and-set on the previous root, so a deposed or stale projector cannot
//! publish), then the served version is swapped in memory and the root mirrored to the
//! object store for edge readers. Only then does the projected index move, which releases
//! `Sesame-Min-Index` waits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use sesame_projector::sandbox::RenderPool;
use sesame_projector::{
    ChangedKey, Config as RenderConfig, Projection, Publisher, Renderer, Root, SiteProjector,
    Source, SourceError, TemplateError,
};
use sesame_proto::{Command, CommandResult, LogIndex, Publish, Tuple};
use sesame_sync::{StoreError, View, CHANGES_LIMIT_MAX};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::node::{now_ms, Node};

/// The shortest time between the starts of two rounds that render: commits arriving within
/// it after a round wait for the window to end and are rendered together.
pub const DEBOUNCE_MS_DEFAULT: u64 = 20;
/// Wait after a failed round before trying again.
const RETRY_MS: u64 = 500;
/// Most changed keys one round collects for one site; past it the site renders from scratch
/// (which reads everything anyway) instead of holding the key list.
const CHANGED_KEYS_PER_SITE_MAX: usize = 200_000;

/// How sites are projected.
#[derive(Debug, Clone)]
pub struct ProjectionConfig {
    pub debounce: Duration,
    /// Public URL of this node (`http://127.0.0.1:7700`); in path mode a site lives under
    /// `<public_url>/<site>`.
    pub public_url: String,
    /// Subdomain mode: a site lives at `<scheme>://<site>.<domain>`.
    pub domain: Option<String>,
    /// Where every site's pages render (worker processes that bound memory and time).
    pub render_pool: Arc<RenderPool>,
}

impl ProjectionConfig {
    /// The site's public URL, which canonical links, the sitemap and robots.txt use.
    pub fn base_url(&self, site: &str) -> String {
        let public = self.public_url.trim_end_matches('/');
        match &self.domain {
            Some(domain) => {
                let scheme = public
                    .split("://")
                    .next()
                    .filter(|s| *s != public)
                    .unwrap_or("https");
                format!("{scheme}://{site}.{domain}")
            }
            None => format!("{public}/{site}"),
        }
    }
}

/// What `GET /v1/sites/{site}/status` reports about the projection of one site.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SiteProjection {
    /// HTML pages in the current version.
    pub pages: u64,
    /// Page renders since this node started.
    pub pages_rendered_total: u64,
    pub last_publish_at: Option<u64>,
    /// Render plus publish time of the last published version.
    pub last_publish_ms: Option<u64>,
    /// The first standing problem, if any (`{ template, line, message }`).
    pub last_error: Option<TemplateError>,
    /// Every standing problem (bounded by the projector).
    pub errors: Vec<TemplateError>,
}

/// A site's projector; touched only by the projection task.
struct SiteState {
    projector: SiteProjector,
    /// Rendered at least once since this node started (else the next round renders all).
    rendered: bool,
}

/// A site version ready to publish, made in the blocking half of a round.
struct Output {
    site: String,
    projection: Projection,
    /// The root this version replaces, as the snapshot saw it.
    expected: Option<String>,
    render_ms: u64,
}

/// The projector of every site on this node.
pub struct Projections {
    config: ProjectionConfig,
    publisher: Arc<Publisher>,
    /// Locked for a whole render; only the projection task takes it.
    sites: Mutex<HashMap<String, SiteState>>,
    /// What status requests read; locked only briefly.
    statuses: Mutex<HashMap<String, SiteProjection>>,
    rebuild: Mutex<BTreeSet<String>>,
    wake: Notify,
}

/// A site's tuples at one snapshot, for the renderer.
struct SiteSource<'v> {
    view: View<'v>,
    site: &'v str,
}

impl Source for SiteSource<'_> {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Tuple>, SourceError> {
        self.view
            .get(self.site, collection, key)
            .map_err(SourceError::new)
    }

    fn list(
        &self,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Tuple>, SourceError> {
        self.view
            .scan(self.site, collection, prefix, None, limit)
            .map_err(SourceError::new)
    }
}

impl Projections {
    pub fn new(config: ProjectionConfig, publisher: Arc<Publisher>) -> Projections {
        Projections {
            config,
            publisher,
            sites: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            rebuild: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
        }
    }

    /// The projection status of a site this node has projected.
    pub fn status(&self, site: &str) -> Option<SiteProjection> {
        self.statuses
            .lock()
            .expect("statuses lock poisoned")
            .get(site)
            .cloned()
    }

    /// Asks for `site` to be rendered from scratch in the next round.
    pub fn request_rebuild(&self, site: &str) {
        self.rebuild
            .lock()
            .expect("rebuild lock poisoned")
            .insert(site.to_string());
        self.wake.notify_one();
    }

    /// Runs rounds until `cancel` fires. The first round renders every site from scratch
    /// (the projector keeps its dependency index in memory).
    pub async fn run(self: Arc<Self>, node: Arc<Node>, cancel: CancellationToken) {
        let mut applied = node.applied();
        let mut projected: LogIndex = 0;
        // When the last round that rendered something started.
        let mut last_render: Option<Instant> = None;
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = applied.wait_for(|a| *a > projected) => if r.is_err() { return },
                    _ = self.wake.notified() => {}
                }
                let since = last_render.map_or(self.config.debounce, |at| at.elapsed());
                if since < self.config.debounce {
                    tokio::time::sleep(self.config.debounce - since).await;
                }
            }
            first = false;
            let started = Instant::now();
            match self.round(&node, projected).await {
                Ok((index, rendered)) => {
                    projected = index;
                    node.pages.set_projected(index);
                    if rendered {
                        last_render = Some(started);
                    }
                }
                Err(e) => {
                    tracing::error!("projection round failed, retrying: {e:#}");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(RETRY_MS)) => {}
                    }
                }
            }
        }
    }

    /// One round: everything committed after `since`, up to the snapshot's applied index,
    /// which it returns, with whether any site rendered.
    async fn round(
        self: &Arc<Self>,
        node: &Arc<Node>,
        since: LogIndex,
    ) -> anyhow::Result<(LogIndex, bool)> {
        self.adopt_published(node).await?;
        let rebuild = std::mem::take(&mut *self.rebuild.lock().expect("rebuild lock poisoned"));
        let me = self.clone();
        let (index, rendered, outputs) = node
            .read(move |view| me.render(view, since, &rebuild))
            .await
            .map_err(|e| anyhow::anyhow!("render: {}", e.message))?;
        // A site whose version was rendered but not published must not keep that state:
        // its next incremental render would find nothing new and never publish it. So every
        // site whose publish fails is forgotten, and the next round adopts its committed
        // root and renders it from scratch. Other sites publish independently.
        let mut failed = 0;
        for out in outputs {
            let site = out.site.clone();
            if let Err(e) = self.publish(node, out).await {
                self.sites
                    .lock()
                    .expect("projections lock poisoned")
                    .remove(&site);
                tracing::error!("publish site {site}: {e:#}");
                failed += 1;
            }
        }
        anyhow::ensure!(failed == 0, "{failed} site(s) failed to publish");
        Ok((index, rendered))
    }

    /// Gives sites this projector has no state for (all of them after start-up) their
    /// published manifest, so unchanged files keep their hashes and deltas stay small.
    async fn adopt_published(&self, node: &Node) -> anyhow::Result<()> {
        let sites = node
            .read(|v| v.sites())
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        for site in sites {
            if self
                .sites
                .lock()
                .expect("projections lock poisoned")
                .contains_key(&site.name)
            {
                continue;
            }
            let name = site.name.clone();
            let root = node
                .read(move |v| v.root(&name))
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            let mut render = RenderConfig::new(self.config.base_url(&site.name));
            render.renderer = Renderer::Pool(Arc::clone(&self.config.render_pool));
            let mut projector = SiteProjector::new(&site.name, render);
            if let Some(root) = root {
                let manifest = self
                    .publisher
                    .get_manifest(&site.name, &root.manifest)
                    .await
                    .with_context(|| {
                        format!("read the published manifest of site {}", site.name)
                    })?;
                projector.adopt(manifest);
            }
            let state = SiteState {
                projector,
                rendered: false,
            };
            self.sites
                .lock()
                .expect("projections lock poisoned")
                .insert(site.name, state);
        }
        Ok(())
    }

    /// The blocking half of a round: read the feed and render, in one snapshot.
    fn render(
        &self,
        view: View<'_>,
        since: LogIndex,
        rebuild: &BTreeSet<String>,
    ) -> Result<(LogIndex, bool, Vec<Output>), StoreError> {
        let index = view.applied_index()?;
        let mut changed: BTreeMap<String, Vec<ChangedKey>> = BTreeMap::new();
        let mut cursor = since;
        while cursor < index {
            let page = view.changes(None, cursor, CHANGES_LIMIT_MAX)?;
            for c in page.changes {
                let keys = changed.entry(c.site).or_default();
                if keys.len() < CHANGED_KEYS_PER_SITE_MAX {
                    keys.push(ChangedKey::new(c.collection, c.key));
                }
            }
            assert!(
                page.next_since > cursor || page.next_since >= index,
                "change feed did not advance"
            );
            cursor = page.next_since;
        }

        let mut outputs = Vec::new();
        let mut rendered = false;
        let mut sites = self.sites.lock().expect("projections lock poisoned");
        for (name, state) in sites.iter_mut() {
            let keys = changed.get(name.as_str());
            let from_scratch = !state.rendered
                || rebuild.contains(name)
                || keys.is_some_and(|k| k.len() >= CHANGED_KEYS_PER_SITE_MAX);
            if !from_scratch && keys.is_none() {
                continue;
            }
            let src = SiteSource { view, site: name };
            let started = Instant::now();
            rendered = true;
            let result = if from_scratch {
                state.projector.render_all(&src, index)
            } else {
                state
                    .projector
                    .render_changes(&src, index, keys.map(Vec::as_slice).unwrap_or(&[]))
            };
            let projection = match result {
                Ok(p) => p,
                Err(e) => {
                    // The store failed under the renderer: nothing is published, and the
                    // projector starts over next round.
                    tracing::error!("render site {name}: {e:#}");
                    state.rendered = false;
                    continue;
                }
            };
            state.rendered = true;
            let errors = state.projector.errors();
            {
                let mut statuses = self.statuses.lock().expect("statuses lock poisoned");
                let status = statuses.entry(name.clone()).or_default();
                status.pages_rendered_total += projection.pages_rendered;
                status.last_error = errors.first().cloned();
                status.errors = errors;
            }
            if projection.changed {
                outputs.push(Output {
                    site: name.clone(),
                    expected: view.root(name)?.map(|r| r.manifest),
                    projection,
                    render_ms: started.elapsed().as_millis() as u64,
                });
            }
        }
        Ok((index, rendered, outputs))
    }

    /// Publishes one site version: files, manifest, root through Raft, served version, mirror.
    async fn publish(&self, node: &Node, out: Output) -> anyhow::Result<()> {
        let started = Instant::now();
        let Output {
            site,
            projection,
            expected,
            render_ms,
        } = out;
        let manifest = projection.manifest.clone();
        let id = self.publisher.publish(&projection).await?;
        let command = Command::Publish(Publish {
            site: site.clone(),
            manifest: id.clone(),
            index: manifest.index,
            files: manifest.files.len() as u64,
            published_at_ms: now_ms(),
            expected,
            rollback: false,
        });
        let (root_log_index, result) = node
            .propose(command)
            .await
            .map_err(|e| anyhow::anyhow!("commit root: {}", e.message))?;
        match result {
            CommandResult::Published => {}
            CommandResult::RootMoved { current } => {
                // Someone else moved the root (a rollback): start over from it.
                anyhow::bail!("root moved to {current:?} meanwhile; re-projecting from it");
            }
            other => anyhow::bail!("commit root: unexpected result {other:?}"),
        }
        for (hash, body) in &projection.new_blobs {
            node.pages.prime(hash, body.clone());
        }
        node.pages.install(manifest.clone(), root_log_index);
        let root = Root {
            manifest: id,
            index: manifest.index,
        };
        if let Err(e) = self.publisher.mirror_root(&site, &root).await {
            // The Raft log holds the truth; the mirror is for edge readers and is rewritten
            // by the next publish.
            tracing::warn!("mirror root of site {site}: {e:#}");
        }
        let pages = manifest
            .files
            .iter()
            .filter(|(path, f)| {
                f.content_type.starts_with("text/html")
                    && path.as_str() != sesame_projector::NOT_FOUND_PATH
            })
            .count() as u64;
        let mut statuses = self.statuses.lock().expect("statuses lock poisoned");
        let status = statuses.entry(site).or_default();
        status.pages = pages;
        status.last_publish_at = Some(now_ms());
        status.last_publish_ms = Some(render_ms + started.elapsed().as_millis() as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let unused = sesame_projector::sandbox::WorkerCommand::new("unused");
        let path = ProjectionConfig {
            debounce: Duration::ZERO,
            public_url: "http://127.0.0.1:7700/".into(),
            domain: None,
            render_pool: Arc::new(RenderPool::new(sesame_projector::sandbox::PoolConfig::new(
                unused,
            ))),
        };
        assert_eq!(path.base_url("demo"), "http://127.0.0.1:7700/demo");
        let sub = ProjectionConfig {
            domain: Some("example.com".into()),
            public_url: "https://example.com".into(),
            ..path.clone()
        };
        assert_eq!(sub.base_url("demo"), "https://demo.example.com");
    }
}
