//! Seeded convergence of app clients over QUIC against a three-node cluster: several clients
//! write (unique keys, and guarded updates of shared keys that may conflict), go offline and
//! write while offline, restart their process (the replica and its queue stay on disk), and
//! the leader is killed in the middle. At the end:
//!
//! - every replica equals the cluster's state for what it subscribes to;
//! - every write the cluster acknowledged to a client is applied exactly once (its key's
//!   version is the index the acknowledgement named), and every unguarded write, however
//!   often it was pushed, is there;
//! - a rejected (guarded) write is not in the client's view.
//!
//! The seed is printed; replay with `SESAME_SYNC_SEED=<seed>`; more steps with
//! `SESAME_SYNC_STEPS=N`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sesame_client::{Client, Event, Options};
use sesame_proto::sync::Target;
use sesame_proto::{Op, Value};
use sesame_tests::cluster::{ClusterOptions, TestCluster, ADMIN_TOKEN};

const CLIENTS: usize = 3;
const STEPS_DEFAULT: u64 = 60;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn items() -> Target {
    Target::Site {
        site: "demo".into(),
        collection: Some("items".into()),
        prefix: String::new(),
    }
}

/// A client of the test: its replica file, and its running process (when it runs).
struct TestClient {
    id: String,
    replica: PathBuf,
    running: Option<Client>,
    events: Option<tokio::task::JoinHandle<()>>,
}

/// What the clients were told: (client, seq) → index, and rejected (client, seq)s.
#[derive(Default)]
struct Outcomes {
    committed: BTreeMap<(String, u64), u64>,
    rejected: BTreeMap<(String, u64), String>,
}

type Shared = std::sync::Arc<std::sync::Mutex<Outcomes>>;

impl TestClient {
    /// Starts the client's process: online against `nodes`, or offline (`nodes` that
    /// nobody listens on).
    fn start(&mut self, nodes: Vec<String>, outcomes: &Shared) {
        let mut options = Options::new(nodes, ADMIN_TOKEN);
        options.replica = Some(self.replica.clone());
        options.client_id = Some(self.id.clone());
        let client = Client::open(options).unwrap();
        let _ = client.subscribe(items()).unwrap();
        let mut events = client.events();
        let outcomes = outcomes.clone();
        let id = self.id.clone();
        self.events = Some(tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(Event::Committed { seq, index, .. }) => {
                        let mut o = outcomes.lock().unwrap();
                        let before = o.committed.insert((id.clone(), seq), index);
                        assert!(
                            before.is_none() || before == Some(index),
                            "{id} seq {seq}: acknowledged at {before:?} and at {index}"
                        );
                    }
                    Ok(Event::Rejected { seq, code, .. }) => {
                        outcomes
                            .lock()
                            .unwrap()
                            .rejected
                            .insert((id.clone(), seq), code);
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        panic!("{id}: the test's event listener lagged by {n}")
                    }
                    Err(_) => return,
                }
            }
        }));
        self.running = Some(client);
    }

    fn stop(&mut self) {
        self.running = None;
        if let Some(e) = self.events.take() {
            e.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_converge_through_offline_writes_restarts_and_a_failover() {
    let seed = env_u64("SESAME_SYNC_SEED").unwrap_or_else(sesame_tests::faults::fresh_seed);
    let steps = env_u64("SESAME_SYNC_STEPS").unwrap_or(STEPS_DEFAULT);
    println!("sync convergence: seed {seed}, {steps} steps (replay: SESAME_SYNC_SEED={seed})");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let options = ClusterOptions {
        adjust: Some(std::sync::Arc::new(|_, c| c.write_rate = None)),
        ..Default::default()
    };
    let mut cluster = TestCluster::start(3, options).await.unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await.unwrap();
    cluster.admin(leader).create_site("demo").await.unwrap();
    let nodes: Vec<String> = cluster
        .running()
        .iter()
        .map(|id| cluster.node(*id).url())
        .collect();
    // Nobody listens here: a client given it is offline.
    let nowhere = format!(
        "http://127.0.0.1:{}",
        sesame_tests::cluster::free_tcp_port().unwrap()
    );

    let dir = tempfile::tempdir().unwrap();
    let outcomes: Shared = Default::default();
    let mut clients: Vec<TestClient> = (0..CLIENTS)
        .map(|i| TestClient {
            id: format!("c{i}"),
            replica: dir.path().join(format!("c{i}.db")),
            running: None,
            events: None,
        })
        .collect();
    for c in clients.iter_mut() {
        c.start(nodes.clone(), &outcomes);
    }
    // (client, seq) → the unique key it wrote; guarded writes by (client, seq).
    let mut unique: BTreeMap<(String, u64), String> = BTreeMap::new();
    let mut guarded: Vec<(String, u64)> = Vec::new();
    let mut killed: Option<u64> = None;

    for step in 0..steps {
        if step == steps / 2 {
            let leader = cluster.wait_leader(Duration::from_secs(20)).await.unwrap();
            println!("step {step}: killing the leader, node {leader}");
            cluster.stop_node(leader).await.unwrap();
            killed = Some(leader);
        }
        if step == steps * 3 / 4 {
            if let Some(id) = killed.take() {
                println!("step {step}: node {id} comes back");
                cluster.restart_node(id).await.unwrap();
            }
        }
        let i = rng.random_range(0..CLIENTS);
        let c = &mut clients[i];
        match rng.random_range(0..10) {
            // The client's process ends (its queue stays on disk).
            0 => c.stop(),
            // It starts again, online.
            1 if c.running.is_none() => c.start(nodes.clone(), &outcomes),
            // It starts offline (no network).
            2 if c.running.is_none() => c.start(vec![nowhere.clone()], &outcomes),
            // A guarded update of a shared key, from what this client sees.
            3 | 4 => {
                let Some(client) = &c.running else { continue };
                let key = format!("s{}", rng.random_range(0..3));
                let seen = client.get("demo", "items", &key).unwrap();
                let if_version = Some(seen.as_ref().map_or(0, |e| e.version));
                let q = client
                    .transact(
                        "demo",
                        vec![Op::Put {
                            collection: "items".into(),
                            key,
                            value: Value::from_json(serde_json::json!(step)).unwrap(),
                            if_version,
                        }],
                    )
                    .unwrap();
                guarded.push((c.id.clone(), q.seq));
            }
            // A write of a key of its own.
            _ => {
                let Some(client) = &c.running else { continue };
                let key = format!("w-{}-{step}", c.id);
                let q = client
                    .transact(
                        "demo",
                        vec![Op::Put {
                            collection: "items".into(),
                            key: key.clone(),
                            value: Value::from_json(serde_json::json!(step)).unwrap(),
                            if_version: None,
                        }],
                    )
                    .unwrap();
                unique.insert((c.id.clone(), q.seq), key);
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
    }
    if let Some(id) = killed.take() {
        cluster.restart_node(id).await.unwrap();
    }

    // Everyone back online until their queues drain.
    for c in clients.iter_mut() {
        c.stop();
        c.start(nodes.clone(), &outcomes);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for c in &clients {
        let client = c.running.as_ref().unwrap();
        while client.pending_count().unwrap() > 0 {
            assert!(
                Instant::now() < deadline,
                "seed {seed}: {} still has {} queued",
                c.id,
                client.pending_count().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The cluster's state, read linearizably.
    let leader = cluster.wait_leader(Duration::from_secs(20)).await.unwrap();
    let admin = cluster.admin(leader);
    let truth: BTreeMap<String, (serde_json::Value, u64)> = admin
        .scan("demo", "items", "", None, 10_000)
        .await
        .unwrap()
        .tuples
        .into_iter()
        .map(|t| (t.key, (t.value.to_json(), t.version)))
        .collect();

    // Every replica converges to it.
    for c in &clients {
        let client = c.running.as_ref().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mine: BTreeMap<String, (serde_json::Value, u64)> = client
                .scan("demo", "items", "", 10_000)
                .unwrap()
                .into_iter()
                .map(|e| (e.key, (e.value.to_json(), e.version)))
                .collect();
            if mine == truth {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "seed {seed}: {}'s replica differs from the cluster:\nreplica {mine:?}\ncluster {truth:?}",
                c.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Exactly once: every unguarded write is there, at the index its acknowledgement named.
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    for ((client, seq), key) in &unique {
        let (_, version) = truth
            .get(key)
            .unwrap_or_else(|| panic!("seed {seed}: {client} seq {seq} ({key}) was lost"));
        if let Some(index) = outcomes.committed.get(&(client.clone(), *seq)) {
            assert_eq!(
                version, index,
                "seed {seed}: {key} acknowledged at {index} but written at {version}: applied twice"
            );
        }
        assert!(!outcomes.rejected.contains_key(&(client.clone(), *seq)));
    }
    // A guarded write either committed or was rejected as a conflict.
    for g in &guarded {
        if let Some(code) = outcomes.rejected.get(g) {
            assert_eq!(code, "conflict", "seed {seed}: {g:?}");
        }
    }
    println!(
        "seed {seed}: {} unique writes, {} guarded ({} rejected), {} keys",
        unique.len(),
        guarded.len(),
        outcomes.rejected.len(),
        truth.len()
    );
    for c in clients.iter_mut() {
        c.stop();
    }
    cluster.stop().await.unwrap();
}

/// A client given the cluster CA verifies nodes against it; one given another CA reaches
/// no node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_verify_cluster_nodes_against_the_ca() {
    let options = ClusterOptions {
        adjust: Some(std::sync::Arc::new(|_, c| c.write_rate = None)),
        ..Default::default()
    };
    let cluster = TestCluster::start(3, options).await.unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await.unwrap();
    cluster.admin(leader).create_site("demo").await.unwrap();
    let follower = *cluster.running().iter().find(|id| **id != leader).unwrap();
    let ca = std::fs::read_to_string(cluster.path().join("certs").join("ca.crt")).unwrap();

    // Through a follower: it names the leader; writes reach it either way.
    let mut good = Options::new([cluster.node(follower).url()], ADMIN_TOKEN);
    good.ca_pem = Some(ca);
    let client = Client::connect(good).await.unwrap();
    let index = client
        .transact_wait(
            "demo",
            vec![Op::Put {
                collection: "items".into(),
                key: "k".into(),
                value: Value::from_json(serde_json::json!(1)).unwrap(),
                if_version: None,
            }],
        )
        .await
        .unwrap();
    assert!(index > 0);

    let other = tempfile::tempdir().unwrap();
    sesame_node::peer::tls::write_cluster_certs(other.path(), &[9]).unwrap();
    let mut bad = Options::new([cluster.node(follower).url()], ADMIN_TOKEN);
    bad.ca_pem = Some(std::fs::read_to_string(other.path().join("ca.crt")).unwrap());
    let err = Client::connect(bad).await.err().expect("no node verifies");
    assert!(
        matches!(&err, sesame_client::SyncError::Refused { code, message }
            if code == "tls" && message.contains("certificate")),
        "{err}"
    );
    drop(client);
    cluster.stop().await.unwrap();
}
