//! `sesame edge` against a real node sharing a local object folder: the edge answers
//! exactly what the node answers (status, body, validators, caching headers), follows
//! edits by polling and at once after a notification, adopts versions whole, never serves
//! damaged files, and refuses hostile paths as the node does. A store that stalls (or an S3
//! endpoint that never answers) bounds each poll round and leaves installed pages served;
//! simultaneous misses for one file cost the store one GET; `/metrics` counts all of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, IF_NONE_MATCH};
use reqwest::StatusCode;
use serde_json::json;
use sesame_client::Http;
use sesame_node::edge::{EdgeConfig, RunningEdge};
use sesame_node::pages::bundle;
use sesame_projector::Publisher;
use sesame_proto::api::{TxRequest, TxResponse};
use sesame_tests::store::ControlledStore;
use sesame_tests::{raw_http, TestNode};

const SITE: &str = "demo";
/// How long a test waits for a publish to show anywhere before failing.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);
/// The headers an edge must answer exactly as the node does.
const SAME_HEADERS: [&str; 8] = [
    "etag",
    "cache-control",
    "cdn-cache-control",
    "sesame-version",
    "content-type",
    "x-content-type-options",
    "location",
    "retry-after",
];

/// A node publishing to `objects` (a shared store, as edges need).
async fn node_on(objects: &Path) -> TestNode {
    std::fs::create_dir_all(objects).unwrap();
    let url = format!("file://{}", objects.display());
    TestNode::start_with(|c| {
        c.debounce = Duration::from_millis(5);
        c.objects = Some(url);
    })
    .await
    .unwrap()
}

async fn edge_on(objects: &Path, poll_ms: u64) -> RunningEdge {
    let mut config = EdgeConfig::new(
        format!("file://{}", objects.display()),
        "127.0.0.1:0".parse().unwrap(),
    );
    config.poll = Duration::from_millis(poll_ms);
    config.cache_bytes = 4 << 20;
    sesame_node::edge::start(config).await.unwrap()
}

async fn deploy_demo(admin: &Http) -> u64 {
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

#[derive(Debug)]
struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn version(&self) -> u64 {
        self.headers
            .get("sesame-version")
            .map_or(0, |v| v.to_str().unwrap().parse().unwrap())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Renames bob (an edit of two pages: his own and the index that lists him).
async fn rename_bob(admin: &Http, name: &str) -> TxResponse {
    let profile = json!({"name": name, "bio": "Edited"});
    admin
        .put(SITE, "profiles", "bob", profile, None)
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn get(base: &str, path: &str, headers: &[(&str, &str)]) -> Page {
    let mut req = client().get(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    Page {
        status: resp.status(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap(),
    }
}

/// GETs `path` until its `Sesame-Version` reaches `index`; panics after `within`.
async fn wait_version(base: &str, path: &str, index: u64, within: Duration) -> Page {
    let deadline = Instant::now() + within;
    loop {
        let page = get(base, path, &[]).await;
        if page.status == StatusCode::OK && page.version() >= index {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{base}{path} did not reach index {index} within {within:?}: {} v{}",
            page.status,
            page.version()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn assert_same(path: &str, node: &Page, edge: &Page) {
    assert_eq!(node.status, edge.status, "{path}: status");
    assert_eq!(node.body, edge.body, "{path}: body");
    for name in SAME_HEADERS {
        assert_eq!(
            node.header(name),
            edge.header(name),
            "{path}: header {name}"
        );
    }
}

fn blob_path(objects: &Path, etag: &str) -> PathBuf {
    objects
        .join("sites")
        .join(SITE)
        .join("blobs")
        .join(etag.trim_matches('"'))
}

#[tokio::test]
async fn an_edge_answers_what_the_node_answers() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let node = node_on(&objects).await;
    let index = deploy_demo(&node.admin()).await;
    let node_url = node.node.url();
    wait_version(&node_url, "/demo/alice", index, PUBLISH_WAIT).await;
    let edge = edge_on(&objects, 50).await;
    let edge_url = edge.url();
    wait_version(&edge_url, "/demo/alice", index, PUBLISH_WAIT).await;

    for path in [
        "/demo/",
        "/demo/alice",
        "/demo/style.css",
        "/demo/sitemap.xml",
        "/demo/no-such-page",
        "/demo",
        "/demo?x=1",
        "/demo/alice/",
        "/nosuchsite/alice",
        "/Bad_Site/x",
    ] {
        let n = get(&node_url, path, &[]).await;
        let e = get(&edge_url, path, &[]).await;
        assert_same(path, &n, &e);
    }
    let alice = get(&edge_url, "/demo/alice", &[]).await;
    assert_eq!(alice.status, StatusCode::OK);
    assert_eq!(alice.header("cache-control"), Some("no-cache"));
    assert!(alice.body.contains(">Alice Liddell</h1>"), "{}", alice.body);
    let missing = get(&edge_url, "/demo/no-such-page", &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.header("etag").is_none());
    assert_eq!(
        get(&edge_url, "/nosuchsite/", &[]).await.status,
        StatusCode::NOT_FOUND
    );

    // A 304 with the 200's headers.
    let etag = alice.header("etag").unwrap().to_string();
    let n = get(&node_url, "/demo/alice", &[(IF_NONE_MATCH.as_str(), &etag)]).await;
    let e = get(&edge_url, "/demo/alice", &[(IF_NONE_MATCH.as_str(), &etag)]).await;
    assert_eq!(e.status, StatusCode::NOT_MODIFIED);
    assert!(e.body.is_empty());
    assert_same("/demo/alice (304)", &n, &e);

    // `?v=` naming the file's hash is immutable; any other is a plain page answer.
    let css = get(&edge_url, "/demo/style.css", &[]).await;
    let hash = css.header("etag").unwrap().trim_matches('"').to_string();
    for (query, immutable) in [
        (format!("?v={}", &hash[..16]), true),
        (format!("?v={hash}"), true),
        ("?v=0000000000000000".to_string(), false),
    ] {
        let path = format!("/demo/style.css{query}");
        let n = get(&node_url, &path, &[]).await;
        let e = get(&edge_url, &path, &[]).await;
        assert_same(&path, &n, &e);
        assert_eq!(
            e.header("cache-control") == Some("max-age=31536000, immutable"),
            immutable,
            "{path}: {:?}",
            e.headers
        );
    }

    // Hostile paths: the same 4xx as the node, byte for byte on the wire.
    let long = format!("/demo/{}", "a".repeat(3_000));
    let huge = format!("/demo/{}", "a".repeat(9_000));
    for path in [
        "/demo/../v1/sites",
        "/demo/%2e%2e/%2e%2e/etc/passwd",
        "/demo/..%2F..%2Fetc%2Fpasswd",
        "/demo/a//b",
        "/demo/%00",
        "/demo/%01x",
        "/demo/%zz",
        "/demo/a%5C..%5Cb",
        long.as_str(),
        huge.as_str(),
    ] {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let n = raw_http(node.node.addr, request.as_bytes()).await;
        let e = raw_http(edge.addr, request.as_bytes()).await;
        let short = &path[..path.len().min(40)];
        assert!((400..500).contains(&e.status), "{short}: {}", e.status);
        assert_eq!(n.status, e.status, "{short}");
        assert!(!e.body.contains("root:"), "{short}");
    }
    // Subdomain mode: `Host: demo.<domain>` serves the same file.
    let mut config = EdgeConfig::new(
        format!("file://{}", objects.display()),
        "127.0.0.1:0".parse().unwrap(),
    );
    config.domain = Some("example.test".into());
    let by_host = sesame_node::edge::start(config).await.unwrap();
    let request = b"GET /alice HTTP/1.1\r\nHost: Demo.Example.test:80\r\nConnection: close\r\n\r\n";
    let answer = raw_http(by_host.addr, request).await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(answer.header("etag"), alice.header("etag"));
    assert_eq!(answer.body, alice.body);
    by_host.shutdown().await.unwrap();

    // HEAD: a GET's headers, its length, no body; on the node as on the edge.
    for (page, status) in [("/demo/alice", 200), ("/demo/no-such-page", 404)] {
        let get = raw_http(
            edge.addr,
            format!("GET {page} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let request =
            format!("HEAD {page} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        for addr in [node.node.addr, edge.addr] {
            let head = raw_http(addr, request.as_bytes()).await;
            assert_eq!(head.status, status, "HEAD {page}: {}", head.head);
            assert!(head.body.is_empty(), "HEAD {page}: {:?}", head.body);
            assert_eq!(
                head.header("content-length"),
                Some(get.body.len().to_string().as_str()),
                "HEAD {page}: {}",
                head.head
            );
            assert_eq!(head.header("etag"), get.header("etag"), "HEAD {page}");
            assert_eq!(head.header("x-content-type-options"), Some("nosniff"));
        }
    }

    // Pages are read-only on the edge too.
    let post = client()
        .post(format!("{edge_url}/demo/alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers()["allow"], "GET, HEAD");

    edge.shutdown().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test]
async fn an_edge_follows_edits_by_polling_by_notification_and_whole() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let node = node_on(&objects).await;
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    let node_url = node.node.url();
    wait_version(&node_url, "/demo/alice", index, PUBLISH_WAIT).await;
    let polling = edge_on(&objects, 50).await;
    // Polls once a minute: only a notification (or a held request) moves it in this test.
    let lazy = edge_on(&objects, 60_000).await;
    wait_version(&polling.url(), "/demo/", index, PUBLISH_WAIT).await;
    wait_version(&lazy.url(), "/demo/", index, PUBLISH_WAIT).await;

    // One edit that changes two pages: bob's own and the index that lists him.
    let w = rename_bob(&admin, "Robert Renamed").await;
    let reader = {
        let url = polling.url();
        tokio::spawn(async move {
            // Until both pages show the edit, every answer's body agrees with its version:
            // new content only from a version at or after the edit, and never an older
            // version after a newer one.
            let deadline = Instant::now() + PUBLISH_WAIT;
            let mut newest = 0;
            let mut seen = 0;
            loop {
                let home = get(&url, "/demo/", &[]).await;
                let bob = get(&url, "/demo/bob", &[]).await;
                let mut done = true;
                for page in [&home, &bob] {
                    assert_eq!(page.status, StatusCode::OK);
                    let new = page.body.contains("Robert Renamed");
                    assert_eq!(new, page.version() >= w.index, "{page:?}");
                    assert!(page.version() >= newest, "went back from {newest}");
                    newest = page.version();
                    done &= new;
                    seen += 1;
                }
                if done {
                    return seen;
                }
                assert!(Instant::now() < deadline, "the edit never showed");
            }
        })
    };
    let published = wait_version(&node_url, "/demo/bob", w.index, PUBLISH_WAIT).await;
    let node_has_it = Instant::now();
    let on_edge = wait_version(&polling.url(), "/demo/bob", w.index, PUBLISH_WAIT).await;
    let lag = node_has_it.elapsed();
    assert!(
        lag < Duration::from_secs(2),
        "the polling edge took {lag:?} after the node"
    );
    assert_same("/demo/bob", &published, &on_edge);
    assert!(reader.await.unwrap() >= 2);

    // The lazy edge still serves the old version, until notified.
    let stale = get(&lazy.url(), "/demo/bob", &[]).await;
    assert!(stale.version() < w.index, "{stale:?}");
    let notified = client()
        .post(format!("{}/_sesame/notify?site=demo", lazy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(notified.status(), StatusCode::ACCEPTED);
    let started = Instant::now();
    wait_version(&lazy.url(), "/demo/bob", w.index, Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    let bad = client()
        .post(format!("{}/_sesame/notify?site=Bad_Site", lazy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // Read-your-writes on an edge: Sesame-Min-Index re-reads the roots and waits.
    let w2 = admin
        .put(SITE, "profiles", "carol", json!({"name": "Carol 2"}), None)
        .await
        .unwrap();
    let deadline = Instant::now() + PUBLISH_WAIT;
    let held = loop {
        let page = get(
            &lazy.url(),
            "/demo/carol",
            &[("Sesame-Min-Index", &w2.index.to_string())],
        )
        .await;
        // 503 only when the node had not published within the edge's 2 s bound.
        if page.status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break page;
        }
    };
    assert_eq!(held.status, StatusCode::OK, "{held:?}");
    assert!(held.version() >= w2.index);
    assert!(held.body.contains("Carol 2"));
    let future = get(
        &lazy.url(),
        "/demo/carol",
        &[("Sesame-Min-Index", &(w2.index + 1_000).to_string())],
    )
    .await;
    assert_eq!(future.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(future.header("retry-after"), Some("1"));

    polling.shutdown().await.unwrap();
    lazy.shutdown().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test]
async fn damaged_files_are_never_served_and_an_outage_keeps_the_installed_version() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let node = node_on(&objects).await;
    let index = deploy_demo(&node.admin()).await;
    let node_url = node.node.url();
    let alice = wait_version(&node_url, "/demo/alice", index, PUBLISH_WAIT).await;
    let home = wait_version(&node_url, "/demo/", index, PUBLISH_WAIT).await;

    // Alice's page is damaged in the store before the edge ever reads it.
    let alice_blob = blob_path(&objects, alice.header("etag").unwrap());
    std::fs::write(&alice_blob, b"<h1>not what was published</h1>").unwrap();
    // A site whose root names a manifest whose bytes do not match its id.
    let fake = "0".repeat(64);
    let broken = objects.join("sites/broken");
    std::fs::create_dir_all(broken.join("manifests")).unwrap();
    std::fs::write(broken.join(format!("manifests/{fake}.json")), b"{}").unwrap();
    let root = sesame_projector::Root {
        manifest: fake,
        index: 1,
    };
    std::fs::write(broken.join("root"), root.to_json()).unwrap();

    let edge = edge_on(&objects, 50).await;
    let url = edge.url();
    wait_version(&url, "/demo/", index, PUBLISH_WAIT).await;
    let damaged = get(&url, "/demo/alice", &[]).await;
    assert_eq!(
        damaged.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{damaged:?}"
    );
    assert!(damaged.body.contains("damaged"), "{}", damaged.body);
    assert!(!damaged.body.contains("not what was published"));
    let site = get(&url, "/broken/", &[]).await;
    assert_eq!(site.status, StatusCode::SERVICE_UNAVAILABLE, "{site:?}");
    assert!(site.body.contains("damaged"), "{}", site.body);
    assert_eq!(
        get(&url, "/gone/", &[]).await.status,
        StatusCode::NOT_FOUND,
        "a site the store does not have"
    );

    // The store fails (its folder is now a file, so every read is an error, not "absent"):
    // what is installed and cached stays served.
    let cached = get(&url, "/demo/", &[]).await;
    assert_same("/demo/", &home, &cached);
    let aside = dir.path().join("objects.aside");
    std::fs::rename(&objects, &aside).unwrap();
    std::fs::write(&objects, b"not a folder").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = get(&url, "/demo/", &[]).await;
    assert_same("/demo/ (store failing)", &home, &during);
    std::fs::remove_file(&objects).unwrap();
    std::fs::rename(&aside, &objects).unwrap();

    // Repaired in the store: served again (the damaged bytes were never cached).
    std::fs::write(&alice_blob, alice.body.as_bytes()).unwrap();
    let repaired = get(&url, "/demo/alice", &[]).await;
    assert_same("/demo/alice (repaired)", &alice, &repaired);

    edge.shutdown().await.unwrap();
    node.stop().await.unwrap();
}

/// An edge over `objects` seen through a [`ControlledStore`] the test drives.
async fn controlled_edge_on(objects: &Path, poll_ms: u64) -> (RunningEdge, Arc<ControlledStore>) {
    let local = object_store::local::LocalFileSystem::new_with_prefix(objects).unwrap();
    let store = Arc::new(ControlledStore::new(Arc::new(local)));
    let publisher = Arc::new(Publisher::new(store.clone()));
    let mut config = EdgeConfig::new("file:///unused", "127.0.0.1:0".parse().unwrap());
    config.poll = Duration::from_millis(poll_ms);
    config.cache_bytes = 4 << 20;
    let edge = sesame_node::edge::start_with(config, publisher)
        .await
        .unwrap();
    (edge, store)
}

fn polls(edge: &RunningEdge, outcome: &str) -> u64 {
    edge.edge
        .metrics()
        .edge_polls
        .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
        .get()
}

#[tokio::test]
async fn a_stalled_store_bounds_each_poll_and_installed_pages_stay_served() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let node = node_on(&objects).await;
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    let node_url = node.node.url();
    let home = wait_version(&node_url, "/demo/", index, PUBLISH_WAIT).await;
    let (edge, store) = controlled_edge_on(&objects, 100).await;
    let url = edge.url();
    wait_version(&url, "/demo/", index, PUBLISH_WAIT).await;

    // The store accepts every call and never answers.
    store.stall(true);
    let failed_before = polls(&edge, "failed");
    let bound = Duration::from_millis(sesame_node::edge::POLL_ROUND_MS_MIN);
    let started = Instant::now();
    tokio::time::timeout(bound * 5, edge.edge.reread())
        .await
        .expect("a poll round against a stalled store never ended");
    let took = started.elapsed();
    assert!(
        took >= bound && took < bound + Duration::from_millis(500),
        "a round against a stalled store took {took:?}, its bound is {bound:?}"
    );
    assert!(polls(&edge, "failed") > failed_before, "counted as failed");
    // Installed (and cached) pages are answered meanwhile, at once.
    let started = Instant::now();
    let during = get(&url, "/demo/", &[]).await;
    assert_same("/demo/ (store stalled)", &home, &during);
    assert!(started.elapsed() < Duration::from_millis(500));

    // An edit published while the edge's store is stalled shows soon after it answers.
    let w = rename_bob(&admin, "Robert Stalled").await;
    wait_version(&node_url, "/demo/bob", w.index, PUBLISH_WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(edge.edge.pages().served_index(SITE) < Some(w.index));
    store.stall(false);
    let back = Instant::now();
    let bob = wait_version(&url, "/demo/bob", w.index, PUBLISH_WAIT).await;
    assert!(bob.body.contains("Robert Stalled"));
    // At most one round still waiting out its bound, then a poll interval and a round.
    assert!(
        back.elapsed() < bound + Duration::from_millis(1_000),
        "took {:?} after the store came back",
        back.elapsed()
    );
    assert!(polls(&edge, "ok") > 0);

    edge.shutdown().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test]
async fn an_s3_endpoint_that_never_answers_holds_no_round_past_its_bound() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut config = EdgeConfig::new("s3://pages/edge", "127.0.0.1:0".parse().unwrap());
    config.poll = Duration::from_millis(200);
    config.store_options = [
        ("aws_endpoint", endpoint.as_str()),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let bound = config.poll_round_bound();
    let slack = Duration::from_millis(500);
    let started = Instant::now();
    // Starting reads every root once.
    let edge = tokio::time::timeout(bound * 10, sesame_node::edge::start(config))
        .await
        .expect("the edge did not start while its store was silent")
        .unwrap();
    assert!(
        started.elapsed() < bound + slack,
        "start took {:?}",
        started.elapsed()
    );
    let url = edge.url();
    assert_eq!(get(&url, "/healthz", &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(&url, "/demo/", &[]).await.status,
        StatusCode::NOT_FOUND,
        "nothing installed"
    );
    let started = Instant::now();
    tokio::time::timeout(bound * 10, edge.edge.reread())
        .await
        .expect("a poll round against a silent S3 endpoint never ended");
    assert!(
        started.elapsed() < bound + slack,
        "a round took {:?}",
        started.elapsed()
    );
    assert!(polls(&edge, "failed") >= 2);
    assert_eq!(polls(&edge, "ok"), 0);
    edge.shutdown().await.unwrap();
    silent.abort();
}

/// Answers to `n` simultaneous GETs of `path`.
async fn simultaneous(url: &str, path: &str, n: usize) -> Vec<Page> {
    let gets = (0..n).map(|_| get(url, path, &[]));
    futures::future::join_all(gets).await
}

#[tokio::test]
async fn simultaneous_misses_for_one_file_cost_the_store_one_get() {
    const N: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let node = node_on(&objects).await;
    let index = deploy_demo(&node.admin()).await;
    let node_url = node.node.url();
    let alice = wait_version(&node_url, "/demo/alice", index, PUBLISH_WAIT).await;
    let bob = wait_version(&node_url, "/demo/bob", index, PUBLISH_WAIT).await;
    let (edge, store) = controlled_edge_on(&objects, 60_000).await;
    let url = edge.url();
    wait_version(&url, "/demo/", index, PUBLISH_WAIT).await;
    // Every GET takes a while, so all N requests miss while the first fetch is on its way.
    store.set_get_delay(Duration::from_millis(300));

    let alice_blob = alice.header("etag").unwrap().trim_matches('"').to_string();
    let m = edge.edge.metrics();
    let (fetches, misses) = (m.blob_fetches.get(), m.blob_cache_misses.get());
    let answers = simultaneous(&url, "/demo/alice", N).await;
    for page in &answers {
        assert_same("/demo/alice", &alice, page);
    }
    assert_eq!(store.gets_of(&alice_blob), 1, "GETs of alice's blob");
    assert_eq!(m.blob_fetches.get() - fetches, 1);
    assert_eq!(m.blob_cache_misses.get() - misses, N as u64);

    // A fetch that fails: every waiter gets the error, and nothing of it stays behind.
    let bob_blob = bob.header("etag").unwrap().trim_matches('"').to_string();
    store.fail_gets(Some(&bob_blob));
    for page in simultaneous(&url, "/demo/bob", N).await {
        assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE, "{page:?}");
        assert_eq!(page.header("retry-after"), Some("1"));
    }
    assert_eq!(store.gets_of(&bob_blob), 1, "GETs of bob's blob");
    store.fail_gets(None);
    store.set_get_delay(Duration::ZERO);
    assert_same("/demo/bob", &bob, &get(&url, "/demo/bob", &[]).await);
    assert_eq!(store.gets_of(&bob_blob), 2, "tried again after the failure");
    assert_same("/demo/bob", &bob, &get(&url, "/demo/bob", &[]).await);
    assert_eq!(store.gets_of(&bob_blob), 2, "cached");

    edge.shutdown().await.unwrap();
    node.stop().await.unwrap();
}

/// The value of the sample named `name` (with its labels, as exposed), if scraped.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn an_edge_exposes_its_figures_at_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let node = node_on(&objects).await;
    let index = deploy_demo(&node.admin()).await;
    wait_version(&node.node.url(), "/demo/", index, PUBLISH_WAIT).await;
    let edge = edge_on(&objects, 50).await;
    let url = edge.url();
    wait_version(&url, "/demo/", index, PUBLISH_WAIT).await;
    get(&url, "/demo/nobody", &[]).await;

    let scrape = |url: String| async move {
        let resp = client().get(format!("{url}/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(content_type.starts_with("application/openmetrics-text"));
        resp.text().await.unwrap()
    };
    let first = scrape(url.clone()).await;
    for (name, kind) in [
        ("sesame_http_requests", "counter"),
        ("sesame_blob_cache_hits", "counter"),
        ("sesame_blob_cache_misses", "counter"),
        ("sesame_blob_cache_bytes", "gauge"),
        ("sesame_blob_fetches", "counter"),
        ("sesame_edge_polls", "counter"),
        ("sesame_edge_poll_seconds", "histogram"),
        ("sesame_edge_installed_index", "gauge"),
        ("sesame_edge_chunk_fetches", "counter"),
    ] {
        assert!(
            first.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} as a {kind} in:\n{first}"
        );
    }
    let installed = edge.edge.pages().served_index(SITE).unwrap();
    assert!(installed >= index);
    assert_eq!(
        sample(&first, "sesame_edge_installed_index{site=\"demo\"}"),
        Some(installed as f64)
    );
    assert!(sample(&first, "sesame_edge_chunk_fetches_total").unwrap() >= 1.0);
    assert!(sample(&first, "sesame_http_requests_total{status=\"404\"}").unwrap() >= 1.0);
    assert!(sample(&first, "sesame_blob_fetches_total").unwrap() >= 1.0);

    // Counters move: answers, cache hits, polls.
    for _ in 0..3 {
        get(&url, "/demo/", &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = scrape(url.clone()).await;
    let moved = |name: &str, by: f64| {
        let (a, b) = (
            sample(&first, name).unwrap_or(0.0),
            sample(&second, name).unwrap_or(0.0),
        );
        assert!(b >= a + by, "{name}: {a} then {b}");
    };
    moved("sesame_http_requests_total{status=\"200\"}", 3.0);
    moved("sesame_blob_cache_hits_total", 3.0);
    moved("sesame_edge_polls_total{outcome=\"ok\"}", 1.0);
    moved("sesame_edge_poll_seconds_count", 1.0);

    edge.shutdown().await.unwrap();
    node.stop().await.unwrap();
}
