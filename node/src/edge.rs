//! `sesame edge`: a stateless page server that reads only the object store.
//!
//! Nodes publish every site version to the object store (projector/src/publish.rs):
//! content-addressed blobs, a manifest per version over a tree of content-addressed chunks,
//! and `sites/<site>/root`, a mirror of the site's committed root. An edge lists `sites/`,
//! reads each site's root every poll interval (and at once on `POST /_sesame/notify`),
//! fetches a new root's manifest and the chunks of its tree that the served version does not
//! share (each hash-checked and size-bounded) and installs it whole, then answers requests exactly as a node does: the answer itself is
//! [`crate::pages::serve::answer`], shared with the node; blobs come on demand
//! (hash-checked) into the same byte-bounded cache.
//!
//! What an edge does not have: a log. `Sesame-Min-Index: N` re-reads the roots until the
//! site's installed version reflects N, within the node's bound (2 s), else 503. A store
//! that cannot be reached leaves the installed versions served; a root, manifest or chunk
//! that is damaged is never installed (the previous version stays served; with none, the
//! site answers 503), and a damaged blob is answered with a 503, never served.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use sesame_projector::{PublishError, Publisher, Root};
use sesame_proto::{validate_site, LogIndex};
use tokio_util::sync::CancellationToken;

use crate::pages::serve::{self, answer, plain, unavailable, Pages, ServeConfig};

/// Default time between two reads of every site's root, in milliseconds.
pub const POLL_MS_DEFAULT: u64 = 1_000;
/// Shortest poll interval allowed, in milliseconds.
pub const POLL_MS_MIN: u64 = 50;
/// Longest poll interval allowed, in milliseconds.
pub const POLL_MS_MAX: u64 = 60_000;
/// Shortest time between two re-reads that notifications (or held requests) ask for:
/// notifications that come faster are coalesced into the next re-read.
pub const NOTIFY_GAP_MS: u64 = 50;
/// Most sites one edge follows; sites past it (in name order) are not served.
pub const SITES_MAX: usize = 10_000;
/// Roots and manifests read at once during a re-read.
const READS_CONCURRENT_MAX: usize = 8;
/// Requests answered at once (the node's bound).
pub const HTTP_CONCURRENCY_MAX: usize = crate::app::HTTP_CONCURRENCY_MAX;
/// Smallest blob cache, in bytes.
pub const CACHE_BYTES_MIN: usize = 1 << 20;

/// How an edge runs.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// The object store nodes publish to (`file:///dir`, `s3://bucket/prefix`).
    pub objects: String,
    pub http_addr: SocketAddr,
    /// Time between two reads of every root.
    pub poll: Duration,
    /// Bytes of file content kept in memory.
    pub cache_bytes: usize,
    /// Subdomain mode: `Host: <site>.<domain>` serves `<site>`.
    pub domain: Option<String>,
}

impl EdgeConfig {
    pub fn new(objects: impl Into<String>, http_addr: SocketAddr) -> EdgeConfig {
        EdgeConfig {
            objects: objects.into(),
            http_addr,
            poll: Duration::from_millis(POLL_MS_DEFAULT),
            cache_bytes: serve::BLOB_CACHE_BYTES_MAX,
            domain: None,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        let poll_ms = self.poll.as_millis();
        anyhow::ensure!(
            (u128::from(POLL_MS_MIN)..=u128::from(POLL_MS_MAX)).contains(&poll_ms),
            "the poll interval is {poll_ms} ms; it must be from {POLL_MS_MIN} to {POLL_MS_MAX} ms"
        );
        anyhow::ensure!(
            self.cache_bytes >= CACHE_BYTES_MIN,
            "the blob cache is {} bytes; it must be at least {CACHE_BYTES_MIN}",
            self.cache_bytes
        );
        Ok(())
    }
}

/// What the edge knows of one site.
#[derive(Default)]
struct Followed {
    /// The root whose version is installed.
    installed: Option<Root>,
    /// Why the newest root could not be installed, when it is damaged in the store.
    damaged: Option<String>,
}

/// An edge's state: the versions it serves and where they come from.
pub struct Edge {
    pages: Pages,
    publisher: Arc<Publisher>,
    poll: Duration,
    sites: Mutex<HashMap<String, Followed>>,
    /// Asks the poller for a re-read now.
    wake: tokio::sync::Notify,
    /// Counts finished re-reads.
    rounds: tokio::sync::watch::Sender<u64>,
    /// Orders installs: a version installed later wins, also when its root names an older
    /// index (a rollback).
    installs: AtomicU64,
    /// Whether the last re-read reached the store (an outage is logged once, not per poll).
    store_ok: AtomicBool,
}

impl Edge {
    pub fn new(config: &EdgeConfig, publisher: Arc<Publisher>) -> anyhow::Result<Edge> {
        config.check()?;
        let pages = Pages::new(
            ServeConfig {
                domain: config.domain.clone(),
                blob_cache_bytes: config.cache_bytes,
                ..ServeConfig::default()
            },
            publisher.clone(),
            Arc::new(crate::metrics::Metrics::new()),
            None,
        );
        Ok(Edge {
            pages,
            publisher,
            poll: config.poll,
            sites: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            rounds: tokio::sync::watch::channel(0).0,
            installs: AtomicU64::new(0),
            store_ok: AtomicBool::new(true),
        })
    }

    /// The versions served.
    pub fn pages(&self) -> &Pages {
        &self.pages
    }

    /// Asks for a re-read of every root now (coalesced with other asks).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Re-reads roots until `cancel`: every poll interval, and after a notification.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            self.reread().await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.poll) => {}
                _ = self.wake.notified() => {
                    // Notifications that arrive meanwhile leave one permit: one more re-read.
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(NOTIFY_GAP_MS)) => {}
                    }
                }
            }
        }
    }

    /// Reads every site's root and installs the versions that changed.
    pub async fn reread(&self) {
        let listed = match self.publisher.list_sites().await {
            Ok(listed) => {
                if !self.store_ok.swap(true, Ordering::Relaxed) {
                    tracing::info!("the object store answers again");
                }
                listed
            }
            Err(e) => {
                if self.store_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "list sites in the object store: {e:#}; serving what is installed"
                    );
                }
                self.rounds.send_modify(|n| *n = n.wrapping_add(1));
                return;
            }
        };
        if listed.len() > SITES_MAX {
            tracing::warn!(
                "the object store has {} sites; this edge follows the first {SITES_MAX}",
                listed.len()
            );
        }
        let mut sites: std::collections::BTreeSet<String> =
            listed.into_iter().take(SITES_MAX).collect();
        // A site whose folder vanished is re-read too: its root is gone, so it leaves.
        sites.extend(
            self.sites
                .lock()
                .expect("edge sites lock poisoned")
                .keys()
                .cloned(),
        );
        futures::stream::iter(sites)
            .for_each_concurrent(READS_CONCURRENT_MAX, |site| async move {
                self.refresh(&site).await;
            })
            .await;
        self.rounds.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Reads `site`'s root; installs its version when it changed.
    async fn refresh(&self, site: &str) {
        let root = match self.publisher.get_root(site).await {
            Ok(root) => root,
            Err(e @ PublishError::Corrupt { .. }) => {
                tracing::error!("read the root of site {site}: {e:#}; not installed");
                self.with_site(site, |f| f.damaged = Some(format!("{e:#}")));
                return;
            }
            Err(e) => {
                tracing::debug!("read the root of site {site}: {e:#}");
                return;
            }
        };
        let Some(root) = root else {
            // No root: the site was deleted (or not published yet).
            let gone = self
                .sites
                .lock()
                .expect("edge sites lock poisoned")
                .remove(site);
            if gone.is_some_and(|f| f.installed.is_some()) {
                let at = self.installs.fetch_add(1, Ordering::Relaxed) + 1;
                self.pages.remove(site, at);
                tracing::info!("site {site} has no root any more; no longer served");
            }
            return;
        };
        if self.with_site(site, |f| f.installed.as_ref() == Some(&root)) {
            return;
        }
        // Chunks the served version has at the same place are reused, not read again.
        let served = self.pages.manifest(site);
        let read = self
            .publisher
            .get_manifest(site, &root.manifest, served.as_deref())
            .await;
        let manifest = match read {
            Ok(m) if m.index == root.index => m,
            Ok(m) => {
                let why = format!(
                    "manifest {} reflects index {}, its root says {}",
                    root.manifest, m.index, root.index
                );
                tracing::error!("install site {site}: {why}; not installed");
                self.with_site(site, |f| f.damaged = Some(why));
                return;
            }
            Err(e @ (PublishError::Corrupt { .. } | PublishError::NotFound { .. })) => {
                tracing::error!(
                    "read manifest {} of site {site}: {e:#}; not installed",
                    root.manifest
                );
                self.with_site(site, |f| f.damaged = Some(format!("{e:#}")));
                return;
            }
            Err(e) => {
                tracing::warn!("read manifest {} of site {site}: {e:#}", root.manifest);
                return;
            }
        };
        let at = self.installs.fetch_add(1, Ordering::Relaxed) + 1;
        self.pages.install(Arc::new(manifest), at);
        tracing::info!(site, index = root.index, manifest = %root.manifest, "installed");
        self.with_site(site, |f| {
            f.installed = Some(root);
            f.damaged = None;
        });
    }

    fn with_site<R>(&self, site: &str, f: impl FnOnce(&mut Followed) -> R) -> R {
        let mut sites = self.sites.lock().expect("edge sites lock poisoned");
        f(sites.entry(site.to_string()).or_default())
    }

    /// Why `site` has nothing to serve although it has a root: its root or manifest is
    /// damaged in the store.
    fn damaged(&self, site: &str) -> Option<String> {
        let sites = self.sites.lock().expect("edge sites lock poisoned");
        let followed = sites.get(site)?;
        match followed.installed {
            Some(_) => None,
            None => followed.damaged.clone(),
        }
    }

    /// Holds a request until `site`'s installed version reflects `index` (re-reading the
    /// roots meanwhile), within the node's bound; else the 503 to answer.
    async fn wait_index(&self, site: &str, index: LogIndex) -> Result<(), Response> {
        let reached = || self.pages.served_index(site).is_some_and(|s| s >= index);
        if reached() {
            return Ok(());
        }
        let Some(_hold) = self.pages.try_hold(site) else {
            return Err(unavailable(format!(
                "too many requests are waiting for new versions (at most {} per site, {} in \
                 all); retry shortly",
                serve::HELD_REQUESTS_PER_SITE_MAX,
                serve::HELD_REQUESTS_MAX
            )));
        };
        let deadline = tokio::time::Instant::now() + self.pages.config().min_index_wait;
        let mut rounds = self.rounds.subscribe();
        loop {
            rounds.mark_unchanged();
            self.notify();
            match tokio::time::timeout_at(deadline, rounds.changed()).await {
                Ok(Ok(())) if reached() => return Ok(()),
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        if reached() {
            return Ok(());
        }
        Err(unavailable(format!(
            "index {index} is not published yet (this edge serves site {site} as of index {}); \
             retry shortly",
            self.pages.served_index(site).unwrap_or(0)
        )))
    }
}

/// Opens the object store a URL names, with S3/R2 settings from `AWS_*` variables (as
/// `aws_endpoint`, `aws_region`, ...; see `object_store::aws::AmazonS3ConfigKey`).
pub fn open_objects(url: &str) -> anyhow::Result<Publisher> {
    let options = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v));
    Publisher::from_url(url, options).with_context(|| format!("open object store {url}"))
}

/// The edge's HTTP routes.
pub fn router(edge: Arc<Edge>) -> axum::Router {
    axum::Router::new()
        .route("/_sesame/notify", post(notify))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(page)
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            HTTP_CONCURRENCY_MAX,
        ))
        .layer(axum::middleware::from_fn(every_answer))
        .with_state(edge)
}

/// What a node's answer layer does that pages rely on: the limits on the request head, and
/// `nosniff` on every answer.
async fn every_answer(req: Request, next: Next) -> Response {
    let mut resp = match crate::http::answer::check_head(&req) {
        Err(e) => e.into_response(),
        Ok(()) => next.run(req).await,
    };
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `POST /_sesame/notify[?site=<site>]`: re-read the roots now. Anyone may ask (it only
/// moves a re-read forward); asks are coalesced, at most one re-read per
/// [`NOTIFY_GAP_MS`]. A `site` is checked to be a site name, but every root is re-read:
/// one read per site is what a poll costs anyway.
async fn notify(State(edge): State<Arc<Edge>>, req: Request) -> Response {
    let site = req
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("site="));
    if let Some(site) = site {
        if validate_site(site).is_err() {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("{site:?} is not a site name"),
            );
        }
    }
    edge.notify();
    plain(StatusCode::ACCEPTED, "re-reading")
}

/// Every other request: a page.
async fn page(State(edge): State<Arc<Edge>>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    let target = serve::site_and_path(edge.pages.config(), &parts.headers, parts.uri.path());
    if edge.pages.served_index(&target.site).is_none() {
        if let Some(why) = edge.damaged(&target.site) {
            return unavailable(format!(
                "site {} is damaged in the object store and is not served: {why}",
                target.site
            ));
        }
    }
    let waiter = edge.clone();
    answer(
        &edge.pages,
        &parts.method,
        &parts.uri,
        &parts.headers,
        |site, index| async move { waiter.wait_index(&site, index).await },
    )
    .await
}

/// A running edge: its HTTP server and its poller.
pub struct RunningEdge {
    pub addr: SocketAddr,
    pub edge: Arc<Edge>,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    poller: tokio::task::JoinHandle<()>,
}

impl RunningEdge {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and polling, and waits for both.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.poller.await.context("join the poller")?;
        self.server
            .await
            .context("join the HTTP server")?
            .context("serve HTTP")
    }

    /// Resolves once the edge stops by itself (its server failed).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }
}

/// Opens the store, reads every root once, then serves and polls.
pub async fn start(config: EdgeConfig) -> anyhow::Result<RunningEdge> {
    let publisher = Arc::new(open_objects(&config.objects)?);
    let edge = Arc::new(Edge::new(&config, publisher)?);
    // The first read before the first request, so a healthy store's pages are there at once.
    edge.reread().await;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("listen on {}", config.http_addr))?;
    let addr = listener.local_addr().context("read the bound address")?;
    let cancel = CancellationToken::new();
    let poller = tokio::spawn(edge.clone().run(cancel.clone()));
    let app = router(edge.clone());
    let stop = cancel.clone();
    let server = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown({
                let stop = stop.clone();
                async move { stop.cancelled().await }
            })
            .await;
        stop.cancel();
        result
    });
    tracing::info!(%addr, objects = %config.objects, "edge serving HTTP");
    Ok(RunningEdge {
        addr,
        edge,
        cancel,
        server,
        poller,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_interval_and_cache_are_bounded() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut config = EdgeConfig::new("file:///nowhere", addr);
        assert!(config.check().is_ok());
        for ms in [POLL_MS_MIN - 1, POLL_MS_MAX + 1, 0] {
            config.poll = Duration::from_millis(ms);
            assert!(config.check().is_err(), "{ms} ms");
        }
        config.poll = Duration::from_millis(POLL_MS_MIN);
        config.cache_bytes = CACHE_BYTES_MIN - 1;
        assert!(config.check().is_err());
    }

    #[tokio::test]
    async fn a_damaged_newer_root_leaves_the_installed_version_served() {
        let dir = tempfile::tempdir().unwrap();
        let publisher = Arc::new(Publisher::local(dir.path()).unwrap());
        let manifest = sesame_projector::Manifest {
            format: sesame_projector::MANIFEST_FORMAT,
            site: "demo".into(),
            index: 7,
            previous: None,
            files: Default::default(),
            delta: Default::default(),
        };
        let id = publisher.put_manifest(&manifest).await.unwrap();
        publisher
            .mirror_root(
                "demo",
                &Root {
                    manifest: id,
                    index: 7,
                },
            )
            .await
            .unwrap();
        let config = EdgeConfig::new("file:///unused", "127.0.0.1:0".parse().unwrap());
        let edge = Edge::new(&config, publisher.clone()).unwrap();
        edge.reread().await;
        assert_eq!(edge.pages().served_index("demo"), Some(7));
        // A root naming a manifest that is not there.
        publisher
            .mirror_root(
                "demo",
                &Root {
                    manifest: "a".repeat(64),
                    index: 9,
                },
            )
            .await
            .unwrap();
        edge.reread().await;
        assert_eq!(edge.pages().served_index("demo"), Some(7));
        assert_eq!(edge.damaged("demo"), None, "a version is installed");
        // The root goes (the site was deleted): no longer served.
        publisher.remove_root("demo").await.unwrap();
        edge.reread().await;
        assert_eq!(edge.pages().served_index("demo"), None);
    }
}
