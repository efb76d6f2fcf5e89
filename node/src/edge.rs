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
//!
//! Every wait on the store is bounded, because a slow or unreachable store must not stall
//! the poller: listing the sites and reading the roots of one round share a deadline of the
//! poll interval (at least [`POLL_ROUND_MS_MIN`]), and installing a version has
//! [`INSTALL_WAIT_MS`]. A round that runs out of time is logged once per outage and counted
//! as failed; the next one starts one poll interval later, so the edge takes up new roots as
//! soon as the store answers again. An S3 client's own defaults (10 retries within 3
//! minutes, no request timeout) would hold a round far longer, so an edge's S3 client gets
//! short timeouts and two retries ([`open_objects_for_edge`]).
//!
//! `GET /metrics` gives the node's serving figures (answers by status, the blob cache) and
//! the edge's own (polls by outcome and their duration, the index installed per site, chunk
//! reads) in the Prometheus text format.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::future::BoxFuture;
use futures::StreamExt as _;
use object_store::{ClientOptions, RetryConfig};
use sesame_projector::{ChunkSource, PublishError, Publisher, Root};
use sesame_proto::{validate_site, LogIndex};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
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
/// Shortest time a round of root reads is given, in milliseconds, when the poll interval is
/// shorter: a listing and a root read against S3 take tens of milliseconds each, so a round
/// bounded by a 50 ms interval would fail while the store is healthy.
pub const POLL_ROUND_MS_MIN: u64 = 1_000;
/// Longest the install of one version (its manifest and the chunks it does not share with
/// the served one) may take, in milliseconds. A first install of a large site reads many
/// chunks, so this is longer than a round's deadline.
pub const INSTALL_WAIT_MS: u64 = 30_000;
/// An edge's S3 client: time to open a connection, in milliseconds.
pub const S3_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// An edge's S3 client: time for one request, body included, in milliseconds (a blob of
/// several MB from a distant region fits).
pub const S3_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// An edge's S3 client: retries of one request (a 5xx, a reset), within
/// [`S3_REQUEST_TIMEOUT_MS`] from the first try.
pub const S3_RETRIES_MAX: usize = 2;
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
    /// Options of the store (`aws_endpoint`, `aws_region`, ...; see
    /// `object_store::aws::AmazonS3ConfigKey`). The CLI takes them from `AWS_*` variables.
    pub store_options: Vec<(String, String)>,
}

impl EdgeConfig {
    pub fn new(objects: impl Into<String>, http_addr: SocketAddr) -> EdgeConfig {
        EdgeConfig {
            objects: objects.into(),
            http_addr,
            poll: Duration::from_millis(POLL_MS_DEFAULT),
            cache_bytes: serve::BLOB_CACHE_BYTES_MAX,
            domain: None,
            store_options: Vec::new(),
        }
    }

    /// How long one round of listing and root reads may take.
    pub fn poll_round_bound(&self) -> Duration {
        self.poll.max(Duration::from_millis(POLL_ROUND_MS_MIN))
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
    metrics: Arc<Metrics>,
    poll: Duration,
    /// Deadline of one round's listing and root reads.
    round_bound: Duration,
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
        let metrics = Arc::new(Metrics::new_edge());
        let pages = Pages::new(
            ServeConfig {
                domain: config.domain.clone(),
                blob_cache_bytes: config.cache_bytes,
                ..ServeConfig::default()
            },
            publisher.clone(),
            metrics.clone(),
            None,
        );
        Ok(Edge {
            pages,
            publisher,
            metrics,
            poll: config.poll,
            round_bound: config.poll_round_bound(),
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

    /// The edge's figures.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
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

    /// Reads every site's root and installs the versions that changed. The listing and the
    /// root reads end by the round's deadline, an install within [`INSTALL_WAIT_MS`].
    pub async fn reread(&self) {
        let started = tokio::time::Instant::now();
        let ok = self.reread_within(started + self.round_bound).await;
        self.metrics
            .edge_poll_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcome = if ok { "ok" } else { "failed" };
        self.metrics
            .edge_polls
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
        self.rounds.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// One round; whether the listing and every root read succeeded.
    async fn reread_within(&self, deadline: tokio::time::Instant) -> bool {
        let listing = tokio::time::timeout_at(deadline, self.publisher.list_sites()).await;
        let listed = match listing {
            Ok(Ok(listed)) => {
                if !self.store_ok.swap(true, Ordering::Relaxed) {
                    tracing::info!("the object store answers again");
                }
                listed
            }
            Ok(Err(e)) => {
                if self.store_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "list sites in the object store: {e:#}; serving what is installed"
                    );
                }
                return false;
            }
            Err(_) => {
                if self.store_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "list sites in the object store: no answer within {:?}; serving what \
                         is installed, trying again every {:?}",
                        self.round_bound,
                        self.poll
                    );
                }
                return false;
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
        let failed = AtomicU64::new(0);
        futures::stream::iter(sites)
            .for_each_concurrent(READS_CONCURRENT_MAX, |site| {
                let failed = &failed;
                async move {
                    if !self.refresh(&site, deadline).await {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        let failed = failed.into_inner();
        if failed > 0 {
            tracing::debug!("{failed} root reads failed or ran out of time this round");
        }
        failed == 0
    }

    /// Reads `site`'s root (by `deadline`); installs its version when it changed. Whether
    /// the root could be read.
    async fn refresh(&self, site: &str, deadline: tokio::time::Instant) -> bool {
        let read = tokio::time::timeout_at(deadline, self.publisher.get_root(site)).await;
        let root = match read {
            Ok(Ok(root)) => root,
            Ok(Err(e @ PublishError::Corrupt { .. })) => {
                tracing::error!("read the root of site {site}: {e:#}; not installed");
                self.with_site(site, |f| f.damaged = Some(format!("{e:#}")));
                return true;
            }
            Ok(Err(e)) => {
                tracing::debug!("read the root of site {site}: {e:#}");
                return false;
            }
            Err(_) => {
                tracing::debug!("read the root of site {site}: no answer in time");
                return false;
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
                self.metrics
                    .edge_installed_index
                    .remove(&vec![("site".to_string(), site.to_string())]);
                tracing::info!("site {site} has no root any more; no longer served");
            }
            return true;
        };
        if self.with_site(site, |f| f.installed.as_ref() == Some(&root)) {
            return true;
        }
        // Chunks the served version has at the same place are reused, not read again.
        let served = self.pages.manifest(site);
        let chunks = CountedChunks {
            publisher: &self.publisher,
            metrics: &self.metrics,
        };
        let read = tokio::time::timeout(
            Duration::from_millis(INSTALL_WAIT_MS),
            self.publisher
                .get_manifest_with(site, &root.manifest, served.as_deref(), &chunks),
        )
        .await;
        let Ok(read) = read else {
            tracing::warn!(
                "read manifest {} of site {site}: not done within {INSTALL_WAIT_MS} ms; the \
                 installed version stays served",
                root.manifest
            );
            return true;
        };
        let manifest = match read {
            Ok(m) if m.index == root.index => m,
            Ok(m) => {
                let why = format!(
                    "manifest {} reflects index {}, its root says {}",
                    root.manifest, m.index, root.index
                );
                tracing::error!("install site {site}: {why}; not installed");
                self.with_site(site, |f| f.damaged = Some(why));
                return true;
            }
            Err(e @ (PublishError::Corrupt { .. } | PublishError::NotFound { .. })) => {
                tracing::error!(
                    "read manifest {} of site {site}: {e:#}; not installed",
                    root.manifest
                );
                self.with_site(site, |f| f.damaged = Some(format!("{e:#}")));
                return true;
            }
            Err(e) => {
                tracing::warn!("read manifest {} of site {site}: {e:#}", root.manifest);
                return true;
            }
        };
        let at = self.installs.fetch_add(1, Ordering::Relaxed) + 1;
        self.pages.install(Arc::new(manifest), at);
        self.metrics
            .edge_installed_index
            .get_or_create(&vec![("site".to_string(), site.to_string())])
            .set(i64::try_from(root.index).unwrap_or(i64::MAX));
        tracing::info!(site, index = root.index, manifest = %root.manifest, "installed");
        self.with_site(site, |f| {
            f.installed = Some(root);
            f.damaged = None;
        });
        true
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

    /// Answers a request for a page.
    async fn serve_page(self: Arc<Self>, req: Request) -> Response {
        let (parts, _body) = req.into_parts();
        let target = serve::site_and_path(self.pages.config(), &parts.headers, parts.uri.path());
        if self.pages.served_index(&target.site).is_none() {
            if let Some(why) = self.damaged(&target.site) {
                return unavailable(format!(
                    "site {} is damaged in the object store and is not served: {why}",
                    target.site
                ));
            }
        }
        let waiter = self.clone();
        answer(
            &self.pages,
            &parts.method,
            &parts.uri,
            &parts.headers,
            |site, index| async move { waiter.wait_index(&site, index).await },
        )
        .await
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

/// Reads chunks from the store and counts them.
struct CountedChunks<'a> {
    publisher: &'a Publisher,
    metrics: &'a Metrics,
}

impl ChunkSource for CountedChunks<'_> {
    fn chunk<'a>(
        &'a self,
        site: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bytes::Bytes, PublishError>> {
        self.metrics.edge_chunk_fetches.inc();
        self.publisher.chunk(site, id)
    }
}

/// S3/R2 settings from `AWS_*` variables (as `aws_endpoint`, `aws_region`, ...; see
/// `object_store::aws::AmazonS3ConfigKey`).
pub fn store_options_from_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

/// Opens the object store a URL names, with S3/R2 settings from `AWS_*` variables, and the
/// S3 client's defaults (a node's publishes may wait out a slow store).
pub fn open_objects(url: &str) -> anyhow::Result<Publisher> {
    Publisher::from_url(url, store_options_from_env())
        .with_context(|| format!("open object store {url}"))
}

/// Opens the object store a URL names for an edge: an S3 (or R2) client gets short
/// timeouts and few retries ([`S3_CONNECT_TIMEOUT_MS`], [`S3_REQUEST_TIMEOUT_MS`],
/// [`S3_RETRIES_MAX`]), so a fetch a visitor waits for fails within seconds when the store
/// does not answer; `options` may still set `timeout` or `connect_timeout`.
pub fn open_objects_for_edge(url: &str, options: &[(String, String)]) -> anyhow::Result<Publisher> {
    let parsed = url::Url::parse(url).with_context(|| format!("parse object store URL {url}"))?;
    let (scheme, prefix) = object_store::ObjectStoreScheme::parse(&parsed)
        .with_context(|| format!("open object store {url}"))?;
    if scheme != object_store::ObjectStoreScheme::AmazonS3 {
        return Publisher::from_url(url, options.iter().cloned())
            .with_context(|| format!("open object store {url}"));
    }
    let client = ClientOptions::new()
        .with_connect_timeout(Duration::from_millis(S3_CONNECT_TIMEOUT_MS))
        .with_timeout(Duration::from_millis(S3_REQUEST_TIMEOUT_MS));
    let retry = RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(1_000),
            base: 2.0,
        },
        max_retries: S3_RETRIES_MAX,
        retry_timeout: Duration::from_millis(S3_REQUEST_TIMEOUT_MS),
    };
    let builder = options.iter().fold(
        object_store::aws::AmazonS3Builder::new()
            .with_url(url)
            .with_client_options(client)
            .with_retry(retry),
        |builder, (key, value)| match key.parse() {
            Ok(k) => builder.with_config(k, value),
            Err(_) => builder,
        },
    );
    let store = builder
        .build()
        .with_context(|| format!("open object store {url}"))?;
    let prefix = object_store::path::Path::parse(prefix)
        .with_context(|| format!("read the folder of object store URL {url}"))?;
    Ok(Publisher::with_prefix(Arc::new(store), prefix))
}

/// The edge's own routes; pages reach them only as the router's fallback (see
/// [`crate::http::front`]).
pub fn router(edge: Arc<Edge>) -> axum::Router {
    axum::Router::new()
        .route("/_sesame/notify", post(notify))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(|State(edge): State<Arc<Edge>>, req: Request| edge.serve_page(req))
        .with_state(edge)
}

/// What a node's answer layer does that pages rely on: the limits on the request head (in
/// [`crate::http::front`]), `nosniff` on every answer, and the count of answers by status.
impl crate::http::front::Frontend for Edge {
    type Ticket = ();

    fn begin(&self, _req: &Request, _page: bool) {}

    fn page(self: Arc<Self>, req: Request) -> impl std::future::Future<Output = Response> + Send {
        self.serve_page(req)
    }

    fn finish(&self, _ticket: (), mut resp: Response) -> Response {
        resp.headers_mut().insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        self.metrics.answered(resp.status().as_u16());
        resp
    }
}

/// `GET /metrics`: the edge's figures in the Prometheus (OpenMetrics) text format. Public,
/// as on a node: it names sites (which the store lists anyway), no key or token.
async fn metrics(State(edge): State<Arc<Edge>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        edge.metrics.encode(),
    )
        .into_response()
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
    let publisher = Arc::new(open_objects_for_edge(
        &config.objects,
        &config.store_options,
    )?);
    start_with(config, publisher).await
}

/// [`start`] over a store opened by the caller (tests wrap one to count or stall reads).
pub async fn start_with(
    config: EdgeConfig,
    publisher: Arc<Publisher>,
) -> anyhow::Result<RunningEdge> {
    let edge = Arc::new(Edge::new(&config, publisher)?);
    // The first read before the first request, so a healthy store's pages are there at once
    // (and an unreachable one delays the start by one round's bound, no more).
    edge.reread().await;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("listen on {}", config.http_addr))?;
    let addr = listener.local_addr().context("read the bound address")?;
    let cancel = CancellationToken::new();
    let poller = tokio::spawn(edge.clone().run(cancel.clone()));
    let app =
        crate::http::front::Front::new(edge.clone(), router(edge.clone()), HTTP_CONCURRENCY_MAX);
    let stop = cancel.clone();
    let server = tokio::spawn(async move {
        let result = axum::serve(crate::http::without_delay(listener), app)
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
