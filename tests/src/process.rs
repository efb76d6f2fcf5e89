//! `sesame node` as real processes on loopback. [`NodeProcess`] is one node's command line
//! and process: started, killed with SIGKILL, started again, and always killed when dropped
//! (printing the end of its log if the test is failing), so a failing test leaves no process
//! behind. [`ProcessCluster`] is a cluster of them, each with its own data folder,
//! certificate folder, HTTP and QUIC ports and log file under one temporary directory; with
//! `SESAME_KEEP_LOGS=1` that directory is kept, and its path printed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sesame_client::Http;

use crate::cluster::{free_tcp_port, free_udp_port, ADMIN_TOKEN};

/// Longest a node process may take from its start to answering `/healthz`.
const START_WAIT_MS: u64 = 30_000;
/// Lines of a node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 30;
/// Set (to anything) to keep a cluster's directory, with every node's log, afterwards.
pub const KEEP_LOGS_ENV: &str = "SESAME_KEEP_LOGS";
/// The log filter node processes run with.
const NODE_LOG_FILTER: &str = "info,openraft=warn";

/// One node's command line, and its process while it runs.
pub struct NodeProcess {
    /// For messages: `node 1`.
    pub name: String,
    /// Where it answers HTTP.
    pub http: SocketAddr,
    bin: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    /// Standard output and error of every run, appended.
    pub log: PathBuf,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl NodeProcess {
    /// A node run as `bin args...` with `env` added to the environment, answering HTTP at
    /// `http`, logging to `log`; not started yet.
    pub fn new(
        name: impl Into<String>,
        bin: &Path,
        args: Vec<OsString>,
        env: Vec<(String, String)>,
        http: SocketAddr,
        log: PathBuf,
    ) -> NodeProcess {
        NodeProcess {
            name: name.into(),
            http,
            bin: bin.to_path_buf(),
            args,
            env,
            log,
            child: None,
            starts: 0,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts the process (it must not be running) and waits until it answers HTTP.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_http().await
    }

    /// Starts the process; it must not be running.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is running", self.name);
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        std::io::Write::write_all(
            &mut log,
            format!("=== start {} of {}\n", self.starts, self.name).as_bytes(),
        )?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("SESAME_LOG", NODE_LOG_FILTER)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the node answers `GET /healthz`; fails early if its process exits.
    pub async fn wait_http(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(START_WAIT_MS);
        loop {
            let child = self.child.as_mut().context("the node is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                anyhow::bail!(
                    "{} exited with {status}:\n{}",
                    self.name,
                    tail(&self.log, LOG_TAIL_LINES)
                );
            }
            if healthz(self.http).await {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not answer HTTP within {START_WAIT_MS} ms:\n{}",
                self.name,
                tail(&self.log, LOG_TAIL_LINES)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process with SIGKILL (no shutdown, no flush) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("the node is not running")?;
        // `Child::kill` is SIGKILL on Unix.
        child
            .kill()
            .with_context(|| format!("kill {}", self.name))?;
        child
            .wait()
            .with_context(|| format!("reap {}", self.name))?;
        Ok(())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} ({} starts), end of {}:\n{}",
                self.name,
                self.starts,
                self.log.display(),
                tail(&self.log, LOG_TAIL_LINES)
            );
        }
    }
}

/// One member of a [`ProcessCluster`].
pub struct ProcessNode {
    pub id: u64,
    pub raft: SocketAddr,
    pub data: PathBuf,
    pub certs: PathBuf,
    pub process: NodeProcess,
}

/// A cluster of `sesame node` processes.
pub struct ProcessCluster {
    pub nodes: BTreeMap<u64, ProcessNode>,
    /// `None` only while dropping.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl ProcessCluster {
    /// Makes certificates with `sesame cluster certs` and starts `voters` nodes (ids
    /// 1..=voters) forming a new cluster, each also given `extra_args`. Returns once every
    /// node answers HTTP; the cluster may not have a leader yet.
    pub async fn start(voters: u64, extra_args: &[&str]) -> anyhow::Result<ProcessCluster> {
        let bin = crate::sesame_bin()?;
        let dir = tempfile::tempdir()?;
        let ids: Vec<u64> = (1..=voters).collect();
        let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let certs = dir.path().join("certs");
        let out = Command::new(&bin)
            .args(["cluster", "certs", "--out"])
            .arg(&certs)
            .args(["--nodes", &list])
            .output()
            .context("run sesame cluster certs")?;
        anyhow::ensure!(
            out.status.success(),
            "sesame cluster certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut addrs = BTreeMap::new();
        for id in &ids {
            addrs.insert(
                *id,
                (loopback(free_udp_port()?), loopback(free_tcp_port()?)),
            );
        }
        let initial = addrs
            .iter()
            .map(|(id, (raft, _))| format!("{id}={raft}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = BTreeMap::new();
        for (id, (raft, http)) in addrs {
            let node_dir = dir.path().join(format!("node{id}"));
            std::fs::create_dir_all(&node_dir)?;
            let data = node_dir.join("data");
            let node_certs = certs.join(id.to_string());
            let mut args: Vec<OsString> = vec!["node".into(), "--id".into(), id.to_string().into()];
            args.extend(["--data".into(), data.clone().into_os_string()]);
            args.extend(["--http".into(), http.to_string().into()]);
            // Any free UDP port for app clients (see `cluster::TestCluster`).
            args.extend(["--quic".into(), "127.0.0.1:0".into()]);
            args.extend(["--raft".into(), raft.to_string().into()]);
            args.extend(["--certs".into(), node_certs.clone().into_os_string()]);
            args.extend(["--initial-cluster".into(), initial.clone().into()]);
            args.extend(["--admin-token".into(), ADMIN_TOKEN.into()]);
            args.extend(extra_args.iter().map(OsString::from));
            let process = NodeProcess::new(
                format!("node {id}"),
                &bin,
                args,
                Vec::new(),
                http,
                node_dir.join("node.log"),
            );
            nodes.insert(
                id,
                ProcessNode {
                    id,
                    raft,
                    data,
                    certs: node_certs,
                    process,
                },
            );
        }
        let mut cluster = ProcessCluster {
            nodes,
            path: dir.path().to_path_buf(),
            dir: Some(dir),
        };
        for node in cluster.nodes.values_mut() {
            node.process.spawn()?;
        }
        for node in cluster.nodes.values_mut() {
            node.process.wait_http().await?;
        }
        Ok(cluster)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The ids of the nodes whose processes run.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.process.is_running())
            .map(|n| n.id)
            .collect()
    }

    pub fn url(&self, id: u64) -> String {
        self.nodes[&id].process.url()
    }

    /// An admin client of node `id` alone.
    pub fn admin(&self, id: u64) -> Http {
        Http::new(&self.url(id), Some(ADMIN_TOKEN.into()))
    }

    /// An admin client of every node, trying them from the `first`-th on.
    pub fn admin_all(&self, first: usize) -> Http {
        let mut urls: Vec<String> = self.nodes.values().map(|n| n.process.url()).collect();
        let len = urls.len();
        urls.rotate_left(first % len);
        Http::with_nodes(urls, Some(ADMIN_TOKEN.into()))
    }

    /// Kills node `id` with SIGKILL and reaps it.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        self.node_mut(id)?.process.kill()
    }

    /// Starts node `id` again on its data and waits until it answers HTTP.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.node_mut(id)?.process.start().await
    }

    fn node_mut(&mut self, id: u64) -> anyhow::Result<&mut ProcessNode> {
        self.nodes
            .get_mut(&id)
            .with_context(|| format!("no node {id}"))
    }

    /// The leader every running node names, once they agree on one that runs (within
    /// `timeout`).
    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let urls: Vec<String> = self.running().iter().map(|id| self.url(*id)).collect();
        let leader = wait_leader(&urls, ADMIN_TOKEN, timeout).await?;
        anyhow::ensure!(
            self.running().contains(&leader),
            "the nodes agree on node {leader}, which is not running"
        );
        Ok(leader)
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        // The processes first (printing their logs' ends if failing), then their folder.
        self.nodes.clear();
        if std::env::var_os(KEEP_LOGS_ENV).is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("kept the cluster's directory: {}", dir.keep().display());
            }
        }
    }
}

/// The leader the nodes at `urls` all name in `GET /v1/cluster` (asked with admin token
/// `token`), once they agree (within `timeout`).
pub async fn wait_leader(urls: &[String], token: &str, timeout: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut views = Vec::new();
        for url in urls {
            let status = Http::new(url, Some(token.into())).cluster_status().await;
            views.push(status.ok().and_then(|s| s.leader));
        }
        if let Some(Some(leader)) = views.first() {
            if views.iter().all(|v| *v == Some(*leader)) {
                return Ok(*leader);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{urls:?} agreed on no leader within {timeout:?}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `GET /healthz` answers 200 within a second.
async fn healthz(addr: SocketAddr) -> bool {
    let client = reqwest::Client::new();
    let request = client
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(1));
    request
        .send()
        .await
        .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
}

/// The last `lines` lines of a log file (or why it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
