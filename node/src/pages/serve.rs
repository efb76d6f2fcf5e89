//! Serving published pages at clean URLs: `GET /<site>/<path>` (path mode) and
//! `Host: <site>.<domain>` (subdomain mode).
//!
//! The hot path touches no database and no object store: each site's current manifest is
//! held in memory (swapped whole on publish, so a reader never sees half a version) and
//! recently served files sit in a byte-bounded cache keyed by content hash. The projector
//! installs the versions it publishes; [`crate::pages::follow`] installs every committed root (on
//! followers, after a rollback, at start-up).
//!
//! A body that is not cached is read from the object store once however many requests want
//! it at the same moment: the first miss starts a fetch (a task of its own, so a client that
//! goes away does not cancel it for the others) and later misses wait for that fetch, within
//! [`BLOB_FETCH_WAIT`]. A page that a CDN purge or a crawler makes cold then costs the store
//! one GET, not one per visitor. A failed fetch gives every waiter the same error and leaves
//! nothing behind: the next request tries again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sesame_projector::{
    FileEntry, Manifest, Publisher, ASSET_VERSION_HEX_LEN, ASSET_VERSION_PARAM, NOT_FOUND_PATH,
};
use sesame_proto::names::is_unreserved;
use sesame_proto::{validate_site, LogIndex};

use crate::app::Node;
use crate::http::error::ApiError;

/// Longest request path we look up, in bytes.
pub const PATH_BYTES_MAX: usize = 2_048;
/// Bytes of file content a node keeps in memory.
pub const BLOB_CACHE_BYTES_MAX: usize = 256 << 20;
/// Files larger than this are served but not cached.
pub const BLOB_CACHED_BYTES_MAX: usize = 8 << 20;
/// Most shards (independently locked parts) of the blob cache.
const BLOB_CACHE_SHARDS_MAX: usize = 8;
/// Longest a request waits for a body from the object store (its own fetch or a shared one);
/// the fetch itself is abandoned then too, so a stalled store holds no task for long.
pub const BLOB_FETCH_WAIT: Duration = Duration::from_secs(20);
/// The typical file, for sizing the cache's index (quick_cache wants an estimated count).
const BLOB_TYPICAL_BYTES: usize = 16 << 10;
/// Header that asks to wait for a projected index (read-your-writes).
pub const MIN_INDEX_HEADER: &str = "sesame-min-index";
/// Most requests held by `Sesame-Min-Index` at once, over all sites. Held requests take
/// slots of the HTTP concurrency limit, so this stays well below it.
pub const HELD_REQUESTS_MAX: usize = 256;
/// Most requests held by `Sesame-Min-Index` at once for one site.
pub const HELD_REQUESTS_PER_SITE_MAX: usize = 64;
/// Header naming the commit index of the version served.
pub const VERSION_HEADER: HeaderName = HeaderName::from_static("sesame-version");
/// The `CDN-Cache-Control` header (RFC 9213): what a CDN obeys instead of `Cache-Control`.
pub const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// Caching a page, in two parts: browsers read `Cache-Control`; a CDN that knows RFC 9213
/// reads `CDN-Cache-Control` ([`PAGE_CDN_CACHE_CONTROL`]) and ignores `Cache-Control`.
///
/// `no-cache`: a browser (and any shared cache that does not know `CDN-Cache-Control`) may
/// keep the page but asks before each use; the strong ETag makes the question a bodiless
/// 304. A reader therefore sees an edit on the next load, never a stale copy from its own
/// cache. There is deliberately no `s-maxage` for the edge here: `s-maxage` implies
/// `proxy-revalidate` (RFC 9111, 5.2.2.10), which forbids a shared cache to serve a stale
/// response, so a `stale-while-revalidate` beside it would be void.
///
/// None of these headers says `public`: it only lets caches keep answers to requests that
/// carried `Authorization` (RFC 9111, 5.2.2.9). Pages are the same for everyone and need no
/// credentials, so it would add nothing (REDbot flags it as unnecessary).
const PAGE_CACHE_CONTROL: &str = "no-cache";
/// What a CDN does with a page:
/// - `max-age=10`: answer from its copy for 10 s, so a crowd on one page costs each edge
///   location one request to the origin per 10 s, and an edit reaches every reader within
///   about 10 s (each manifest's delta names the paths to purge for sooner).
/// - `stale-while-revalidate=60`: for a minute after that, answer at once from the old copy
///   while fetching the new one in the background, so no reader of a popular page waits on
///   the origin; a copy served is then at most 70 s old.
/// - `stale-if-error=86400`: when no node answers (or they answer 5xx), serve the last copy
///   for up to a day rather than an error: a page was correct once, and its site is static.
///   (A `Sesame-Min-Index` wait that times out is a 503, but only a request with the same
///   `?_min=` could be answered with a copy, and that copy reflects the index.)
const PAGE_CDN_CACHE_CONTROL: &str = "max-age=10, stale-while-revalidate=60, stale-if-error=86400";
/// A file requested with `?v=` naming its own content hash (the URLs `asset_url()` makes):
/// that URL can only ever answer these bytes, so every cache may keep it for a year without
/// asking, and a browser need not even revalidate on reload (`immutable`, RFC 8246). Sent
/// without `CDN-Cache-Control`: a CDN then reads this one (RFC 9213, 2.1).
const IMMUTABLE_CACHE_CONTROL: &str = "max-age=31536000, immutable";
/// A 404 (no such site, nothing published yet, or no such page, also when the site's own
/// 404 page is the body): browsers ask again every time, so a page created a moment ago
/// shows on the next load; a CDN keeps the answer 10 s, the same bound as for an edit, so a
/// flood of requests for missing URLs (scanners, a broken link on a popular page) costs the
/// origin one request per URL per 10 s. No `stale-while-revalidate` or `stale-if-error`: a
/// stale 404 would hide a page that exists. No ETag either: a 404 is never answered with a
/// 304, so a validator would only invite pointless conditional requests.
const NOT_FOUND_CACHE_CONTROL: &str = "no-cache";
/// See [`NOT_FOUND_CACHE_CONTROL`].
const NOT_FOUND_CDN_CACHE_CONTROL: &str = "max-age=10";

/// How serving behaves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Subdomain mode: `Host: <site>.<domain>` serves `<site>`. `None`: path mode only.
    pub domain: Option<String>,
    /// Longest a `Sesame-Min-Index` request waits for the projection.
    pub min_index_wait: Duration,
    /// Bytes of file content kept in memory.
    pub blob_cache_bytes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            domain: None,
            min_index_wait: Duration::from_millis(2_000),
            blob_cache_bytes: BLOB_CACHE_BYTES_MAX,
        }
    }
}

/// One site's published version, as served: the manifest itself, shared with the projector
/// that made it, so installing a version costs nothing per file.
struct SiteVersion {
    manifest: Arc<Manifest>,
    /// The log index of the root that published this version: installs only move forward.
    root_log_index: LogIndex,
    version_header: HeaderValue,
}

impl SiteVersion {
    fn file(&self, path: &str) -> Option<&FileEntry> {
        self.manifest.files.get(path)
    }
}

/// A file's strong ETag: its content hash, quoted. One allocation, no copy.
fn etag_header(hash: &str) -> Option<HeaderValue> {
    let mut tag = Vec::with_capacity(hash.len() + 2);
    tag.push(b'"');
    tag.extend_from_slice(hash.as_bytes());
    tag.push(b'"');
    HeaderValue::from_maybe_shared(Bytes::from(tag)).ok()
}

/// Content types that pages and assets mostly have, as header values made once.
static COMMON_CONTENT_TYPES: [HeaderValue; 8] = [
    HeaderValue::from_static("text/html; charset=utf-8"),
    HeaderValue::from_static("text/css; charset=utf-8"),
    HeaderValue::from_static("text/javascript; charset=utf-8"),
    HeaderValue::from_static("application/json"),
    HeaderValue::from_static("image/svg+xml"),
    HeaderValue::from_static("image/png"),
    HeaderValue::from_static("image/jpeg"),
    HeaderValue::from_static("image/webp"),
];

/// A file's content type as a header value, or `None` when it cannot be one.
fn content_type_header(content_type: &str) -> Option<HeaderValue> {
    match COMMON_CONTENT_TYPES
        .iter()
        .find(|t| t.as_bytes() == content_type.as_bytes())
    {
        Some(t) => Some(t.clone()),
        None => HeaderValue::from_str(content_type).ok(),
    }
}

/// Weighs a cached file by its length, so the cache is bounded in bytes.
#[derive(Clone)]
struct BlobWeighter;

impl quick_cache::Weighter<String, Bytes> for BlobWeighter {
    fn weight(&self, key: &String, body: &Bytes) -> u64 {
        // At least 1: quick_cache never evicts an item of weight 0.
        (key.len() + body.len()).max(1) as u64
    }
}

/// Content-addressed file bytes, bounded in total size. quick_cache's S3-FIFO keeps files
/// that are asked for again (a site's home page, its stylesheet) over files read once (a
/// crawler walking every page), which a plain FIFO would not.
struct BlobCache {
    cache: quick_cache::sync::Cache<String, Bytes, BlobWeighter>,
}

impl BlobCache {
    fn new(bytes_max: usize) -> BlobCache {
        assert!(bytes_max > 0, "a blob cache needs room");
        // quick_cache splits its capacity among shards, and a shard refuses a file heavier
        // than its share: keep every share at least 4 files of the largest cached size.
        let shards = (bytes_max / (4 * BLOB_CACHED_BYTES_MAX)).clamp(1, BLOB_CACHE_SHARDS_MAX);
        let options = quick_cache::OptionsBuilder::new()
            .shards(shards)
            .estimated_items_capacity((bytes_max / BLOB_TYPICAL_BYTES).max(16))
            .weight_capacity(bytes_max as u64)
            .build()
            .expect("blob cache options are complete");
        BlobCache {
            cache: quick_cache::sync::Cache::with_options(
                options,
                BlobWeighter,
                quick_cache::DefaultHashBuilder::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            ),
        }
    }

    fn get(&self, hash: &str) -> Option<Bytes> {
        self.cache.get(hash)
    }

    fn insert(&self, hash: &str, body: Bytes) {
        if body.len() > BLOB_CACHED_BYTES_MAX {
            return;
        }
        self.cache.insert(hash.to_string(), body);
    }

    fn bytes(&self) -> u64 {
        self.cache.weight()
    }
}

/// Why a body could not be read: the same for every request that waited for one fetch.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BlobError {
    /// The store has bytes that do not match their hash (as opposed to an outage).
    pub corrupt: bool,
    message: Arc<str>,
}

impl BlobError {
    fn new(corrupt: bool, message: String) -> BlobError {
        BlobError {
            corrupt,
            message: message.into(),
        }
    }
}

/// A fetch of one body, shared by every request that missed the cache for it meanwhile.
type BlobFetch =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<Bytes, BlobError>>>;

/// Fetches in flight, by content hash. An entry lives from the first miss to the end of its
/// fetch (which is bounded by [`BLOB_FETCH_WAIT`]), and misses come from requests, so the
/// map is bounded by the HTTP concurrency limit.
type BlobFetches = Arc<Mutex<HashMap<String, BlobFetch>>>;

/// Counts of held requests, in all and per site. A site has an entry only while requests
/// for it are held, so the map is bounded by [`HELD_REQUESTS_MAX`].
#[derive(Default)]
struct Holds {
    counts: Mutex<(usize, HashMap<String, usize>)>,
}

/// One held request; dropping it releases its place.
struct Hold<'a> {
    holds: &'a Holds,
    site: String,
}

impl Holds {
    fn try_hold(&self, site: &str) -> Option<Hold<'_>> {
        let mut counts = self.counts.lock().expect("holds lock poisoned");
        let (total, per_site) = &mut *counts;
        let here = per_site.get(site).copied().unwrap_or(0);
        if *total >= HELD_REQUESTS_MAX || here >= HELD_REQUESTS_PER_SITE_MAX {
            return None;
        }
        *total += 1;
        per_site.insert(site.to_string(), here + 1);
        Some(Hold {
            holds: self,
            site: site.to_string(),
        })
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut counts = self.holds.counts.lock().expect("holds lock poisoned");
        let (total, per_site) = &mut *counts;
        *total -= 1;
        if let Some(n) = per_site.get_mut(&self.site) {
            *n -= 1;
            if *n == 0 {
                per_site.remove(&self.site);
            }
        }
    }
}

/// The served state of every site.
pub struct Pages {
    config: ServeConfig,
    publisher: Arc<Publisher>,
    metrics: Arc<crate::metrics::Metrics>,
    sites: RwLock<HashMap<String, Arc<SiteVersion>>>,
    blobs: Arc<BlobCache>,
    /// Fetches of uncached bodies in flight (see the module doc).
    fetches: BlobFetches,
    /// Bumped at every install.
    installed: tokio::sync::watch::Sender<u64>,
    /// Requests held by `Sesame-Min-Index`.
    holds: Holds,
    /// Deleted sites and the log index of their deletion: a version published before it
    /// (a projector racing the deletion) is never installed. One entry per deleted site
    /// until it is published again.
    deleted: Mutex<HashMap<String, LogIndex>>,
    /// Told of every change of a served version (it purges CDN caches while this node leads).
    purger: Option<Arc<crate::pages::purge::Purger>>,
}

impl Pages {
    pub fn new(
        config: ServeConfig,
        publisher: Arc<Publisher>,
        metrics: Arc<crate::metrics::Metrics>,
        purger: Option<Arc<crate::pages::purge::Purger>>,
    ) -> Pages {
        let blobs = BlobCache::new(config.blob_cache_bytes);
        Pages {
            config,
            publisher,
            metrics,
            sites: RwLock::new(HashMap::new()),
            blobs: Arc::new(blobs),
            fetches: Arc::default(),
            installed: tokio::sync::watch::channel(0).0,
            holds: Holds::default(),
            deleted: Mutex::new(HashMap::new()),
            purger,
        }
    }

    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// The manifest of the version `site` serves now.
    pub fn manifest(&self, site: &str) -> Option<Arc<Manifest>> {
        self.sites
            .read()
            .expect("pages lock poisoned")
            .get(site)
            .map(|v| v.manifest.clone())
    }

    /// A file of `site` by its hash (for the service worker, which keeps pages by content
    /// hash and may still serve an older version than the node). Files are immutable, so an
    /// older version's is as good. Its content type is the served version's entry at `path`
    /// when that entry has this hash, else `application/octet-stream`: the lookup costs a
    /// path's walk down the tree, never a scan of the site. `None` when the site has no
    /// such file.
    pub async fn blob(
        &self,
        site: &str,
        hash: &str,
        path: Option<&str>,
    ) -> Option<anyhow::Result<(Bytes, String)>> {
        let manifest = self.manifest(site)?;
        let content_type = path
            .and_then(|p| manifest.files.get(p))
            .filter(|f| f.hash == hash)
            .map(|f| f.content_type.clone());
        match (self.body(site, hash).await, content_type) {
            (Ok(body), t) => Some(Ok((
                body,
                t.unwrap_or_else(|| "application/octet-stream".into()),
            ))),
            // Not in the served version, and not in the store: no such file.
            (Err(_), None) => None,
            (Err(e), Some(_)) => Some(Err(e.into())),
        }
    }

    /// Stops serving a site deleted by the command at log index `deleted_at`.
    pub fn remove(&self, site: &str, deleted_at: LogIndex) {
        let mut deleted = self.deleted.lock().expect("deleted sites lock poisoned");
        let at = deleted.entry(site.to_string()).or_insert(deleted_at);
        *at = (*at).max(deleted_at);
        let gone = self
            .sites
            .write()
            .expect("pages lock poisoned")
            .remove(site);
        drop(deleted);
        if let (Some(purger), Some(gone)) = (&self.purger, gone) {
            purger.removed(&gone.manifest, deleted_at);
        }
    }

    /// Serves `manifest`, published by the root committed at `root_log_index`, as its
    /// site's current version, unless a later root's version is served already (the
    /// projector and a refresh may race; the later root must win).
    pub fn install(&self, manifest: Arc<Manifest>, root_log_index: LogIndex) {
        let site = manifest.site.clone();
        {
            let mut deleted = self.deleted.lock().expect("deleted sites lock poisoned");
            match deleted.get(&site) {
                Some(at) if *at > root_log_index => return,
                Some(_) => {
                    deleted.remove(&site);
                }
                None => {}
            }
        }
        let version = Arc::new(SiteVersion {
            version_header: HeaderValue::from(manifest.index),
            manifest,
            root_log_index,
        });
        let mut sites = self.sites.write().expect("pages lock poisoned");
        match sites.get(&site) {
            Some(current) if current.root_log_index > root_log_index => {}
            _ => {
                let replaced = sites.insert(site, version.clone());
                drop(sites);
                self.installed.send_modify(|n| *n = n.wrapping_add(1));
                if let Some(purger) = &self.purger {
                    let old = replaced.map(|v| v.manifest.clone());
                    // The same version installed again (the projector, then the follower)
                    // changed nothing.
                    if !old
                        .as_ref()
                        .is_some_and(|o| Arc::ptr_eq(o, &version.manifest))
                    {
                        purger.installed(old.as_deref(), &version.manifest);
                    }
                }
            }
        }
    }

    /// The sites with a version served now.
    pub fn served_sites(&self) -> Vec<String> {
        self.sites
            .read()
            .expect("pages lock poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// The log index of the root whose version is served for `site` (0: none).
    pub fn root_log_index(&self, site: &str) -> LogIndex {
        self.sites
            .read()
            .expect("pages lock poisoned")
            .get(site)
            .map_or(0, |v| v.root_log_index)
    }

    /// Changes whenever a version is installed.
    pub fn installed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.installed.subscribe()
    }

    /// Waits until the version served for `site` comes from a root at or after
    /// `root_log_index`, at most `timeout`.
    pub async fn wait_root(&self, site: &str, root_log_index: LogIndex, timeout: Duration) -> bool {
        let mut installed = self.installed();
        tokio::time::timeout(
            timeout,
            installed.wait_for(|_| self.root_log_index(site) >= root_log_index),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// Puts file bytes the caller already holds into the cache.
    pub fn prime(&self, hash: &str, body: Bytes) {
        self.blobs.insert(hash, body);
        self.metrics.blob_cache_bytes.set(self.blobs.bytes() as i64);
    }

    /// A place among the requests held by `Sesame-Min-Index`, or `None` when the limits
    /// ([`HELD_REQUESTS_MAX`], [`HELD_REQUESTS_PER_SITE_MAX`]) are reached.
    pub(crate) fn try_hold(&self, site: &str) -> Option<impl Drop + '_> {
        self.holds.try_hold(site)
    }

    /// The commit index a site's served version reflects.
    pub fn served_index(&self, site: &str) -> Option<LogIndex> {
        self.sites
            .read()
            .expect("pages lock poisoned")
            .get(site)
            .map(|v| v.manifest.index)
    }

    /// The bytes of file `hash` of `site`: from the cache, else from the store through the
    /// fetch in flight for it, or a new one (see the module doc).
    pub(crate) async fn body(&self, site: &str, hash: &str) -> Result<Bytes, BlobError> {
        if let Some(b) = self.blobs.get(hash) {
            self.metrics.blob_cache_hits.inc();
            return Ok(b);
        }
        self.metrics.blob_cache_misses.inc();
        let fetch = {
            let mut fetches = self.fetches.lock().expect("blob fetches lock poisoned");
            match fetches.get(hash) {
                Some(fetch) => fetch.clone(),
                None => {
                    // The fetch may have ended between the cache lookup and the lock.
                    if let Some(b) = self.blobs.get(hash) {
                        return Ok(b);
                    }
                    let fetch = self.start_fetch(site, hash);
                    fetches.insert(hash.to_string(), fetch.clone());
                    fetch
                }
            }
        };
        match tokio::time::timeout(BLOB_FETCH_WAIT, fetch).await {
            Ok(result) => result,
            Err(_) => Err(BlobError::new(
                false,
                format!("the object store did not answer within {BLOB_FETCH_WAIT:?}"),
            )),
        }
    }

    /// Starts fetching `hash` of `site` into the cache, in a task of its own; the task takes
    /// its entry out of `fetches` when it ends, after caching a good body.
    fn start_fetch(&self, site: &str, hash: &str) -> BlobFetch {
        self.metrics.blob_fetches.inc();
        let (publisher, blobs, fetches, metrics) = (
            self.publisher.clone(),
            self.blobs.clone(),
            self.fetches.clone(),
            self.metrics.clone(),
        );
        let (site, hash) = (site.to_string(), hash.to_string());
        let task = tokio::spawn(async move {
            let read = tokio::time::timeout(BLOB_FETCH_WAIT, publisher.get_blob(&site, &hash));
            let result = match read.await {
                Ok(Ok(body)) => {
                    blobs.insert(&hash, body.clone());
                    metrics.blob_cache_bytes.set(blobs.bytes() as i64);
                    Ok(body)
                }
                Ok(Err(e)) => Err(BlobError::new(
                    matches!(e, sesame_projector::PublishError::Corrupt { .. }),
                    format!("{e:#}"),
                )),
                Err(_) => Err(BlobError::new(
                    false,
                    format!("the object store did not answer within {BLOB_FETCH_WAIT:?}"),
                )),
            };
            fetches
                .lock()
                .expect("blob fetches lock poisoned")
                .remove(&hash);
            result
        });
        use futures::FutureExt as _;
        async move {
            task.await.unwrap_or_else(|e| {
                Err(BlobError::new(false, format!("the blob fetch failed: {e}")))
            })
        }
        .boxed()
        .shared()
    }
}

/// A 503 that asks to retry in a second.
pub(crate) fn unavailable(message: impl Into<String>) -> Response {
    let mut resp = plain(StatusCode::SERVICE_UNAVAILABLE, message);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// A plain-text answer that no cache keeps.
pub(crate) fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    let mut resp = (status, format!("{}\n", message.into())).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A plain-text 404, cached as [`NOT_FOUND_CACHE_CONTROL`] says.
fn not_found(message: &str, version: Option<&SiteVersion>) -> Response {
    let mut resp = plain(StatusCode::NOT_FOUND, message);
    not_found_headers(resp.headers_mut(), version);
    resp
}

/// The caching headers of every 404, and the version that answered it if a site did.
fn not_found_headers(headers: &mut HeaderMap, version: Option<&SiteVersion>) {
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(NOT_FOUND_CACHE_CONTROL),
    );
    headers.insert(
        CDN_CACHE_CONTROL,
        HeaderValue::from_static(NOT_FOUND_CDN_CACHE_CONTROL),
    );
    if let Some(version) = version {
        headers.insert(VERSION_HEADER, version.version_header.clone());
    }
}

/// Whether the request's `?v=` names `hash`: at least [`ASSET_VERSION_HEX_LEN`] hex digits
/// that start it (what `asset_url()` writes), at most all of it.
fn names_version(query: Option<&str>, hash: &str) -> bool {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.strip_prefix(ASSET_VERSION_PARAM)?.strip_prefix('='))
        .any(|v| v.len() >= ASSET_VERSION_HEX_LEN && hash.starts_with(v))
}

/// Where a request for a page goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub site: std::borrow::Cow<'a, str>,
    /// The raw path inside the site (still percent-encoded), starting with `/`.
    pub path: &'a str,
    /// Subdomain mode: the site came from the `Host` header.
    pub by_host: bool,
}

/// Splits a request into site and path: subdomain mode when the `Host` names a site under
/// the configured domain (compared case-insensitively, a trailing dot and a port ignored),
/// else path mode (`/<site>/<path>`).
pub fn site_and_path<'a>(config: &ServeConfig, headers: &HeaderMap, path: &'a str) -> Target<'a> {
    if let Some(domain) = &config.domain {
        let site = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|host| site_from_host(host, domain));
        if let Some(site) = site {
            return Target {
                site: std::borrow::Cow::Owned(site),
                path,
                by_host: true,
            };
        }
    }
    let rest = path.strip_prefix('/').unwrap_or(path);
    let (site, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Target {
        site: std::borrow::Cow::Borrowed(site),
        path,
        by_host: false,
    }
}

/// The site a `Host` value names under `domain` (`Demo.Example.com.:8080` → `demo`).
fn site_from_host(host: &str, domain: &str) -> Option<String> {
    let host = host.trim();
    // An IPv6 literal names no site.
    if host.starts_with('[') {
        return None;
    }
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let domain = normalize_domain(domain);
    let site = host.strip_suffix(domain.as_str())?.strip_suffix('.')?;
    (!site.is_empty()).then(|| site.to_string())
}

/// A domain as hosts are compared with it: lower case, without a trailing dot.
pub fn normalize_domain(domain: &str) -> String {
    let d = domain.trim();
    d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase()
}

/// Normalises a raw request path the way the manifest spells paths: percent-encodings of
/// unreserved characters are decoded, others upper-cased. An encoded slash or backslash
/// stays encoded inside its segment (a key `a/b` is published at `/a%2Fb`; pages are looked
/// up in the manifest, never on a file system). `.`/`..` segments (also encoded), empty
/// segments, raw backslashes and control characters are refused.
pub fn normalize_path(raw: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    if raw.len() > PATH_BYTES_MAX {
        return Err(format!(
            "path is {} bytes, the limit is {PATH_BYTES_MAX}",
            raw.len()
        ));
    }
    // Most paths need no change: check them where they are.
    if raw.starts_with('/') && !raw.contains('%') {
        if raw.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'\\') {
            return Err("control characters and backslashes are not allowed in paths".into());
        }
        check_segments(raw)?;
        return Ok(std::borrow::Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or("truncated percent-encoding")?;
            if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                return Err(format!("bad percent-encoding %{hex}"));
            }
            let v =
                u8::from_str_radix(hex, 16).map_err(|_| format!("bad percent-encoding %{hex}"))?;
            match v {
                v if is_unreserved(v) => out.push(v as char),
                v if v < 0x20 || v == 0x7f => {
                    return Err("control characters are not allowed in paths".into())
                }
                v => out.push_str(&format!("%{v:02X}")),
            }
            i += 3;
        } else if b < 0x20 || b == 0x7f || b == b'\\' {
            return Err("control characters and backslashes are not allowed in paths".into());
        } else {
            // Multi-byte UTF-8 is copied whole (a request path from the network is ASCII;
            // this keeps the function total on any string).
            let len = utf8_len(b);
            out.push_str(raw.get(i..i + len).ok_or("path is not UTF-8")?);
            i += len;
        }
    }
    check_segments(&out)?;
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// Refuses empty, `.` and `..` segments (a leading and a trailing `/` are allowed).
fn check_segments(path: &str) -> Result<(), String> {
    let inner = path.strip_prefix('/').unwrap_or(path);
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if !inner.is_empty()
        && inner
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("paths may not have empty, '.' or '..' segments".into());
    }
    Ok(())
}

/// Bytes in the UTF-8 sequence that starts with `first`.
fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

fn min_index(headers: &HeaderMap, query: Option<&str>) -> Result<Option<LogIndex>, String> {
    let from_query = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("_min=")));
    let raw = match (headers.get(MIN_INDEX_HEADER), from_query) {
        (Some(h), _) => h
            .to_str()
            .map_err(|_| "Sesame-Min-Index is not text".to_string())?,
        (None, Some(q)) => q,
        (None, None) => return Ok(None),
    };
    raw.trim()
        .parse::<LogIndex>()
        .map(Some)
        .map_err(|_| format!("minimum index {raw:?} is not a whole number"))
}

/// The router's fallback on a node: a page (see [`crate::http::front`]).
pub async fn serve(State(node): State<Arc<Node>>, req: Request) -> Response {
    serve_request(node, req).await
}

/// Answers a request for a page on a node.
pub async fn serve_request(node: Arc<Node>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    let waiter = node.clone();
    answer(
        &node.pages,
        &parts.method,
        &parts.uri,
        &parts.headers,
        |site, index| async move { wait_projected(&waiter, &site, index).await },
    )
    .await
}

/// Answers a request for a page from the versions `pages` serves: what a node and an edge
/// server (crate::edge) have in common. `wait` holds a request that names a minimum index
/// (`Sesame-Min-Index`, `?_min=`) until the site's served version reflects it, or answers
/// what to say instead; each server knows where newer versions come from.
pub async fn answer<W, F>(
    pages: &Pages,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    wait: W,
) -> Response
where
    W: FnOnce(String, LogIndex) -> F,
    F: std::future::Future<Output = Result<(), Response>>,
{
    if method != Method::GET && method != Method::HEAD {
        let mut resp = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed: pages are read with GET or HEAD"),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let target = site_and_path(&pages.config, headers, uri.path());
    let (site, raw_path) = (target.site.as_ref(), target.path);
    if validate_site(site).is_err() {
        return not_found("no such site", None);
    }
    // "/demo" → "/demo/": the site's root page, where its relative links resolve.
    if !target.by_host && uri.path().len() == site.len() + 1 {
        let location = match uri.query() {
            Some(q) => format!("/{site}/?{q}"),
            None => format!("/{site}/"),
        };
        let mut resp = plain(StatusCode::PERMANENT_REDIRECT, "moved");
        if let Ok(loc) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, loc);
        }
        return resp;
    }
    let path = match normalize_path(raw_path) {
        Ok(p) => p,
        Err(e) => return plain(StatusCode::BAD_REQUEST, e),
    };
    match min_index(headers, uri.query()) {
        Err(e) => return plain(StatusCode::BAD_REQUEST, e),
        Ok(Some(n)) => {
            if let Err(resp) = wait(site.to_string(), n).await {
                return resp;
            }
        }
        Ok(None) => {}
    }
    let Some(version) = pages
        .sites
        .read()
        .expect("pages lock poisoned")
        .get(site)
        .cloned()
    else {
        return not_found("no such site, or nothing published yet", None);
    };
    let (file, status) = match version.file(&path) {
        Some(f) => (f, StatusCode::OK),
        None => {
            // "/alice/" → "/alice": one canonical URL per page.
            if let Some(trimmed) = path.strip_suffix('/').filter(|t| version.file(t).is_some()) {
                let base = if target.by_host {
                    String::new()
                } else {
                    format!("/{site}")
                };
                let mut resp = plain(StatusCode::PERMANENT_REDIRECT, "moved");
                if let Ok(loc) = HeaderValue::from_str(&format!("{base}{trimmed}")) {
                    resp.headers_mut().insert(header::LOCATION, loc);
                }
                return resp;
            }
            match version.file(NOT_FOUND_PATH) {
                Some(f) => (f, StatusCode::NOT_FOUND),
                None => return not_found("not found", Some(&*version)),
            }
        }
    };
    let (Some(etag), Some(content_type)) = (
        etag_header(&file.hash),
        content_type_header(&file.content_type),
    ) else {
        tracing::error!(
            "serve {site}{path}: the manifest has a header-unsafe hash or content type"
        );
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "this file cannot be served",
        );
    };
    // The answer's headers, built in place (a page is the request served most), with room
    // for the ones its server adds (`nosniff`, a request id).
    let mut resp = Response::new(Body::empty());
    *resp.headers_mut() = HeaderMap::with_capacity(8);
    let resp_headers = resp.headers_mut();
    if status == StatusCode::NOT_FOUND {
        not_found_headers(resp_headers, Some(&*version));
    } else {
        // A 304 carries the same headers as the 200 it stands for (RFC 9110, 15.4.5), so a
        // cache that refreshes its copy with them keeps the same policy.
        resp_headers.insert(header::ETAG, etag);
        if names_version(uri.query(), &file.hash) {
            resp_headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static(IMMUTABLE_CACHE_CONTROL),
            );
        } else {
            resp_headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static(PAGE_CACHE_CONTROL),
            );
            resp_headers.insert(
                CDN_CACHE_CONTROL,
                HeaderValue::from_static(PAGE_CDN_CACHE_CONTROL),
            );
        }
        resp_headers.insert(VERSION_HEADER, version.version_header.clone());
        if etag_matches(headers, &file.hash) {
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            return resp;
        }
    }
    resp_headers.insert(header::CONTENT_TYPE, content_type);
    match pages.body(site, &file.hash).await {
        Ok(body) => {
            *resp.status_mut() = status;
            if method == Method::HEAD {
                // The length of the body a GET would get (RFC 9110, 9.3.2); hyper sends no
                // body for a HEAD.
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            } else {
                *resp.body_mut() = Body::from(body);
            }
            resp
        }
        Err(e) => {
            tracing::error!("serve {site}{path}: read blob {}: {e:#}", file.hash);
            let corrupt = e.corrupt;
            let mut resp = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                if corrupt {
                    "this file is damaged in the object store and is not served; retry later"
                } else {
                    "this file cannot be read right now; retry shortly"
                },
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
    }
}

/// Holds a request until `site`'s pages reflect every commit up to `index`, within the
/// configured wait and the limits on held requests; else the 503 to answer.
///
/// A served version made at or after `index` reflects it, on any node. Otherwise the
/// leader's projector knows whether the site is published that far (a site without changes
/// is published as far as the log goes): on the leader it is asked directly; a follower
/// waits to have applied `index`, asks the leader which root serves it, and waits to have
/// installed that root.
async fn wait_projected(node: &Node, site: &str, index: LogIndex) -> Result<(), Response> {
    let projections = &node.projections;
    let served = |node: &Node| node.pages.served_index(site).is_some_and(|s| s >= index);
    if served(node) || (projections.is_active() && projections.projected(site) >= index) {
        return Ok(());
    }
    // An index past the end of this node's log cannot be published soon: answer now
    // rather than hold the request.
    let known = node.known_index();
    if index > known {
        return Err(unavailable(format!(
            "index {index} is beyond the newest index this node knows ({known}); nothing that \
             new has been written here yet"
        )));
    }
    let Some(_hold) = node.pages.try_hold(site) else {
        return Err(unavailable(format!(
            "too many requests are waiting for new versions (at most {HELD_REQUESTS_PER_SITE_MAX} \
             per site, {HELD_REQUESTS_MAX} in all); retry shortly"
        )));
    };
    let wait = node.pages.config.min_index_wait;
    let deadline = tokio::time::Instant::now() + wait;
    let reached = if projections.is_active() {
        projections.wait_projected(site, index, wait).await
    } else {
        follower_wait(node, site, index, deadline).await
    };
    if reached || served(node) {
        Ok(())
    } else {
        Err(unavailable(format!(
            "index {index} is not published yet (this node serves site {site} as of index {}); \
             retry shortly",
            node.pages.served_index(site).unwrap_or(0)
        )))
    }
}

/// On a follower: whether `site` is served here as of `index` before `deadline`.
async fn follower_wait(
    node: &Node,
    site: &str,
    index: LogIndex,
    deadline: tokio::time::Instant,
) -> bool {
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    if !node.reads.wait_applied(index, left()).await {
        return false;
    }
    let request = crate::peer::PeerRequest::WaitProjected {
        site: site.to_string(),
        index,
        wait_ms: left().as_millis() as u64,
    };
    let root = match node.cluster.link.to_leader_within(&request, left()).await {
        Ok(crate::peer::PeerResponse::Projected {
            reached: true,
            root_log_index,
        }) => root_log_index,
        Ok(_) => return false,
        Err(e) => {
            tracing::debug!("ask the leader whether {site} is published: {e}");
            return false;
        }
    };
    node.pages.wait_root(site, root, left()).await
}

/// Whether `If-None-Match` names this file's ETag (or `*`).
fn etag_matches(headers: &HeaderMap, hash: &str) -> bool {
    let Some(v) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    v.split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/").trim_matches('"') == hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_or_refused() {
        assert_eq!(normalize_path("/").unwrap(), "/");
        assert_eq!(normalize_path("").unwrap(), "/");
        assert_eq!(normalize_path("/alice").unwrap(), "/alice");
        assert_eq!(normalize_path("/%61lice").unwrap(), "/alice");
        assert_eq!(normalize_path("/zo%c3%ab").unwrap(), "/zo%C3%AB");
        assert_eq!(normalize_path("/blog/").unwrap(), "/blog/");
        // Encoded slashes stay inside their segment, spelled as the manifest spells them.
        assert_eq!(normalize_path("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(normalize_path("/a%2Fb").unwrap(), "/a%2Fb");
        assert_eq!(normalize_path("/a%5cb").unwrap(), "/a%5Cb");
        assert_eq!(normalize_path("/..%2F..%2Fx").unwrap(), "/..%2F..%2Fx");
        for bad in [
            "/../etc/passwd",
            "/a/../b",
            "/%2e%2e/x",
            "/a/%2E",
            "/a\\b",
            "/%+1",
            "/a//b",
            "/./a",
            "/%zz",
            "/%4",
            "/a%00",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
        assert!(normalize_path(&format!("/{}", "a".repeat(PATH_BYTES_MAX))).is_err());
    }

    #[test]
    fn sites_from_path_or_host() {
        let mut h = HeaderMap::new();
        let cfg = ServeConfig {
            domain: Some("Example.com.".into()),
            ..Default::default()
        };
        let split = |h: &HeaderMap, p: &'static str| {
            let t = site_and_path(&cfg, h, p);
            (t.site.into_owned(), t.path, t.by_host)
        };
        assert_eq!(split(&h, "/demo/alice"), ("demo".into(), "/alice", false));
        assert_eq!(split(&h, "/demo"), ("demo".into(), "/", false));
        for host in [
            "demo.example.com:8080",
            "demo.example.com",
            "Demo.EXAMPLE.com",
            "demo.example.com.",
            "DEMO.example.com.:443",
        ] {
            h.insert(header::HOST, HeaderValue::from_static(host));
            assert_eq!(
                split(&h, "/alice"),
                ("demo".into(), "/alice", true),
                "{host}"
            );
        }
        for host in [
            "example.com",
            "[::1]:8080",
            "demo.example.org",
            ".example.com",
        ] {
            h.insert(header::HOST, HeaderValue::from_static(host));
            assert_eq!(split(&h, "/demo/x"), ("demo".into(), "/x", false), "{host}");
        }
    }

    #[test]
    fn etags_match_strong_weak_and_lists() {
        let mut h = HeaderMap::new();
        assert!(!etag_matches(&h, "abc"));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"abc\""),
        );
        assert!(etag_matches(&h, "abc"));
        assert!(!etag_matches(&h, "abd"));
    }

    #[test]
    fn only_a_version_that_starts_the_hash_names_it() {
        let hash = "0123456789abcdef".repeat(4);
        assert!(names_version(Some("v=0123456789abcdef"), &hash));
        assert!(names_version(Some(&format!("v={hash}")), &hash));
        assert!(names_version(Some("_min=3&v=0123456789abcdef0"), &hash));
        for query in [
            None,
            Some(""),
            Some("v="),
            Some("v=0123456789abcde"),
            Some("v=0123456789ABCDEF"),
            Some("v=1123456789abcdef"),
            Some("x=0123456789abcdef"),
            Some("vv=0123456789abcdef"),
        ] {
            assert!(!names_version(query, &hash), "{query:?}");
        }
        assert!(!names_version(Some(&format!("v={hash}0")), &hash));
    }

    #[test]
    fn installs_only_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let publisher = Arc::new(Publisher::local(dir.path()).unwrap());
        let pages = Pages::new(ServeConfig::default(), publisher, Default::default(), None);
        let manifest = |index| Manifest {
            format: sesame_projector::MANIFEST_FORMAT,
            site: "demo".into(),
            index,
            previous: None,
            files: Default::default(),
            delta: Default::default(),
        };
        pages.install(Arc::new(manifest(7)), 10);
        pages.install(Arc::new(manifest(3)), 5);
        assert_eq!(
            pages.served_index("demo"),
            Some(7),
            "an older root does not replace a newer one"
        );
        pages.install(Arc::new(manifest(3)), 12);
        assert_eq!(
            pages.served_index("demo"),
            Some(3),
            "a later root (a rollback) does"
        );
    }

    #[test]
    fn blob_cache_is_bounded_in_bytes_and_keeps_what_is_asked_for_again() {
        let bytes_max = 64 << 10;
        let c = BlobCache::new(bytes_max);
        let body = |n: usize| Bytes::from(vec![0u8; n]);
        c.insert("hot", body(1 << 10));
        for i in 0..1_000 {
            // The hot file is asked for between every cold one.
            assert!(
                c.get("hot").is_some(),
                "hot file evicted after {i} cold ones"
            );
            c.insert(&format!("cold{i}"), body(1 << 10));
            assert!(c.bytes() <= bytes_max as u64, "{} > {bytes_max}", c.bytes());
        }
        let cold_left = (0..1_000)
            .filter(|i| c.get(&format!("cold{i}")).is_some())
            .count();
        assert!(
            cold_left < 64,
            "{cold_left} cold files of 1 KiB left in 64 KiB"
        );
        c.insert("huge", body(BLOB_CACHED_BYTES_MAX + 1));
        assert!(
            c.get("huge").is_none(),
            "files past the per-file limit are not cached"
        );
    }
}
