//! Three voters in this process over QUIC with mutual TLS: writes through any node, reads at
//! every consistency level, pages on every node, failover without losing a write, a learner
//! that joins from a snapshot, and one node's full disk.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sesame_client::{ClientError, Http};
use sesame_node::pages::bundle;
use sesame_proto::api::TxRequest;
use sesame_proto::{Op, Value};
use sesame_tests::cluster::{ClusterOptions, TestCluster};

const SITE: &str = "demo";
/// How long a test waits for something that must happen (CI machines are slow).
const PATIENCE: Duration = Duration::from_secs(60);

async fn page(url: &str, min_index: Option<u64>) -> (StatusCode, String) {
    let client = reqwest::Client::new();
    let mut req = client.get(url);
    if let Some(n) = min_index {
        req = req.header("Sesame-Min-Index", n.to_string());
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.text().await.unwrap())
}

/// GETs a page with `Sesame-Min-Index`, retrying the node's bounded 503 until it answers.
async fn page_at(url: &str, index: u64) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = page(url, Some(index)).await;
        if status == StatusCode::OK {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never reached index {index}: {status} {body}"
        );
    }
}

fn put(key: &str, value: serde_json::Value) -> Op {
    Op::Put {
        collection: "t".into(),
        key: key.into(),
        value: Value::from_json(value).unwrap(),
        if_version: None,
    }
}

#[tokio::test]
async fn writes_go_through_any_node_and_every_node_reads_and_serves_them() {
    let cluster = TestCluster::start(3, ClusterOptions::default())
        .await
        .unwrap();
    let leader = cluster.wait_leader(PATIENCE).await.unwrap();
    let followers: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|i| *i != leader)
        .collect();

    // A follower forwards: creating the site and deploying it are ordered by the leader.
    let f0 = cluster.admin(followers[0]);
    f0.create_site(SITE).await.unwrap();
    let ops = bundle::deploy_ops(&bundle::demo(), &[]);
    let deployed = cluster
        .admin(followers[1])
        .tx(
            SITE,
            &TxRequest {
                ops,
                client_id: None,
                seq: None,
            },
        )
        .await
        .unwrap()
        .index;

    // Every node serves the version: followers fetch the files from a peer and check them.
    for id in cluster.running() {
        let url = format!("{}/demo/alice", cluster.node(id).url());
        let body = page_at(&url, deployed).await;
        assert!(body.contains(">Alice"), "node {id}: {body}");
    }

    // An edit through one follower is read at once, linearizably, on the other, and its
    // page is served there with Sesame-Min-Index.
    let w = f0
        .put(
            SITE,
            "profiles",
            "alice",
            json!({"name": "Alice Everywhere"}),
            None,
        )
        .await
        .unwrap();
    let other = cluster.admin(followers[1]);
    let got = other
        .get_with(SITE, "profiles", "alice", "linearizable", None)
        .await
        .unwrap();
    assert_eq!(got.version, w.index);
    let got = other
        .get_with(SITE, "profiles", "alice", "lease", None)
        .await
        .unwrap();
    assert_eq!(got.version, w.index);
    let got = other
        .get_with(SITE, "profiles", "alice", "stale", Some(w.index))
        .await
        .unwrap();
    assert_eq!(got.version, w.index);
    for id in cluster.running() {
        let url = format!("{}/demo/alice", cluster.node(id).url());
        let body = page_at(&url, w.index).await;
        assert!(body.contains("Alice Everywhere"), "node {id}: {body}");
    }

    // A read asking for an index nobody wrote is refused, not held forever.
    let err = other
        .get_with(
            SITE,
            "profiles",
            "alice",
            "stale",
            Some(w.index + 1_000_000),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 503, .. }), "{err}");

    // Cluster status from any node names the leader and three voters that kept up.
    let status = cluster.admin(followers[0]).cluster_status().await.unwrap();
    assert_eq!(status.leader, Some(leader));
    assert_eq!(status.members.len(), 3);
    for m in &status.members {
        assert_eq!(m.role, "voter");
        assert!(m.applied_index.is_some(), "{m:?}");
        assert!(m
            .http
            .as_deref()
            .is_some_and(|h| h.starts_with("http://127.0.0.1:")));
    }
    cluster.stop().await.unwrap();
}

#[tokio::test]
async fn failover_loses_no_acknowledged_write_and_retries_apply_once() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default())
        .await
        .unwrap();
    let leader = cluster.wait_leader(PATIENCE).await.unwrap();
    let survivors: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|i| *i != leader)
        .collect();
    cluster.admin(survivors[0]).create_site("s").await.unwrap();

    // Writers on the two followers, each transaction with (client_id, seq), retried until
    // acknowledged; the leader goes away in the middle.
    let mut writers = tokio::task::JoinSet::new();
    for (w, id) in survivors.iter().enumerate() {
        let client = cluster.admin(*id);
        writers.spawn(async move {
            let mut acked = BTreeMap::new();
            for seq in 1..=60u64 {
                let key = format!("w{w}-{seq}");
                let req = TxRequest {
                    ops: vec![put(&key, json!(seq))],
                    client_id: Some(format!("writer-{w}")),
                    seq: Some(seq),
                };
                let deadline = Instant::now() + PATIENCE;
                loop {
                    match client.tx("s", &req).await {
                        Ok(r) => {
                            acked.insert(key.clone(), (r.index, r.duplicate));
                            break;
                        }
                        Err(e) => {
                            assert!(Instant::now() < deadline, "never acknowledged: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            acked
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.stop_node(leader).await.unwrap();
    let new_leader = cluster.wait_leader(PATIENCE).await.unwrap();
    assert_ne!(new_leader, leader);

    let mut acked = BTreeMap::new();
    while let Some(w) = writers.join_next().await {
        acked.extend(w.unwrap());
    }
    assert_eq!(acked.len(), 120);

    // The old leader rejoins as a follower and catches up.
    cluster.restart_node(leader).await.unwrap();
    let newest = acked.values().map(|(i, _)| *i).max().unwrap();
    cluster.wait_applied(newest, PATIENCE).await.unwrap();
    assert_ne!(cluster.wait_leader(PATIENCE).await.unwrap(), 0);
    for id in cluster.running() {
        let client = cluster.admin(id);
        for key in acked.keys() {
            let t = client
                .get_with("s", "t", key, "stale", Some(newest))
                .await
                .unwrap_or_else(|e| panic!("node {id} lost {key}: {e}"));
            let seq: u64 = key.rsplit('-').next().unwrap().parse().unwrap();
            assert_eq!(t.value.to_json(), json!(seq));
        }
    }
    // A retried transaction applied once: every key holds a version at which it was
    // written by exactly one transaction, so the change feed has one change per key.
    let changes = cluster
        .admin(new_leader)
        .changes("s", 0, 10_000)
        .await
        .unwrap();
    assert_eq!(changes.changes.len(), 120);
    cluster.stop().await.unwrap();
}

#[tokio::test]
async fn a_learner_joins_from_a_snapshot_and_is_promoted() {
    let mut options = ClusterOptions::default();
    // Snapshots every 20 entries, so the log the learner needs is gone: it gets a snapshot.
    options.tuning.snapshot_every = 20;
    let mut cluster = TestCluster::start(3, options).await.unwrap();
    let leader = cluster.wait_leader(PATIENCE).await.unwrap();
    let admin = cluster.admin(leader);
    admin.create_site("s").await.unwrap();
    let mut last = 0;
    for i in 0..80 {
        last = admin
            .put("s", "t", &format!("k{i}"), json!(i), None)
            .await
            .unwrap()
            .index;
    }
    cluster.wait_applied(last, PATIENCE).await.unwrap();

    let raft = cluster.start_new(4).await.unwrap();
    let http = cluster.node(4).url();
    // Asked of a follower: the change is forwarded to the leader.
    let follower = cluster
        .running()
        .into_iter()
        .find(|i| *i != leader && *i != 4)
        .unwrap();
    cluster
        .admin(follower)
        .add_learner(4, &raft, &http)
        .await
        .unwrap();
    let learner = cluster.admin(4);
    let t = learner
        .get_with("s", "t", "k79", "stale", Some(last))
        .await
        .unwrap();
    assert_eq!(t.value.to_json(), json!(79));
    let snapshot_dir = cluster.data_dir(4).join("snapshots");
    assert!(
        std::fs::read_dir(&snapshot_dir).unwrap().next().is_some(),
        "the learner installed a snapshot"
    );
    let status = admin.cluster_status().await.unwrap();
    let four = status.members.iter().find(|m| m.id == 4).unwrap();
    assert_eq!(four.role, "learner");

    cluster.admin(leader).promote(4).await.unwrap();
    let status = admin.cluster_status().await.unwrap();
    assert_eq!(
        status.members.iter().filter(|m| m.role == "voter").count(),
        4
    );
    // The promoted node takes part in commits: writes still go through it.
    let w = learner
        .put("s", "t", "after", json!("four"), None)
        .await
        .unwrap();
    cluster.wait_applied(w.index, PATIENCE).await.unwrap();

    // Removing it leaves three voters.
    cluster.admin(leader).remove_member(4).await.unwrap();
    let status = admin.cluster_status().await.unwrap();
    assert_eq!(status.members.len(), 3);
    cluster.stop().await.unwrap();
}

#[tokio::test]
async fn bad_membership_requests_get_clear_errors() {
    let cluster = TestCluster::start(3, ClusterOptions::default())
        .await
        .unwrap();
    let leader = cluster.wait_leader(PATIENCE).await.unwrap();
    let admin = cluster.admin(leader);
    // Promoting a node that is not a learner.
    let err = admin.promote(9).await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 409, .. }), "{err}");
    // A site token cannot see or change the cluster.
    admin.create_site("s").await.unwrap();
    let token = admin
        .create_token("s", sesame_proto::Role::Owner)
        .await
        .unwrap()
        .token;
    let owner = Http::new(&cluster.node(leader).url(), Some(token));
    let err = owner.cluster_status().await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 403, .. }), "{err}");
    cluster.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_disk_on_one_node_does_not_stop_the_cluster() {
    let disk = std::sync::Arc::new(sesame_tests::disk::SmallDisk::mount(96 << 20));
    let mut options = ClusterOptions::default();
    let on_disk = disk.clone();
    options.adjust = Some(std::sync::Arc::new(move |id, c| {
        if id == 3 {
            c.data_dir = on_disk.path().join("node3");
        }
    }));
    let cluster = TestCluster::start(3, options).await.unwrap();
    let healthy = cluster.admin(1);
    healthy.create_site("s").await.unwrap();
    let health = |id: u64| {
        let url = format!("{}/healthz", cluster.node(id).url());
        async move {
            let resp = reqwest::get(url).await.unwrap();
            (resp.status(), resp.text().await.unwrap())
        }
    };

    let filler = sesame_tests::disk::fill(disk.path());
    // Writes through the healthy nodes keep being acknowledged while node 3 cannot store
    // anything: the other two are a majority.
    let value = "x".repeat(2_000);
    let mut acked = Vec::new();
    let mut failing_seen = false;
    let deadline = Instant::now() + PATIENCE;
    let mut i = 0u64;
    while !failing_seen || acked.len() < 50 {
        assert!(Instant::now() < deadline, "node 3 never reported its disk");
        let writer = cluster.admin(1 + i % 2);
        let key = format!("k{i}");
        i += 1;
        match writer
            .put("s", "t", &key, json!({ "v": value }), None)
            .await
        {
            Ok(w) => acked.push((key, w.index)),
            // A write in flight when node 3 (perhaps the leader) failed: the cluster moves on.
            Err(e) => assert!(
                ["outcome_unknown", "not_leader", "unavailable"].contains(&e.code().unwrap_or("")),
                "{e}"
            ),
        }
        let (status, body) = health(3).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(body.contains("raft stopped"), "{body}");
            failing_seen = true;
        }
    }
    // Node 3 never acknowledged what it did not store: its applied index is behind.
    let newest = acked.last().unwrap().1;
    assert!(cluster.node(3).node.reads.applied_index() < newest);

    // Space returns: node 3 restarts its Raft, catches up and serves reads again.
    std::fs::remove_file(filler).unwrap();
    cluster.wait_applied(newest, PATIENCE).await.unwrap();
    assert_eq!(health(3).await.0, StatusCode::OK);
    let three = cluster.admin(3);
    for (key, _) in &acked {
        let t = three
            .get_with("s", "t", key, "stale", Some(newest))
            .await
            .unwrap();
        assert_eq!(t.value.to_json(), json!({ "v": value }));
    }
    cluster.stop().await.unwrap();
}
