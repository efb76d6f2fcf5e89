//! `sesame edge` against a real node sharing a local object folder: the edge answers
//! exactly what the node answers (status, body, validators, caching headers), follows
//! edits by polling and at once after a notification, adopts versions whole, never serves
//! damaged files, and refuses hostile paths as the node does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, IF_NONE_MATCH};
use reqwest::StatusCode;
use serde_json::json;
use sesame_client::Http;
use sesame_node::edge::{EdgeConfig, RunningEdge};
use sesame_node::pages::bundle;
use sesame_proto::api::TxRequest;
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
    let w = admin
        .put(
            SITE,
            "profiles",
            "bob",
            json!({"name": "Robert Renamed", "bio": "Edited"}),
            None,
        )
        .await
        .unwrap();
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
