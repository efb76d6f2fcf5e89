//! `/metrics`: the Prometheus text a scraper reads, with the names and types it expects, and
//! counters that move when the node works.

use std::collections::BTreeMap;
use std::time::Duration;

use sesame_tests::TestNode;

/// Samples by name (with labels), and the declared type of each metric family.
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn value(&self, name: &str) -> f64 {
        *self
            .samples
            .get(name)
            .unwrap_or_else(|| panic!("no sample {name} in {:?}", self.samples.keys()))
    }
}

async fn scrape(url: &str) -> Scrape {
    let resp = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (name, value) = line.rsplit_once(' ').unwrap();
            samples.insert(name.to_string(), value.parse().unwrap());
        }
    }
    Scrape { samples, types }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_their_names_and_types_and_move() {
    let node = TestNode::start_with(|c| {
        c.write_rate = Some(sesame_node::http::limits::RateLimit {
            per_second: 1.0,
            burst: 5.0,
        })
    })
    .await
    .unwrap();
    assert!(sesame_node::cli::seed_demo(&node.node.node).await.unwrap());
    let url = node.node.url();
    let admin = node.admin();
    let status = admin.status("demo").await.unwrap();
    let page = format!("{url}/demo/alice?_min={}", status.committed_index);
    assert_eq!(reqwest::get(&page).await.unwrap().status(), 200);

    let before = scrape(&url).await;
    for (name, kind) in [
        ("sesame_http_requests", "counter"),
        ("sesame_rate_limited", "counter"),
        ("sesame_write_seconds", "histogram"),
        ("sesame_write_batch_transactions", "histogram"),
        ("sesame_raft_term", "gauge"),
        ("sesame_raft_commit_index", "gauge"),
        ("sesame_raft_applied_index", "gauge"),
        ("sesame_raft_last_log_index", "gauge"),
        ("sesame_projection_rounds", "counter"),
        ("sesame_pages_rendered", "counter"),
        ("sesame_publish_seconds", "histogram"),
        ("sesame_blob_cache_hits", "counter"),
        ("sesame_blob_cache_misses", "counter"),
        ("sesame_blob_cache_bytes", "gauge"),
        ("sesame_client_connections", "gauge"),
        ("sesame_client_sessions", "gauge"),
        ("sesame_live_channels", "gauge"),
        ("sesame_purged_urls", "counter"),
        ("sesame_purge_errors", "counter"),
        ("sesame_purge_dropped_urls", "counter"),
    ] {
        assert_eq!(
            before.types.get(name).map(String::as_str),
            Some(kind),
            "{name} in {:?}",
            before.types
        );
    }
    assert!(before.value("sesame_raft_term") >= 1.0);
    assert!(before.value("sesame_raft_applied_index") >= status.committed_index as f64);
    assert!(before.value("sesame_projection_rounds_total") >= 1.0);
    assert!(
        before.value("sesame_pages_rendered_total") >= 4.0,
        "the demo's pages"
    );
    assert!(before.value("sesame_publish_seconds_count") >= 1.0);
    assert!(before.value("sesame_http_requests_total{status=\"200\"}") >= 1.0);

    // Work: a write, the same page again (from memory), a 404, a rate-limited burst, and an
    // app client's connection.
    let w = admin
        .put(
            "demo",
            "profiles",
            "dave",
            serde_json::json!({"name": "Dave"}),
            None,
        )
        .await
        .unwrap();
    let _ = reqwest::get(format!("{url}/demo/dave?_min={}", w.index))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(reqwest::get(&page).await.unwrap().status(), 200);
    }
    assert_eq!(
        reqwest::get(format!("{url}/demo/nobody"))
            .await
            .unwrap()
            .status(),
        404
    );
    let mut limited = 0;
    for i in 0..20 {
        if admin
            .put(
                "demo",
                "burst",
                &format!("k{i}"),
                serde_json::json!(i),
                None,
            )
            .await
            .is_err()
        {
            limited += 1;
        }
    }
    assert!(limited > 0, "the write rate limit refuses some");
    let client = sesame_client::Client::connect(sesame_client::Options::new(
        [url.clone()],
        &node.node.admin_token,
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let after = scrape(&url).await;
    let moved = |name: &str| after.value(name) - before.value(name);
    assert!(moved("sesame_write_seconds_count") >= 2.0);
    assert!(moved("sesame_write_batch_transactions_count") >= 2.0);
    assert!(moved("sesame_projection_rounds_total") >= 1.0);
    assert!(moved("sesame_pages_rendered_total") >= 1.0);
    assert!(moved("sesame_blob_cache_hits_total") >= 3.0);
    assert!(moved("sesame_rate_limited_total") >= limited as f64);
    assert!(after.value("sesame_http_requests_total{status=\"404\"}") >= 1.0);
    assert!(after.value("sesame_raft_applied_index") > before.value("sesame_raft_applied_index"));
    assert_eq!(after.value("sesame_client_connections"), 1.0);
    assert_eq!(after.value("sesame_client_sessions"), 1.0);
    assert!(after.value("sesame_blob_cache_bytes") > 0.0);
    drop(client);
    node.stop().await.unwrap();
}

/// On a cluster's leader: each follower's lag, by follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_reports_each_followers_lag() {
    use sesame_tests::cluster::{ClusterOptions, TestCluster};
    let cluster = TestCluster::start(3, ClusterOptions::default())
        .await
        .unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await.unwrap();
    cluster.admin(leader).create_site("demo").await.unwrap();
    let s = scrape(&cluster.node(leader).url()).await;
    assert_eq!(
        s.types
            .get("sesame_raft_follower_lag_entries")
            .map(String::as_str),
        Some("gauge")
    );
    assert_eq!(s.value("sesame_raft_is_leader"), 1.0);
    for id in cluster.running().into_iter().filter(|id| *id != leader) {
        let lag = s.value(&format!(
            "sesame_raft_follower_lag_entries{{follower=\"{id}\"}}"
        ));
        assert!(lag >= 0.0);
        let f = scrape(&cluster.node(id).url()).await;
        assert_eq!(f.value("sesame_raft_is_leader"), 0.0);
        assert!(!f.types.contains_key("sesame_raft_follower_lag_entries"));
    }
    cluster.stop().await.unwrap();
}
