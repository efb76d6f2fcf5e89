//! A running node: its parts, wired together in one place.
//!
//! [`start`] opens the storage, starts Raft (with the peer transport in a cluster), and
//! builds the parts every request path uses, each knowing only what it needs:
//! [`Reads`] and [`ReadGate`] (consistent reads), [`Writer`] (the write path),
//! [`Pages`] (what is served), [`Projections`] (the leader's projector),
//! [`crate::pages::follow`] (every node installs committed versions), [`Cluster`] (peers and
//! membership). [`Node`] holds them for the HTTP handlers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sesame_proto::{Command, LogIndex, Transaction};
use sesame_sync::{StoreError, View};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use sesame_projector::sandbox::{
    PoolConfig, RenderPool, WorkerCommand, PAGE_TIME_MS_DEFAULT, WORKER_MEMORY_BYTES_DEFAULT,
};
use sesame_projector::Publisher;

use crate::cluster::{Cluster, NodeService};
use crate::http::auth;
use crate::http::error::ApiError;
use crate::http::limits::{RateLimit, SiteLimiter};
use crate::pages::follow::Follower;
use crate::pages::projection::{ProjectionConfig, Projections, DEBOUNCE_MS_DEFAULT};
use crate::pages::purge::Purger;
use crate::pages::serve::{Pages, ServeConfig};
use crate::peer::link::Link;
use crate::peer::{
    Faults, FaultyTransport, NoPeers, NodeCerts, PeerConfig, PeerEndpoint, PeerTransport,
};
use crate::raft::{Member, Network, NodeId, RaftHandle, RaftParts, RaftTuning};
use crate::reads::{ReadGate, Reads};
use crate::write::{WriteError, Writer, Written};

/// Name of the file under the data directory that holds the admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// How long start-up waits for this node to become leader of its single-voter cluster.
const LEADER_WAIT_MS: u64 = 10_000;
/// Most requests served at once; more wait in the listener's backlog.
pub const HTTP_CONCURRENCY_MAX: usize = 1024;
/// Longest start-up waits to install the published versions before serving.
const STARTUP_INSTALL_WAIT_MS: u64 = 10_000;

/// Name of the folder under the data directory that is the default object store.
pub const OBJECTS_DIR: &str = "objects";

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    /// The admin token; when absent, the one in `<data>/admin-token`, else a new one.
    pub admin_token: Option<String>,
    pub node_id: NodeId,
    /// Where pages are published: an object store URL (`s3://bucket/prefix`, `file:///dir`);
    /// `None`: the local folder `<data>/objects`. S3/R2 settings come from `AWS_*` variables.
    pub objects: Option<String>,
    /// The URL visitors reach this node at; `None`: `http://<bound address>`.
    pub public_url: Option<String>,
    /// Subdomain mode: serve `Host: <site>.<domain>`.
    pub domain: Option<String>,
    /// Shortest time between two projection rounds of one site (0: none).
    pub debounce: Duration,
    /// Per-site write rate limit; `None`: unlimited.
    pub write_rate: Option<RateLimit>,
    /// Longest a `Sesame-Min-Index` request waits.
    pub min_index_wait: Duration,
    /// How long a deleted site's published files stay in the object store.
    pub deleted_site_retention: Duration,
    /// The site people sign up to and edit their own profiles on; `None`: no accounts.
    pub studio_site: Option<String>,
    /// How many published versions stay in each site's history, and how often files no
    /// retained version uses are collected.
    pub history: crate::pages::gc::HistoryConfig,
    /// `None`: a single voter with no peers (`sesame dev`).
    pub cluster: Option<ClusterConfig>,
    pub raft_tuning: RaftTuning,
    /// The program the render pool runs as its workers; `None`: this executable with
    /// `render-worker` (right for the `sesame` binary; a process that is not `sesame`, like
    /// a test, must name the `sesame` binary here).
    pub render_worker: Option<WorkerCommand>,
    /// Render worker processes; 0: one per core.
    pub render_workers: usize,
    /// Address space of each render worker: what one page render may use, plus the worker.
    pub render_memory_bytes_max: u64,
    /// Longest one page may take to render before its worker is killed.
    pub render_page_time_max: Duration,
    /// Most pages (routes, pages per tuple, 404) one site may have; pages past it are left
    /// out and the site status reports an error.
    pub site_pages_max: usize,
    /// Where app clients connect over QUIC (UDP); `None`: the HTTP address's IP and port
    /// (any free port if that one is taken).
    pub quic_addr: Option<SocketAddr>,
    /// Purge a CDN's copies of the URLs each new version changes; `None`: no purges.
    pub purge: Option<crate::pages::purge::PurgeConfig>,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>, http_addr: SocketAddr) -> NodeConfig {
        NodeConfig {
            data_dir: data_dir.into(),
            http_addr,
            admin_token: None,
            node_id: 1,
            objects: None,
            public_url: None,
            domain: None,
            debounce: Duration::from_millis(DEBOUNCE_MS_DEFAULT),
            write_rate: Some(RateLimit::default()),
            min_index_wait: ServeConfig::default().min_index_wait,
            deleted_site_retention: Duration::from_secs(
                crate::pages::janitor::RETENTION_HOURS_DEFAULT * 3600,
            ),
            history: crate::pages::gc::HistoryConfig::default(),
            studio_site: None,
            cluster: None,
            raft_tuning: RaftTuning::default(),
            render_worker: None,
            render_workers: 0,
            render_memory_bytes_max: WORKER_MEMORY_BYTES_DEFAULT,
            render_page_time_max: Duration::from_millis(PAGE_TIME_MS_DEFAULT),
            site_pages_max: sesame_projector::SITE_PAGES_MAX_DEFAULT,
            quic_addr: None,
            purge: None,
        }
    }

    /// The render pool's configuration.
    fn render_pool(&self) -> anyhow::Result<PoolConfig> {
        let command = match &self.render_worker {
            Some(command) => command.clone(),
            None => WorkerCommand::current_exe(&[crate::cli::RENDER_WORKER_COMMAND])
                .context("find this executable to run it as the render worker")?,
        };
        let mut config = PoolConfig::new(command);
        config.workers = self.render_workers;
        config.memory_bytes_max = self.render_memory_bytes_max;
        config.page_time_max = self.render_page_time_max;
        Ok(config)
    }
}

/// How a node takes part in a cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    /// The address peers reach this node at, `host:port` (what membership records).
    pub raft_addr: String,
    /// The UDP address to listen on.
    pub raft_listen: SocketAddr,
    /// This node's certificate folder (`node.crt`, `node.key`, `ca.crt`).
    pub certs: PathBuf,
    /// Form a new cluster of these voters (id → raft address) on first start; `None`: wait
    /// to be added to an existing cluster.
    pub initial: Option<BTreeMap<NodeId, String>>,
    /// Test seam: every message this node sends to a peer goes through this policy.
    pub faults: Option<Arc<dyn Faults>>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("raft_addr", &self.raft_addr)
            .field("raft_listen", &self.raft_listen)
            .field("certs", &self.certs)
            .field("initial", &self.initial)
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

/// The parts of a running node, for the HTTP handlers.
pub struct Node {
    pub id: NodeId,
    pub raft: Arc<RaftHandle>,
    pub reads: Reads,
    pub gate: ReadGate,
    pub writer: Arc<Writer>,
    pub pages: Arc<Pages>,
    pub projections: Arc<Projections>,
    pub cluster: Arc<Cluster>,
    pub limiter: Arc<SiteLimiter>,
    pub publisher: Arc<Publisher>,
    /// Where clients reach the QUIC sync endpoint (`GET /v1/sync`).
    pub sync_info: crate::clients::SyncInfo,
    pub feed: Arc<crate::clients::feed::Feed>,
    /// Browsers' data channels (live pages).
    pub live: Arc<crate::live::Live>,
    pub clients: Arc<crate::clients::ClientContext>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The node's data directory (backups copy its store from there).
    pub data_dir: std::path::PathBuf,
    /// The object store is shared by every node (S3, R2) rather than a folder per node.
    pub shared_store: bool,
    /// The site people sign up to and edit their profiles on (`--studio-site`).
    pub studio_site: Option<String>,
    /// The URL visitors reach this node at.
    pub public_url: String,
    /// Failed logins, per name and per address.
    pub logins: crate::http::accounts::WindowLimiter,
    /// Studio saves, per person.
    pub saves: crate::http::accounts::WindowLimiter,
    /// The latest writes refused (4xx on a write path), for the admin dashboard.
    pub rejections: crate::studio::Rejections,
    /// CDN purges, when configured.
    pub purger: Option<Arc<Purger>>,
    admin_hash: String,
}

impl Node {
    pub fn is_admin_hash(&self, hash: &str) -> bool {
        // Both are hex hashes of equal length: nothing an attacker learns from timing helps
        // them find a preimage.
        hash == self.admin_hash
    }

    /// Fetches published versions this node lacks from its peers (for reads of versions
    /// that are not the root, such as previews).
    pub fn follower(&self) -> crate::pages::follow::Follower {
        crate::pages::follow::Follower {
            reads: self.reads.clone(),
            pages: self.pages.clone(),
            publisher: self.publisher.clone(),
            link: self.cluster.link.clone(),
            shared_store: self.shared_store,
        }
    }

    /// Runs a read on a consistent snapshot of the tuple store, off the async runtime.
    pub async fn read<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(View<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.reads.read(f).await.map_err(ApiError::internal)
    }

    /// Follows the applied index of the state machine.
    pub fn applied(&self) -> watch::Receiver<LogIndex> {
        self.reads.applied()
    }

    /// Orders one command through the Raft log on its own.
    pub async fn propose(&self, command: Command) -> Written {
        self.writer.propose(command).await
    }

    /// Commits a validated transaction (grouped with others into one log entry).
    pub async fn write_tx(&self, tx: Transaction) -> Written {
        self.writer.write_tx(tx).await
    }

    /// The newest log index this node knows of (appended, committed or applied): an index
    /// past it has not been written yet.
    pub fn known_index(&self) -> LogIndex {
        self.raft
            .view()
            .last_log_index
            .max(self.reads.applied_index())
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        let mut api = match &e {
            WriteError::NotLeader { addr, .. } => {
                let mut api = ApiError::new(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "not_leader",
                    e.to_string(),
                );
                // Members learn each other's HTTP URLs after joining: it may be unknown.
                api.leader = (!addr.is_empty()).then(|| addr.clone());
                api
            }
            WriteError::NoLeader => ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "not_leader",
                e.to_string(),
            ),
            WriteError::Unavailable(_) => ApiError::unavailable(e.to_string()),
            WriteError::OutcomeUnknown(_) => ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "outcome_unknown",
                format!(
                    "{e}; the write may or may not have been applied: retry it with the same \
                     client_id and seq to apply it at most once"
                ),
            ),
            WriteError::Unexpected(_) => return ApiError::internal(e),
        };
        api.retry_after = Some(1);
        api
    }
}

/// A node serving HTTP; stop it with [`RunningNode::shutdown`].
pub struct RunningNode {
    pub addr: SocketAddr,
    pub admin_token: String,
    pub node: Arc<Node>,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    endpoint: Option<PeerEndpoint>,
    clients: crate::clients::ClientEndpoint,
}

impl RunningNode {
    /// The HTTP base URL, like `http://127.0.0.1:7700`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, lets in-flight ones finish, and stops Raft and the peer
    /// endpoint.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.server
            .await
            .context("join the HTTP server")?
            .context("serve HTTP")?;
        for task in self.tasks {
            task.await.context("join a node task")?;
        }
        self.node
            .raft
            .get()
            .shutdown()
            .await
            .context("shut down raft")?;
        if let Some(endpoint) = self.endpoint {
            endpoint.close().await;
        }
        self.clients.close().await;
        Ok(())
    }

    /// Resolves when the node is asked to stop (by [`RunningNode::shutdown`]).
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }
}

/// Starts a node: opens storage, starts Raft, and serves HTTP (and its peers, in a cluster).
/// A single voter initialises itself on first start and this returns once it leads; a
/// cluster node with `initial` voters initialises the same membership as its peers, and the
/// cluster forms once a majority is up.
pub async fn start(config: NodeConfig) -> anyhow::Result<RunningNode> {
    if let Some(domain) = &config.domain {
        check_domain(domain)?;
    }
    secure_data_dir(&config.data_dir)?;
    let admin_token = load_admin_token(&config.data_dir, config.admin_token.clone())?;
    let id = config.node_id;

    // The peer transport: QUIC with mutual TLS in a cluster, none for a single voter. The
    // client endpoint presents the node certificate, or a single node's self-signed one.
    let mut identity = None;
    let (endpoint, transport): (Option<PeerEndpoint>, Arc<dyn PeerTransport>) =
        match &config.cluster {
            None => (None, Arc::new(NoPeers)),
            Some(c) => {
                let certs = NodeCerts::load(&c.certs)
                    .with_context(|| format!("load certificates from {}", c.certs.display()))?;
                anyhow::ensure!(
                    certs.node_id() == id,
                    "the certificates in {} are node {}'s, but this is node {id}",
                    c.certs.display(),
                    certs.node_id()
                );
                let endpoint = PeerEndpoint::bind(PeerConfig::new(c.raft_listen), &certs)
                    .context("start the peer endpoint")?;
                identity = Some(crate::clients::Identity::from_node_certs(&certs));
                let transport: Arc<dyn PeerTransport> = match &c.faults {
                    Some(f) => Arc::new(FaultyTransport::new(
                        id,
                        Arc::new(endpoint.clone()),
                        f.clone(),
                    )),
                    None => Arc::new(endpoint.clone()),
                };
                (Some(endpoint), transport)
            }
        };

    let applied_tx = Arc::new(watch::channel(0).0);
    let landmarks_tx = Arc::new(watch::channel(crate::raft::Landmarks::default()).0);
    let raft_parts = RaftParts {
        dir: config.data_dir.clone(),
        node_id: id,
        timing: config.raft_tuning,
        network: Network::new(id, transport.clone()),
        applied: applied_tx.clone(),
        landmarks: landmarks_tx.clone(),
    };
    let (raft, pool) = raft_parts.open().await?;
    let raft = Arc::new(RaftHandle::new(id, config.raft_tuning, raft));
    let reads = Reads::new(
        Arc::new(pool),
        applied_tx.subscribe(),
        landmarks_tx.subscribe(),
    );

    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("bind HTTP on {}", config.http_addr))?;
    let addr = listener.local_addr().context("read the bound address")?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));

    let r = raft.get();
    match &config.cluster {
        None => {
            if !r.is_initialized().await.context("read raft state")? {
                let members = BTreeMap::from([(id, Member::new("", public_url.clone()))]);
                r.initialize(members)
                    .await
                    .context("initialise single-voter cluster")?;
            }
            r.wait(Some(Duration::from_millis(LEADER_WAIT_MS)))
                .current_leader(id, "become leader of the single-voter cluster")
                .await
                .context("wait for leadership")?;
        }
        Some(c) => {
            if let Some(initial) = &c.initial {
                anyhow::ensure!(
                    initial.contains_key(&id),
                    "--initial-cluster does not name this node ({id})"
                );
                if !r.is_initialized().await.context("read raft state")? {
                    // Every initial node proposes the very same membership, which is safe:
                    // the vote decides who leads it. HTTP addresses are learned later.
                    let members = initial
                        .iter()
                        .map(|(n, addr)| (*n, Member::new(addr.clone(), "")))
                        .collect::<BTreeMap<_, _>>();
                    r.initialize(members)
                        .await
                        .context("initialise the cluster")?;
                }
            }
        }
    }
    drop(r);

    let publisher = Arc::new(match &config.objects {
        None => Publisher::local(config.data_dir.join(OBJECTS_DIR))
            .context("open the local object folder")?,
        Some(url) => crate::edge::open_objects(url)?,
    });
    // Storage and the object folder made their files by now.
    secure_data_dir(&config.data_dir)?;
    let link = Arc::new(Link::new(raft.clone(), transport));
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let writer = Arc::new(Writer::start(
        raft.clone(),
        link.clone(),
        reads.clone(),
        metrics.clone(),
    ));
    let purger = match &config.purge {
        Some(purge) => Some(Arc::new(
            Purger::new(
                purge.clone(),
                public_url.clone(),
                config.domain.clone(),
                metrics.clone(),
            )
            .context("set up CDN purges")?,
        )),
        None => None,
    };
    let pages = Arc::new(Pages::new(
        ServeConfig {
            domain: config.domain.clone(),
            min_index_wait: config.min_index_wait,
            blob_cache_bytes: crate::pages::serve::BLOB_CACHE_BYTES_MAX,
        },
        publisher.clone(),
        metrics.clone(),
        purger.clone(),
    ));
    let projections = Arc::new(Projections::new(
        ProjectionConfig {
            debounce: config.debounce,
            public_url: public_url.clone(),
            domain: config.domain.clone(),
            render_pool: Arc::new(RenderPool::new(config.render_pool()?)),
            site_pages_max: config.site_pages_max,
        },
        publisher.clone(),
        reads.clone(),
        writer.clone(),
        pages.clone(),
        metrics.clone(),
    ));
    let cluster = Arc::new(Cluster {
        raft: raft.clone(),
        link: link.clone(),
        reads: reads.clone(),
        pages: pages.clone(),
        projections: projections.clone(),
        publisher: publisher.clone(),
        http_url: public_url.clone(),
    });
    if let Some(endpoint) = &endpoint {
        // The accept loop ends when the endpoint is closed.
        drop(endpoint.serve(Arc::new(NodeService::new(cluster.clone()))));
    }

    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    // Serve the last published versions from the first request on.
    let follower = Follower {
        reads: reads.clone(),
        pages: pages.clone(),
        publisher: publisher.clone(),
        link: link.clone(),
        shared_store: config.objects.is_some(),
    };
    let installed = tokio::time::timeout(
        Duration::from_millis(STARTUP_INSTALL_WAIT_MS),
        follower.catch_up(0),
    )
    .await;
    let seen = match installed {
        Ok(Ok(seen)) => seen,
        Ok(Err(e)) => {
            tracing::warn!("install published versions at start-up: {e:#}; retrying");
            0
        }
        Err(_) => 0,
    };
    tasks.push(tokio::spawn(follower.run(seen, cancel.clone())));
    tasks.push(tokio::spawn(
        crate::pages::janitor::Janitor {
            reads: reads.clone(),
            publisher: publisher.clone(),
            raft: raft.clone(),
            shared_store: config.objects.is_some(),
            retention: config.deleted_site_retention,
            writer: writer.clone(),
        }
        .run(cancel.clone()),
    ));
    tasks.push(tokio::spawn(
        crate::pages::gc::Collector {
            reads: reads.clone(),
            publisher: publisher.clone(),
            pages: pages.clone(),
            raft: raft.clone(),
            writer: writer.clone(),
            shared_store: config.objects.is_some(),
            config: config.history.clone(),
            metrics: metrics.clone(),
        }
        .run(cancel.clone()),
    ));
    tasks.push(tokio::spawn(crate::raft::handle::supervise(
        raft.clone(),
        raft_parts,
        cancel.clone(),
    )));
    if let Some(purger) = &purger {
        tasks.push(tokio::spawn(purger.clone().run(cancel.clone())));
    }
    tasks.push(tokio::spawn(project_while_leader(
        raft.clone(),
        projections.clone(),
        purger.clone(),
        cancel.clone(),
    )));

    let limiter = Arc::new(SiteLimiter::new(config.write_rate));
    // App clients over QUIC, fed from the change feed.
    let feed = crate::clients::feed::Feed::new(reads.applied_index());
    tasks.push(tokio::spawn(
        feed.clone().run(reads.clone(), cancel.clone()),
    ));
    let identity = match identity {
        Some(identity) => identity,
        None => crate::clients::Identity::self_signed(&config.data_dir)?,
    };
    let client_ctx = Arc::new(crate::clients::ClientContext {
        node_id: id,
        reads: reads.clone(),
        writer: writer.clone(),
        raft: raft.clone(),
        feed: feed.clone(),
        admin_hash: auth::hash_token(&admin_token),
        connections: Default::default(),
        presence: Default::default(),
        limiter: limiter.clone(),
    });
    let quic_addr = config.quic_addr.unwrap_or(addr);
    let live = crate::live::Live::new(client_ctx.clone(), addr.ip(), cancel.clone());
    let clients = match crate::clients::ClientEndpoint::start(
        quic_addr,
        &identity,
        client_ctx.clone(),
        cancel.clone(),
    ) {
        Ok(e) => e,
        Err(e) if config.quic_addr.is_none() => {
            tracing::warn!("{e:#}; taking any free UDP port");
            crate::clients::ClientEndpoint::start(
                SocketAddr::new(addr.ip(), 0),
                &identity,
                client_ctx.clone(),
                cancel.clone(),
            )?
        }
        Err(e) => return Err(e),
    };

    let node = Arc::new(Node {
        id,
        raft,
        gate: ReadGate::new(cluster.raft.clone(), reads.clone(), link),
        reads,
        writer,
        pages,
        projections,
        cluster,
        limiter,
        publisher,
        sync_info: clients.info.clone(),
        feed,
        live,
        clients: client_ctx,
        metrics,
        data_dir: config.data_dir.clone(),
        shared_store: config.objects.is_some(),
        studio_site: config.studio_site.clone(),
        public_url: public_url.clone(),
        logins: Default::default(),
        saves: Default::default(),
        rejections: Default::default(),
        purger,
        admin_hash: auth::hash_token(&admin_token),
    });
    let app = crate::http::api::front(node.clone());
    let stop = cancel.clone();
    let server = tokio::spawn(async move {
        axum::serve(crate::http::without_delay(listener), app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    tracing::info!(%addr, "node {id} serving HTTP");
    Ok(RunningNode {
        addr,
        admin_token,
        node,
        cancel,
        server,
        tasks,
        endpoint,
        clients,
    })
}

/// Runs the projector while this node leads: started when it becomes leader, cancelled when
/// it stops (the Raft log fences a deposed projector anyway: its root commits fail).
///
/// The purger, if any, queues purges while this node leads: the versions it installs then are
/// the ones its projector publishes and the rollbacks the log commits.
async fn project_while_leader(
    raft: Arc<RaftHandle>,
    projections: Arc<Projections>,
    purger: Option<Arc<Purger>>,
    cancel: CancellationToken,
) {
    loop {
        // Wait to lead.
        while !raft.view().is_leader() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = raft.changed(Duration::from_millis(200)) => {}
            }
        }
        let term = raft.view().term;
        let leading = cancel.child_token();
        if let Some(purger) = &purger {
            purger.set_leading(true);
        }
        let run = tokio::spawn(projections.clone().run(leading.clone()));
        // Lead until the term changes or this node is no longer leader.
        loop {
            let view = raft.view();
            if !view.is_leader() || view.term != term {
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = raft.changed(Duration::from_millis(200)) => {}
            }
        }
        leading.cancel();
        if let Some(purger) = &purger {
            purger.set_leading(false);
        }
        let _ = run.await;
        if cancel.is_cancelled() {
            return;
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch, as proposers put them into commands (the
/// state machine never reads the clock itself).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Makes the data directory private (see [`crate::private`]), saying what it fixed.
fn secure_data_dir(dir: &Path) -> anyhow::Result<()> {
    let fixed = crate::private::make_private(dir)
        .with_context(|| format!("make data directory {} private", dir.display()))?;
    for path in fixed {
        tracing::warn!(
            "{} was readable by other users; made it private to this user",
            path.display()
        );
    }
    Ok(())
}

/// Checks `--domain`: a host name, without scheme, port or path.
fn check_domain(domain: &str) -> anyhow::Result<()> {
    let d = crate::pages::serve::normalize_domain(domain);
    let ok = !d.is_empty()
        && d.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    anyhow::ensure!(
        ok,
        "--domain {domain:?} must be a host name like sites.example.com (no scheme, port or path)"
    );
    Ok(())
}

/// Checks an admin token given to the node: at least [`auth::ADMIN_TOKEN_CHARS_MIN`]
/// characters, so it cannot be guessed.
fn check_admin_token(token: &str, source: &str) -> anyhow::Result<()> {
    let chars = token.chars().count();
    anyhow::ensure!(
        chars >= auth::ADMIN_TOKEN_CHARS_MIN,
        "{source} is {chars} characters; an admin token needs at least {} (leave it out and \
         the node makes a random one)",
        auth::ADMIN_TOKEN_CHARS_MIN
    );
    Ok(())
}

/// The admin token: the configured one (saved for next time), else the saved one, else new.
fn load_admin_token(data_dir: &Path, configured: Option<String>) -> anyhow::Result<String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let token = match configured {
        Some(t) if !t.trim().is_empty() => {
            check_admin_token(t.trim(), "--admin-token")?;
            t.trim().to_string()
        }
        Some(_) => anyhow::bail!("--admin-token is empty"),
        None => match std::fs::read_to_string(&path) {
            Ok(saved) if !saved.trim().is_empty() => {
                check_admin_token(
                    saved.trim(),
                    &format!("the admin token in {}", path.display()),
                )?;
                return Ok(saved.trim().to_string());
            }
            Ok(_) => auth::new_token(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => auth::new_token(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        },
    };
    write_secret_file(&path, &token)?;
    Ok(token)
}

/// Writes a secret atomically (write then rename), readable by the owner only.
fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(format!("{secret}\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("rename into {}", path.display()))?;
    Ok(())
}
