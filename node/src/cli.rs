//! The `sesame` command line: `sesame dev` runs a node; the other commands talk to a node's
//! HTTP API through [`sesame_client::Http`].

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sesame_client::Http;
use sesame_proto::api::TxRequest;
use sesame_proto::{Op, Role, Value};

use crate::app::{NodeConfig, ADMIN_TOKEN_FILE};

/// The node id of `sesame dev` (and of a restored node).
pub const DEV_NODE_ID: u64 = 1;
/// Where `sesame dev` keeps its data unless told otherwise.
pub const DEV_DATA_DIR: &str = "./sesame-data";
/// The HTTP address `sesame dev` listens on unless told otherwise.
pub const DEV_HTTP_ADDR: &str = "127.0.0.1:7700";

#[derive(Debug, Parser)]
#[command(
    name = "sesame",
    version,
    about = "A replicated tuple database that projects its data into static web pages"
)]
pub struct Cli {
    #[command(flatten)]
    pub remote: Remote,
    /// How the node writes its log on standard error: `text`, or `json` (one object per
    /// line, with the request id of the HTTP request it belongs to).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SESAME_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a single node on the embedded default (data under ./sesame-data).
    Dev(DevArgs),
    /// Run a node of a cluster.
    Node(NodeArgs),
    /// Serve published pages from the object store alone (no log, no data directory).
    Edge(EdgeArgs),
    /// Create and list sites.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Put a tuple: `sesame put SITE COLLECTION KEY JSON`.
    Put {
        site: String,
        collection: String,
        key: String,
        /// The value, as JSON (`'{"name": "Alice"}'`, `'"text"'`, `42`).
        json: String,
        /// Only if the tuple is at this version (0: only if it does not exist).
        #[arg(long)]
        if_version: Option<u64>,
        /// `http` (the API) or `quic` (the sync client: queued, pushed, at most once).
        #[arg(long, value_enum, default_value_t = Via::Http)]
        via: Via,
        #[command(flatten)]
        sync: SyncArgs,
    },
    /// Follow a site's changes over QUIC, one JSON line per change as it commits (from the
    /// current content unless --since is given), until interrupted.
    Watch {
        site: String,
        /// Only this collection.
        collection: Option<String>,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Only changes after this index (without it: every tuple first, then changes).
        #[arg(long)]
        since: Option<u64>,
        #[command(flatten)]
        sync: SyncArgs,
    },
    /// Put a tuple into a client's mailbox (over QUIC): `sesame send --to CLIENT_ID SITE
    /// COLLECTION KEY JSON`. The recipient gets it when it connects.
    Send {
        /// The recipient's client id.
        #[arg(long)]
        to: String,
        site: String,
        collection: String,
        key: String,
        json: String,
        #[command(flatten)]
        sync: SyncArgs,
    },
    /// Connect as a client and print its mailbox tuples as JSON lines (each is marked
    /// delivered, and its sender gets a receipt); with --follow, keep printing new ones.
    Inbox {
        site: String,
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        sync: SyncArgs,
    },
    /// Write every tuple of a site to standard output, one JSON line each
    /// (`{"collection", "key", "value"}`).
    Export { site: String },
    /// Load a file of JSON lines (as `export` writes them) into a site: checked whole first,
    /// then written in order in batches; resumes where an interrupted run stopped.
    Import { site: String, file: PathBuf },
    /// Take an online backup of a node (admin token): its store (tuples, sites, tokens,
    /// roots, history) and the published files those name, while writes go on. Written to
    /// FILE.part and checked whole before it becomes FILE.
    Backup { file: PathBuf },
    /// Make a new single node in an empty folder from a backup (checked whole; nothing is
    /// left behind if it is bad). Start it with `sesame dev --data DIR`.
    Restore {
        file: PathBuf,
        #[arg(long)]
        data: PathBuf,
    },
    /// Check a backup file and say what it holds.
    VerifyBackup { file: PathBuf },
    /// Get one tuple.
    Get {
        site: String,
        collection: String,
        key: String,
    },
    /// Delete a tuple.
    Del {
        site: String,
        collection: String,
        key: String,
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// List tuples of a collection in key order.
    Scan {
        site: String,
        collection: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this key (the `next` cursor of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show what changed in a site after an index.
    Changes {
        site: String,
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Make tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Administer a cluster.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// A worker process of the node's render pool (started by the node; speaks a binary
    /// protocol on stdin and stdout). `main` runs it before any runtime starts.
    #[command(hide = true, name = RENDER_WORKER_COMMAND)]
    RenderWorker,
}

/// What `sesame` logs when `SESAME_LOG` does not say: `info`, and openraft's warnings.
pub const DEFAULT_LOG_FILTER: &str = "info,openraft=warn";

/// The log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How `sesame put` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    Http,
    Quic,
}

/// Options of the commands that connect as a sync client (over QUIC).
#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    /// The client id to connect as (default: the replica's own, or a new one).
    #[arg(long)]
    pub client_id: Option<String>,
    /// A replica file to keep (the offline queue and what was received survive); default: in
    /// memory.
    #[arg(long)]
    pub replica: Option<PathBuf>,
    /// The cluster CA (PEM) to verify the node with; default: pin the certificate the node
    /// names over HTTP.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

/// The hidden subcommand that makes `sesame` a render worker.
pub const RENDER_WORKER_COMMAND: &str = "render-worker";

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make the cluster CA (unless DIR has one) and a certificate per node, signed by it:
    /// DIR/ca.crt, DIR/ca.key (keep it safe: it adds nodes), and DIR/<id>/ with node.crt,
    /// node.key and a copy of ca.crt. A node runs with `--certs DIR/<id>`. Run again with new
    /// ids to add nodes signed by the same CA.
    Certs {
        /// The folder to write into.
        #[arg(long)]
        out: PathBuf,
        /// Node ids, comma-separated: `--nodes 1,2,3`.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// Keep the certificates of ids that have them (checked, not remade) instead of
        /// refusing: for a step that runs at every start, like docker-compose.yml's.
        #[arg(long)]
        skip_existing: bool,
    },
    /// Who leads, and every member's progress (`GET /v1/cluster`).
    Status,
    /// Add a node as a learner: it receives a snapshot and the log, and does not vote.
    AddLearner {
        #[arg(long)]
        id: u64,
        /// Its cluster (QUIC) address, host:port.
        #[arg(long)]
        raft: String,
        /// Its HTTP URL.
        #[arg(long, default_value = "")]
        http: String,
    },
    /// Make a learner a voter.
    Promote {
        #[arg(long)]
        id: u64,
    },
    /// Take a node out of the cluster.
    Remove {
        #[arg(long)]
        id: u64,
    },
}

/// `sesame edge`: see [`crate::edge`].
#[derive(Debug, Args)]
pub struct EdgeArgs {
    /// The object store the nodes publish to (`file:///dir`, `s3://bucket/prefix`; S3/R2
    /// settings from AWS_* variables, as for `sesame node --objects`).
    #[arg(long)]
    pub objects: String,
    /// Where to serve HTTP.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub http: SocketAddr,
    /// Milliseconds between two reads of every site's root (50 to 60000).
    #[arg(long, default_value_t = crate::edge::POLL_MS_DEFAULT)]
    pub poll_ms: u64,
    /// Bytes of file content kept in memory.
    #[arg(long, default_value_t = crate::pages::serve::BLOB_CACHE_BYTES_MAX)]
    pub cache_bytes: usize,
    /// Serve `Host: <site>.<domain>` too (subdomain mode).
    #[arg(long)]
    pub domain: Option<String>,
}

/// Serving settings shared by `sesame dev` and `sesame node`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where app clients connect over QUIC (UDP) [default: the HTTP address and port].
    #[arg(long)]
    pub quic: Option<SocketAddr>,
    /// Use this admin token instead of the saved or a generated one.
    #[arg(long, env = "SESAME_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Publish to this object store (`s3://bucket/prefix`; S3/R2 settings from AWS_*
    /// variables) instead of <data>/objects.
    #[arg(long)]
    pub objects: Option<String>,
    /// Serve `Host: <site>.<domain>` too (subdomain mode).
    #[arg(long)]
    pub domain: Option<String>,
    /// The URL visitors reach this node at (for canonical links and sitemaps).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Shortest time between two projection rounds of one site, in milliseconds (0: none).
    #[arg(long, default_value_t = crate::pages::projection::DEBOUNCE_MS_DEFAULT)]
    pub debounce_ms: u64,
    /// Most pages (routes, pages per tuple, 404) one site may have; pages past it are left
    /// out and the site status reports an error.
    #[arg(long, default_value_t = sesame_projector::SITE_PAGES_MAX_DEFAULT)]
    pub site_pages_max: usize,
    /// Sustained transactions per second each site may write (0: unlimited).
    #[arg(long, default_value_t = crate::http::limits::WRITE_RATE_PER_SECOND_DEFAULT)]
    pub write_rate: f64,
    /// Transactions a site may write in a burst.
    #[arg(long, default_value_t = crate::http::limits::WRITE_BURST_DEFAULT)]
    pub write_burst: f64,
    /// Hours a deleted site's published files stay in the object store.
    #[arg(long, default_value_t = crate::pages::janitor::RETENTION_HOURS_DEFAULT)]
    pub deleted_site_retention_hours: u64,
    /// The site people sign up to and edit their own profile on (`/v1/auth/*`; `sesame dev`:
    /// demo).
    #[arg(long)]
    pub studio_site: Option<String>,
    /// Published versions each site keeps in its history (for rollback); older ones leave
    /// it once they are also older than --history-days, and their files are collected.
    #[arg(long, default_value_t = crate::pages::gc::HISTORY_KEEP_DEFAULT)]
    pub history_keep: usize,
    /// Versions younger than this many days stay in the history, however many there are.
    #[arg(long, default_value_t = crate::pages::gc::HISTORY_DAYS_DEFAULT)]
    pub history_days: u64,
    /// Seconds a file no retained version uses is kept after it was written.
    #[arg(long, default_value_t = crate::pages::gc::GRACE_SECS_DEFAULT)]
    pub gc_grace_secs: u64,
    /// Seconds between two garbage collections.
    #[arg(long, default_value_t = crate::pages::gc::INTERVAL_SECS_DEFAULT)]
    pub gc_interval_secs: u64,
    /// Purge the URLs each new version changes from this Cloudflare zone (purge by URL; the
    /// API token comes from SESAME_CLOUDFLARE_TOKEN). Needs --public-url.
    #[arg(long, value_name = "ZONE_ID", conflicts_with = "purge_url")]
    pub purge_cloudflare: Option<String>,
    /// POST the URLs each new version changes to this URL as
    /// `{"site", "index", "urls": [...]}`. Needs --public-url.
    #[arg(long, value_name = "URL")]
    pub purge_url: Option<String>,
    /// Most URLs in one purge call [default: 30 for Cloudflare, 500 for --purge-url].
    #[arg(long, value_name = "URLS")]
    pub purge_batch: Option<usize>,
    /// Most URLs purged per minute (0: unpaced) [default: 1000 for Cloudflare, 60000 for
    /// --purge-url].
    #[arg(long, value_name = "URLS_PER_MINUTE")]
    pub purge_rate: Option<u32>,
    /// Most changed URLs waiting to be purged; past it they are dropped and the site status
    /// says how many.
    #[arg(long, value_name = "URLS", default_value_t = crate::pages::purge::QUEUE_URLS_MAX_DEFAULT)]
    pub purge_queue: usize,
    /// First wait after a failed purge call, in milliseconds; it doubles with each failure.
    #[arg(long, hide = true, default_value_t = crate::pages::purge::BACKOFF_MS_DEFAULT)]
    pub purge_backoff_ms: u64,
    /// Cloudflare's API base URL (tests point it at a receiver on loopback).
    #[arg(long, hide = true, env = crate::pages::purge::CLOUDFLARE_API_ENV, default_value = crate::pages::purge::CLOUDFLARE_API_DEFAULT)]
    pub purge_cloudflare_api: String,
}

impl ServeArgs {
    /// The purge settings of `--purge-cloudflare` or `--purge-url`, if either is given.
    fn purge_config(&self) -> anyhow::Result<Option<crate::pages::purge::PurgeConfig>> {
        use crate::pages::purge::{PurgeConfig, PurgeTarget, CLOUDFLARE_TOKEN_ENV};
        let mut purge = match (&self.purge_cloudflare, &self.purge_url) {
            (Some(zone), _) => {
                let token = std::env::var(CLOUDFLARE_TOKEN_ENV).map_err(|_| {
                    anyhow::anyhow!(
                        "--purge-cloudflare needs the API token in {CLOUDFLARE_TOKEN_ENV}"
                    )
                })?;
                let mut purge = PurgeConfig::cloudflare(zone.clone(), token.trim());
                if let PurgeTarget::Cloudflare { api, .. } = &mut purge.target {
                    api.clone_from(&self.purge_cloudflare_api);
                }
                purge
            }
            (None, Some(url)) => PurgeConfig::webhook(url.clone()),
            (None, None) => return Ok(None),
        };
        anyhow::ensure!(
            self.public_url.is_some(),
            "purging needs --public-url: the URLs a CDN caches are the public ones"
        );
        if let Some(batch) = self.purge_batch {
            purge.batch_urls_max = batch;
        }
        if let Some(rate) = self.purge_rate {
            purge.urls_per_minute = rate;
        }
        purge.queue_urls_max = self.purge_queue;
        purge.backoff = std::time::Duration::from_millis(self.purge_backoff_ms);
        purge.check()?;
        Ok(Some(purge))
    }

    fn apply(self, config: &mut NodeConfig) -> anyhow::Result<()> {
        config.purge = self.purge_config()?;
        config.quic_addr = self.quic;
        config.admin_token = self.admin_token;
        config.objects = self.objects;
        config.domain = self.domain;
        config.public_url = self.public_url;
        config.debounce = std::time::Duration::from_millis(self.debounce_ms);
        anyhow::ensure!(
            self.site_pages_max >= 1,
            "--site-pages-max must be at least 1 (the 404 page)"
        );
        config.site_pages_max = self.site_pages_max;
        config.deleted_site_retention =
            std::time::Duration::from_secs(self.deleted_site_retention_hours.saturating_mul(3600));
        anyhow::ensure!(
            self.history_keep >= 1,
            "--history-keep must be at least 1 (the served version)"
        );
        anyhow::ensure!(
            self.gc_interval_secs >= 1,
            "--gc-interval-secs must be at least 1"
        );
        if let Some(site) = &self.studio_site {
            sesame_proto::validate_site(site).map_err(|e| anyhow::anyhow!("--studio-site: {e}"))?;
        }
        config.studio_site = self.studio_site;
        config.history = crate::pages::gc::HistoryConfig {
            keep: self.history_keep,
            max_age: std::time::Duration::from_secs(self.history_days.saturating_mul(24 * 3600)),
            grace: std::time::Duration::from_secs(self.gc_grace_secs),
            interval: std::time::Duration::from_secs(self.gc_interval_secs),
        };
        config.write_rate = match (self.write_rate, self.write_burst) {
            (0.0, _) => None,
            (rate, burst) if rate > 0.0 && burst >= 1.0 => Some(crate::http::limits::RateLimit {
                per_second: rate,
                burst,
            }),
            (rate, burst) => anyhow::bail!(
                "--write-rate {rate} and --write-burst {burst}: need rate > 0 (or 0 for no limit) and burst >= 1"
            ),
        };
        Ok(())
    }
}

/// `sesame node`: one node of a cluster.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// This node's id (its certificate must be for it).
    #[arg(long)]
    pub id: u64,
    #[arg(long)]
    pub data: PathBuf,
    /// The HTTP address to listen on (API and pages).
    #[arg(long)]
    pub http: SocketAddr,
    /// The cluster (QUIC) address peers reach this node at, host:port; also where it
    /// listens unless --raft-listen says otherwise.
    #[arg(long)]
    pub raft: String,
    /// Listen for peers here instead (e.g. 0.0.0.0:7800 behind NAT).
    #[arg(long)]
    pub raft_listen: Option<SocketAddr>,
    /// This node's certificate folder, made by `sesame cluster certs`.
    #[arg(long)]
    pub certs: PathBuf,
    /// Form a new cluster of these voters on first start: `1=host1:7800,2=host2:7800,...`.
    /// Without it the node waits to be added (`sesame cluster add-learner`).
    #[arg(long)]
    pub initial_cluster: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Parses `--initial-cluster 1=host1:7800,2=host2:7800`.
pub fn parse_initial_cluster(
    spec: &str,
) -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
    let mut members = std::collections::BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("--initial-cluster entry {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("--initial-cluster id {id:?} is not a number"))?;
        let addr = addr.trim();
        anyhow::ensure!(
            addr.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
            "--initial-cluster address {addr:?} is not HOST:PORT"
        );
        anyhow::ensure!(
            members.insert(id, addr.to_string()).is_none(),
            "--initial-cluster names node {id} twice"
        );
    }
    anyhow::ensure!(!members.is_empty(), "--initial-cluster names no nodes");
    Ok(members)
}

#[derive(Debug, Args)]
pub struct DevArgs {
    #[arg(long, default_value = DEV_DATA_DIR)]
    pub data: PathBuf,
    #[arg(long, default_value = DEV_HTTP_ADDR)]
    pub http: SocketAddr,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    Create {
        name: String,
    },
    List,
    /// Load a folder (templates/, routes.toml, assets/, data/) into a site in one transaction.
    Deploy {
        site: String,
        dir: PathBuf,
    },
    /// Projection and publishing status.
    Status {
        site: String,
    },
    /// Published versions, newest first.
    Versions {
        site: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Serve an earlier version again (by the commit index it reflects).
    Rollback {
        site: String,
        index: u64,
    },
    /// Render the whole site again.
    Rebuild {
        site: String,
    },
    /// Render the site at a proposed change without committing it, and print the private
    /// URL it is served at until it expires: `sesame site preview SITE OPS_JSON`, with the
    /// ops of a transaction (`'[{"put": {"collection": "profiles", "key": "alice",
    /// "value": {"name": "Alice"}}}]'`).
    Preview {
        site: String,
        ops: String,
        /// Seconds until the preview expires.
        #[arg(long)]
        ttl_s: Option<u64>,
    },
    /// Download the site's current version as a ZIP any static host can serve
    /// (`path/index.html` for clean URLs): `sesame site export SITE FILE.zip`.
    Export {
        site: String,
        file: PathBuf,
    },
    /// Forget the site's tombstones below an index (default: all); readers of changes from
    /// before then read the site whole instead.
    Compact {
        site: String,
        #[arg(long)]
        before: Option<u64>,
    },
    /// Delete a site and all its data (admin). Its pages stop being served at once.
    Delete {
        site: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a site token: `sesame token create SITE owner|editor|reader [--ttl SECONDS]`.
    Create {
        site: String,
        role: String,
        /// Seconds until the token expires (default: never).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// List a site's tokens (ids, roles, times; never the secrets).
    List { site: String },
    /// Revoke a site token by its id (see `token list`).
    Revoke { site: String, id: u64 },
}

/// Which node to talk to and as whom.
#[derive(Debug, Args)]
pub struct Remote {
    /// The node's URL, or several nodes of one cluster, comma-separated: a node that cannot
    /// be reached, or cannot help now, is passed over for the next.
    #[arg(
        long,
        global = true,
        env = "SESAME_NODE",
        default_value = "http://127.0.0.1:7700"
    )]
    pub node: String,
    /// Bearer token; defaults to the admin token `sesame dev` saved in ./sesame-data.
    #[arg(long, global = true, env = "SESAME_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Remote {
    fn token(&self) -> Option<String> {
        self.token.clone().or_else(|| {
            std::fs::read_to_string(PathBuf::from(DEV_DATA_DIR).join(ADMIN_TOKEN_FILE))
                .ok()
                .map(|t| t.trim().to_string())
        })
    }

    /// A sync client (over QUIC), connected: an error if the node refuses the token.
    async fn sync_client(&self, args: &SyncArgs) -> anyhow::Result<sesame_client::Client> {
        let token = self
            .token()
            .context("no token: give --token (or SESAME_TOKEN)")?;
        let mut options = sesame_client::Options::new(self.nodes()?, &token);
        options.client_id = args.client_id.clone();
        options.replica = args.replica.clone();
        if let Some(ca) = &args.ca {
            options.ca_pem = Some(
                std::fs::read_to_string(ca).with_context(|| format!("read {}", ca.display()))?,
            );
        }
        sesame_client::Client::connect(options)
            .await
            .context("connect to the node over QUIC")
    }

    fn nodes(&self) -> anyhow::Result<Vec<String>> {
        let nodes: Vec<String> = self
            .node
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        anyhow::ensure!(!nodes.is_empty(), "--node names no node URL");
        Ok(nodes)
    }

    fn client(&self) -> anyhow::Result<Http> {
        let token = self.token();
        let nodes: Vec<&str> = self
            .node
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        anyhow::ensure!(!nodes.is_empty(), "--node names no node URL");
        anyhow::ensure!(
            nodes.len() <= sesame_client::NODES_MAX,
            "--node names {} URLs; at most {} are taken",
            nodes.len(),
            sesame_client::NODES_MAX
        );
        Ok(Http::with_nodes(nodes, token))
    }
}

/// Standard output was closed by its reader (`sesame ... | head -1`): the command stops
/// quietly, the way Unix tools do, instead of panicking on the broken pipe.
#[derive(Debug, thiserror::Error)]
#[error("standard output is closed")]
pub struct StdoutClosed;

/// Writes one line to standard output; see [`StdoutClosed`].
pub fn out(line: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("write to standard output")),
    }
}

/// Like [`out`], for a running node's messages: a closed standard output is no reason to stop.
fn say(line: impl std::fmt::Display) -> anyhow::Result<()> {
    match out(line) {
        Err(e) if e.is::<StdoutClosed>() => Ok(()),
        other => other,
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    out(serde_json::to_string_pretty(value)?)
}

fn parse_value(json: &str) -> anyhow::Result<Value> {
    let parsed: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("value is not valid JSON: {json}"))?;
    Value::from_json(parsed).map_err(|m| anyhow::anyhow!("invalid value: {m}"))
}

/// Prints changes as JSON lines until the stream ends or the process is interrupted.
async fn print_changes(
    mut changes: impl futures::Stream<Item = sesame_client::Change> + Unpin,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(c) => out(change_line(&c))?,
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn change_line(c: &sesame_client::Change) -> serde_json::Value {
    serde_json::json!({
        "index": c.index,
        "collection": c.collection,
        "key": c.key,
        "value": c.value.as_ref().map(Value::to_json),
    })
}

/// `sesame inbox`: the client's mailbox tuples, each marked delivered as it arrives.
async fn inbox(remote: &Remote, site: &str, follow: bool, sync: &SyncArgs) -> anyhow::Result<()> {
    use sesame_client::Event;
    let client = remote.sync_client(sync).await?;
    let mut events = client.events();
    let target = sesame_proto::sync::Target::Mailbox { site: site.into() };
    let sub = client.subscribe_id(target)?;
    let mut caught_up = false;
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = tokio::signal::ctrl_c() => return Ok(()),
            // Once caught up, give the delivery marks a moment to leave, then stop.
            _ = tokio::time::sleep(std::time::Duration::from_millis(300)), if caught_up && !follow => {
                return Ok(());
            }
        };
        match event {
            Ok(Event::Changed {
                sub: s,
                tuples,
                through,
                ..
            }) if s == sub => {
                for t in tuples.into_iter().filter(|t| t.value.is_some()) {
                    out(change_line(&sesame_client::Change::from(t)))?;
                }
                caught_up |= through.is_some();
            }
            Ok(Event::Disconnected { code, message })
                if matches!(code.as_str(), "unauthorized" | "forbidden") =>
            {
                anyhow::bail!("the node refused the session: {code}: {message}")
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// Runs a command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let remote = cli.remote;
    match cli.command {
        Command::Dev(args) => dev(args).await,
        Command::Node(args) => node(args).await,
        Command::Edge(args) => edge(args).await,
        Command::Site { command } => match command {
            SiteCommand::Create { name } => print_json(&remote.client()?.create_site(&name).await?),
            SiteCommand::List => print_json(&remote.client()?.list_sites().await?),
            SiteCommand::Deploy { site, dir } => deploy(&remote.client()?, &site, &dir).await,
            SiteCommand::Status { site } => print_json(&remote.client()?.status(&site).await?),
            SiteCommand::Versions { site, limit } => {
                print_json(&remote.client()?.versions(&site, limit).await?)
            }
            SiteCommand::Rollback { site, index } => {
                print_json(&remote.client()?.rollback(&site, index).await?)
            }
            SiteCommand::Rebuild { site } => print_json(&remote.client()?.rebuild(&site).await?),
            SiteCommand::Preview { site, ops, ttl_s } => {
                let ops: Vec<sesame_proto::Op> = serde_json::from_str(&ops)
                    .context("OPS_JSON: a JSON array of ops, as in a transaction")?;
                print_json(&remote.client()?.preview(&site, &ops, ttl_s).await?)
            }
            SiteCommand::Export { site, file } => {
                let zip = remote.client()?.export_zip(&site).await?;
                let tmp = file.with_extension("zip.part");
                std::fs::write(&tmp, &zip).with_context(|| format!("write {}", tmp.display()))?;
                std::fs::rename(&tmp, &file)
                    .with_context(|| format!("rename into {}", file.display()))?;
                print_json(&serde_json::json!({
                    "site": site, "file": file.display().to_string(), "bytes": zip.len()
                }))
            }
            SiteCommand::Compact { site, before } => {
                print_json(&remote.client()?.compact(&site, before).await?)
            }
            SiteCommand::Delete { site } => print_json(&remote.client()?.delete_site(&site).await?),
        },
        Command::Put {
            site,
            collection,
            key,
            json,
            if_version,
            via,
            sync,
        } => {
            let value = parse_value(&json)?;
            let op = Op::Put {
                collection,
                key,
                value,
                if_version,
            };
            if via == Via::Quic {
                let client = remote.sync_client(&sync).await?;
                let index = client.transact_wait(&site, vec![op]).await?;
                return print_json(&serde_json::json!({ "index": index }));
            }
            let req = TxRequest {
                ops: vec![op],
                client_id: None,
                seq: None,
            };
            print_json(&remote.client()?.tx(&site, &req).await?)
        }
        Command::Watch {
            site,
            collection,
            prefix,
            since,
            sync,
        } => {
            let client = remote.sync_client(&sync).await?;
            let target = sesame_proto::sync::Target::Site {
                site,
                collection,
                prefix,
            };
            let changes = client.subscribe_from(target, since.unwrap_or(0))?;
            print_changes(changes).await
        }
        Command::Send {
            to,
            site,
            collection,
            key,
            json,
            sync,
        } => {
            let value = parse_value(&json)?;
            let client = remote.sync_client(&sync).await?;
            let op = Op::Send {
                to,
                collection,
                key,
                value,
            };
            let index = client.transact_wait(&site, vec![op]).await?;
            print_json(&serde_json::json!({ "index": index, "from": client.client_id() }))
        }
        Command::Inbox { site, follow, sync } => inbox(&remote, &site, follow, &sync).await,
        Command::Export { site } => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let n = crate::transfer::export(&remote.client()?, &site, &mut out).await;
            match n.and_then(|n| out.flush().map(|()| n).map_err(anyhow::Error::from)) {
                Ok(n) => {
                    eprintln!("exported {n} tuples of {site}");
                    Ok(())
                }
                Err(e)
                    if e.downcast_ref::<std::io::Error>()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
                {
                    Err(StdoutClosed.into())
                }
                Err(e) => Err(e),
            }
        }
        Command::Import { site, file } => {
            let n = crate::transfer::import(&remote.client()?, &site, &file).await?;
            print_json(&serde_json::json!({ "site": site, "imported": n }))
        }
        Command::Backup { file } => {
            let node = remote.node.split(',').next().unwrap_or_default().trim();
            let summary = crate::backup::download(node, remote.token().as_deref(), &file).await?;
            print_json(&summary)
        }
        Command::Restore { file, data } => {
            let src = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("open {}", file.display()))?;
            let restored = crate::backup::restore(
                tokio::io::BufReader::with_capacity(1 << 20, src),
                &data,
                DEV_NODE_ID,
            )
            .await
            .with_context(|| format!("restore {} into {}", file.display(), data.display()))?;
            eprintln!(
                "restored the store at index {} and {} published files into {}; start it with: sesame dev --data {}",
                restored.info.applied_index,
                restored.objects,
                data.display(),
                data.display()
            );
            print_json(&serde_json::json!({
                "data": data.display().to_string(),
                "applied_index": restored.info.applied_index,
                "objects": restored.objects,
                "store_bytes": restored.store_bytes,
            }))
        }
        Command::VerifyBackup { file } => print_json(&crate::backup::verify(&file).await?),
        Command::Get {
            site,
            collection,
            key,
        } => print_json(&remote.client()?.get(&site, &collection, &key).await?),
        Command::Del {
            site,
            collection,
            key,
            if_version,
        } => print_json(
            &remote
                .client()?
                .delete(&site, &collection, &key, if_version)
                .await?,
        ),
        Command::Scan {
            site,
            collection,
            prefix,
            limit,
            after,
        } => print_json(
            &remote
                .client()?
                .scan(&site, &collection, &prefix, after.as_deref(), limit)
                .await?,
        ),
        Command::Changes { site, since, limit } => {
            print_json(&remote.client()?.changes(&site, since, limit).await?)
        }
        Command::Token { command } => match command {
            TokenCommand::Create { site, role, ttl } => {
                let role = match role.as_str() {
                    "owner" => Role::Owner,
                    "editor" => Role::Editor,
                    "reader" => Role::Reader,
                    other => anyhow::bail!("unknown role {other:?}: use owner, editor or reader"),
                };
                print_json(&remote.client()?.create_token_for(&site, role, ttl).await?)
            }
            TokenCommand::List { site } => print_json(&remote.client()?.list_tokens(&site).await?),
            TokenCommand::Revoke { site, id } => {
                print_json(&remote.client()?.revoke_token(&site, id).await?)
            }
        },
        Command::Cluster { command } => match command {
            ClusterCommand::Certs {
                out,
                nodes,
                skip_existing,
            } => cluster_certs(&out, &nodes, skip_existing),
            ClusterCommand::Status => print_json(&remote.client()?.cluster_status().await?),
            ClusterCommand::AddLearner { id, raft, http } => {
                print_json(&remote.client()?.add_learner(id, &raft, &http).await?)
            }
            ClusterCommand::Promote { id } => print_json(&remote.client()?.promote(id).await?),
            ClusterCommand::Remove { id } => print_json(&remote.client()?.remove_member(id).await?),
        },
        Command::RenderWorker => {
            anyhow::bail!("{RENDER_WORKER_COMMAND} runs from main, outside the async runtime")
        }
    }
}

fn cluster_certs(out: &std::path::Path, nodes: &[u64], skip_existing: bool) -> anyhow::Result<()> {
    use crate::peer::tls::{CA_CERT_FILE, NODE_CERT_FILE};
    let mut nodes = nodes.to_vec();
    if skip_existing {
        let mut kept = Vec::new();
        nodes.retain(|id| {
            let has = out.join(id.to_string()).join(NODE_CERT_FILE).exists();
            if has {
                kept.push(*id);
            }
            !has
        });
        let ca = std::fs::read(out.join(CA_CERT_FILE));
        for id in kept {
            let dir = out.join(id.to_string());
            // A folder that no longer loads, or is another CA's, is a problem to show now,
            // not when the node starts.
            let certs = crate::peer::NodeCerts::load(&dir)
                .with_context(|| format!("check the certificates of node {id}"))?;
            anyhow::ensure!(
                certs.node_id() == id,
                "{} holds node {}'s certificate",
                dir.display(),
                certs.node_id()
            );
            let own_ca = std::fs::read(dir.join(CA_CERT_FILE))
                .with_context(|| format!("read {}", dir.join(CA_CERT_FILE).display()))?;
            anyhow::ensure!(
                ca.as_ref().is_ok_and(|ca| *ca == own_ca),
                "{} is not signed by the CA in {}",
                dir.display(),
                out.display()
            );
            self::out(format_args!("node {id}: --certs {} (kept)", dir.display()))?;
        }
        if nodes.is_empty() {
            return Ok(());
        }
    }
    let written = crate::peer::tls::write_cluster_certs(out, &nodes)
        .with_context(|| format!("make cluster certificates in {}", out.display()))?;
    let ca = if written.new_ca { "made" } else { "used" };
    self::out(format_args!(
        "{ca} the cluster CA in {} (keep ca.key safe)",
        out.display()
    ))?;
    for (id, dir) in nodes.iter().zip(&written.node_dirs) {
        self::out(format_args!("node {id}: --certs {}", dir.display()))?;
    }
    Ok(())
}

async fn deploy(client: &Http, site: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let bundle = crate::pages::bundle::load_dir(dir)?;
    let mut existing = Vec::new();
    for collection in crate::pages::bundle::PAGE_COLLECTIONS {
        for key in client.keys(site, collection).await? {
            existing.push((collection.to_string(), key));
        }
    }
    let ops = crate::pages::bundle::deploy_ops(&bundle, &existing);
    let deleted = ops
        .iter()
        .filter(|op| matches!(op, Op::Delete { .. }))
        .count();
    let req = TxRequest {
        ops,
        client_id: None,
        seq: None,
    };
    let written = client.tx(site, &req).await?;
    out(format_args!(
        "deployed {} tuples to {site} (deleted {deleted}) at index {}",
        bundle.len(),
        written.index
    ))?;
    out(format_args!("status: sesame site status {site}"))
}

/// The site `sesame dev` seeds on first start.
pub const DEMO_SITE: &str = "demo";

/// Creates the demo site from the built-in bundle, unless the site exists. Returns whether
/// it seeded.
pub async fn seed_demo(node: &crate::app::Node) -> anyhow::Result<bool> {
    let exists = node
        .read(|v| v.site(DEMO_SITE))
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?
        .is_some();
    if exists {
        return Ok(false);
    }
    let create = sesame_proto::Command::CreateSite {
        name: DEMO_SITE.into(),
        created_at_ms: crate::app::now_ms(),
    };
    node.propose(create).await.context("create the demo site")?;
    let ops = crate::pages::bundle::deploy_ops(&crate::pages::bundle::demo(), &[]);
    let tx = sesame_proto::Transaction {
        site: DEMO_SITE.into(),
        ops,
        origin: None,
    };
    tx.validate().context("validate the demo bundle")?;
    match node.write_tx(tx).await.context("write the demo site")?.1 {
        sesame_proto::CommandResult::Committed { .. } => Ok(true),
        other => anyhow::bail!("seed the demo site: {other:?}"),
    }
}

/// The address to listen on for `--raft host:port`: the host's first address.
async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}

async fn node(args: NodeArgs) -> anyhow::Result<()> {
    let mut config = NodeConfig::new(&args.data, args.http);
    config.node_id = args.id;
    args.serve.apply(&mut config)?;
    let raft_listen = match args.raft_listen {
        Some(a) => a,
        None => resolve(&args.raft).await?,
    };
    let initial = args
        .initial_cluster
        .as_deref()
        .map(parse_initial_cluster)
        .transpose()?;
    config.cluster = Some(crate::app::ClusterConfig {
        raft_addr: args.raft.clone(),
        raft_listen,
        certs: args.certs,
        initial,
        faults: None,
    });
    let running = crate::app::start(config).await?;
    println!(
        "Sesame node {} listening on {} (HTTP) and {} (cluster)",
        args.id,
        running.url(),
        args.raft
    );
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = running.cancelled() => {}
    }
    println!("shutting down");
    running.shutdown().await
}

async fn edge(args: EdgeArgs) -> anyhow::Result<()> {
    let mut config = crate::edge::EdgeConfig::new(args.objects, args.http);
    config.poll = std::time::Duration::from_millis(args.poll_ms);
    config.cache_bytes = args.cache_bytes;
    config.domain = args.domain;
    config.store_options = crate::edge::store_options_from_env();
    let running = crate::edge::start(config).await?;
    say(format!("Sesame edge listening on {}", running.url()))?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = running.cancelled() => {}
    }
    running.shutdown().await
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let mut config = NodeConfig::new(&args.data, args.http);
    // A token the operator gave is theirs already: the banner does not echo it.
    let given = args.serve.admin_token.is_some();
    args.serve.apply(&mut config)?;
    // People sign up on the demo site unless told otherwise.
    config
        .studio_site
        .get_or_insert_with(|| DEMO_SITE.to_string());
    let running = crate::app::start(config).await?;
    let seeded = seed_demo(&running.node).await?;
    let url = running.url();
    let demo = format!("{url}/{DEMO_SITE}");
    let token = if given {
        "<the --admin-token given>"
    } else {
        running.admin_token.as_str()
    };
    let banner = format!(
        "Sesame dev node listening on {url}\n  \
         data:        {data}\n  \
         admin token: {token}\n  \
         demo site:   {demo}/{seeded}\n               \
         {demo}/alice  {demo}/bob  {demo}/carol\n  \
         studio:      {url}/_studio/   (sign up, edit your page at {demo}/<you>)\n  \
         edit:        sesame put demo profiles alice '{{\"name\": \"Alice\", \"bio\": \"Edited\"}}'\n  \
         status:      sesame site status demo\n  \
         live:        sesame watch demo profiles   (QUIC, UDP port {quic_port})\n  \
         API:         curl -H 'Authorization: Bearer {token}' {url}/v1/sites",
        quic_port = running.node.sync_info.port,
        data = args.data.display(),
        seeded = if seeded { "   (seeded just now)" } else { "" },
    );
    // The node is useful with nobody reading its banner (`sesame dev | head -3`).
    say(banner)?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = running.cancelled() => {}
    }
    say("shutting down")?;
    running.shutdown().await
}
