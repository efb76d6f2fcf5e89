//! The projection loop: committed changes become published site versions.
//!
//! Every site is projected by a task of its own, so one site's slow renders never hold up
//! another's (the render pool interleaves the pages of concurrent sites). A dispatcher
//! follows the state machine's applied index and tells each site that a commit touched the
//! index of its newest change; it also starts a task for every new site and ends the task of
//! a deleted one.
//!
//! A site's rounds work the way group commit does: a round starts as soon as there is work
//! and the previous round has ended, and it takes everything committed meanwhile, so an
//! isolated edit waits for no timer and a burst costs one render per affected page per round.
//! An optional debounce (off by default) spaces rounds out to save object-store writes.
//!
//! A round opens one consistent snapshot of the tuple store, reads the site's change feed
//! since its last round, and asks the site's [`SiteProjector`] to re-render what those keys
//! touched. A changed version is published in order: blobs and manifest to the object store,
//! then the new root through the Raft log (compare-and-set on the previous root, so a deposed
//! or stale projector cannot publish), then the served version is swapped in memory and the
//! root mirrored to the object store for edge readers. Only then does the site's projected
//! index move, which releases `Sesame-Min-Index` waits.
//!
//! Before each round the projector checks that it starts from the site's committed root;
//! when the root moved under it (a rollback, a failed publish, another projector), it adopts
//! that root's manifest first, so the next version's delta is taken from what is served.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use serde::Serialize;
use sesame_projector::sandbox::RenderPool;
use sesame_projector::{
    BlobSink, ChangedKey, Config as RenderConfig, Projection, Publisher, Renderer, Root,
    SiteProjector, Source, SourceError, TemplateError,
};
use sesame_proto::{Command, CommandResult, LogIndex, Publish, Tuple};
use sesame_sync::{StoreError, View};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::now_ms;
use crate::pages::serve::Pages;
use crate::reads::Reads;
use crate::write::Writer;

/// Default shortest time between the starts of two rounds of one site: 0, no timer.
pub const DEBOUNCE_MS_DEFAULT: u64 = 0;
/// First wait after a failed round; it doubles with each failure in a row.
const RETRY_MS_MIN: u64 = 250;
/// Longest wait between retries of a failing site.
const RETRY_MS_MAX: u64 = 10_000;
/// Wait before the dispatcher retries after failing to read the store.
const DISPATCH_RETRY_MS: u64 = 500;
/// Sites rendering at once. Each round holds a read snapshot and a blocking thread; the
/// render pool bounds CPU, this bounds the rest.
const ROUNDS_CONCURRENT_MAX: usize = 8;
/// Most changed keys one round collects for one site; past it the site renders from scratch
/// (which reads everything anyway) instead of holding the key list.
const CHANGED_KEYS_PER_SITE_MAX: usize = 200_000;
/// Files a round has made and not yet handed to its early writer (`early_writes`).
const EARLY_BLOBS_QUEUED_MAX: usize = 1_024;
/// Files the early writer writes in one go.
const EARLY_BLOBS_BATCH: usize = 256;
/// The `template` named by a publish failure in the site status.
pub const PUBLISH_PROBLEM: &str = "(publish)";

/// How sites are projected.
#[derive(Debug, Clone)]
pub struct ProjectionConfig {
    /// Shortest time between the starts of two rounds of one site (0: none).
    pub debounce: Duration,
    /// Public URL of this node (`http://127.0.0.1:7700`); in path mode a site lives under
    /// `<public_url>/<site>`.
    pub public_url: String,
    /// Subdomain mode: a site lives at `<scheme>://<site>.<domain>`.
    pub domain: Option<String>,
    /// Where every site's pages render (worker processes that bound memory and time).
    pub render_pool: Arc<RenderPool>,
    /// Most pages one site may have (see [`sesame_projector::SITE_PAGES_MAX_DEFAULT`]).
    pub site_pages_max: usize,
}

impl ProjectionConfig {
    /// The site's public URL, which canonical links, the sitemap and robots.txt use. In
    /// subdomain mode it keeps the public URL's scheme and port (`http://127.0.0.1:7700`
    /// with domain `sites.test` gives `http://demo.sites.test:7700`).
    pub fn base_url(&self, site: &str) -> String {
        site_base_url(&self.public_url, self.domain.as_deref(), site)
    }
}

/// A site's public URL from the node's public URL and, in subdomain mode, the domain (see
/// [`ProjectionConfig::base_url`]); no trailing slash.
pub fn site_base_url(public_url: &str, domain: Option<&str>, site: &str) -> String {
    let public = public_url.trim_end_matches('/');
    match domain {
        Some(domain) => {
            let domain = crate::pages::serve::normalize_domain(domain);
            match url::Url::parse(public) {
                Ok(u) => match u.port() {
                    Some(port) => format!("{}://{site}.{domain}:{port}", u.scheme()),
                    None => format!("{}://{site}.{domain}", u.scheme()),
                },
                Err(_) => format!("https://{site}.{domain}"),
            }
        }
        None => format!("{public}/{site}"),
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
    /// Every standing problem: the site's template problems (bounded by the projector) and
    /// a failing publish.
    pub errors: Vec<TemplateError>,
}

/// Progress and status of one site, shared between its task, the dispatcher and readers.
#[derive(Default)]
struct SiteState {
    /// Index of the newest change handed to the site.
    wanted: LogIndex,
    /// Snapshot index of the last round that finished: everything up to it is served.
    done: LogIndex,
    /// Render from scratch in the next round.
    rebuild: bool,
    /// The site is gone: its task ends.
    deleted: bool,
    pages: u64,
    pages_rendered_total: u64,
    last_publish_at: Option<u64>,
    last_publish_ms: Option<u64>,
    template_errors: Vec<TemplateError>,
    publish_error: Option<TemplateError>,
}

/// A site as the projection knows it.
struct Slot {
    site: String,
    state: Mutex<SiteState>,
    /// Work arrived (a change, a rebuild, deletion).
    wake: Notify,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SiteState> {
        self.state.lock().expect("site state lock poisoned")
    }
}

/// What a round's snapshot found.
enum Rendered {
    /// The site was deleted.
    Deleted,
    /// The committed root is not the one the projector starts from; adopt it first.
    RootMoved,
    /// The store failed under the renderer: nothing is published, the round is retried.
    Failed(sesame_projector::ProjectError),
    /// Rendered at `index`; publish if the version changed. `expected` is the root the new
    /// version replaces.
    Done {
        index: LogIndex,
        projection: Box<Projection>,
        expected: Option<String>,
        render_ms: u64,
    },
}

/// The projector of every site. It runs on the leader only ([`Projections::run`] is started
/// when this node becomes leader and cancelled when it stops being leader).
pub struct Projections {
    pub(crate) config: ProjectionConfig,
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) reads: Reads,
    pub(crate) writer: Arc<Writer>,
    pages: Arc<Pages>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Whether `run` is running (this node leads).
    active: std::sync::atomic::AtomicBool,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Every change at or below this index has been handed to its site.
    dispatched: watch::Sender<LogIndex>,
    /// Bumped whenever some site's projected index may have moved; waiters re-check.
    progress: watch::Sender<u64>,
    rounds: Semaphore,
    /// Preview builds rendering now (`preview.rs`).
    pub(crate) previews_rendering: Semaphore,
}

/// A site's tuples at one snapshot, for the renderer.
pub(crate) struct SiteSource<'v> {
    pub(crate) view: View<'v>,
    pub(crate) site: &'v str,
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
    pub fn new(
        config: ProjectionConfig,
        publisher: Arc<Publisher>,
        reads: Reads,
        writer: Arc<Writer>,
        pages: Arc<Pages>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Projections {
        Projections {
            config,
            publisher,
            reads,
            writer,
            pages,
            metrics,
            active: std::sync::atomic::AtomicBool::new(false),
            slots: Mutex::new(HashMap::new()),
            dispatched: watch::channel(0).0,
            progress: watch::channel(0).0,
            rounds: Semaphore::new(ROUNDS_CONCURRENT_MAX),
            previews_rendering: Semaphore::new(crate::pages::preview::PREVIEWS_RENDERING_MAX),
        }
    }

    fn slot(&self, site: &str) -> Option<Arc<Slot>> {
        self.slots
            .lock()
            .expect("projection slots lock poisoned")
            .get(site)
            .cloned()
    }

    /// The projection status of a site this node projects.
    pub fn status(&self, site: &str) -> Option<SiteProjection> {
        let slot = self.slot(site)?;
        let s = slot.state();
        let errors: Vec<TemplateError> = s
            .publish_error
            .iter()
            .chain(&s.template_errors)
            .cloned()
            .collect();
        Some(SiteProjection {
            pages: s.pages,
            pages_rendered_total: s.pages_rendered_total,
            last_publish_at: s.last_publish_at,
            last_publish_ms: s.last_publish_ms,
            last_error: errors.first().cloned(),
            errors,
        })
    }

    /// Every commit at or below the returned index is reflected in the pages served for
    /// `site` (a site with no pending work is projected as far as the dispatcher has read).
    pub fn projected(&self, site: &str) -> LogIndex {
        // Read the dispatcher's index before the site's progress: the dispatcher raises
        // `wanted` before it moves `dispatched`, so this order never pairs a new
        // `dispatched` with an old `wanted`.
        let dispatched = *self.dispatched.borrow();
        match self.slot(site) {
            Some(slot) => {
                let s = slot.state();
                if s.wanted <= s.done {
                    dispatched.max(s.done)
                } else {
                    s.done
                }
            }
            None => 0,
        }
    }

    /// Changes whenever a site's projected index may have moved.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// Whether this node projects sites now (it leads).
    /// The base URL `site`'s pages link with.
    pub fn base_url(&self, site: &str) -> String {
        self.config.base_url(site)
    }

    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until `site`'s pages reflect every commit up to `index`, at most `timeout`;
    /// whether they do.
    pub async fn wait_projected(&self, site: &str, index: LogIndex, timeout: Duration) -> bool {
        let mut progress = self.progress();
        tokio::time::timeout(
            timeout,
            progress.wait_for(|_| self.projected(site) >= index),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    fn bump_progress(&self) {
        self.progress.send_modify(|p| *p = p.wrapping_add(1));
    }

    /// Asks for `site` to be rendered from scratch in its next round.
    pub fn request_rebuild(&self, site: &str) {
        if let Some(slot) = self.slot(site) {
            slot.state().rebuild = true;
            slot.wake.notify_one();
        }
    }

    /// Follows the applied index and hands changes to the sites' tasks until `cancel` fires
    /// (this node stopped leading, or is shutting down). Each run starts from the committed
    /// roots, so a new leader resumes where the last published versions left off.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        self.slots
            .lock()
            .expect("projection slots lock poisoned")
            .clear();
        self.dispatched.send_replace(0);
        self.active
            .store(true, std::sync::atomic::Ordering::Release);
        let mut applied = self.reads.applied();
        let landmarks = self.reads.landmarks();
        let mut tasks = JoinSet::new();
        let mut cursor: Option<LogIndex> = None;
        // The sites are listed again only when an entry created or deleted one.
        let mut sites_listed_at: Option<LogIndex> = None;
        loop {
            if let Some(seen) = cursor {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = applied.wait_for(|a| *a > seen) => if r.is_err() { break },
                }
            }
            let sites_at = landmarks.borrow().sites_at;
            let list_sites = sites_listed_at.is_none_or(|at| sites_at > at);
            match self.dispatch(cursor.unwrap_or(0), list_sites).await {
                Ok((index, new_slots)) => {
                    if list_sites {
                        sites_listed_at = Some(sites_at);
                    }
                    for slot in new_slots {
                        tasks.spawn(self.clone().site_task(slot, cancel.clone()));
                    }
                    cursor = Some(index);
                    self.dispatched.send_replace(index);
                    self.bump_progress();
                }
                Err(e) => {
                    tracing::error!("projection: read the change feed: {e:#}");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(DISPATCH_RETRY_MS)) => {}
                    }
                }
            }
            // Reap tasks of deleted sites.
            while tasks.try_join_next().is_some() {}
        }
        cancel.cancel();
        while tasks.join_next().await.is_some() {}
        self.active
            .store(false, std::sync::atomic::Ordering::Release);
        self.slots
            .lock()
            .expect("projection slots lock poisoned")
            .clear();
        self.bump_progress();
    }

    /// Reads which sites changed after `since` and tells them; makes slots for new sites and
    /// retires deleted ones. Returns the index read up to and the new slots.
    async fn dispatch(
        &self,
        since: LogIndex,
        list_sites: bool,
    ) -> anyhow::Result<(LogIndex, Vec<Arc<Slot>>)> {
        let (index, listed, changed) = self
            .reads
            .read(move |v| {
                let sites = if list_sites { Some(v.sites()?) } else { None };
                Ok((v.applied_index()?, sites, v.changed_sites(since)?))
            })
            .await?;
        // Without a listing, the sites are the ones already known.
        let sites: Vec<String> = match listed {
            Some(sites) => sites.into_iter().map(|s| s.name).collect(),
            None => self
                .slots
                .lock()
                .expect("projection slots lock poisoned")
                .keys()
                .cloned()
                .collect(),
        };
        let fresh: Vec<String> = {
            let slots = self.slots.lock().expect("projection slots lock poisoned");
            sites
                .iter()
                .filter(|s| !slots.contains_key(*s))
                .cloned()
                .collect()
        };
        // What a new slot (every site, at start-up) must do first: nothing when its root
        // is current, else one round from scratch.
        let first_wanted = if fresh.is_empty() {
            HashMap::new()
        } else {
            self.reads
                .read(move |v| {
                    let newest: HashMap<String, LogIndex> =
                        v.changed_sites(0)?.into_iter().collect();
                    let mut wanted = HashMap::new();
                    for site in fresh {
                        let newest = newest.get(&site).copied().unwrap_or(0);
                        let w = match v.root(&site)? {
                            // A rollback stays served until the site changes after it.
                            Some(root) => {
                                let reflects = if root.rollback {
                                    root.log_index
                                } else {
                                    root.index
                                };
                                if newest > reflects {
                                    newest
                                } else {
                                    0
                                }
                            }
                            // Never published: publish once, even an empty site.
                            None => index.max(1),
                        };
                        wanted.insert(site, w);
                    }
                    Ok(wanted)
                })
                .await?
        };
        let mut new_slots = Vec::new();
        let mut slots = self.slots.lock().expect("projection slots lock poisoned");
        let live: BTreeSet<&str> = sites.iter().map(String::as_str).collect();
        slots.retain(|name, slot| {
            let keep = live.contains(name.as_str());
            if !keep {
                slot.state().deleted = true;
                slot.wake.notify_one();
            }
            keep
        });
        for (site, wanted) in first_wanted {
            if slots.contains_key(&site) || !live.contains(site.as_str()) {
                continue;
            }
            let slot = Arc::new(Slot {
                site: site.clone(),
                state: Mutex::new(SiteState {
                    wanted,
                    ..SiteState::default()
                }),
                wake: Notify::new(),
            });
            slots.insert(site, slot.clone());
            new_slots.push(slot);
        }
        let created: std::collections::HashSet<&str> =
            new_slots.iter().map(|s| s.site.as_str()).collect();
        for (site, newest) in changed {
            // A new slot's first work was worked out from its root above.
            if created.contains(site.as_str()) {
                continue;
            }
            if let Some(slot) = slots.get(&site) {
                let mut s = slot.state();
                if newest > s.wanted {
                    s.wanted = newest;
                    drop(s);
                    slot.wake.notify_one();
                }
            }
        }
        Ok((index, new_slots))
    }

    /// Projects one site, round after round, until the site is deleted or `cancel` fires.
    async fn site_task(self: Arc<Self>, slot: Arc<Slot>, cancel: CancellationToken) {
        let mut projector: Option<SiteProjector> = None;
        let mut last_round: Option<Instant> = None;
        let mut failures: u32 = 0;
        loop {
            // Wait for work. `notified` is created before the check, so a wake-up between
            // the check and the wait is not lost.
            loop {
                let notified = slot.wake.notified();
                {
                    let s = slot.state();
                    if s.deleted {
                        return;
                    }
                    if s.wanted > s.done || s.rebuild {
                        break;
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = notified => {}
                }
            }
            if let Some(at) = last_round {
                let since = at.elapsed();
                if since < self.config.debounce {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(self.config.debounce - since) => {}
                    }
                }
            }
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                p = self.rounds.acquire() => p.expect("the rounds semaphore is never closed"),
            };
            last_round = Some(Instant::now());
            let result = self.round(&slot, &mut projector).await;
            drop(permit);
            match result {
                Ok(()) => failures = 0,
                Err(e) => {
                    tracing::error!("project site {}: {e:#}", slot.site);
                    slot.state().publish_error = Some(TemplateError {
                        template: PUBLISH_PROBLEM.into(),
                        line: None,
                        message: format!(
                            "publishing failed; the last published version stays live; retrying: {e:#}"
                        ),
                        path: None,
                    });
                    // Start over from the committed root next time.
                    projector = None;
                    failures = failures.saturating_add(1);
                    let wait = RETRY_MS_MIN
                        .saturating_mul(1 << failures.min(8))
                        .min(RETRY_MS_MAX);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    }
                }
            }
        }
    }

    /// One round of one site: adopt the committed root if needed, render in one snapshot,
    /// publish what changed, move the site's projected index.
    async fn round(
        &self,
        slot: &Slot,
        projector: &mut Option<SiteProjector>,
    ) -> anyhow::Result<()> {
        let site = slot.site.clone();
        loop {
            self.start_from_root(&site, projector).await?;
            let (rebuild, since) = {
                let mut s = slot.state();
                (std::mem::take(&mut s.rebuild), s.done)
            };
            let mut p = projector
                .take()
                .expect("start_from_root leaves a projector");
            // Garbage collection waits until the version is committed and served (gc.rs):
            // from the first file written while rendering to the commit of the root.
            let _pin = self.publisher.pin().await;
            let (sink, early) = early_writes(&self.publisher, &site);
            p.stream_blobs(Some(sink));
            let name = site.clone();
            let read = self
                .reads
                .read(move |view| {
                    let rendered = render_site(view, &name, &mut p, since, rebuild);
                    p.stream_blobs(None);
                    Ok((p, rendered?))
                })
                .await;
            // The sink is gone with the render, so the writer ends; wait for it before the
            // pin can go.
            match early.await {
                Ok(Ok(_)) => {}
                // Publishing writes whatever did not get written here.
                Ok(Err(e)) => tracing::warn!("site {site}: writing files while rendering: {e:#}"),
                Err(e) => tracing::warn!("site {site}: the early file writer stopped: {e}"),
            }
            let (p, rendered) = read.context("render")?;
            *projector = Some(p);
            let (index, projection, expected, render_ms) = match rendered {
                Rendered::Deleted => return Ok(()),
                Rendered::Failed(e) => {
                    *projector = None;
                    return Err(anyhow::Error::new(e).context("render"));
                }
                Rendered::RootMoved => {
                    // Only a root committed between the check and the snapshot gets here.
                    if rebuild {
                        slot.state().rebuild = true;
                    }
                    *projector = None;
                    continue;
                }
                Rendered::Done {
                    index,
                    projection,
                    expected,
                    render_ms,
                } => (index, projection, expected, render_ms),
            };
            {
                let errors = projector.as_ref().map(|p| p.errors()).unwrap_or_default();
                let mut s = slot.state();
                s.pages_rendered_total += projection.pages_rendered;
                s.template_errors = errors;
                self.metrics.projection_rounds.inc();
                self.metrics
                    .pages_rendered
                    .inc_by(projection.pages_rendered);
            }
            if projection.changed {
                self.publish(slot, *projection, expected, render_ms).await?;
            }
            {
                let mut s = slot.state();
                s.done = s.done.max(index);
                s.publish_error = None;
            }
            self.bump_progress();
            return Ok(());
        }
    }

    /// Makes sure `projector` starts from the site's committed root: builds one on first
    /// use (or after a failure) and adopts the root's manifest when the root moved.
    async fn start_from_root(
        &self,
        site: &str,
        projector: &mut Option<SiteProjector>,
    ) -> anyhow::Result<()> {
        let name = site.to_string();
        let root = self.reads.read(move |v| v.root(&name)).await?;
        let root_id = root.as_ref().map(|r| r.manifest.as_str());
        if let Some(p) = projector {
            if p.manifest_id() == root_id {
                return Ok(());
            }
        }
        let mut render = RenderConfig::new(self.config.base_url(site));
        render.renderer = Renderer::Pool(Arc::clone(&self.config.render_pool));
        render.pages_max = self.config.site_pages_max;
        let mut p = SiteProjector::new(site, render);
        if let Some(root) = &root {
            // The served version shares most chunks with the root's (after a rollback too).
            let served = self.pages.manifest(site);
            let manifest = self
                .publisher
                .get_manifest(site, &root.manifest, served.as_deref())
                .await
                .with_context(|| format!("read the published manifest of site {site}"))?;
            p.adopt(manifest);
        }
        *projector = Some(p);
        Ok(())
    }

    /// Publishes one site version: files, manifest, root through Raft, served version, mirror.
    /// The caller holds a pin of the publisher (garbage collection stays out).
    async fn publish(
        &self,
        slot: &Slot,
        projection: Projection,
        expected: Option<String>,
        render_ms: u64,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let site = slot.site.clone();
        let manifest = projection.manifest.clone();
        let id = self
            .publisher
            .publish(&projection)
            .await
            .context("write files and manifest to the object store")?;
        let written = started.elapsed();
        let command = Command::Publish(Publish {
            site: site.clone(),
            manifest: id.clone(),
            index: manifest.index,
            files: manifest.files.len() as u64,
            published_at_ms: now_ms(),
            expected,
            rollback: false,
        });
        let (root_log_index, result) = self
            .writer
            .propose(command)
            .await
            .context("commit the root through raft")?;
        match result {
            CommandResult::Published => {}
            CommandResult::RootMoved { current } => {
                // Someone else moved the root (a rollback): start over from it.
                anyhow::bail!("root moved to {current:?} meanwhile; re-projecting from it");
            }
            other => anyhow::bail!("commit root: unexpected result {other:?}"),
        }
        let committed = started.elapsed();
        for (hash, body) in &projection.new_blobs {
            self.pages.prime(hash, body.clone());
        }
        self.pages.install(manifest.clone(), root_log_index);
        let root = Root {
            manifest: id,
            index: manifest.index,
        };
        if let Err(e) = self.publisher.mirror_root(&site, &root).await {
            // The Raft log holds the truth; the mirror is for edge readers and is rewritten
            // by the next publish.
            tracing::warn!("mirror root of site {site}: {e:#}");
        }
        let pages = manifest.files.pages() as u64;
        let mut s = slot.state();
        s.pages = pages;
        s.last_publish_at = Some(now_ms());
        s.last_publish_ms = Some(render_ms + started.elapsed().as_millis() as u64);
        // Where a publish's time goes (`RUST_LOG=sesame_node::pages::projection=debug`).
        tracing::debug!(
            site = %site,
            files = manifest.files.len(),
            new_blobs = projection.new_blobs.len(),
            render_ms,
            write_ms = written.as_millis() as u64,
            commit_ms = (committed - written).as_millis() as u64,
            install_ms = (started.elapsed() - committed).as_millis() as u64,
            "published"
        );
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Starts writing the files a round makes while it renders: the sink for the projector
/// ([`SiteProjector::stream_blobs`]) and the task that writes what reaches it, in batches
/// of at most [`EARLY_BLOBS_BATCH`]. At most [`EARLY_BLOBS_QUEUED_MAX`] files wait in
/// between; a full queue holds the render back. The task ends when the sink is dropped, or
/// at its first failed write (the sink then drops what it is given).
fn early_writes(
    publisher: &Arc<Publisher>,
    site: &str,
) -> (
    BlobSink,
    tokio::task::JoinHandle<Result<usize, sesame_projector::PublishError>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Bytes)>(EARLY_BLOBS_QUEUED_MAX);
    let publisher = Arc::clone(publisher);
    let site = site.to_string();
    let task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(EARLY_BLOBS_BATCH);
        let mut written = 0;
        while rx.recv_many(&mut batch, EARLY_BLOBS_BATCH).await > 0 {
            written += publisher.put_blobs(&site, &batch).await?;
            batch.clear();
        }
        Ok(written)
    });
    let sink: BlobSink = Box::new(move |hash: &str, body: &Bytes| {
        // The render runs on a blocking thread, where waiting for room is allowed.
        let _ = tx.blocking_send((hash.to_string(), body.clone()));
    });
    (sink, task)
}

/// The blocking half of a round: in one snapshot, check the site and its root, read the
/// site's changes since `since`, and render.
fn render_site(
    view: View<'_>,
    site: &str,
    projector: &mut SiteProjector,
    since: LogIndex,
    rebuild: bool,
) -> Result<Rendered, StoreError> {
    let index = view.applied_index()?;
    if view.site(site)?.is_none() {
        return Ok(Rendered::Deleted);
    }
    let expected = view.root(site)?.map(|r| r.manifest);
    if projector.manifest_id() != expected.as_deref() {
        return Ok(Rendered::RootMoved);
    }
    // More changed keys than a round should track: render the whole site instead.
    let keys: Option<Vec<ChangedKey>> = view
        .changed_keys(site, since, CHANGED_KEYS_PER_SITE_MAX)?
        .map(|keys| {
            keys.into_iter()
                .map(|(collection, key)| ChangedKey { collection, key })
                .collect()
        });
    let src = SiteSource { view, site };
    let started = Instant::now();
    let result = match keys {
        Some(keys) if !rebuild => projector.render_changes(&src, index, &keys),
        _ => projector.render_all(&src, index),
    };
    let projection = match result {
        Ok(p) => p,
        Err(e) => return Ok(Rendered::Failed(e)),
    };
    Ok(Rendered::Done {
        index,
        projection: Box::new(projection),
        expected,
        render_ms: started.elapsed().as_millis() as u64,
    })
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
            site_pages_max: sesame_projector::SITE_PAGES_MAX_DEFAULT,
        };
        assert_eq!(path.base_url("demo"), "http://127.0.0.1:7700/demo");
        let sub = ProjectionConfig {
            domain: Some("example.com".into()),
            public_url: "https://example.com".into(),
            ..path.clone()
        };
        assert_eq!(sub.base_url("demo"), "https://demo.example.com");
        let with_port = ProjectionConfig {
            domain: Some("Sites.test.".into()),
            public_url: "http://127.0.0.1:7700".into(),
            ..path.clone()
        };
        assert_eq!(with_port.base_url("demo"), "http://demo.sites.test:7700");
    }
}
