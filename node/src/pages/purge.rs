//! CDN purges: when the version a site serves changes, the exact URLs that changed are sent
//! to a purge target, Cloudflare's purge-by-URL API or a webhook.
//!
//! [`Pages`](crate::pages::serve::Pages) tells the [`Purger`] whenever it swaps a site's
//! served version (a publish, a rollback, a deletion). While this node leads (only the leader
//! projects, so only it purges and followers do not send the same purges again), the purger
//! takes the difference between the version served until then and the new one, which for a
//! publish is the manifest's delta and for a rollback is what the rollback changed, and
//! queues every URL a CDN could have cached for those paths:
//!
//! - the file's own URL, `<base>/about` (the base is the site's public URL: `https://host/<site>`
//!   in path mode, `https://<site>.<domain>` in subdomain mode; see
//!   [`site_base_url`](crate::pages::projection::site_base_url));
//! - the same URL with or without a trailing slash, `<base>/about/`: serving redirects it to
//!   the file now, but answered with the not-found page (cacheable) before the file existed,
//!   and a CDN told to cache everything may hold the redirect;
//! - for the root `/`, `<base>/` and, in path mode, `<base>` (which redirects to `<base>/`).
//!
//! Paths are sent spelled as the manifest spells them (percent-encoded where a key needed it),
//! which is how links and the sitemap spell them. Not purged: other spellings of the same path
//! (`%7E` for `~`), path-mode URLs of a site that is served by subdomain, and URLs answered by
//! the not-found page when only the not-found page changed: they refresh after their cache
//! time (`s-maxage=10`).
//!
//! Sending never holds up publishing: URLs wait in a bounded queue (at most
//! [`PurgeConfig::queue_urls_max`] over all sites, kept per site), where a URL already waiting
//! is not queued twice. One task sends them in batches of at most
//! [`PurgeConfig::batch_urls_max`] URLs of one site, taking the sites in turn, paced to
//! [`PurgeConfig::urls_per_minute`]: calls spaced evenly, and no minute carrying more
//! (Cloudflare Free: 30 URLs a call, 1,000 URLs a minute; those are the Cloudflare defaults).
//! A batch that fails with a network error, a timeout, 408, 429 or a 5xx goes back to the
//! front of its site's queue and is retried after an exponential backoff (or the
//! `Retry-After` the target asked for); a batch refused for good (another 4xx, or Cloudflare
//! answering `"success": false`) is dropped and reported. When the queue is full, new URLs
//! are dropped: the site's status says how many (`purge.dropped_urls_total`, with
//! `last_error` saying the backlog overflowed), and the CDN serves its copies of them until
//! their cache time ends. Each site's status reports its backlog, its last error and its last
//! success (`GET /v1/sites/{site}/status`, `purge`).
//!
//! The queue lives in the leader's memory: a leader that stops leading still sends what it
//! had queued, but what is queued when a node stops or crashes is lost (their cache time
//! bounds the harm). The Cloudflare token is never logged and never in a status.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sesame_projector::{Delta, Manifest};
use sesame_proto::api::PurgeStatus;
use sesame_proto::LogIndex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::now_ms;
use crate::metrics::Metrics;

/// Where Cloudflare's API is; `SESAME_CLOUDFLARE_API` overrides it (tests point it at a
/// receiver on loopback).
pub const CLOUDFLARE_API_DEFAULT: &str = "https://api.cloudflare.com";
/// The environment variable that holds the Cloudflare API token.
pub const CLOUDFLARE_TOKEN_ENV: &str = "SESAME_CLOUDFLARE_TOKEN";
/// The environment variable that overrides [`CLOUDFLARE_API_DEFAULT`].
pub const CLOUDFLARE_API_ENV: &str = "SESAME_CLOUDFLARE_API";
/// URLs in one Cloudflare purge call (Cloudflare Free takes at most 30).
pub const CLOUDFLARE_BATCH_URLS_DEFAULT: usize = 30;
/// URLs purged per minute at most on Cloudflare (Cloudflare Free: 1,000).
pub const CLOUDFLARE_URLS_PER_MINUTE_DEFAULT: u32 = 1_000;
/// URLs in one webhook call.
pub const WEBHOOK_BATCH_URLS_DEFAULT: usize = 500;
/// URLs sent to a webhook per minute at most.
pub const WEBHOOK_URLS_PER_MINUTE_DEFAULT: u32 = 60_000;
/// Most URLs one call may carry, whatever is configured (bounds a request body).
pub const BATCH_URLS_MAX: usize = 10_000;
/// URLs waiting to be purged, over all sites, by default.
pub const QUEUE_URLS_MAX_DEFAULT: usize = 100_000;
/// Most URLs the queue may be configured to hold (each is a few hundred bytes at most).
pub const QUEUE_URLS_LIMIT: usize = 10_000_000;
/// First wait after a failed call; it doubles with each failure in a row.
pub const BACKOFF_MS_DEFAULT: u64 = 1_000;
/// Shortest first wait after a failed call that may be configured: a failing target is
/// never called in a tight loop.
pub const BACKOFF_MS_MIN: u64 = 10;
/// Longest wait between retries, unless the target asks for longer with `Retry-After`.
const BACKOFF_MS_MAX: u64 = 60_000;
/// Longest `Retry-After` honoured.
const RETRY_AFTER_MS_MAX: u64 = 600_000;
/// Longest one purge call may take.
const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Characters of a target's answer kept in an error message.
const ANSWER_CHARS_MAX: usize = 300;

/// Where purges go.
#[derive(Clone)]
pub enum PurgeTarget {
    /// Cloudflare's purge-by-URL API: `POST {api}/client/v4/zones/{zone}/purge_cache` with
    /// `{"files": [...]}` and `Authorization: Bearer {token}`.
    Cloudflare {
        zone: String,
        token: String,
        /// [`CLOUDFLARE_API_DEFAULT`] unless overridden.
        api: String,
    },
    /// Any HTTP endpoint: `POST {url}` with `{"site", "index", "urls": [...]}`.
    Webhook { url: String },
}

impl PurgeTarget {
    /// What the status calls it.
    pub fn kind(&self) -> &'static str {
        match self {
            PurgeTarget::Cloudflare { .. } => "cloudflare",
            PurgeTarget::Webhook { .. } => "webhook",
        }
    }
}

impl std::fmt::Debug for PurgeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of every log line and error message.
        match self {
            PurgeTarget::Cloudflare { zone, api, .. } => f
                .debug_struct("Cloudflare")
                .field("zone", zone)
                .field("token", &"<redacted>")
                .field("api", api)
                .finish(),
            PurgeTarget::Webhook { .. } => f
                .debug_struct("Webhook")
                .field("url", &"<redacted>")
                .finish(),
        }
    }
}

/// How a node purges.
#[derive(Debug, Clone)]
pub struct PurgeConfig {
    pub target: PurgeTarget,
    /// Most URLs in one call (1 to [`BATCH_URLS_MAX`]).
    pub batch_urls_max: usize,
    /// Most URLs sent per minute (0: no pacing).
    pub urls_per_minute: u32,
    /// Most URLs waiting, over all sites; past it new URLs are dropped and reported.
    pub queue_urls_max: usize,
    /// First wait after a failure; it doubles with each failure in a row.
    pub backoff: Duration,
}

impl PurgeConfig {
    /// Purges through Cloudflare's API with Cloudflare Free's limits.
    pub fn cloudflare(zone: impl Into<String>, token: impl Into<String>) -> PurgeConfig {
        PurgeConfig {
            target: PurgeTarget::Cloudflare {
                zone: zone.into(),
                token: token.into(),
                api: CLOUDFLARE_API_DEFAULT.into(),
            },
            batch_urls_max: CLOUDFLARE_BATCH_URLS_DEFAULT,
            urls_per_minute: CLOUDFLARE_URLS_PER_MINUTE_DEFAULT,
            queue_urls_max: QUEUE_URLS_MAX_DEFAULT,
            backoff: Duration::from_millis(BACKOFF_MS_DEFAULT),
        }
    }

    /// Purges through a webhook.
    pub fn webhook(url: impl Into<String>) -> PurgeConfig {
        PurgeConfig {
            target: PurgeTarget::Webhook { url: url.into() },
            batch_urls_max: WEBHOOK_BATCH_URLS_DEFAULT,
            urls_per_minute: WEBHOOK_URLS_PER_MINUTE_DEFAULT,
            queue_urls_max: QUEUE_URLS_MAX_DEFAULT,
            backoff: Duration::from_millis(BACKOFF_MS_DEFAULT),
        }
    }

    /// Checks the settings; says what is wrong.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=BATCH_URLS_MAX).contains(&self.batch_urls_max),
            "the purge batch is {} URLs; it must be 1 to {BATCH_URLS_MAX}",
            self.batch_urls_max
        );
        anyhow::ensure!(
            (1..=QUEUE_URLS_LIMIT).contains(&self.queue_urls_max),
            "the purge queue is {} URLs; it must be 1 to {QUEUE_URLS_LIMIT}",
            self.queue_urls_max
        );
        anyhow::ensure!(
            self.backoff >= Duration::from_millis(BACKOFF_MS_MIN),
            "the first wait after a failed purge is {:?}; it must be at least {BACKOFF_MS_MIN} ms",
            self.backoff
        );
        match &self.target {
            PurgeTarget::Cloudflare { zone, token, api } => {
                anyhow::ensure!(
                    !zone.is_empty() && zone.bytes().all(|b| b.is_ascii_alphanumeric()),
                    "the Cloudflare zone id {zone:?} must be letters and digits"
                );
                anyhow::ensure!(
                    !token.trim().is_empty(),
                    "purging through Cloudflare needs an API token in {CLOUDFLARE_TOKEN_ENV}"
                );
                check_http_url(api, "the Cloudflare API")?;
            }
            PurgeTarget::Webhook { url } => check_http_url(url, "--purge-url")?,
        }
        Ok(())
    }
}

fn check_http_url(raw: &str, what: &str) -> anyhow::Result<()> {
    // The URL itself may carry a secret: the message names the problem, not the URL.
    let url = url::Url::parse(raw).map_err(|e| anyhow::anyhow!("{what} is not a URL: {e}"))?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https") && url.host().is_some(),
        "{what} must be an http:// or https:// URL with a host"
    );
    Ok(())
}

/// One site's waiting URLs and what happened to its purges.
#[derive(Default)]
struct SiteQueue {
    /// In the order they were queued.
    urls: VecDeque<String>,
    /// The same URLs, to queue each once.
    queued: HashSet<String>,
    /// URLs taken by the call in flight.
    in_flight: Vec<String>,
    /// The index of the version served since the last change queued (a rollback's is older
    /// than the version it replaced): a batch says the CDN is purged up to it.
    index: LogIndex,
    purged_total: u64,
    dropped_total: u64,
    last_error: Option<String>,
    last_error_at: Option<u64>,
    last_success_at: Option<u64>,
}

/// Every site's queue. `waiting` counts the queued URLs of all sites (not those in flight).
#[derive(Default)]
struct Queue {
    sites: BTreeMap<String, SiteQueue>,
    waiting: usize,
    /// The site the last batch came from: the next batch comes from the one after it.
    last_site: Option<String>,
}

/// URLs of one site, sent in one call.
#[derive(Debug)]
struct Batch {
    site: String,
    index: LogIndex,
    urls: Vec<String>,
}

/// How a call failed.
#[derive(Debug)]
struct Failure {
    message: String,
    retry: Retry,
}

#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// After the backoff.
    Backoff,
    /// After the wait the target asked for.
    After(Duration),
    /// Never: the target refused the batch for good.
    Never,
}

/// The node's purger: fed by [`Pages`](crate::pages::serve::Pages), drained by [`Purger::run`].
pub struct Purger {
    config: PurgeConfig,
    /// The node's public URL and subdomain-mode domain, which make the sites' base URLs.
    public_url: String,
    domain: Option<String>,
    client: reqwest::Client,
    /// Whether this node leads (and so purges what it installs).
    leading: AtomicBool,
    queue: Mutex<Queue>,
    /// URLs were queued.
    wake: Notify,
    metrics: Arc<Metrics>,
}

impl Purger {
    pub fn new(
        config: PurgeConfig,
        public_url: String,
        domain: Option<String>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Purger> {
        config.check()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            // A purge target answers; it does not send the node elsewhere with the token.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| anyhow::anyhow!("make the purge HTTP client: {e}"))?;
        Ok(Purger {
            config,
            public_url,
            domain,
            client,
            leading: AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            metrics,
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("purge queue lock poisoned")
    }

    /// This node started or stopped leading: only a leader queues purges.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Release);
    }

    fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// `site` now serves `new` instead of `old` (`None`: nothing was served, and `new`'s own
    /// delta says what changed; when it only counts them, every path of `new` is purged).
    /// Queues the changed URLs when this node leads.
    pub fn installed(&self, old: Option<&Manifest>, new: &Manifest) {
        if !self.is_leading() {
            return;
        }
        match old {
            Some(old) => {
                let delta = Delta::between(&old.files, &new.files);
                self.enqueue(&new.site, new.index, delta.paths());
            }
            None if new.delta.is_listed() => {
                self.enqueue(&new.site, new.index, new.delta.paths());
            }
            None => self.enqueue(&new.site, new.index, new.files.keys().map(String::as_str)),
        }
    }

    /// `site` was deleted at `deleted_at` while serving `old`: every URL of it changed.
    pub fn removed(&self, old: &Manifest, deleted_at: LogIndex) {
        if !self.is_leading() {
            return;
        }
        self.enqueue(&old.site, deleted_at, old.files.keys().map(String::as_str));
    }

    /// Queues the URLs of `paths` for `site` as of version `index`.
    fn enqueue<'a>(&self, site: &str, index: LogIndex, paths: impl Iterator<Item = &'a str>) {
        let base =
            crate::pages::projection::site_base_url(&self.public_url, self.domain.as_deref(), site);
        let path_mode = self.domain.is_none();
        let mut added = 0usize;
        let mut dropped = 0u64;
        {
            let mut q = self.queue();
            let limit = self.config.queue_urls_max;
            let mut waiting = q.waiting;
            let sq = q.sites.entry(site.to_string()).or_default();
            for path in paths {
                for url in urls_of(&base, path_mode, path) {
                    if sq.queued.contains(&url) {
                        continue;
                    }
                    if waiting >= limit {
                        dropped += 1;
                        continue;
                    }
                    sq.queued.insert(url.clone());
                    sq.urls.push_back(url);
                    waiting += 1;
                    added += 1;
                }
            }
            sq.index = index;
            if dropped > 0 {
                sq.dropped_total += dropped;
                sq.last_error = Some(format!(
                    "purge backlog overflowed: {dropped} URLs of version {index} dropped (the \
                     queue holds {limit} URLs); their cached copies live until their cache time \
                     ends"
                ));
                sq.last_error_at = Some(now_ms());
            }
            q.waiting = waiting;
        }
        if dropped > 0 {
            self.metrics.purge_dropped_urls.inc_by(dropped);
            tracing::warn!(
                "site {site}: the purge backlog is full; {dropped} changed URLs will not be purged"
            );
        }
        if added > 0 {
            self.wake.notify_one();
        }
    }

    /// What `GET /v1/sites/{site}/status` says about the site's purges.
    pub fn status(&self, site: &str) -> PurgeStatus {
        let q = self.queue();
        let mut status = PurgeStatus {
            target: self.config.target.kind().into(),
            ..PurgeStatus::default()
        };
        if let Some(sq) = q.sites.get(site) {
            // A URL in flight and queued again meanwhile is one URL to purge.
            let in_flight_only = sq.in_flight.iter().filter(|u| !sq.queued.contains(*u));
            status.pending_urls = (sq.urls.len() + in_flight_only.count()) as u64;
            status.purged_urls_total = sq.purged_total;
            status.dropped_urls_total = sq.dropped_total;
            status.last_error = sq.last_error.clone();
            status.last_error_at = sq.last_error_at;
            status.last_success_at = sq.last_success_at;
        }
        status
    }

    /// Takes the next batch: up to a batch of the first site with URLs waiting after the one
    /// the last batch came from.
    fn take_batch(&self) -> Option<Batch> {
        let mut q = self.queue();
        let Queue {
            sites,
            waiting,
            last_site,
        } = &mut *q;
        let after = last_site.as_deref();
        let site = sites
            .iter()
            .filter(|(name, _)| after.is_some_and(|a| name.as_str() > a))
            .chain(sites.iter())
            .find(|(_, sq)| !sq.urls.is_empty())
            .map(|(name, _)| name.clone())?;
        let sq = sites.get_mut(&site).expect("the site was just found");
        let n = sq.urls.len().min(self.config.batch_urls_max);
        let urls: Vec<String> = sq.urls.drain(..n).collect();
        for url in &urls {
            sq.queued.remove(url);
        }
        sq.in_flight.clone_from(&urls);
        *waiting -= urls.len();
        let batch = Batch {
            site: site.clone(),
            index: sq.index,
            urls,
        };
        *last_site = Some(site);
        Some(batch)
    }

    /// Records a batch the target took.
    fn succeeded(&self, batch: &Batch) {
        let n = batch.urls.len() as u64;
        let mut q = self.queue();
        if let Some(sq) = q.sites.get_mut(&batch.site) {
            sq.in_flight.clear();
            sq.purged_total += n;
            sq.last_success_at = Some(now_ms());
            sq.last_error = None;
            sq.last_error_at = None;
        }
        drop(q);
        self.metrics.purged_urls.inc_by(n);
    }

    /// Records a failed batch: it goes back to the front of its site's queue unless the
    /// target refused it for good.
    fn failed(&self, batch: Batch, failure: &Failure) {
        self.metrics.purge_errors.inc();
        let mut q = self.queue();
        let mut requeued = 0usize;
        let mut dropped = 0u64;
        if let Some(sq) = q.sites.get_mut(&batch.site) {
            sq.in_flight.clear();
            sq.last_error = Some(failure.message.clone());
            sq.last_error_at = Some(now_ms());
            if failure.retry == Retry::Never {
                dropped = batch.urls.len() as u64;
                sq.dropped_total += dropped;
            } else {
                // Those queued again meanwhile stay where they are. The queue may go past
                // its limit by this one batch: those URLs were taken from it.
                for url in batch.urls.into_iter().rev() {
                    if sq.queued.insert(url.clone()) {
                        sq.urls.push_front(url);
                        requeued += 1;
                    }
                }
            }
        }
        q.waiting += requeued;
        drop(q);
        if dropped > 0 {
            self.metrics.purge_dropped_urls.inc_by(dropped);
        }
    }

    /// Sends the queue until `cancel` fires: batch after batch, paced, with backoff after
    /// failures.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut next_send = Instant::now();
        let mut window = Window::new(self.config.urls_per_minute);
        let mut failures: u32 = 0;
        loop {
            // Wait for URLs. `notified` is created before the check, so a wake-up between
            // the check and the wait is not lost.
            loop {
                let notified = self.wake.notified();
                if self.queue().waiting > 0 {
                    break;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = notified => {}
                }
            }
            // Pace first, so the batch takes whatever was queued meanwhile.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next_send) => {}
            }
            let Some(batch) = self.take_batch() else {
                continue;
            };
            // Even spacing alone lets a minute carry one batch more than the rate.
            let ready = window.ready_at(batch.urls.len(), Instant::now());
            tokio::select! {
                // Shutting down: the queue is in memory and goes anyway.
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(ready) => {}
            }
            window.record(batch.urls.len(), Instant::now());
            let sent = self.send(&batch).await;
            next_send = Instant::now() + self.pace(batch.urls.len());
            match sent {
                Ok(()) => {
                    failures = 0;
                    self.succeeded(&batch);
                }
                Err(failure) => {
                    tracing::warn!(
                        "purge {} URLs of site {} ({}): {}",
                        batch.urls.len(),
                        batch.site,
                        self.config.target.kind(),
                        failure.message
                    );
                    let wait = match failure.retry {
                        Retry::Never => None,
                        Retry::After(wait) => Some(wait),
                        Retry::Backoff => Some(backoff(self.config.backoff, failures)),
                    };
                    failures = failures.saturating_add(1);
                    self.failed(batch, &failure);
                    if let Some(wait) = wait {
                        next_send = next_send.max(Instant::now() + wait);
                    }
                }
            }
        }
    }

    /// The wait after a call of `urls` URLs that keeps to the configured rate.
    fn pace(&self, urls: usize) -> Duration {
        match self.config.urls_per_minute {
            0 => Duration::ZERO,
            rate => Duration::from_millis(urls as u64 * 60_000 / u64::from(rate)),
        }
    }

    /// One call to the target.
    async fn send(&self, batch: &Batch) -> Result<(), Failure> {
        let request = match &self.config.target {
            PurgeTarget::Cloudflare { zone, token, api } => self
                .client
                .post(format!(
                    "{}/client/v4/zones/{zone}/purge_cache",
                    api.trim_end_matches('/')
                ))
                .bearer_auth(token)
                .json(&serde_json::json!({ "files": batch.urls })),
            PurgeTarget::Webhook { url } => self.client.post(url).json(&serde_json::json!({
                "site": batch.site,
                "index": batch.index,
                "urls": batch.urls,
            })),
        };
        let response = request.send().await.map_err(|e| Failure {
            // Without the URL: a webhook's may carry a secret.
            message: format!("send the purge request: {}", e.without_url()),
            retry: Retry::Backoff,
        })?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let retry = if status.is_server_error()
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status == reqwest::StatusCode::REQUEST_TIMEOUT
            {
                retry_after.map_or(Retry::Backoff, Retry::After)
            } else {
                Retry::Never
            };
            return Err(Failure {
                message: format!(
                    "the purge target answered {status}{}: {}",
                    if retry == Retry::Never {
                        " (not retried)"
                    } else {
                        ""
                    },
                    excerpt(&body)
                ),
                retry,
            });
        }
        if let PurgeTarget::Cloudflare { .. } = &self.config.target {
            let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if answer.get("success") != Some(&serde_json::Value::Bool(true)) {
                return Err(Failure {
                    message: format!("Cloudflare did not purge (not retried): {}", excerpt(&body)),
                    retry: Retry::Never,
                });
            }
        }
        Ok(())
    }
}

/// The calls of the last minute, so that no minute carries more URLs than the rate (every
/// call counts, failed ones too: a target counts what it was asked).
struct Window {
    /// URLs per minute; 0: no limit.
    rate: usize,
    /// When each call of the last minute was made, and its URLs, oldest first.
    calls: VecDeque<(Instant, usize)>,
    /// The URLs of `calls`.
    urls: usize,
}

const MINUTE: Duration = Duration::from_secs(60);

impl Window {
    fn new(urls_per_minute: u32) -> Window {
        Window {
            rate: urls_per_minute as usize,
            calls: VecDeque::new(),
            urls: 0,
        }
    }

    /// When a call of `n` URLs keeps the last minute within the rate (at `now` or later).
    fn ready_at(&mut self, n: usize, now: Instant) -> Instant {
        while let Some(&(at, urls)) = self.calls.front() {
            if now.saturating_duration_since(at) < MINUTE {
                break;
            }
            self.calls.pop_front();
            self.urls -= urls;
        }
        if self.rate == 0 {
            return now;
        }
        let mut over = (self.urls + n).saturating_sub(self.rate);
        for &(at, urls) in &self.calls {
            if over == 0 {
                break;
            }
            over = over.saturating_sub(urls);
            if over == 0 {
                return at + MINUTE;
            }
        }
        // Within the rate, or a call larger than the rate: it waits for an empty minute.
        match (over, self.calls.back()) {
            (0, _) | (_, None) => now,
            (_, Some(&(at, _))) => at + MINUTE,
        }
    }

    fn record(&mut self, n: usize, at: Instant) {
        if self.rate == 0 {
            return;
        }
        self.calls.push_back((at, n));
        self.urls += n;
    }
}

/// Every URL a CDN could have cached for the manifest path `path` of a site at `base`.
pub fn urls_of(base: &str, path_mode: bool, path: &str) -> Vec<String> {
    if path == "/" {
        return if path_mode {
            vec![format!("{base}/"), base.to_string()]
        } else {
            vec![format!("{base}/")]
        };
    }
    let other = match path.strip_suffix('/') {
        Some(without) => without.to_string(),
        None => format!("{path}/"),
    };
    vec![format!("{base}{path}"), format!("{base}{other}")]
}

/// The wait after `failures` failures in a row before this one.
fn backoff(first: Duration, failures: u32) -> Duration {
    let first_ms = first.as_millis().min(u128::from(BACKOFF_MS_MAX)) as u64;
    Duration::from_millis(
        first_ms
            .saturating_mul(1u64 << failures.min(16))
            .min(BACKOFF_MS_MAX.max(first_ms)),
    )
}

/// `Retry-After` in seconds (the HTTP-date form falls back to the backoff).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_millis(
        seconds.saturating_mul(1_000).min(RETRY_AFTER_MS_MAX),
    ))
}

/// The start of a target's answer, on one line.
fn excerpt(body: &str) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(ANSWER_CHARS_MAX)
        .collect();
    if one_line.trim().is_empty() {
        "(no body)".into()
    } else {
        one_line.trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purger(config: PurgeConfig, domain: Option<&str>) -> Purger {
        let p = Purger::new(
            config,
            "https://example.com".into(),
            domain.map(str::to_string),
            Default::default(),
        )
        .unwrap();
        p.set_leading(true);
        p
    }

    fn manifest(index: LogIndex, files: &[(&str, &str)]) -> Manifest {
        Manifest {
            format: sesame_projector::MANIFEST_FORMAT,
            site: "demo".into(),
            index,
            previous: None,
            files: files
                .iter()
                .map(|(path, body)| {
                    (
                        path.to_string(),
                        sesame_projector::FileEntry {
                            hash: sesame_projector::content_hash(body.as_bytes()),
                            content_type: "text/html".into(),
                            size: body.len() as u64,
                        },
                    )
                })
                .collect(),
            delta: Delta::default(),
        }
    }

    #[test]
    fn url_forms() {
        let base = "https://example.com/demo";
        assert_eq!(
            urls_of(base, true, "/"),
            ["https://example.com/demo/", "https://example.com/demo"]
        );
        assert_eq!(
            urls_of(base, true, "/about"),
            [
                "https://example.com/demo/about",
                "https://example.com/demo/about/"
            ]
        );
        assert_eq!(
            urls_of(base, true, "/blog/"),
            [
                "https://example.com/demo/blog/",
                "https://example.com/demo/blog"
            ]
        );
        let sub = "https://demo.example.com";
        assert_eq!(urls_of(sub, false, "/"), ["https://demo.example.com/"]);
        assert_eq!(
            urls_of(sub, false, "/a%2Fb"),
            [
                "https://demo.example.com/a%2Fb",
                "https://demo.example.com/a%2Fb/"
            ]
        );
    }

    #[test]
    fn only_a_leader_queues_and_duplicates_coalesce() {
        let p = purger(PurgeConfig::webhook("http://127.0.0.1:9/purge"), None);
        let v1 = manifest(5, &[("/", "home"), ("/a", "a"), ("/b", "b")]);
        let v2 = manifest(7, &[("/", "home"), ("/a", "A"), ("/c", "c")]);
        p.set_leading(false);
        p.installed(Some(&v1), &v2);
        assert_eq!(
            p.status("demo").pending_urls,
            0,
            "a follower queues nothing"
        );
        p.set_leading(true);
        p.installed(Some(&v1), &v2);
        p.installed(Some(&v1), &v2);
        assert_eq!(
            p.status("demo").pending_urls,
            6,
            "/a, /b, /c, each twice; once"
        );
        let batch = p.take_batch().unwrap();
        assert_eq!(batch.site, "demo");
        assert_eq!(batch.index, 7);
        assert_eq!(
            batch.urls,
            [
                "https://example.com/demo/c",
                "https://example.com/demo/c/",
                "https://example.com/demo/a",
                "https://example.com/demo/a/",
                "https://example.com/demo/b",
                "https://example.com/demo/b/",
            ]
        );
        assert_eq!(
            p.status("demo").pending_urls,
            6,
            "in flight counts as pending"
        );
        assert!(p.take_batch().is_none());
        p.succeeded(&batch);
        let s = p.status("demo");
        assert_eq!((s.pending_urls, s.purged_urls_total), (0, 6));
        assert!(s.last_success_at.is_some());
    }

    #[test]
    fn batches_are_bounded_and_failures_requeue() {
        let mut config = PurgeConfig::cloudflare("zone1", "secret-token");
        config.queue_urls_max = 5;
        let p = purger(config, Some("example.com"));
        let v1 = manifest(3, &[]);
        let v2 = manifest(4, &[("/", "x"), ("/a", "a"), ("/b", "b")]);
        p.installed(Some(&v1), &v2);
        let s = p.status("demo");
        assert_eq!(s.pending_urls, 5, "the queue is full at 5");
        assert_eq!(s.dropped_urls_total, 0);
        p.installed(Some(&v1), &manifest(6, &[("/z", "z")]));
        let s = p.status("demo");
        assert_eq!(s.dropped_urls_total, 2, "/z and /z/ overflowed");
        assert!(s.last_error.unwrap().contains("overflowed"));

        let batch = p.take_batch().unwrap();
        assert_eq!(batch.urls.len(), 5);
        assert_eq!(batch.urls[0], "https://demo.example.com/");
        p.failed(
            batch,
            &Failure {
                message: "the purge target answered 500".into(),
                retry: Retry::Backoff,
            },
        );
        let s = p.status("demo");
        assert_eq!(s.pending_urls, 5, "a failed batch goes back");
        assert_eq!(
            s.last_error.as_deref(),
            Some("the purge target answered 500")
        );
        let batch = p.take_batch().unwrap();
        assert_eq!(batch.urls[0], "https://demo.example.com/", "in its order");
        p.failed(
            batch,
            &Failure {
                message: "refused".into(),
                retry: Retry::Never,
            },
        );
        let s = p.status("demo");
        assert_eq!((s.pending_urls, s.dropped_urls_total), (0, 7));
        assert!(!format!("{:?}", p.config).contains("secret-token"));
    }

    /// A node that served nothing purges what the new version's delta lists, or every path
    /// of the version when the delta was too long to list.
    #[test]
    fn a_delta_only_counted_purges_every_path() {
        let p = purger(PurgeConfig::webhook("http://127.0.0.1:9/purge"), None);
        let mut m = manifest(4, &[("/a", "a"), ("/b", "b"), ("/c", "c")]);
        m.delta = sesame_projector::Delta {
            added: vec!["/b".into()],
            ..Default::default()
        };
        p.installed(None, &m);
        let urls = p.take_batch().unwrap().urls;
        assert!(
            urls.iter()
                .all(|u| u.starts_with("https://example.com/demo/b")),
            "{urls:?}"
        );
        m.delta = sesame_projector::Delta {
            omitted: 12_345,
            ..Default::default()
        };
        p.installed(None, &m);
        let urls = p.take_batch().unwrap().urls;
        for path in ["a", "b", "c"] {
            let url = format!("https://example.com/demo/{path}");
            assert!(urls.contains(&url), "{url} in {urls:?}");
        }
    }

    #[test]
    fn sites_take_turns() {
        let mut config = PurgeConfig::webhook("http://127.0.0.1:9/purge");
        config.batch_urls_max = 2;
        let p = purger(config, None);
        let mut other = manifest(9, &[("/x", "x"), ("/y", "y")]);
        other.site = "other".into();
        p.installed(None, &{
            let mut m = manifest(8, &[]);
            m.delta.added = vec!["/a".into(), "/b".into()];
            m
        });
        p.installed(Some(&manifest(1, &[])), &other);
        let order: Vec<String> = std::iter::from_fn(|| {
            let b = p.take_batch()?;
            p.succeeded(&b);
            Some(b.site)
        })
        .collect();
        assert_eq!(order, ["demo", "other", "demo", "other"]);
    }

    #[test]
    fn no_minute_carries_more_than_the_rate() {
        let t0 = Instant::now();
        let mut w = Window::new(100);
        assert_eq!(w.ready_at(30, t0), t0);
        w.record(30, t0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(w.ready_at(30, t1), t1);
        w.record(30, t1);
        let t2 = t0 + Duration::from_secs(20);
        assert_eq!(w.ready_at(30, t2), t2);
        w.record(30, t2);
        let t3 = t0 + Duration::from_secs(30);
        assert_eq!(w.ready_at(10, t3), t3, "100 in all");
        assert_eq!(
            w.ready_at(30, t3),
            t0 + MINUTE,
            "130 would be over: when the first call leaves the minute"
        );
        assert_eq!(w.ready_at(50, t3), t1 + MINUTE, "two calls must leave");
        assert_eq!(w.ready_at(30, t0 + MINUTE), t0 + MINUTE);
        let mut tiny = Window::new(10);
        tiny.record(5, t0);
        assert_eq!(tiny.ready_at(30, t1), t0 + MINUTE, "larger than the rate");
        assert_eq!(Window::new(0).ready_at(1_000_000, t0), t0);
    }

    #[test]
    fn backoff_doubles_up_to_its_limit() {
        let first = Duration::from_millis(100);
        assert_eq!(backoff(first, 0), Duration::from_millis(100));
        assert_eq!(backoff(first, 3), Duration::from_millis(800));
        assert_eq!(backoff(first, 30), Duration::from_millis(BACKOFF_MS_MAX));
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(reqwest::header::RETRY_AFTER, "99999999".parse().unwrap());
        assert_eq!(
            retry_after(&h),
            Some(Duration::from_millis(RETRY_AFTER_MS_MAX))
        );
    }

    #[test]
    fn configs_are_checked() {
        assert!(PurgeConfig::webhook("http://127.0.0.1:1/x").check().is_ok());
        assert!(PurgeConfig::webhook("ftp://x/").check().is_err());
        assert!(PurgeConfig::cloudflare("abc123", "t").check().is_ok());
        assert!(PurgeConfig::cloudflare("abc/../x", "t").check().is_err());
        assert!(PurgeConfig::cloudflare("abc", " ").check().is_err());
        let mut c = PurgeConfig::webhook("http://127.0.0.1:1/x");
        c.batch_urls_max = 0;
        assert!(c.check().is_err());
        let mut c = PurgeConfig::webhook("http://127.0.0.1:1/x");
        c.backoff = Duration::ZERO;
        assert!(c.check().is_err());
    }
}
