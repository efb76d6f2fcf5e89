//! A real cluster in one process: three openraft nodes on our SQLite storage, talking over the
//! QUIC peer transport with mutual TLS on loopback. They elect a leader, replicate writes,
//! elect another leader when it stops, and bring a new learner up to date with a snapshot
//! streamed in chunks after the log it would need was purged.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use openraft::{LogId, SnapshotPolicy};
use sesame_node::peer::tls::write_cluster_certs;
use sesame_node::peer::{NodeCerts, PeerConfig, PeerEndpoint};
use sesame_node::raft::network::{NetworkConfig, RaftHandler};
use sesame_node::raft::{open_storage, Member, Network, NodeId, Raft};
use sesame_proto::{Command, CommandResult, Op, Transaction, Value};
use sesame_sync::ReadPool;
use tempfile::TempDir;

/// How long any one wait for the cluster may take before the test fails.
const RAFT_WAIT: Duration = Duration::from_secs(10);
/// Small chunks, so even this test's snapshot takes several.
const CHUNK_BYTES: usize = 16 << 10;
/// Snapshot after this many entries; logs in a snapshot are purged at once.
const SNAPSHOT_EVERY: u64 = 10;

struct TestNode {
    id: NodeId,
    raft: Raft,
    endpoint: PeerEndpoint,
    reads: ReadPool,
    member: Member,
    _dir: TempDir,
}

impl TestNode {
    async fn start(certs: &Path, id: NodeId) -> anyhow::Result<TestNode> {
        let dir = TempDir::new()?;
        let (log_store, state_machine) = open_storage(dir.path())?;
        let reads = state_machine.read_pool(1)?;
        let node_certs = NodeCerts::load(&certs.join(id.to_string()))?;
        let endpoint = PeerEndpoint::bind(PeerConfig::new("127.0.0.1:0".parse()?), &node_certs)?;
        let network = Network::new(id, Arc::new(endpoint.clone())).with_config(NetworkConfig {
            snapshot_chunk_bytes: CHUNK_BYTES,
            ..NetworkConfig::default()
        });
        let config = openraft::Config {
            cluster_name: "test".into(),
            heartbeat_interval: 50,
            election_timeout_min: 300,
            election_timeout_max: 600,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
            max_in_snapshot_log_to_keep: 0,
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()?;
        let raft = Raft::new(id, Arc::new(config), network, log_store, state_machine).await?;
        endpoint.serve(Arc::new(RaftHandler::new(raft.clone())));
        let member = Member::new(endpoint.local_addr()?.to_string(), "");
        Ok(TestNode {
            id,
            raft,
            endpoint,
            reads,
            member,
            _dir: dir,
        })
    }

    async fn stop(&self) -> anyhow::Result<()> {
        self.raft.shutdown().await?;
        self.endpoint.close().await;
        Ok(())
    }

    fn profile(&self, key: &str) -> anyhow::Result<Option<Value>> {
        let key = key.to_string();
        let tuple = self.reads.read(move |v| v.get("demo", "profiles", &key))?;
        Ok(tuple.map(|t| t.value))
    }

    async fn applied(&self, index: u64) -> anyhow::Result<()> {
        self.raft
            .wait(Some(RAFT_WAIT))
            .applied_index_at_least(Some(index), format!("node {} applies {index}", self.id))
            .await?;
        Ok(())
    }
}

/// A profile with enough padding that the store, and so its snapshot, spans many chunks.
fn profile(key: &str, n: u64) -> anyhow::Result<Value> {
    Value::from_json(serde_json::json!({ "name": key, "n": n, "pad": "x".repeat(2_000) }))
        .map_err(anyhow::Error::msg)
}

fn put(key: &str, n: u64) -> anyhow::Result<Command> {
    Ok(Command::Txs(vec![Transaction {
        site: "demo".into(),
        ops: vec![Op::Put {
            collection: "profiles".into(),
            key: key.into(),
            value: profile(key, n)?,
            if_version: None,
        }],
        origin: None,
    }]))
}

/// Writes `key` through `leader` and returns its log index.
async fn write(leader: &TestNode, key: &str, n: u64) -> anyhow::Result<u64> {
    let written = leader
        .raft
        .client_write(put(key, n)?)
        .await
        .with_context(|| format!("write {key} through node {}", leader.id))?;
    let index = written.log_id.index;
    assert_eq!(
        written.data,
        CommandResult::Txs(vec![CommandResult::Committed { index }])
    );
    Ok(index)
}

/// Waits until every node in `nodes` agrees on a leader among them, and returns it.
async fn agreed_leader(nodes: &[&TestNode]) -> anyhow::Result<NodeId> {
    let first = nodes[0]
        .raft
        .wait(Some(RAFT_WAIT))
        .metrics(
            |m| {
                m.current_leader
                    .is_some_and(|l| nodes.iter().any(|n| n.id == l))
            },
            "elect a leader",
        )
        .await?
        .current_leader
        .expect("waited for a leader");
    for node in &nodes[1..] {
        node.raft
            .wait(Some(RAFT_WAIT))
            .metrics(
                |m| m.current_leader == Some(first),
                format!("node {} follows {first}", node.id),
            )
            .await?;
    }
    Ok(first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_fail_over_and_catch_up_a_learner_by_snapshot() -> anyhow::Result<()>
{
    let certs = TempDir::new()?;
    write_cluster_certs(certs.path(), &[1, 2, 3, 4])?;
    let mut nodes = Vec::new();
    for id in [1, 2, 3] {
        nodes.push(TestNode::start(certs.path(), id).await?);
    }
    let members: BTreeMap<NodeId, Member> =
        nodes.iter().map(|n| (n.id, n.member.clone())).collect();
    nodes[0].raft.initialize(members).await?;

    // Replication: every write reaches every node.
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader_id = agreed_leader(&all).await?;
    let leader = nodes
        .iter()
        .find(|n| n.id == leader_id)
        .expect("the leader is one of the nodes");
    let created = leader
        .raft
        .client_write(Command::CreateSite {
            name: "demo".into(),
            created_at_ms: 1_700_000_000_000,
        })
        .await?;
    assert_eq!(created.data, CommandResult::SiteCreated);
    let mut last = 0;
    for n in 0..5 {
        last = write(leader, &format!("user{n}"), n).await?;
    }
    for node in &nodes {
        node.applied(last).await?;
        assert_eq!(node.profile("user4")?, Some(profile("user4", 4)?));
    }

    // Failover: stop the leader; the other two elect one of themselves and keep writing.
    leader.stop().await?;
    let survivors: Vec<&TestNode> = nodes.iter().filter(|n| n.id != leader_id).collect();
    let new_leader_id = agreed_leader(&survivors).await?;
    assert_ne!(new_leader_id, leader_id);
    let new_leader = *survivors
        .iter()
        .find(|n| n.id == new_leader_id)
        .expect("the new leader survived");
    for n in 5..(3 * SNAPSHOT_EVERY) {
        last = write(new_leader, &format!("user{n}"), n).await?;
    }
    for node in &survivors {
        node.applied(last).await?;
        assert_eq!(node.profile("user5")?, Some(profile("user5", 5)?));
    }

    // Snapshot and purge on the leader, so a newcomer cannot be sent the log.
    new_leader.raft.trigger().snapshot().await?;
    let snapshot = new_leader
        .raft
        .wait(Some(RAFT_WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "snapshot the last write",
        )
        .await?
        .snapshot
        .expect("waited for a snapshot");
    new_leader.raft.trigger().purge_log(snapshot.index).await?;
    new_leader
        .raft
        .wait(Some(RAFT_WAIT))
        .purged(Some(snapshot), "purge up to the snapshot")
        .await?;
    let (snapshot_id, snapshot_bytes) = {
        let current = new_leader
            .raft
            .get_snapshot()
            .await?
            .context("the leader has a snapshot")?;
        let bytes = std::fs::metadata(current.snapshot.path())?.len();
        (current.meta.snapshot_id, bytes)
    };
    assert!(
        snapshot_bytes > 4 * CHUNK_BYTES as u64,
        "the snapshot ({snapshot_bytes} bytes) takes several chunks"
    );

    // A learner joins and is brought up to date by the streamed snapshot.
    let learner = TestNode::start(certs.path(), 4).await?;
    new_leader
        .raft
        .add_learner(4, learner.member.clone(), true)
        .await?;
    learner.applied(last).await?;
    let learned: Option<LogId<NodeId>> = learner.raft.metrics().borrow().snapshot;
    assert!(
        learned.is_some_and(|s| s.index >= snapshot.index),
        "the learner installed the snapshot, it has {learned:?}"
    );
    let installed = learner
        .raft
        .get_snapshot()
        .await?
        .context("the learner has a snapshot")?;
    assert_eq!(
        installed.meta.snapshot_id, snapshot_id,
        "the learner's snapshot is the leader's"
    );
    for n in [0, 4, 5, 3 * SNAPSHOT_EVERY - 1] {
        let key = format!("user{n}");
        assert_eq!(learner.profile(&key)?, Some(profile(&key, n)?), "{key}");
    }

    // And it follows new writes through the log.
    let more = write(new_leader, "late", 99).await?;
    learner.applied(more).await?;
    assert_eq!(learner.profile("late")?, Some(profile("late", 99)?));

    for node in survivors.iter().copied().chain([&learner]) {
        node.stop().await?;
    }
    Ok(())
}
