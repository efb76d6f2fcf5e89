//! What visitors and the disk can do to a node, and what it must survive: floods of requests
//! held for an index (`Sesame-Min-Index` / `?_min=`), and a full disk under the Raft log.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sesame_node::pages::bundle;
use sesame_proto::api::TxRequest;
use sesame_tests::disk::{fill, SmallDisk};
use sesame_tests::TestNode;

const SITE: &str = "demo";
/// How long a test waits for something that must happen before failing (CI is slow).
const PATIENCE: Duration = Duration::from_secs(60);

async fn deploy_demo(node: &TestNode) -> u64 {
    let admin = node.admin();
    admin.create_site(SITE).await.unwrap();
    let ops = bundle::deploy_ops(&bundle::demo(), &[]);
    admin
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
        .index
}

/// GETs `path` until it answers 200 with `Sesame-Min-Index: index` or [`PATIENCE`] passes.
async fn wait_published(node: &TestNode, path: &str, index: u64) -> String {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let resp = client
            .get(format!("{}{path}", node.node.url()))
            .header("Sesame-Min-Index", index.to_string())
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::OK {
            return resp.text().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{path} never reached index {index}"
        );
    }
}

#[tokio::test]
async fn requests_for_an_index_that_cannot_come_are_answered_at_once() {
    let node = TestNode::start().await.unwrap();
    let index = deploy_demo(&node).await;
    wait_published(&node, "/demo/alice", index).await;

    // 5,000 unauthenticated requests for an index nobody has written: each is answered
    // at once instead of holding a connection slot for the whole wait.
    let client = reqwest::Client::new();
    let url = format!("{}/demo/alice?_min=99999999", node.node.url());
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..5_000 {
        let (client, url) = (client.clone(), url.clone());
        flood.spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            (resp.status(), resp.text().await.unwrap())
        });
    }
    // Meanwhile a visitor's ordinary page is served.
    let normal = client
        .get(format!("{}/demo/alice", node.node.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(normal.status(), StatusCode::OK);
    while let Some(answer) = flood.join_next().await {
        let (status, body) = answer.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("beyond the newest index"), "{body}");
    }
    node.stop().await.unwrap();
}

#[tokio::test]
async fn held_requests_are_bounded_and_never_starve_other_visitors() {
    let wait = Duration::from_secs(8);
    let node = TestNode::start_with(|c| c.min_index_wait = wait)
        .await
        .unwrap();
    let index = deploy_demo(&node).await;
    wait_published(&node, "/demo/alice", index).await;

    // Break the object store so the next commit cannot be published: requests for its
    // index are for a known index and are held.
    let blobs = node.data_dir().join("objects/sites/demo/blobs");
    std::fs::rename(&blobs, node.data_dir().join("objects/blobs.aside")).unwrap();
    std::fs::write(&blobs, b"not a folder").unwrap();
    let w = node
        .admin()
        .put(SITE, "profiles", "alice", json!({"name": "Stuck"}), None)
        .await
        .unwrap();

    let client = reqwest::Client::new();
    let url = format!("{}/demo/alice?_min={}", node.node.url(), w.index);
    let flood_started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..400 {
        let (client, url) = (client.clone(), url.clone());
        flood.spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            let status = resp.status();
            (status, resp.text().await.unwrap(), Instant::now())
        });
    }
    // Let the flood arrive, then check that others are served while it is held.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let normal = client
        .get(format!("{}/demo/", node.node.url()))
        .send()
        .await
        .unwrap();
    let normal_done = Instant::now();
    assert_eq!(normal.status(), StatusCode::OK);

    let (mut refused, mut held) = (0, 0);
    while let Some(answer) = flood.join_next().await {
        let (status, body, at) = answer.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        if body.contains("too many requests are waiting") {
            refused += 1;
        } else {
            assert!(body.contains("not published yet"), "{body}");
            assert!(
                at >= normal_done,
                "a held request came back before the ordinary page was served"
            );
            held += 1;
        }
    }
    assert!(
        held <= sesame_node::pages::serve::HELD_REQUESTS_PER_SITE_MAX,
        "{held} held"
    );
    assert_eq!(held + refused, 400);
    assert!(
        normal_done - flood_started < wait,
        "the ordinary page waited behind the held requests"
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_disk_stops_writes_cleanly_and_the_node_recovers_without_a_restart() {
    let disk = SmallDisk::mount(96 << 20);
    let data = disk.path().join("node");
    let node = TestNode::start_in_with(&data, |c| c.write_rate = None)
        .await
        .unwrap();
    let admin = node.admin();
    admin.create_site("s").await.unwrap();
    let client = reqwest::Client::new();
    let health = || {
        let client = client.clone();
        let url = format!("{}/healthz", node.node.url());
        async move {
            let resp = client.get(url).send().await.unwrap();
            (resp.status(), resp.text().await.unwrap())
        }
    };
    assert_eq!(health().await.0, StatusCode::OK);

    let filler = fill(disk.path());
    // Write until the disk refuses; every acknowledged write must survive.
    let mut acked = Vec::new();
    let mut failure = None;
    let value = "x".repeat(4_000);
    for i in 0..100_000u64 {
        match admin
            .put("s", "t", &format!("k{i}"), json!({ "v": value }), None)
            .await
        {
            Ok(w) => acked.push((i, w.index)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("a full disk refuses writes");
    let code = failure.code().unwrap_or_default().to_string();
    assert!(
        ["unavailable", "outcome_unknown"].contains(&code.as_str()),
        "{failure}"
    );
    // Health tells the truth while Raft is down.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = health().await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(body.contains("raft stopped"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "healthz never reported the failure"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = admin
        .put("s", "t", "while-full", json!(1), None)
        .await
        .unwrap_err();
    assert!(
        ["unavailable", "outcome_unknown"].contains(&refused.code().unwrap_or_default()),
        "{refused}"
    );

    // Space returns: Raft restarts in-process and writes are accepted again.
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let after = loop {
        if let Ok(w) = admin.put("s", "t", "after", json!("back"), None).await {
            break w;
        }
        assert!(Instant::now() < deadline, "writes never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health().await.0, StatusCode::OK);
    assert!(after.index > acked.last().map_or(0, |a| a.1));
    for (i, _) in &acked {
        let t = admin.get("s", "t", &format!("k{i}")).await.unwrap();
        assert_eq!(t.value.to_json(), json!({ "v": value }));
    }

    // And after a restart, every acknowledged write is still there.
    node.stop().await.unwrap();
    let node = TestNode::start_in(&data).await.unwrap();
    let admin = node.admin();
    for (i, _) in &acked {
        admin.get("s", "t", &format!("k{i}")).await.unwrap();
    }
    assert_eq!(
        admin.get("s", "t", "after").await.unwrap().value.to_json(),
        json!("back")
    );
    node.stop().await.unwrap();
    drop(disk);
}
