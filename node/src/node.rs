//! A running node: Raft, the tuple store's readers, and the HTTP server, wired together.
//!
//! The path of a write: [`crate::api`] validates it and calls [`Node::write_tx`], which queues
//! it for [`group_commit`]: transactions that arrive while one log entry is being made
//! durable go together into the next (one entry, one fsync, each transaction still atomic on
//! its own). [`propose`] hands the entry to openraft; the leader appends it to the log
//! (durably), commits it, and the state machine applies it to the tuple store; the results
//! computed there travel back to each waiting request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use openraft::error::{ClientWriteError, RaftError};
use sesame_proto::{codec, Command, CommandResult, LogIndex, Transaction};
use sesame_sync::{ReadPool, StoreError, View};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use sesame_projector::sandbox::{
    PoolConfig, RenderPool, WorkerCommand, PAGE_TIME_MS_DEFAULT, WORKER_MEMORY_BYTES_DEFAULT,
};
use sesame_projector::Publisher;

use crate::auth;
use crate::error::ApiError;
use crate::limits::{RateLimit, SiteLimiter};
use crate::projection::{ProjectionConfig, Projections, DEBOUNCE_MS_DEFAULT};
use crate::raft::{self, Network, NodeId, Raft};
use crate::serve::{Pages, ServeConfig};

/// Name of the file under the data directory that holds the admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// How long start-up waits for this node to become leader of its single-voter cluster.
const LEADER_WAIT_MS: u64 = 10_000;
/// Most requests served at once; more wait in the listener's backlog.
pub const HTTP_CONCURRENCY_MAX: usize = 1024;
/// Transactions waiting for the next log entry; past this, writers wait (backpressure).
const TX_QUEUE_MAX: usize = 4_096;
/// Most transactions grouped into one log entry.
const TXS_PER_ENTRY_MAX: usize = 512;
/// Encoded bytes after which no more transactions join an entry. One transaction may
/// overshoot it by at most its own size (itself at most `TX_BYTES_MAX`), well inside the
/// codec's frame limit.
const ENTRY_BYTES_MAX: usize = 16 << 20;
/// Idle reader connections kept open for HTTP reads.
const READ_POOL_IDLE_MAX: usize = 16;

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
    /// Throttle of the projector: commits arriving within this window after a render are
    /// rendered together in the next round (a commit to an idle projector renders at once).
    pub debounce: Duration,
    /// Per-site write rate limit; `None`: unlimited.
    pub write_rate: Option<RateLimit>,
    /// Longest a `Sesame-Min-Index` request waits.
    pub min_index_wait: Duration,
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
            render_worker: None,
            render_workers: 0,
            render_memory_bytes_max: WORKER_MEMORY_BYTES_DEFAULT,
            render_page_time_max: Duration::from_millis(PAGE_TIME_MS_DEFAULT),
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

/// Shared state of a running node; handlers hold an `Arc<Node>`.
pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    reads: Arc<ReadPool>,
    applied: watch::Receiver<LogIndex>,
    admin_hash: String,
    txs: mpsc::Sender<PendingTx>,
    /// What is served, and the projected index.
    pub pages: Arc<Pages>,
    pub projections: Arc<Projections>,
    pub limiter: SiteLimiter,
    pub publisher: Arc<Publisher>,
}

type Proposed = Result<(LogIndex, CommandResult), ApiError>;

/// A transaction waiting for [`group_commit`] to put it in a log entry.
struct PendingTx {
    tx: Transaction,
    bytes: usize,
    reply: oneshot::Sender<Proposed>,
}

impl Node {
    pub fn is_admin_hash(&self, hash: &str) -> bool {
        // Both are hex hashes of equal length: nothing an attacker learns from timing helps
        // them find a preimage.
        hash == self.admin_hash
    }

    /// Runs a read on a consistent snapshot of the tuple store, off the async runtime.
    pub async fn read<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(View<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let reads = self.reads.clone();
        tokio::task::spawn_blocking(move || reads.read(f))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::from)
    }

    /// Follows the applied index of the state machine.
    pub fn applied(&self) -> watch::Receiver<LogIndex> {
        self.applied.clone()
    }

    /// Orders one command through the Raft log on its own; see [`propose`].
    pub async fn propose(&self, command: Command) -> Proposed {
        propose(&self.raft, command).await
    }

    /// Commits a validated transaction and returns its log index and result (committed,
    /// duplicate, conflict, unknown site). Returns once the transaction is durable and
    /// applied.
    pub async fn write_tx(&self, tx: Transaction) -> Proposed {
        let (reply, answer) = oneshot::channel();
        let bytes = codec::encoded_len(&tx);
        self.txs
            .send(PendingTx { tx, bytes, reply })
            .await
            .map_err(|_| ApiError::unavailable("the node is shutting down"))?;
        answer
            .await
            .map_err(|_| ApiError::unavailable("the node is shutting down"))?
    }
}

/// Orders `command` through the Raft log and returns its log index and what applying it did.
/// Returns once the entry is committed (durable on a quorum) and applied.
pub async fn propose(raft: &Raft, command: Command) -> Proposed {
    match raft.client_write(command).await {
        Ok(resp) => Ok((resp.log_id.index, resp.data)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(ApiError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "not_leader",
            match (f.leader_id, f.leader_node) {
                (Some(id), Some(n)) => {
                    format!("this node is not the leader; node {id} at {} is", n.addr)
                }
                _ => "this node is not the leader and knows no leader now; retry shortly".into(),
            },
        )),
        Err(RaftError::APIError(e)) => Err(ApiError::unavailable(format!("cannot write: {e}"))),
        Err(RaftError::Fatal(e)) => {
            tracing::error!("raft stopped: {e}");
            Err(ApiError::unavailable(format!("raft has stopped: {e}")))
        }
    }
}

/// Group commit: takes every transaction queued while the previous entry was in flight (up
/// to the entry limits) and proposes them as one [`Command::Txs`]. A lone writer gets an
/// entry of its own at once; many writers share entries, and fsyncs. Ends when the node is
/// dropped.
async fn group_commit(raft: Raft, mut queue: mpsc::Receiver<PendingTx>) {
    while let Some(first) = queue.recv().await {
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < TXS_PER_ENTRY_MAX && bytes < ENTRY_BYTES_MAX {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.bytes;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let (txs, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.tx, p.reply)).unzip();
        match propose(&raft, Command::Txs(txs)).await {
            Ok((index, CommandResult::Txs(results))) if results.len() == replies.len() => {
                for (reply, result) in replies.into_iter().zip(results) {
                    // A requester that went away (client disconnected) needs no answer.
                    let _ = reply.send(Ok((index, result)));
                }
            }
            Ok((_, other)) => {
                let e = ApiError::internal(format!("transactions: unexpected result {other:?}"));
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// A node serving HTTP; stop it with [`RunningNode::shutdown`].
pub struct RunningNode {
    pub addr: SocketAddr,
    pub admin_token: String,
    pub node: Arc<Node>,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    projector: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    /// The HTTP base URL, like `http://127.0.0.1:7700`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, lets in-flight ones finish, and stops Raft.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.server
            .await
            .context("join the HTTP server")?
            .context("serve HTTP")?;
        self.projector.await.context("join the projector")?;
        self.node.raft.shutdown().await.context("shut down raft")?;
        Ok(())
    }

    /// Resolves when the node is asked to stop (by [`RunningNode::shutdown`]).
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }
}

/// Starts a node: opens storage, starts Raft (initialising a single-voter cluster on first
/// start), and serves HTTP. Returns once the node is leader and listening.
pub async fn start(config: NodeConfig) -> anyhow::Result<RunningNode> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
    let admin_token = load_admin_token(&config.data_dir, config.admin_token.clone())?;

    let dir = config.data_dir.clone();
    let (log_store, state_machine) = tokio::task::spawn_blocking(move || raft::open_storage(&dir))
        .await
        .context("join storage opening")?
        .context("open raft storage")?;
    let reads = Arc::new(
        state_machine
            .read_pool(READ_POOL_IDLE_MAX)
            .context("open tuple store readers")?,
    );
    let applied = state_machine.applied_index();

    let raft_config = openraft::Config {
        cluster_name: "sesame".into(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Default::default()
    }
    .validate()
    .context("validate raft config")?;
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config),
        Network,
        log_store,
        state_machine,
    )
    .await
    .context("start raft")?;

    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("bind HTTP on {}", config.http_addr))?;
    let addr = listener.local_addr().context("read the bound address")?;

    if !raft.is_initialized().await.context("read raft state")? {
        let members = BTreeMap::from([(
            config.node_id,
            openraft::BasicNode {
                addr: addr.to_string(),
            },
        )]);
        raft.initialize(members)
            .await
            .context("initialise single-voter cluster")?;
    }
    raft.wait(Some(Duration::from_millis(LEADER_WAIT_MS)))
        .current_leader(config.node_id, "become leader of the single-voter cluster")
        .await
        .context("wait for leadership")?;

    let publisher = Arc::new(match &config.objects {
        None => Publisher::local(config.data_dir.join(OBJECTS_DIR))
            .context("open the local object folder")?,
        Some(url) => {
            let options = std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .map(|(k, v)| (k.to_ascii_lowercase(), v));
            Publisher::from_url(url, options).with_context(|| format!("open object store {url}"))?
        }
    });
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let pages = Arc::new(Pages::new(
        ServeConfig {
            domain: config.domain.clone(),
            min_index_wait: config.min_index_wait,
        },
        publisher.clone(),
    ));
    let projections = Arc::new(Projections::new(
        ProjectionConfig {
            debounce: config.debounce,
            public_url,
            domain: config.domain.clone(),
            render_pool: Arc::new(RenderPool::new(config.render_pool()?)),
        },
        publisher.clone(),
    ));

    let (txs, queue) = mpsc::channel(TX_QUEUE_MAX);
    tokio::spawn(group_commit(raft.clone(), queue));
    let node = Arc::new(Node {
        id: config.node_id,
        raft,
        reads,
        applied,
        admin_hash: auth::hash_token(&admin_token),
        txs,
        pages,
        projections: projections.clone(),
        limiter: SiteLimiter::new(config.write_rate),
        publisher,
    });
    // Serve the last published versions from the first request on.
    node.pages
        .refresh(&node)
        .await
        .context("load published site versions")?;
    let cancel = CancellationToken::new();
    let projector = tokio::spawn(projections.run(node.clone(), cancel.clone()));
    let app = crate::api::router(node.clone());
    let stop = cancel.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    tracing::info!(%addr, "node {} serving HTTP", config.node_id);
    Ok(RunningNode {
        addr,
        admin_token,
        node,
        cancel,
        server,
        projector,
    })
}

/// Wall-clock milliseconds since the Unix epoch, as proposers put them into commands (the
/// state machine never reads the clock itself).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The admin token: the configured one (saved for next time), else the saved one, else new.
fn load_admin_token(data_dir: &Path, configured: Option<String>) -> anyhow::Result<String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let token = match configured {
        Some(t) if !t.trim().is_empty() => t.trim().to_string(),
        Some(_) => anyhow::bail!("--admin-token is empty"),
        None => match std::fs::read_to_string(&path) {
            Ok(saved) if !saved.trim().is_empty() => return Ok(saved.trim().to_string()),
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
