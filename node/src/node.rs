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
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use openraft::error::{ClientWriteError, RaftError};
use sesame_proto::{codec, Command, CommandResult, LogIndex, Transaction};
use sesame_sync::{ReadPool, StoreError, View};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

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
/// First wait before restarting a Raft that stopped on a storage failure; doubles per failed
/// attempt up to [`RAFT_RESTART_MS_MAX`].
const RAFT_RESTART_MS_MIN: u64 = 250;
const RAFT_RESTART_MS_MAX: u64 = 10_000;

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
        }
    }
}

/// Why a write did not commit. Callers branch on it: only `OutcomeUnknown` may have been
/// applied, and a retry with the same `(client_id, seq)` settles it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("this node is not the leader; node {id} at {addr} is")]
    NotLeader { id: NodeId, addr: String },
    #[error("this node is not the leader and knows no leader now; retry shortly")]
    NoLeader,
    /// Nothing was written.
    #[error("{0}; nothing was written")]
    Unavailable(String),
    /// The node failed while the write was in flight: it may or may not have committed.
    #[error("{0}")]
    OutcomeUnknown(String),
    #[error("transactions: unexpected result {0}")]
    Unexpected(String),
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        let mut api = match &e {
            WriteError::NotLeader { .. } | WriteError::NoLeader => ApiError::new(
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

/// The node's Raft. A storage failure (a full or failing disk) stops an openraft instance
/// for good, so [`supervise_raft`] replaces it with a fresh one on the same storage once
/// the storage opens again; everyone reaches Raft through this handle.
pub struct RaftHandle {
    current: RwLock<Raft>,
    /// Why Raft is not running now, if it is not.
    problem: RwLock<Option<String>>,
}

impl RaftHandle {
    fn new(raft: Raft) -> RaftHandle {
        RaftHandle {
            current: RwLock::new(raft),
            problem: RwLock::new(None),
        }
    }

    /// The running instance (cheap: a handle).
    pub fn get(&self) -> Raft {
        self.current
            .read()
            .expect("raft handle lock poisoned")
            .clone()
    }

    /// Why Raft is not running, or `None` when it runs.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .read()
            .expect("raft problem lock poisoned")
            .clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        *self.problem.write().expect("raft problem lock poisoned") = problem;
    }
}

/// Shared state of a running node; handlers hold an `Arc<Node>`.
pub struct Node {
    pub id: NodeId,
    pub raft: RaftHandle,
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

type Proposed = Result<(LogIndex, CommandResult), WriteError>;

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
        propose(&self.raft.get(), command).await
    }

    /// The newest log index this node knows of (appended, committed or applied): an index
    /// past it has not been written yet.
    pub fn known_index(&self) -> LogIndex {
        let metrics = self.raft.get().metrics().borrow().clone();
        let log = metrics.last_log_index.unwrap_or(0);
        let applied = *self.applied.borrow();
        log.max(applied)
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
            .map_err(|_| WriteError::Unavailable("the node is shutting down".into()))?;
        answer
            .await
            .map_err(|_| WriteError::OutcomeUnknown("the node shut down during the write".into()))?
    }
}

/// Orders `command` through the Raft log and returns its log index and what applying it did.
/// Returns once the entry is committed (durable on a quorum) and applied.
pub async fn propose(raft: &Raft, command: Command) -> Proposed {
    if let Err(e) = &raft.metrics().borrow().running_state {
        return Err(WriteError::Unavailable(format!("raft has stopped: {e}")));
    }
    match raft.client_write(command).await {
        Ok(resp) => Ok((resp.log_id.index, resp.data)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(match (f.leader_id, f.leader_node) {
                (Some(id), Some(n)) => WriteError::NotLeader { id, addr: n.http },
                _ => WriteError::NoLeader,
            })
        }
        Err(RaftError::APIError(e)) => Err(WriteError::Unavailable(format!("cannot write: {e}"))),
        Err(RaftError::Fatal(e)) => {
            tracing::error!("raft stopped during a write: {e}");
            Err(WriteError::OutcomeUnknown(format!(
                "raft stopped while the write was in flight: {e}"
            )))
        }
    }
}

/// Group commit: takes every transaction queued while the previous entry was in flight (up
/// to the entry limits) and proposes them as one [`Command::Txs`]. A lone writer gets an
/// entry of its own at once; many writers share entries, and fsyncs. Ends when the node is
/// dropped.
async fn group_commit(node: std::sync::Weak<Node>, mut queue: mpsc::Receiver<PendingTx>) {
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
        let Some(raft) = node.upgrade().map(|n| n.raft.get()) else {
            return;
        };
        match propose(&raft, Command::Txs(txs)).await {
            Ok((index, CommandResult::Txs(results))) if results.len() == replies.len() => {
                for (reply, result) in replies.into_iter().zip(results) {
                    // A requester that went away (client disconnected) needs no answer.
                    let _ = reply.send(Ok((index, result)));
                }
            }
            Ok((_, other)) => {
                let e = WriteError::Unexpected(format!("{other:?}"));
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
    supervisor: tokio::task::JoinHandle<()>,
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
        self.supervisor.abort();
        self.node
            .raft
            .get()
            .shutdown()
            .await
            .context("shut down raft")?;
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
    if let Some(domain) = &config.domain {
        check_domain(domain)?;
    }
    secure_data_dir(&config.data_dir)?;
    let admin_token = load_admin_token(&config.data_dir, config.admin_token.clone())?;

    let applied_tx = Arc::new(watch::channel(0).0);
    let applied = applied_tx.subscribe();
    let raft_parts = RaftParts {
        dir: config.data_dir.clone(),
        node_id: config.node_id,
        applied: applied_tx,
    };
    let (raft, reads) = raft_parts.open().await?;
    let reads = Arc::new(reads);

    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("bind HTTP on {}", config.http_addr))?;
    let addr = listener.local_addr().context("read the bound address")?;

    if !raft.is_initialized().await.context("read raft state")? {
        let members = BTreeMap::from([(
            config.node_id,
            // No peer address yet: a single voter dials nobody.
            raft::Member::new("", addr.to_string()),
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
    // Storage and the object folder made their files by now.
    secure_data_dir(&config.data_dir)?;
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
        },
        publisher.clone(),
    ));

    let (txs, queue) = mpsc::channel(TX_QUEUE_MAX);
    let node = Arc::new(Node {
        id: config.node_id,
        raft: RaftHandle::new(raft),
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
    tokio::spawn(group_commit(Arc::downgrade(&node), queue));
    let cancel = CancellationToken::new();
    let supervisor = tokio::spawn(supervise_raft(
        Arc::downgrade(&node),
        raft_parts,
        cancel.clone(),
    ));
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
        supervisor,
    })
}

/// What it takes to (re)start this node's Raft on its storage.
struct RaftParts {
    dir: PathBuf,
    node_id: NodeId,
    /// The applied index, shared by every instance so followers of it need not resubscribe.
    applied: Arc<watch::Sender<LogIndex>>,
}

impl RaftParts {
    /// Opens the log and the state machine and starts a Raft on them; also returns a read
    /// pool on the tuple store.
    async fn open(&self) -> anyhow::Result<(Raft, ReadPool)> {
        let dir = self.dir.clone();
        let (log_store, state_machine) =
            tokio::task::spawn_blocking(move || raft::open_storage(&dir))
                .await
                .context("join storage opening")?
                .context("open raft storage")?;
        let state_machine = state_machine.with_applied_watch(self.applied.clone());
        let reads = state_machine
            .read_pool(READ_POOL_IDLE_MAX)
            .context("open tuple store readers")?;
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
            self.node_id,
            Arc::new(raft_config),
            Network::unconnected(self.node_id),
            log_store,
            state_machine,
        )
        .await
        .context("start raft")?;
        Ok((raft, reads))
    }
}

/// Watches Raft and, when a storage failure stops it (openraft stops for good on any
/// storage error: a full disk, an I/O error), shuts it down and starts a new instance on the
/// same storage, retrying with backoff until the storage opens and works again. Writes that
/// were in flight are answered `outcome_unknown`; the log on disk decides what committed.
async fn supervise_raft(node: std::sync::Weak<Node>, parts: RaftParts, cancel: CancellationToken) {
    loop {
        let Some(raft) = node.upgrade().map(|n| n.raft.get()) else {
            return;
        };
        let mut metrics = raft.metrics();
        let stopped = tokio::select! {
            _ = cancel.cancelled() => return,
            m = metrics.wait_for(|m| m.running_state.is_err()) => match m {
                Ok(m) => m.running_state.clone().err(),
                // The metrics sender is gone: the instance ended without saying why.
                Err(_) => None,
            },
        };
        let reason = stopped.map_or_else(|| "raft ended".to_string(), |e| e.to_string());
        tracing::error!("raft stopped: {reason}; restarting it on the same storage");
        if let Some(n) = node.upgrade() {
            n.raft.set_problem(Some(format!(
                "raft stopped: {reason}; restarting it on the same storage"
            )));
        }
        // The stopped instance reports its fatal error again here; it is logged above.
        let _ = raft.shutdown().await;
        drop(raft);
        let mut attempt: u32 = 0;
        loop {
            let wait = RAFT_RESTART_MS_MIN
                .saturating_mul(1 << attempt.min(6))
                .min(RAFT_RESTART_MS_MAX);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
            match parts.open().await {
                Ok((raft, _reads)) => {
                    let Some(n) = node.upgrade() else { return };
                    *n.raft.current.write().expect("raft handle lock poisoned") = raft;
                    n.raft.set_problem(None);
                    tracing::info!("raft restarted after a storage failure");
                    break;
                }
                Err(e) => {
                    tracing::error!("restart raft: {e:#}; retrying");
                    attempt = attempt.saturating_add(1);
                }
            }
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
    let d = crate::serve::normalize_domain(domain);
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
