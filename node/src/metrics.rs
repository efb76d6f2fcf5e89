//! `/metrics`: the node's figures in the Prometheus text format, from a registry of its own
//! (several nodes can share a process, as in the tests).
//!
//! Counters and histograms move where things happen (the write path, the projector, the blob
//! cache, the layer every HTTP answer passes); gauges that mirror state (Raft's indexes and
//! followers' lag, open client connections and data channels) are read when scraped.
//!
//! An edge (`crate::edge`) has a registry of its own with the serving figures a node has
//! (answers by status, the blob cache) and its own: root polls, their duration, the index
//! installed per site, and the chunks it reads. Those are registered on edges only
//! ([`Metrics::new_edge`]), so a node's scrape does not carry families that never move.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a family: `[("status", "200")]`.
pub type Labels = Vec<(String, String)>;

/// Statuses whose counters are looked up once, not per answer: what pages are answered with.
const COMMON_STATUSES: [u16; 3] = [200, 304, 404];

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<Labels, Counter>,
    /// The counters of [`COMMON_STATUSES`] in `http_requests`, in that order.
    common_answers: [Counter; COMMON_STATUSES.len()],
    pub rate_limited: Counter,
    pub write_seconds: Histogram,
    pub write_batch: Histogram,
    pub raft_term: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_commit_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_is_leader: Gauge,
    pub follower_lag: Family<Labels, Gauge>,
    pub projection_rounds: Counter,
    pub pages_rendered: Counter,
    pub publish_seconds: Histogram,
    pub blob_cache_hits: Counter,
    pub blob_cache_misses: Counter,
    pub blob_cache_bytes: Gauge,
    pub blob_fetches: Counter,
    pub edge_polls: Family<Labels, Counter>,
    pub edge_poll_seconds: Histogram,
    pub edge_installed_index: Family<Labels, Gauge>,
    pub edge_chunk_fetches: Counter,
    pub client_connections: Gauge,
    pub client_sessions: Gauge,
    pub live_channels: Gauge,
    pub gc_objects_deleted: Counter,
    pub purged_urls: Counter,
    pub purge_errors: Counter,
    pub purge_dropped_urls: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A node's figures.
    pub fn new() -> Metrics {
        Metrics::build(false)
    }

    /// An edge's figures: a node's and the edge's own.
    pub fn new_edge() -> Metrics {
        Metrics::build(true)
    }

    fn build(edge: bool) -> Metrics {
        let mut r = Registry::with_prefix("sesame");
        let m = Metrics {
            http_requests: Family::default(),
            rate_limited: Counter::default(),
            // 50 µs to ~13 s.
            write_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 19)),
            write_batch: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            raft_term: Gauge::default(),
            raft_last_log_index: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_is_leader: Gauge::default(),
            follower_lag: Family::default(),
            projection_rounds: Counter::default(),
            pages_rendered: Counter::default(),
            publish_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            blob_cache_hits: Counter::default(),
            blob_cache_misses: Counter::default(),
            blob_cache_bytes: Gauge::default(),
            blob_fetches: Counter::default(),
            edge_polls: Family::default(),
            // 1 ms to ~65 s.
            edge_poll_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            edge_installed_index: Family::default(),
            edge_chunk_fetches: Counter::default(),
            client_connections: Gauge::default(),
            client_sessions: Gauge::default(),
            live_channels: Gauge::default(),
            gc_objects_deleted: Counter::default(),
            purged_urls: Counter::default(),
            purge_errors: Counter::default(),
            purge_dropped_urls: Counter::default(),
            common_answers: Default::default(),
            registry: Registry::default(),
        };
        let common_answers = COMMON_STATUSES.map(|status| {
            m.http_requests
                .get_or_create(&vec![("status".to_string(), status.to_string())])
                .clone()
        });
        r.register(
            "http_requests",
            "HTTP answers, by status",
            m.http_requests.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused for a rate limit (429)",
            m.rate_limited.clone(),
        );
        r.register(
            "write_seconds",
            "Time from a transaction's arrival at the write path to its commit and apply",
            m.write_seconds.clone(),
        );
        r.register(
            "write_batch_transactions",
            "Transactions per log entry (group commit)",
            m.write_batch.clone(),
        );
        r.register(
            "raft_term",
            "The node's current Raft term",
            m.raft_term.clone(),
        );
        r.register(
            "raft_last_log_index",
            "The last index in the node's Raft log",
            m.raft_last_log_index.clone(),
        );
        r.register(
            "raft_commit_index",
            "The highest index known committed (openraft 0.9 reports it as the applied index)",
            m.raft_commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "The last index the state machine applied",
            m.raft_applied_index.clone(),
        );
        r.register(
            "raft_is_leader",
            "1 while the node leads",
            m.raft_is_leader.clone(),
        );
        r.register(
            "raft_follower_lag_entries",
            "On the leader: entries each follower is behind",
            m.follower_lag.clone(),
        );
        r.register(
            "gc_objects_deleted",
            "Blobs and manifests deleted by garbage collection (no retained version used them)",
            m.gc_objects_deleted.clone(),
        );
        r.register(
            "projection_rounds",
            "Projection rounds run (leader)",
            m.projection_rounds.clone(),
        );
        r.register(
            "pages_rendered",
            "Pages rendered by the projector (leader)",
            m.pages_rendered.clone(),
        );
        r.register(
            "publish_seconds",
            "Time to publish a site version: files, manifest, root through Raft",
            m.publish_seconds.clone(),
        );
        r.register(
            "blob_cache_hits",
            "Page bodies served from memory",
            m.blob_cache_hits.clone(),
        );
        r.register(
            "blob_cache_misses",
            "Page bodies read from the object store",
            m.blob_cache_misses.clone(),
        );
        r.register(
            "blob_cache_bytes",
            "Bytes held by the page-body cache",
            m.blob_cache_bytes.clone(),
        );
        r.register(
            "blob_fetches",
            "Page bodies fetched from the object store (simultaneous misses of one body share \
             one fetch)",
            m.blob_fetches.clone(),
        );
        if edge {
            r.register(
                "edge_polls",
                "Rounds of reading every site's root, by outcome (failed: the listing or a \
                 root read failed or ran out of time)",
                m.edge_polls.clone(),
            );
            r.register(
                "edge_poll_seconds",
                "Time one round of reading the roots took, installs included",
                m.edge_poll_seconds.clone(),
            );
            r.register(
                "edge_installed_index",
                "The commit index of the version installed, per site",
                m.edge_installed_index.clone(),
            );
            r.register(
                "edge_chunk_fetches",
                "File-tree chunks read from the object store to install versions",
                m.edge_chunk_fetches.clone(),
            );
        }
        r.register(
            "client_connections",
            "Open QUIC connections of app clients",
            m.client_connections.clone(),
        );
        r.register(
            "client_sessions",
            "Sync sessions following the change feed (QUIC and data channels)",
            m.client_sessions.clone(),
        );
        r.register(
            "live_channels",
            "Browsers' data channels, open or opening",
            m.live_channels.clone(),
        );
        r.register(
            "purged_urls",
            "URLs a CDN purge target acknowledged (leader)",
            m.purged_urls.clone(),
        );
        r.register(
            "purge_errors",
            "Purge calls that failed (each is retried unless refused for good)",
            m.purge_errors.clone(),
        );
        r.register(
            "purge_dropped_urls",
            "Changed URLs never purged: the purge backlog overflowed or the target refused them",
            m.purge_dropped_urls.clone(),
        );
        Metrics {
            registry: r,
            common_answers,
            ..m
        }
    }

    /// Counts an HTTP answer by its status. Every request passes here, so the usual
    /// statuses skip the family's lock and the label strings.
    pub fn answered(&self, status: u16) {
        match COMMON_STATUSES.iter().position(|s| *s == status) {
            Some(i) => {
                self.common_answers[i].inc();
            }
            None => {
                self.http_requests
                    .get_or_create(&vec![("status".to_string(), status.to_string())])
                    .inc();
            }
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
