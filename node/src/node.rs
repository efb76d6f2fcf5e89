//! A running node: Raft, the tuple store's readers, and the HTTP server, wired together.
//!
//! The path of a write: [`crate::api`] validates it and calls [`Node::propose`], which hands
//! the command to openraft; the leader appends it to the log (durably), commits it, and the
//! state machine applies it to the tuple store; `propose` returns the result computed there.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use openraft::error::{ClientWriteError, RaftError};
use sesame_proto::{Command, CommandResult, LogIndex};
use sesame_sync::{ReadPool, StoreError, View};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth;
use crate::error::ApiError;
use crate::raft::{self, Network, NodeId, Raft};

/// Name of the file under the data directory that holds the admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// How long start-up waits for this node to become leader of its single-voter cluster.
const LEADER_WAIT_MS: u64 = 10_000;
/// Most requests served at once; more wait in the listener's backlog.
pub const HTTP_CONCURRENCY_MAX: usize = 1024;
/// Idle reader connections kept open for HTTP reads.
const READ_POOL_IDLE_MAX: usize = 16;

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    /// The admin token; when absent, the one in `<data>/admin-token`, else a new one.
    pub admin_token: Option<String>,
    pub node_id: NodeId,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>, http_addr: SocketAddr) -> NodeConfig {
        NodeConfig {
            data_dir: data_dir.into(),
            http_addr,
            admin_token: None,
            node_id: 1,
        }
    }
}

/// Shared state of a running node; handlers hold an `Arc<Node>`.
pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    reads: Arc<ReadPool>,
    applied: watch::Receiver<LogIndex>,
    admin_hash: String,
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

    /// Orders `command` through the Raft log and returns its log index and what applying it
    /// did. Returns once the entry is committed (durable on a quorum) and applied.
    pub async fn propose(&self, command: Command) -> Result<(LogIndex, CommandResult), ApiError> {
        match self.raft.client_write(command).await {
            Ok(resp) => Ok((resp.log_id.index, resp.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "not_leader",
                match (f.leader_id, f.leader_node) {
                    (Some(id), Some(n)) => {
                        format!("this node is not the leader; node {id} at {} is", n.addr)
                    }
                    _ => {
                        "this node is not the leader and knows no leader now; retry shortly".into()
                    }
                },
            )),
            Err(RaftError::APIError(e)) => Err(ApiError::unavailable(format!("cannot write: {e}"))),
            Err(RaftError::Fatal(e)) => {
                tracing::error!("raft stopped: {e}");
                Err(ApiError::unavailable(format!("raft has stopped: {e}")))
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

    let node = Arc::new(Node {
        id: config.node_id,
        raft,
        reads,
        applied,
        admin_hash: auth::hash_token(&admin_token),
    });
    let app = crate::api::router(node.clone());
    let cancel = CancellationToken::new();
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
    })
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
