//! `sesame node` as real processes on loopback: a cluster a test can kill with SIGKILL and
//! restart. Each node has its own data folder, certificate folder, HTTP and QUIC ports and
//! log file under one temporary directory; every process is killed when the cluster is
//! dropped, so a failing test leaves none behind (and prints the end of each node's log).
//! With `SESAME_KEEP_LOGS=1` the directory is kept, and its path printed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sesame_client::Http;

use crate::cluster::{free_tcp_port, free_udp_port, ADMIN_TOKEN};

/// Longest a node process may take from its start to answering `/healthz`.
const START_WAIT_MS: u64 = 30_000;
/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 30;
/// Set (to anything) to keep the cluster's directory, with every node's log, afterwards.
pub const KEEP_LOGS_ENV: &str = "SESAME_KEEP_LOGS";

/// One `sesame node` process, running or not.
pub struct ProcessNode {
    pub id: u64,
    pub http: SocketAddr,
    pub raft: SocketAddr,
    pub data: PathBuf,
    pub certs: PathBuf,
    /// Standard output and error of every run, appended.
    pub log: PathBuf,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl ProcessNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A cluster of `sesame node` processes.
pub struct ProcessCluster {
    /// `None` only while dropping.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    bin: PathBuf,
    /// Arguments every node gets after its own.
    extra_args: Vec<String>,
    pub nodes: BTreeMap<u64, ProcessNode>,
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
        let mut nodes = BTreeMap::new();
        for id in ids {
            let node_dir = dir.path().join(format!("node{id}"));
            std::fs::create_dir_all(&node_dir)?;
            let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
            nodes.insert(
                id,
                ProcessNode {
                    id,
                    http: loopback(free_tcp_port()?),
                    raft: loopback(free_udp_port()?),
                    data: node_dir.join("data"),
                    certs: certs.join(id.to_string()),
                    log: node_dir.join("node.log"),
                    child: None,
                    starts: 0,
                },
            );
        }
        let mut cluster = ProcessCluster {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            bin,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            nodes,
        };
        for id in cluster.ids() {
            cluster.spawn(id)?;
        }
        for id in cluster.ids() {
            cluster.wait_http(id).await?;
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
            .filter(|n| n.is_running())
            .map(|n| n.id)
            .collect()
    }

    pub fn url(&self, id: u64) -> String {
        self.nodes[&id].url()
    }

    /// An admin client of node `id` alone.
    pub fn admin(&self, id: u64) -> Http {
        Http::new(&self.url(id), Some(ADMIN_TOKEN.into()))
    }

    /// An admin client of every node, trying them from `first` on.
    pub fn admin_all(&self, first: usize) -> Http {
        let mut urls: Vec<String> = self.nodes.values().map(ProcessNode::url).collect();
        let len = urls.len();
        urls.rotate_left(first % len);
        Http::with_nodes(urls, Some(ADMIN_TOKEN.into()))
    }

    /// The `--initial-cluster` value: every node's QUIC address.
    fn initial_cluster(&self) -> String {
        self.nodes
            .values()
            .map(|n| format!("{}={}", n.id, n.raft))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `id`'s process on its data folder (it must not be running).
    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let initial = self.initial_cluster();
        let bin = self.bin.clone();
        let extra = self.extra_args.clone();
        let node = self.nodes.get_mut(&id).context("no such node")?;
        anyhow::ensure!(node.child.is_none(), "node {id} is running");
        node.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("open {}", node.log.display()))?;
        std::io::Write::write_all(
            &mut log,
            format!("=== start {} of node {id}\n", node.starts).as_bytes(),
        )?;
        let child = Command::new(bin)
            .arg("node")
            .args(["--id", &id.to_string()])
            .arg("--data")
            .arg(&node.data)
            .args(["--http", &node.http.to_string()])
            .args(["--raft", &node.raft.to_string()])
            .arg("--certs")
            .arg(&node.certs)
            .args(["--initial-cluster", &initial])
            .args(["--admin-token", ADMIN_TOKEN])
            .args(&extra)
            .env("SESAME_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start node {id}"))?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until node `id` answers `GET /healthz`; fails early if its process exits.
    pub async fn wait_http(&mut self, id: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(START_WAIT_MS);
        let addr = self.nodes[&id].http;
        loop {
            let node = self.nodes.get_mut(&id).context("no such node")?;
            let child = node.child.as_mut().context("node is not running")?;
            if let Some(status) = child.try_wait()? {
                node.child = None;
                anyhow::bail!(
                    "node {id} exited with {status}:\n{}",
                    tail(&node.log, LOG_TAIL_LINES)
                );
            }
            if healthz(addr).await {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {id} did not answer HTTP within {START_WAIT_MS} ms:\n{}",
                tail(&self.nodes[&id].log, LOG_TAIL_LINES)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills node `id` with SIGKILL (no shutdown, no flush) and reaps it.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        let mut child = node.child.take().context("node is not running")?;
        // `Child::kill` is SIGKILL on Unix.
        child.kill().with_context(|| format!("kill node {id}"))?;
        child.wait().with_context(|| format!("reap node {id}"))?;
        Ok(())
    }

    /// Starts node `id` again on its data and waits until it answers HTTP.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.spawn(id)?;
        self.wait_http(id).await
    }

    /// The leader every running node names, once they agree on one that runs (within
    /// `timeout`).
    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running();
            let mut views = Vec::new();
            for id in &running {
                views.push(
                    self.admin(*id)
                        .cluster_status()
                        .await
                        .ok()
                        .and_then(|s| s.leader),
                );
            }
            if let Some(Some(leader)) = views.first() {
                if views.iter().all(|v| *v == Some(*leader)) && running.contains(leader) {
                    return Ok(*leader);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "nodes {running:?} agreed on no running leader within {timeout:?}: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for node in self.nodes.values() {
                eprintln!(
                    "--- node {} ({} starts), end of {}:\n{}",
                    node.id,
                    node.starts,
                    node.log.display(),
                    tail(&node.log, LOG_TAIL_LINES)
                );
            }
        }
        if std::env::var_os(KEEP_LOGS_ENV).is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("kept the cluster's directory: {}", dir.keep().display());
            }
        }
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
