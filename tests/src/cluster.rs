//! A cluster of real nodes in this process, on loopback: each with its own data folder,
//! HTTP port, QUIC peer port and certificate from one test CA.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sesame_client::Http;
use sesame_node::peer::Faults;
use sesame_node::raft::RaftTuning;
use sesame_node::{ClusterConfig, NodeConfig, RunningNode};

/// The admin token every node of a test cluster takes.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Adjusts a node's configuration (given its id) before it starts.
pub type Adjust = Arc<dyn Fn(u64, &mut NodeConfig) + Send + Sync>;

/// How one test cluster runs.
#[derive(Clone)]
pub struct ClusterOptions {
    pub tuning: RaftTuning,
    /// Every message between nodes goes through this policy.
    pub faults: Option<Arc<dyn Faults>>,
    /// Adjusts each node's configuration (by node id) before it starts.
    pub adjust: Option<Adjust>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            // Debug builds on a busy 2-core machine: elections a little slower than the
            // production default, so a slow test thread does not churn leaders.
            tuning: RaftTuning {
                heartbeat_ms: 100,
                election_min_ms: 500,
                election_max_ms: 1_000,
                ..RaftTuning::default()
            },
            faults: None,
            adjust: None,
        }
    }
}

/// One member of a test cluster: its settings, and the running node when it runs.
pub struct Member {
    pub id: u64,
    pub config: NodeConfig,
    pub running: Option<RunningNode>,
}

/// A test cluster; nodes are stopped on [`TestCluster::stop`].
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub members: BTreeMap<u64, Member>,
    options: ClusterOptions,
}

/// Longest [`TestCluster::restart_node`] waits for a stopped node's port to be free again.
pub const REBIND_WAIT: Duration = Duration::from_secs(20);

/// Whether starting a node failed because its address is still taken.
fn address_in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    })
}

/// A UDP port on 127.0.0.1 that nothing listens on now.
pub fn free_udp_port() -> anyhow::Result<u16> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a UDP port")?;
    Ok(socket.local_addr()?.port())
}

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_tcp_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind a TCP port")?;
    Ok(listener.local_addr()?.port())
}

impl TestCluster {
    /// Starts `voters` nodes (ids 1..=voters) forming a new cluster.
    pub async fn start(voters: u64, options: ClusterOptions) -> anyhow::Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let ids: Vec<u64> = (1..=voters).collect();
        sesame_node::peer::tls::write_cluster_certs(&dir.path().join("certs"), &ids)?;
        let mut initial = BTreeMap::new();
        let mut ports = BTreeMap::new();
        for id in &ids {
            let raft = free_udp_port()?;
            initial.insert(*id, format!("127.0.0.1:{raft}"));
            ports.insert(*id, (raft, free_tcp_port()?));
        }
        let mut cluster = TestCluster {
            dir,
            members: BTreeMap::new(),
            options,
        };
        for id in ids {
            let (raft, http) = ports[&id];
            let config = cluster.config(id, raft, http, Some(initial.clone()));
            cluster.members.insert(
                id,
                Member {
                    id,
                    config,
                    running: None,
                },
            );
        }
        let started = futures::future::join_all(
            cluster
                .members
                .values()
                .map(|m| sesame_node::start(m.config.clone())),
        )
        .await;
        for (member, running) in cluster.members.values_mut().zip(started) {
            member.running = Some(running?);
        }
        cluster.wait_leader(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    fn config(
        &self,
        id: u64,
        raft_port: u16,
        http_port: u16,
        initial: Option<BTreeMap<u64, String>>,
    ) -> NodeConfig {
        let base = self.dir.path();
        let mut c = NodeConfig::new(
            base.join(format!("node{id}")),
            format!("127.0.0.1:{http_port}")
                .parse()
                .expect("a loopback address"),
        );
        c.node_id = id;
        // Any free UDP port for app clients: the default (the HTTP port's number) could be
        // a port another test's node picked for its peers.
        c.quic_addr = Some("127.0.0.1:0".parse().expect("a loopback address"));
        c.render_worker = Some(crate::render_worker());
        c.admin_token = Some(ADMIN_TOKEN.into());
        c.write_rate = None;
        c.raft_tuning = self.options.tuning;
        c.cluster = Some(ClusterConfig {
            raft_addr: format!("127.0.0.1:{raft_port}"),
            raft_listen: format!("127.0.0.1:{raft_port}")
                .parse()
                .expect("a loopback address"),
            certs: base.join("certs").join(id.to_string()),
            initial,
            faults: self.options.faults.clone(),
        });
        if let Some(adjust) = &self.options.adjust {
            adjust(id, &mut c);
        }
        c
    }

    /// Makes certificates and settings for a new node `id` (not a member yet) and starts it.
    pub async fn start_new(&mut self, id: u64) -> anyhow::Result<String> {
        sesame_node::peer::tls::write_cluster_certs(&self.dir.path().join("certs"), &[id])?;
        let raft = free_udp_port()?;
        let config = self.config(id, raft, free_tcp_port()?, None);
        let running = sesame_node::start(config.clone()).await?;
        self.members.insert(
            id,
            Member {
                id,
                config,
                running: Some(running),
            },
        );
        Ok(format!("127.0.0.1:{raft}"))
    }

    pub fn node(&self, id: u64) -> &RunningNode {
        self.members[&id]
            .running
            .as_ref()
            .expect("the node is running")
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.members[&id].config.data_dir.clone()
    }

    /// An admin client of node `id`.
    pub fn admin(&self, id: u64) -> Http {
        Http::new(&self.node(id).url(), Some(ADMIN_TOKEN.into()))
    }

    /// The ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| m.running.is_some())
            .map(|m| m.id)
            .collect()
    }

    /// The leader every running node agrees on, once they do (within `timeout`).
    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let views: Vec<Option<u64>> = self
                .running()
                .iter()
                .map(|id| self.node(*id).node.raft.view().leader)
                .collect();
            if let Some(Some(leader)) = views.first() {
                if views.iter().all(|v| *v == Some(*leader))
                    && self.running().contains(leader)
                    && self.node(*leader).node.raft.view().is_leader()
                {
                    return Ok(*leader);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no leader agreed on within {timeout:?}: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops node `id` (its data stays).
    pub async fn stop_node(&mut self, id: u64) -> anyhow::Result<()> {
        let running = self
            .members
            .get_mut(&id)
            .and_then(|m| m.running.take())
            .context("the node is not running")?;
        running.shutdown().await
    }

    /// Starts node `id` again on its data.
    ///
    /// A stopped node's last requests to its peers can outlive it for a while (a message
    /// the fault-injecting transport drops waits out its timeout, up to the link's), and
    /// they hold its endpoint and so its UDP port: a start that finds the port taken is
    /// retried for up to [`REBIND_WAIT`].
    pub async fn restart_node(&mut self, id: u64) -> anyhow::Result<()> {
        let member = self.members.get_mut(&id).context("no such member")?;
        anyhow::ensure!(member.running.is_none(), "node {id} is running");
        let deadline = Instant::now() + REBIND_WAIT;
        loop {
            match sesame_node::start(member.config.clone()).await {
                Ok(running) => {
                    member.running = Some(running);
                    return Ok(());
                }
                Err(e) if address_in_use(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until every running node has applied `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> anyhow::Result<()> {
        for id in self.running() {
            let reads = &self.node(id).node.reads;
            anyhow::ensure!(
                reads.wait_applied(index, timeout).await,
                "node {id} did not apply index {index} within {timeout:?} (it has {})",
                reads.applied_index()
            );
        }
        Ok(())
    }

    /// Stops every node, all at once (each waits for its in-flight requests to finish).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let stopping = self
            .members
            .values_mut()
            .filter_map(|m| m.running.take())
            .map(RunningNode::shutdown);
        for stopped in futures::future::join_all(stopping).await {
            stopped?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
