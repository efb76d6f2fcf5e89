//! CDN purges end to end: a real node sends the URLs each new version changed to a receiver
//! on loopback, as a webhook or in Cloudflare's purge-by-URL shape; exactly the changed
//! pages' URLs arrive (for edits, a shared layout, a rollback, a deleted site), failures are
//! retried with backoff while publishing goes on and the site status shows the backlog
//! meanwhile, refused batches are dropped and reported, only a cluster's leader purges, and
//! a purge target the node cannot use stops it at start.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::{json, Value};
use sesame_client::Http;
use sesame_node::pages::bundle;
use sesame_node::pages::purge::PurgeConfig;
use sesame_proto::api::{PurgeStatus, TxRequest};
use sesame_proto::Op;
use sesame_tests::cluster::{ClusterOptions, TestCluster};
use sesame_tests::TestNode;

const SITE: &str = "demo";
/// How long a test waits for a publish or a purge before failing (debug builds are slow).
const WAIT: Duration = Duration::from_secs(30);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Call {
    at: Instant,
    path: String,
    query: Option<String>,
    authorization: Option<String>,
    body: Value,
    /// What the receiver answered.
    status: u16,
}

/// A purge target on loopback that records every request. It answers 500 while `failing`,
/// 429 with `Retry-After: 1` to the next `throttle` requests, and 400 to the next `refuse`.
#[derive(Clone, Default)]
struct Receiver {
    calls: Arc<Mutex<Vec<Call>>>,
    failing: Arc<AtomicBool>,
    throttle: Arc<AtomicU32>,
    /// Answer 400 to the next this many requests.
    refuse: Arc<AtomicU32>,
    /// Answer in Cloudflare's shape (`{"success": true, ...}`).
    cloudflare: bool,
}

impl Receiver {
    async fn start(cloudflare: bool) -> (Receiver, SocketAddr) {
        let receiver = Receiver {
            cloudflare,
            ..Receiver::default()
        };
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, addr)
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls answered 2xx from the `from`th on.
    fn accepted_since(&self, from: usize) -> Vec<Call> {
        self.calls()
            .into_iter()
            .skip(from)
            .filter(|c| c.status < 300)
            .collect()
    }
}

async fn receive(
    State(r): State<Receiver>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let (status, answer) = if r.failing.load(Ordering::SeqCst) {
        (StatusCode::INTERNAL_SERVER_ERROR, "down for a moment")
    } else if r
        .throttle
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        (StatusCode::TOO_MANY_REQUESTS, "slow down")
    } else if r
        .refuse
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        (StatusCode::BAD_REQUEST, "no such thing")
    } else if r.cloudflare {
        (
            StatusCode::OK,
            r#"{"success":true,"errors":[],"messages":[],"result":{"id":"x"}}"#,
        )
    } else {
        (StatusCode::OK, "ok")
    };
    r.calls.lock().unwrap().push(Call {
        at: Instant::now(),
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        authorization: headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string()),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        status: status.as_u16(),
    });
    let mut resp = (status, answer).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert("retry-after", "1".parse().unwrap());
    }
    resp
}

/// A node that purges through `config`, with quick rounds.
async fn node_purging(config: PurgeConfig) -> TestNode {
    TestNode::start_with(|c| {
        c.debounce = Duration::from_millis(5);
        c.purge = Some(config);
    })
    .await
    .unwrap()
}

/// A webhook config for a receiver at `addr`: quick backoff, no pacing.
fn webhook(addr: SocketAddr) -> PurgeConfig {
    let mut config = PurgeConfig::webhook(format!("http://{addr}/purge?key=hook-secret"));
    config.backoff = Duration::from_millis(100);
    config.urls_per_minute = 0;
    config
}

/// Creates the demo site; returns the deploy's commit index.
async fn deploy_demo(admin: &Http) -> u64 {
    admin.create_site(SITE).await.unwrap();
    let ops = bundle::deploy_ops(&bundle::demo(), &[]);
    let tx = TxRequest {
        ops,
        client_id: None,
        seq: None,
    };
    admin.tx(SITE, &tx).await.unwrap().index
}

/// GETs `path` of the site once it reflects `index`; returns the version served and the body.
async fn page(node: &TestNode, path: &str, index: u64) -> (u64, String) {
    page_at(&node.node.url(), path, index).await
}

/// [`page`] from the node at `url`.
async fn page_at(url: &str, path: &str, index: u64) -> (u64, String) {
    let deadline = Instant::now() + WAIT;
    let client = reqwest::Client::new();
    loop {
        let resp = client
            .get(format!("{url}/{SITE}{path}"))
            .header("Sesame-Min-Index", index.to_string())
            .send()
            .await
            .unwrap();
        if resp.status() == reqwest::StatusCode::OK {
            let version = resp.headers()["sesame-version"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            return (version, resp.text().await.unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "{path} not published at {index}: {}",
            resp.status()
        );
    }
}

async fn purge_status(admin: &Http) -> PurgeStatus {
    admin
        .status(SITE)
        .await
        .unwrap()
        .purge
        .expect("a node with a purge target reports purges")
}

/// Waits until the site has no URLs waiting to be purged.
async fn drained(admin: &Http) -> PurgeStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = purge_status(admin).await;
        if status.pending_urls == 0 {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "purges still pending: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `check` holds for the receiver's calls.
async fn wait_calls(receiver: &Receiver, what: &str, check: impl Fn(&[Call]) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check(&receiver.calls()) {
        assert!(
            Instant::now() < deadline,
            "{what}; calls: {:#?}",
            receiver.calls()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The URLs of the webhook calls, with each call's site and index checked.
fn webhook_urls(calls: &[Call], index: u64) -> BTreeSet<String> {
    let mut urls = BTreeSet::new();
    for call in calls {
        assert_eq!(call.path, "/purge", "{call:?}");
        assert_eq!(call.body["site"], SITE, "{call:?}");
        assert_eq!(call.body["index"], index, "the version's index: {call:?}");
        for url in call.body["urls"].as_array().expect("urls is a list") {
            assert!(
                urls.insert(url.as_str().unwrap().to_string()),
                "{url} sent twice"
            );
        }
    }
    urls
}

/// The URLs a CDN could have cached for these pages of the site at `base`.
fn urls_of(base: &str, paths: &[&str]) -> BTreeSet<String> {
    paths
        .iter()
        .flat_map(|p| match *p {
            "/" => vec![format!("{base}/"), base.to_string()],
            p => vec![format!("{base}{p}"), format!("{base}{p}/")],
        })
        .collect()
}

fn alice(bio: &str, link: &str) -> Value {
    json!({"name": "Alice Liddell", "bio": bio,
           "links": [{"title": "Blog", "url": link}]})
}

const ALICE_BIO: &str = "Curious about rabbit holes and consensus protocols.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_exactly_the_changed_urls() {
    let (receiver, addr) = Receiver::start(false).await;
    let node = node_purging(webhook(addr)).await;
    let admin = node.admin();
    let base = format!("{}/{SITE}", node.node.url());
    let deployed = deploy_demo(&admin).await;
    page(&node, "/alice", deployed).await;
    drained(&admin).await;
    let first: BTreeSet<String> = receiver
        .accepted_since(0)
        .iter()
        .flat_map(|c| c.body["urls"].as_array().unwrap().clone())
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    assert!(
        first.is_superset(&urls_of(
            &base,
            &["/", "/alice", "/bob", "/carol", "/style.css"]
        )),
        "a new site's every URL is purged: {first:?}"
    );

    // A link only the profile page shows: that page, and nothing else.
    let seen = receiver.calls().len();
    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            alice(ALICE_BIO, "https://example.com/alice2"),
            None,
        )
        .await
        .unwrap()
        .index;
    let (version, body) = page(&node, "/alice", w).await;
    assert!(body.contains("https://example.com/alice2"), "{body}");
    assert!(version >= w);
    let status = drained(&admin).await;
    let calls = receiver.accepted_since(seen);
    assert_eq!(
        webhook_urls(&calls, version),
        urls_of(&base, &["/alice"]),
        "{calls:#?}"
    );
    assert_eq!(receiver.calls().len(), seen + calls.len(), "no failures");
    assert!(status.last_success_at.is_some() && status.last_error.is_none());
    assert_eq!(status.target, "webhook");
    assert_eq!(status.dropped_urls_total, 0);

    // The shared layout: every page that uses it, not the stylesheet or the sitemap.
    let seen = receiver.calls().len();
    let layout = admin.get(SITE, "_templates", "layout.html").await.unwrap();
    let source = layout.value.to_json()["source"]
        .as_str()
        .unwrap()
        .replace("Static pages projected by Sesame.", "Projected by Sesame.");
    let w = admin
        .put(
            SITE,
            "_templates",
            "layout.html",
            json!({ "source": source }),
            None,
        )
        .await
        .unwrap()
        .index;
    let (version, body) = page(&node, "/", w).await;
    assert!(
        body.contains("<footer>Projected by Sesame.</footer>"),
        "{body}"
    );
    drained(&admin).await;
    let calls = receiver.accepted_since(seen);
    assert_eq!(
        webhook_urls(&calls, version),
        urls_of(&base, &["/", "/alice", "/bob", "/carol", "/404.html"]),
        "{calls:#?}"
    );

    // A rollback changes the served pages back: those URLs are purged too, with the index of
    // the version rolled back to.
    let seen = receiver.calls().len();
    let target = deployed_version(&admin, w).await;
    let rolled = admin.rollback(SITE, target).await.unwrap();
    assert_eq!(rolled["index"], target);
    drained(&admin).await;
    wait_calls(&receiver, "the rollback's purge", |c| c.len() > seen).await;
    drained(&admin).await;
    let calls = receiver.accepted_since(seen);
    assert_eq!(
        webhook_urls(&calls, target),
        urls_of(&base, &["/", "/alice", "/bob", "/carol", "/404.html"]),
        "the layout change undone: {calls:#?}"
    );

    // A deleted site's every URL goes.
    let seen = receiver.calls().len();
    let deleted = admin.delete_site(SITE).await.unwrap().index;
    let all = urls_of(
        &base,
        &[
            "/",
            "/alice",
            "/bob",
            "/carol",
            "/404.html",
            "/style.css",
            "/favicon.svg",
            "/robots.txt",
            "/sitemap.xml",
        ],
    );
    let sent_since = |calls: &[Call]| -> BTreeSet<String> {
        calls
            .iter()
            .skip(seen)
            .flat_map(|c| c.body["urls"].as_array().unwrap().clone())
            .map(|u| u.as_str().unwrap().to_string())
            .collect()
    };
    wait_calls(&receiver, "the deleted site's URLs", |calls| {
        sent_since(calls) == all
    })
    .await;
    for call in receiver.calls().iter().skip(seen) {
        assert_eq!(call.body["site"], SITE);
        assert!(call.body["index"].as_u64().unwrap() >= deleted, "{call:?}");
    }

    let metrics = reqwest::get(format!("{}/metrics", node.node.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sesame_purged_urls_total ")
                && l.split(' ').nth(1).unwrap().parse::<u64>().unwrap() > 0),
        "{metrics}"
    );
    node.stop().await.unwrap();
}

/// The index of the version before the one that reflects `index` (the one to roll back to).
async fn deployed_version(admin: &Http, index: u64) -> u64 {
    let versions = admin.versions(SITE, 10).await.unwrap().versions;
    versions
        .iter()
        .find(|v| v.index < index)
        .expect("an earlier version")
        .index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_backoff_while_publishing_goes_on() {
    let (receiver, addr) = Receiver::start(false).await;
    let node = node_purging(webhook(addr)).await;
    let admin = node.admin();
    let base = format!("{}/{SITE}", node.node.url());
    let deployed = deploy_demo(&admin).await;
    page(&node, "/alice", deployed).await;
    drained(&admin).await;

    receiver.failing.store(true, Ordering::SeqCst);
    let seen = receiver.calls().len();
    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            alice("Down the rabbit hole.", "https://example.com/alice"),
            None,
        )
        .await
        .unwrap()
        .index;
    let (_, body) = page(&node, "/alice", w).await;
    assert!(body.contains("Down the rabbit hole."), "{body}");
    wait_calls(&receiver, "three failed tries", |c| c.len() >= seen + 3).await;
    let status = purge_status(&admin).await;
    assert_eq!(status.pending_urls, 4, "/ and /alice wait: {status:?}");
    let error = status.last_error.expect("the failure is reported");
    assert!(error.contains("500"), "{error}");
    assert!(!error.contains("hook-secret"), "{error}");
    assert!(status.last_error_at.is_some());

    // Publishing does not wait for purges.
    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            alice("Through the looking glass.", "https://example.com/alice"),
            None,
        )
        .await
        .unwrap()
        .index;
    let (version, body) = page(&node, "/alice", w).await;
    assert!(body.contains("Through the looking glass."), "{body}");
    assert_eq!(
        purge_status(&admin).await.pending_urls,
        4,
        "the same URLs again are queued once"
    );

    // The waits between tries grow.
    let failed: Vec<Call> = receiver.calls().into_iter().skip(seen).collect();
    for (i, pair) in failed.windows(2).take(3).enumerate() {
        let gap = pair[1].at - pair[0].at;
        let least = Duration::from_millis(100 << i);
        assert!(
            gap >= least,
            "try {} came {gap:?} after the one before",
            i + 2
        );
    }

    receiver.failing.store(false, Ordering::SeqCst);
    let status = drained(&admin).await;
    assert!(status.last_error.is_none(), "{status:?}");
    assert!(status.last_success_at.is_some());
    let calls = receiver.accepted_since(seen);
    assert_eq!(
        webhook_urls(&calls, version),
        urls_of(&base, &["/", "/alice"]),
        "{calls:#?}"
    );
    let metrics = reqwest::get(format!("{}/metrics", node.node.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sesame_purge_errors_total ")
                && l.split(' ').nth(1).unwrap().parse::<u64>().unwrap() >= 3),
        "{metrics}"
    );
    node.stop().await.unwrap();
}

/// `sesame dev` with `--purge-cloudflare`, the token from the environment and the API at a
/// receiver that checks Cloudflare's request shape: bearer token, the zone's purge path,
/// `{"files": [...]}` with at most 30 URLs a call, and `Retry-After` honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_gets_its_request_shape() {
    const TOKEN: &str = "cf-token-never-shown-0123456789";
    const ZONE: &str = "0123abcd";
    let (receiver, addr) = Receiver::start(true).await;
    receiver.throttle.store(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let http = SocketAddr::from((
        [127, 0, 0, 1],
        sesame_tests::cluster::free_tcp_port().unwrap(),
    ));
    let quic = SocketAddr::from((
        [127, 0, 0, 1],
        sesame_tests::cluster::free_udp_port().unwrap(),
    ));
    let public = format!("http://{http}");
    let args: Vec<std::ffi::OsString> = [
        "dev".to_string(),
        "--data".into(),
        dir.path().join("data").display().to_string(),
        "--http".into(),
        http.to_string(),
        "--quic".into(),
        quic.to_string(),
        "--public-url".into(),
        public.clone(),
        "--admin-token".into(),
        sesame_tests::cluster::ADMIN_TOKEN.into(),
        "--debounce-ms".into(),
        "5".into(),
        "--purge-cloudflare".into(),
        ZONE.into(),
        "--purge-backoff-ms".into(),
        "100".into(),
    ]
    .into_iter()
    .map(Into::into)
    .collect();
    let mut node = sesame_tests::process::NodeProcess::new(
        "dev node",
        &sesame_tests::sesame_binary(),
        args,
        vec![
            ("SESAME_CLOUDFLARE_TOKEN".into(), TOKEN.into()),
            ("SESAME_CLOUDFLARE_API".into(), format!("http://{addr}")),
        ],
        http,
        dir.path().join("node.log"),
    );
    node.start().await.unwrap();
    let admin = Http::new(&node.url(), Some(sesame_tests::cluster::ADMIN_TOKEN.into()));
    let base = format!("{public}/{SITE}");
    // The seeded demo site, then 20 new pages in one transaction: more than one call's worth.
    let keys: Vec<String> = (0..20).map(|i| format!("p{i:02}")).collect();
    let ops = keys
        .iter()
        .map(|k| Op::Put {
            collection: "profiles".into(),
            key: k.clone(),
            value: sesame_proto::Value::from_json(json!({"name": k})).unwrap(),
            if_version: None,
        })
        .collect();
    let w = admin
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
    let mut want = BTreeSet::new();
    for k in &keys {
        want.insert(format!("{base}/{k}"));
        want.insert(format!("{base}/{k}/"));
    }
    let purged = |calls: &[Call]| -> BTreeSet<String> {
        calls
            .iter()
            .filter(|c| c.status == 200)
            .flat_map(|c| c.body["files"].as_array().unwrap().clone())
            .map(|u| u.as_str().unwrap().to_string())
            .collect()
    };
    wait_calls(&receiver, "the new pages' URLs", |calls| {
        purged(calls).is_superset(&want)
    })
    .await;
    let status = admin.status(SITE).await.unwrap();
    assert!(status.projected_index >= w);

    let calls = receiver.calls();
    for call in &calls {
        assert_eq!(
            call.path,
            format!("/client/v4/zones/{ZONE}/purge_cache"),
            "{call:?}"
        );
        assert_eq!(
            call.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        let body = call.body.as_object().expect("a JSON object");
        assert_eq!(
            body.keys().map(String::as_str).collect::<Vec<_>>(),
            ["files"],
            "{call:?}"
        );
        let files = body["files"].as_array().unwrap();
        assert!(
            !files.is_empty() && files.len() <= 30,
            "{} files",
            files.len()
        );
        for f in files {
            assert!(f.as_str().unwrap().starts_with(&format!("{base}/")) || f == &base);
        }
    }
    assert!(
        calls
            .iter()
            .any(|c| c.body["files"].as_array().unwrap().len() == 30),
        "the backlog is sent in full batches of 30: {calls:#?}"
    );
    assert_eq!(calls[0].status, 429);
    assert!(
        calls[1].at - calls[0].at >= Duration::from_secs(1),
        "Retry-After: 1 is honoured"
    );
    let status_json = reqwest::Client::new()
        .get(format!("{}/v1/sites/{SITE}/status", node.url()))
        .bearer_auth(sesame_tests::cluster::ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        status_json.contains(r#""target":"cloudflare""#),
        "{status_json}"
    );
    assert!(!status_json.contains(TOKEN), "{status_json}");
    let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap();
    assert!(!log.contains(TOKEN), "the token is never logged");
    node.kill().unwrap();
}

/// A purge target the node cannot use stops it at start, saying why.
#[tokio::test]
async fn purge_flags_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let refused = |args: &[&str], token: Option<&str>| {
        let mut command = std::process::Command::new(sesame_tests::sesame_binary());
        command
            .args(["dev", "--data", &data, "--http", "127.0.0.1:0"])
            .args(args)
            .env_remove("SESAME_CLOUDFLARE_TOKEN")
            .env_remove("SESAME_CLOUDFLARE_API");
        if let Some(token) = token {
            command.env("SESAME_CLOUDFLARE_TOKEN", token);
        }
        let out = command.output().unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&["--purge-url", "http://127.0.0.1:1/purge"], None);
    assert!(err.contains("purging needs --public-url"), "{err}");
    let public = ["--public-url", "https://example.com"];
    let err = refused(
        &[&public[..], &["--purge-cloudflare", "abc123"]].concat(),
        None,
    );
    assert!(err.contains("SESAME_CLOUDFLARE_TOKEN"), "{err}");
    let err = refused(
        &[&public[..], &["--purge-cloudflare", "abc/123"]].concat(),
        Some("t0ken-never-shown"),
    );
    assert!(err.contains("letters and digits"), "{err}");
    assert!(!err.contains("t0ken-never-shown"), "{err}");
    let err = refused(
        &[
            &public[..],
            &["--purge-url", "ftp://example.com/x?key=s3cret"],
        ]
        .concat(),
        None,
    );
    assert!(err.contains("http:// or https://"), "{err}");
    assert!(!err.contains("s3cret"), "the URL may hold a secret: {err}");
    let err = refused(
        &[
            &public[..],
            &["--purge-url", "http://127.0.0.1:1/x", "--purge-batch", "0"],
        ]
        .concat(),
        None,
    );
    assert!(err.contains("purge batch"), "{err}");
}

/// The public URL of the cluster's nodes.
const PUBLIC: &str = "https://sesame.test";

/// In a cluster only the leader purges (followers install the same versions and send
/// nothing), and after a failover the new leader purges what it publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_purges_and_a_new_leader_takes_over() {
    let (receiver, addr) = Receiver::start(false).await;
    let options = ClusterOptions {
        adjust: Some(Arc::new(move |id, c: &mut sesame_node::NodeConfig| {
            c.debounce = Duration::from_millis(5);
            // One public URL, as behind a CDN: every leader renders the same pages.
            c.public_url = Some(PUBLIC.into());
            let mut purge = webhook(addr);
            purge.target = sesame_node::pages::purge::PurgeTarget::Webhook {
                url: format!("http://{addr}/purge?node={id}"),
            };
            c.purge = Some(purge);
        })),
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start(3, options).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let from = |id: u64| Some(format!("node={id}"));
    let admin = cluster.admin(leader);
    let deployed = deploy_demo(&admin).await;
    page_at(&cluster.node(leader).url(), "/alice", deployed).await;
    drained(&admin).await;

    let seen = receiver.calls().len();
    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            alice(ALICE_BIO, "https://example.com/alice2"),
            None,
        )
        .await
        .unwrap()
        .index;
    let (version, _) = page_at(&cluster.node(leader).url(), "/alice", w).await;
    // Every node serves the new version; the followers purge nothing of it.
    for id in cluster.running() {
        let (served, body) = page_at(&cluster.node(id).url(), "/alice", w).await;
        assert!(served >= version && body.contains("alice2"), "node {id}");
        let status = drained(&cluster.admin(id)).await;
        if id != leader {
            assert_eq!(status.purged_urls_total, 0, "follower {id}: {status:?}");
        }
    }
    let calls = receiver.accepted_since(seen);
    assert!(calls.iter().all(|c| c.query == from(leader)), "{calls:#?}");
    let base = format!("{PUBLIC}/{SITE}");
    assert_eq!(webhook_urls(&calls, version), urls_of(&base, &["/alice"]));
    assert!(
        receiver.calls().iter().all(|c| c.query == from(leader)),
        "only the leader ever purged"
    );

    cluster.stop_node(leader).await.unwrap();
    let next = cluster.wait_leader(WAIT).await.unwrap();
    assert_ne!(next, leader);
    let admin = cluster.admin(next);
    let seen = receiver.calls().len();
    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            alice(ALICE_BIO, "https://example.com/alice3"),
            None,
        )
        .await
        .unwrap()
        .index;
    let (version, body) = page_at(&cluster.node(next).url(), "/alice", w).await;
    assert!(body.contains("alice3"), "{body}");
    drained(&admin).await;
    let calls = receiver.accepted_since(seen);
    assert!(calls.iter().all(|c| c.query == from(next)), "{calls:#?}");
    assert_eq!(webhook_urls(&calls, version), urls_of(&base, &["/alice"]));
    cluster.stop().await.unwrap();
}

/// Subdomain mode: URLs on the site's own host. A batch the target refuses (400) is not
/// retried: its URLs are counted as dropped and the error is shown until the next success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subdomain_urls_and_refused_batches() {
    let (receiver, addr) = Receiver::start(false).await;
    let node = TestNode::start_with(|c| {
        c.debounce = Duration::from_millis(5);
        c.domain = Some("sites.test".into());
        c.public_url = Some("https://sites.test".into());
        c.purge = Some(webhook(addr));
    })
    .await
    .unwrap();
    let admin = node.admin();
    let deployed = deploy_demo(&admin).await;
    page(&node, "/alice", deployed).await;
    let status = drained(&admin).await;
    assert_eq!(status.dropped_urls_total, 0);
    let first: BTreeSet<String> = receiver
        .accepted_since(0)
        .iter()
        .flat_map(|c| c.body["urls"].as_array().unwrap().clone())
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    assert!(first.contains("https://demo.sites.test/"), "{first:?}");
    assert!(
        first.contains("https://demo.sites.test/alice/"),
        "{first:?}"
    );
    assert!(
        first
            .iter()
            .all(|u| u.starts_with("https://demo.sites.test/")),
        "no bare host, no path-mode URL: {first:?}"
    );

    receiver.refuse.store(1, Ordering::SeqCst);
    let seen = receiver.calls().len();
    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            alice(ALICE_BIO, "https://example.com/refused"),
            None,
        )
        .await
        .unwrap()
        .index;
    page(&node, "/alice", w).await;
    let status = drained(&admin).await;
    assert_eq!(status.dropped_urls_total, 2, "{status:?}");
    let error = status.last_error.expect("the refusal is shown");
    assert!(
        error.contains("400") && error.contains("not retried"),
        "{error}"
    );
    assert_eq!(
        receiver.calls().len(),
        seen + 1,
        "a refused batch is not retried"
    );

    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            alice(ALICE_BIO, "https://example.com/accepted"),
            None,
        )
        .await
        .unwrap()
        .index;
    let (version, _) = page(&node, "/alice", w).await;
    let status = drained(&admin).await;
    assert!(status.last_error.is_none(), "{status:?}");
    assert_eq!(
        webhook_urls(&receiver.accepted_since(seen), version),
        urls_of("https://demo.sites.test", &["/alice"])
    );
    node.stop().await.unwrap();
}
