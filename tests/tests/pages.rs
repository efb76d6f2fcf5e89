//! End to end against a real node: committed tuples become published, served pages.
//! Publishing, incremental re-rendering, read-your-writes, caching headers (also of 304s,
//! 404s and content-addressed assets), atomic versions, template failure and recovery,
//! rollback, restarts, odd paths, rate limits, subdomains.

use std::time::Duration;

use reqwest::header::{HeaderMap, ETAG, IF_NONE_MATCH, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::json;
use sesame_client::{ClientError, Http};
use sesame_node::pages::bundle;
use sesame_proto::api::TxRequest;
use sesame_proto::Op;
use sesame_tests::{raw_http, TestNode};

const SITE: &str = "demo";

fn fast(c: &mut sesame_node::NodeConfig) {
    c.debounce = Duration::from_millis(5);
}

/// Creates the site and deploys the built-in demo bundle; returns the commit index.
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

struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn version(&self) -> u64 {
        self.headers["sesame-version"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// How long a test waits for a commit to be published before failing. Generous: CI machines
/// are slow and noisy, and debug builds render slowly; speed is the benchmark's business.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);

/// GETs a page; with `min_index`, retries the node's bounded wait (503) until the page
/// reflects that index or [`PUBLISH_WAIT`] passes.
async fn get(node: &TestNode, path: &str, min_index: Option<u64>) -> Page {
    let Some(n) = min_index else {
        return get_with(node, path, |r| r).await;
    };
    let deadline = std::time::Instant::now() + PUBLISH_WAIT;
    loop {
        let page = get_with(node, path, |r| r.header("Sesame-Min-Index", n.to_string())).await;
        if page.status != StatusCode::SERVICE_UNAVAILABLE || std::time::Instant::now() > deadline {
            return page;
        }
    }
}

async fn get_with(
    node: &TestNode,
    path: &str,
    f: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
) -> Page {
    let client = reqwest::Client::new();
    let resp = f(client.get(format!("{}{path}", node.node.url())))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap();
    Page {
        status,
        headers,
        body,
    }
}

/// A GET sent exactly as written; returns the status code and the body.
async fn raw_get(node: &TestNode, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(node.node.addr)
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn rendered_total(admin: &Http) -> u64 {
    admin.status(SITE).await.unwrap().pages_rendered_total
}

#[tokio::test]
async fn publish_edit_delete_add_rerenders_only_what_changed() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;

    let home = get(&node, "/demo/", Some(index)).await;
    assert_eq!(home.status, StatusCode::OK, "{}", home.body);
    assert!(
        home.body.contains("Alice Liddell") && home.body.contains("Bob Builder"),
        "{}",
        home.body
    );
    assert!(home.version() >= index);
    let base = format!("{}/demo", node.node.url());
    assert!(
        home.body
            .contains(&format!(r#"<link rel="canonical" href="{base}/">"#)),
        "{}",
        home.body
    );
    let alice = get(&node, "/demo/alice", None).await;
    assert!(alice.body.contains(">Alice Liddell</h1>"));
    assert!(alice
        .body
        .contains(&format!(r#"<link rel="canonical" href="{base}/alice">"#)));
    assert_eq!(alice.headers["content-type"], "text/html; charset=utf-8");
    let css = get(&node, "/demo/style.css", None).await;
    assert_eq!(
        (css.status, css.headers["content-type"].to_str().unwrap()),
        (StatusCode::OK, "text/css; charset=utf-8")
    );
    let sitemap = get(&node, "/demo/sitemap.xml", None).await.body;
    assert!(
        sitemap.contains(&format!("<loc>{base}/carol</loc>")),
        "{sitemap}"
    );
    assert!(get(&node, "/demo/robots.txt", None)
        .await
        .body
        .contains(&format!("Sitemap: {base}/sitemap.xml")));
    let status = admin.status(SITE).await.unwrap();
    assert_eq!(
        (status.pages, status.last_error.is_none(), status.pending),
        (4, true, 0),
        "{status:?}"
    );

    // An edit re-renders the profile and the index that lists it: two pages, no more.
    let before = rendered_total(&admin).await;
    let w = admin
        .put(
            SITE,
            "profiles",
            "bob",
            json!({"name": "Robert", "bio": "Renamed"}),
            None,
        )
        .await
        .unwrap();
    let bob = get(&node, "/demo/bob", Some(w.index)).await;
    assert!(
        bob.body.contains(">Robert</h1>"),
        "read-your-writes: {}",
        bob.body
    );
    assert!(bob.version() >= w.index);
    assert_eq!(rendered_total(&admin).await - before, 2);
    assert!(get(&node, "/demo/", None).await.body.contains("Robert"));

    // Delete: the page goes (404 page served), the index and sitemap drop it.
    let before = rendered_total(&admin).await;
    let w = admin.delete(SITE, "profiles", "carol", None).await.unwrap();
    let carol = get(&node, "/demo/carol", Some(w.index)).await;
    assert_eq!(carol.status, StatusCode::NOT_FOUND);
    assert!(
        carol.body.contains("Not found"),
        "the site's 404 template: {}",
        carol.body
    );
    assert!(!get(&node, "/demo/", None).await.body.contains("Carol"));
    assert!(!get(&node, "/demo/sitemap.xml", None)
        .await
        .body
        .contains("/carol<"));
    assert_eq!(
        rendered_total(&admin).await - before,
        1,
        "only the index re-renders"
    );

    // Add: a new page appears.
    let w = admin
        .put(
            SITE,
            "profiles",
            "dave",
            json!({"name": "Dave", "bio": "New"}),
            None,
        )
        .await
        .unwrap();
    let dave = get(&node, "/demo/dave", Some(w.index)).await;
    assert_eq!(dave.status, StatusCode::OK);
    assert!(dave.body.contains(">Dave</h1>"));
    assert!(get(&node, "/demo/sitemap.xml", None)
        .await
        .body
        .contains("/dave</loc>"));
    assert_eq!(admin.status(SITE).await.unwrap().pages, 4);

    // A burst of edits to one profile is coalesced, and the last one wins.
    let mut last = 0;
    for i in 0..20 {
        last = admin
            .put(
                SITE,
                "profiles",
                "dave",
                json!({"name": format!("Dave {i}")}),
                None,
            )
            .await
            .unwrap()
            .index;
    }
    assert!(get(&node, "/demo/dave", Some(last))
        .await
        .body
        .contains(">Dave 19</h1>"));
    node.stop().await.unwrap();
}

#[tokio::test]
async fn read_your_writes_etags_and_bounded_waits() {
    let node = TestNode::start_with(|c| {
        fast(c);
        c.min_index_wait = Duration::from_millis(300);
    })
    .await
    .unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;

    get(&node, "/demo/alice", Some(index)).await;
    let page = get_with(&node, &format!("/demo/alice?_min={index}"), |r| r).await;
    assert_eq!(page.status, StatusCode::OK);
    let etag = page.headers[ETAG].to_str().unwrap().to_string();
    assert!(
        etag.starts_with('"') && etag.len() == 66,
        "strong blake3 ETag: {etag}"
    );
    assert_eq!(page.headers["cache-control"], "no-cache");
    let same = get_with(&node, "/demo/alice", |r| r.header(IF_NONE_MATCH, &etag)).await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED);
    assert!(same.body.is_empty());

    // After an edit the old ETag no longer matches.
    let w = admin
        .put(SITE, "profiles", "alice", json!({"name": "Alice 2"}), None)
        .await
        .unwrap();
    get(&node, "/demo/alice", Some(w.index)).await;
    let changed = get_with(&node, "/demo/alice", |r| {
        r.header(IF_NONE_MATCH, &etag)
            .header("Sesame-Min-Index", w.index.to_string())
    })
    .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_ne!(changed.headers[ETAG].to_str().unwrap(), etag);

    // An index this node has not even written cannot arrive soon: 503 at once, with
    // Retry-After (the bounded wait is tested with a stuck projector elsewhere).
    let future = get_with(&node, "/demo/alice", |r| {
        r.header("Sesame-Min-Index", (w.index + 1_000).to_string())
    })
    .await;
    assert_eq!(future.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(future.headers.contains_key(RETRY_AFTER));
    assert!(
        future.body.contains("beyond the newest index"),
        "{}",
        future.body
    );
    assert_eq!(
        get(&node, "/demo/alice", None).await.status,
        StatusCode::OK,
        "without a minimum, serve at once"
    );
    let bad = get_with(&node, "/demo/alice", |r| {
        r.header("Sesame-Min-Index", "soon")
    })
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn readers_never_see_half_a_transaction() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    get(&node, "/demo/", Some(index)).await;

    // Each transaction renames alice and bob together; the index page lists both.
    let writer = {
        let admin = admin.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..40 {
                let put = |key: &str| Op::Put {
                    collection: "profiles".into(),
                    key: key.into(),
                    value: sesame_proto::Value::from_json(json!({"name": format!("gen{i}")}))
                        .unwrap(),
                    if_version: None,
                };
                let req = TxRequest {
                    ops: vec![put("alice"), put("bob")],
                    client_id: None,
                    seq: None,
                };
                last = admin.tx(SITE, &req).await.unwrap().index;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            last
        })
    };
    let generation = |body: &str| -> Vec<String> {
        body.match_indices("gen")
            .map(|(i, _)| {
                body[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect()
            })
            .collect()
    };
    let mut by_version: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut checks = 0;
    while !writer.is_finished() {
        for path in ["/demo/", "/demo/alice", "/demo/bob"] {
            let page = get(&node, path, None).await;
            let gens = generation(&page.body);
            if gens.is_empty() {
                continue;
            }
            assert!(
                gens.iter().all(|g| g == &gens[0]),
                "one page mixes versions: {gens:?}"
            );
            // Every page of one published version shows the same generation.
            let seen = by_version
                .entry(page.version())
                .or_insert_with(|| gens[0].clone());
            assert_eq!(
                seen,
                &gens[0],
                "version {} mixes generations",
                page.version()
            );
            checks += 1;
        }
    }
    let last = writer.await.unwrap();
    assert!(get(&node, "/demo/", Some(last))
        .await
        .body
        .contains("gen39"));
    assert!(checks > 10, "the reader ran ({checks} checks)");
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_broken_template_keeps_the_last_good_pages_and_a_fix_recovers() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    let good = get(&node, "/demo/alice", Some(index)).await.body;

    let broken = json!({"source": "{% extends \"layout.html\" %}\n{% block main %}\n<h1>{{ page.tuple.value.name }</h1>\n{% endblock %}"});
    let w = admin
        .put(SITE, "_templates", "profile.html", broken, None)
        .await
        .unwrap();
    assert_eq!(
        get(&node, "/demo/alice", Some(w.index)).await.body,
        good,
        "last good page stays live"
    );
    let status = admin.status(SITE).await.unwrap();
    let err = status.last_error.expect("the error shows in the status");
    assert_eq!(
        (err.template.as_str(), err.line),
        ("profile.html", Some(3)),
        "{err:?}"
    );
    // An edit meanwhile still updates pages that do not use the broken template.
    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            json!({"name": "Alice Fixed"}),
            None,
        )
        .await
        .unwrap();
    assert!(get(&node, "/demo/", Some(w.index))
        .await
        .body
        .contains("Alice Fixed"));

    // Runaway loops run out of fuel instead of hanging the projector.
    let looping = json!({"source": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"});
    let w = admin
        .put(SITE, "_templates", "profile.html", looping, None)
        .await
        .unwrap();
    get(&node, "/demo/", Some(w.index)).await;
    assert!(admin.status(SITE).await.unwrap().last_error.is_some());

    let fixed = json!({"source": "{% extends \"layout.html\" %}{% block main %}<h1 class=\"v2\">{{ page.tuple.value.name }}</h1>{% endblock %}"});
    let w = admin
        .put(SITE, "_templates", "profile.html", fixed, None)
        .await
        .unwrap();
    let alice = get(&node, "/demo/alice", Some(w.index)).await;
    assert!(
        alice.body.contains(r#"<h1 class="v2">Alice Fixed</h1>"#),
        "{}",
        alice.body
    );
    assert!(get(&node, "/demo/bob", None)
        .await
        .body
        .contains(r#"<h1 class="v2">"#));
    assert!(admin.status(SITE).await.unwrap().last_error.is_none());
    node.stop().await.unwrap();
}

#[tokio::test]
async fn rollback_and_restart_serve_published_versions() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    let first = deploy_demo(&admin).await;
    let v1 = get(&node, "/demo/alice", Some(first)).await;
    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            json!({"name": "Alice Two"}),
            None,
        )
        .await
        .unwrap();
    let v2 = get(&node, "/demo/alice", Some(w.index)).await;
    assert!(v2.body.contains("Alice Two"));

    let versions = admin.versions(SITE, 10).await.unwrap().versions;
    assert!(versions[0].current && versions.len() >= 2, "{versions:?}");
    let err = admin.rollback(SITE, 999_999).await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 404, .. }), "{err}");
    admin.rollback(SITE, v1.version()).await.unwrap();
    let back = get(&node, "/demo/alice", None).await;
    assert_eq!(
        (back.body.as_str(), back.version()),
        (v1.body.as_str(), v1.version())
    );
    assert!(admin.versions(SITE, 10).await.unwrap().versions[0].rollback);
    let status = admin.status(SITE).await.unwrap();
    assert!(status.rolled_back, "{status:?}");
    assert_eq!(status.served_index, Some(v1.version()));
    assert_eq!(status.pending, 0, "a rollback is not pending work");

    // Restart: the rolled-back version is served by the very first request, and stays
    // (a rollback holds until the site's next commit or a rebuild).
    let dir = node.stop().await.unwrap().expect("owned dir");
    let node = TestNode::start_in_with(dir.path(), fast).await.unwrap();
    let after = get(&node, "/demo/alice", None).await;
    assert_eq!(
        (after.status, after.body.as_str()),
        (StatusCode::OK, v1.body.as_str())
    );
    let admin = node.admin();
    // Let the projection settle, then check it left the rollback alone.
    let settle = get(&node, "/demo/alice", Some(node.node.node.known_index())).await;
    assert_eq!(settle.body, v1.body, "a restart keeps the rollback");
    assert!(admin.status(SITE).await.unwrap().rolled_back);

    // A rebuild projects the current data again and leaves the rollback.
    let before = admin.versions(SITE, 1).await.unwrap().versions[0].clone();
    admin.rebuild(SITE).await.unwrap();
    let deadline = std::time::Instant::now() + PUBLISH_WAIT;
    loop {
        let now = admin.versions(SITE, 1).await.unwrap().versions[0].clone();
        if now.manifest != before.manifest || std::time::Instant::now() > deadline {
            assert!(!now.rollback && now.current, "{now:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rebuilt = get(&node, "/demo/alice", None).await;
    assert!(rebuilt.body.contains("Alice Two"), "{}", rebuilt.body);
    let status = admin.status(SITE).await.unwrap();
    assert!(!status.rolled_back && status.pending == 0, "{status:?}");

    // After the restart, edits project again from the current data.
    let w = node
        .admin()
        .put(
            SITE,
            "profiles",
            "alice",
            json!({"name": "Alice Three"}),
            None,
        )
        .await
        .unwrap();
    assert!(get(&node, "/demo/alice", Some(w.index))
        .await
        .body
        .contains("Alice Three"));
    node.stop().await.unwrap();
}

#[tokio::test]
async fn odd_paths_never_escape_the_site() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    get(&node, "/demo/", Some(index)).await;
    let long = format!("/demo/{}", "a".repeat(3_000));
    // An encoded slash stays inside its segment and is looked up in the manifest (no such
    // page here): it never splits a path, so it can never climb out of the site.
    let cases: [(&str, u16); 11] = [
        ("/demo/%2e%2e/%2e%2e/etc/passwd", 400),
        ("/demo/..%2F..%2Fetc%2Fpasswd", 404),
        ("/demo/a%2Fb", 404),
        ("/demo/a%5C..%5Cb", 404),
        ("/demo/a//b", 400),
        ("/demo/%00", 400),
        ("/demo/%zz", 400),
        (&long, 400),
        ("/demo/no-such-page", 404),
        ("/nosuchsite/alice", 404),
        ("/Bad_Site/alice", 404),
    ];
    // Sent byte for byte: HTTP clients would normalise some of these away.
    for (path, status) in cases {
        let (got, body) = raw_get(&node, path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(!body.contains("root:"), "{path}");
    }
    let (got, _) = raw_get(&node, "/demo/../v1/sites").await;
    assert_eq!(got, 400, "a raw '..' is refused too");
    // Trailing slash: one canonical URL.
    let slash = get_with(&node, "/demo/alice/", |r| r).await;
    assert_eq!(slash.status, StatusCode::OK, "redirect followed");
    assert!(slash.body.contains(">Alice Liddell</h1>"));
    // Pages are read-only.
    let post = reqwest::Client::new()
        .post(format!("{}/demo/alice", node.node.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers()["allow"], "GET, HEAD");
    assert_eq!(post.headers()["x-content-type-options"], "nosniff");
    let body: serde_json::Value = post.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    node.stop().await.unwrap();
}

/// The `<loc>` URLs of a sitemap.
fn sitemap_urls(xml: &str) -> Vec<String> {
    xml.split("<loc>")
        .skip(1)
        .filter_map(|rest| {
            rest.split_once("</loc>")
                .map(|(url, _)| url.replace("&amp;", "&"))
        })
        .collect()
}

#[tokio::test]
async fn a_key_with_a_slash_is_served_where_the_sitemap_and_links_say() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    deploy_demo(&admin).await;
    let w = admin
        .put(
            SITE,
            "profiles",
            "a/b",
            json!({"name": "Slashed", "bio": "x"}),
            None,
        )
        .await
        .unwrap();
    let sitemap = get(&node, "/demo/sitemap.xml", Some(w.index)).await;
    assert_eq!(sitemap.status, StatusCode::OK);
    let urls = sitemap_urls(&sitemap.body);
    let url = urls
        .iter()
        .find(|u| u.ends_with("/demo/a%2Fb"))
        .unwrap_or_else(|| panic!("no URL for key a/b in {urls:?}"));
    // The URL exactly as the sitemap names it: 200, the page, whose canonical link is it.
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    let body = resp.text().await.unwrap();
    assert!(body.contains(">Slashed</h1>"), "{body}");
    assert!(
        body.contains(&format!(r#"<link rel="canonical" href="{url}">"#)),
        "{body}"
    );
    // The index page links to it the same way.
    let index = get(&node, "/demo/", Some(w.index)).await;
    assert!(index.body.contains(r#"href="#), "{}", index.body);
    assert!(
        index.body.contains(&format!(r#"href="{url}""#)),
        "{}",
        index.body
    );
    // Lower-case hex reaches it too; the unencoded path is another page (none).
    let path = url.strip_prefix(&node.node.url()).unwrap();
    let lower = path.replace("%2F", "%2f");
    let request = format!("GET {lower} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(
        raw_http(node.node.addr, request.as_bytes()).await.status,
        200
    );
    assert_eq!(
        get(&node, "/demo/a/b", None).await.status,
        StatusCode::NOT_FOUND
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_bare_site_path_redirects_to_its_root_page() {
    let node = TestNode::start_with(fast).await.unwrap();
    let index = deploy_demo(&node.admin()).await;
    get(&node, "/demo/", Some(index)).await;
    for (path, location) in [("/demo", "/demo/"), ("/demo?_min=1", "/demo/?_min=1")] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let resp = raw_http(node.node.addr, request.as_bytes()).await;
        assert_eq!(resp.status, 308, "{path}: {}", resp.head);
        assert_eq!(resp.header("location"), Some(location), "{}", resp.head);
    }
    let followed = get(&node, "/demo", None).await;
    assert_eq!(followed.status, StatusCode::OK);
    assert_eq!(followed.headers["x-content-type-options"], "nosniff");
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_deleted_site_stops_being_served_and_comes_back_empty() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    assert_eq!(
        get(&node, "/demo/alice", Some(index)).await.status,
        StatusCode::OK
    );
    let reader = admin
        .create_token(SITE, sesame_proto::Role::Reader)
        .await
        .unwrap()
        .token;
    let root = node.data_dir().join("objects/sites/demo/root");
    assert!(root.is_file());

    let deleted = admin.delete_site(SITE).await.unwrap();
    assert!(deleted.index > index);
    assert_eq!(
        get(&node, "/demo/alice", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&node, "/demo/", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(!root.exists(), "edge readers lose the root too");
    let err = node
        .client(Some(&reader))
        .get(SITE, "profiles", "alice")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 401, .. }), "{err}");
    let err = admin.delete_site(SITE).await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 404, .. }), "{err}");
    assert!(admin.list_sites().await.unwrap().sites.is_empty());

    // Recreated under the same name: empty, and it publishes afresh.
    admin.create_site(SITE).await.unwrap();
    assert!(admin.keys(SITE, "profiles").await.unwrap().is_empty());
    assert!(admin
        .changes(SITE, 0, 100)
        .await
        .unwrap()
        .changes
        .is_empty());
    let versions = admin.versions(SITE, 10).await.unwrap().versions;
    assert!(
        versions.iter().all(|v| v.index > deleted.index),
        "no version of the old site: {versions:?}"
    );
    let w = admin
        .put(SITE, "profiles", "zed", json!({"name": "Zed"}), None)
        .await
        .unwrap();
    assert_eq!(
        get(&node, "/demo/alice", Some(w.index)).await.status,
        StatusCode::NOT_FOUND
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_deleted_sites_files_go_after_its_retention_unless_the_name_is_taken_again() {
    // Retention 0: files go at the janitor's next look.
    let node = TestNode::start_with(|c| {
        fast(c);
        c.deleted_site_retention = Duration::ZERO;
    })
    .await
    .unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    get(&node, "/demo/alice", Some(index)).await;
    admin.create_site("kept").await.unwrap();
    let w = admin
        .put("kept", "profiles", "x", json!({"name": "X"}), None)
        .await
        .unwrap();
    let demo = node.data_dir().join("objects/sites/demo/blobs");
    let kept = node.data_dir().join("objects/sites/kept");
    let files = |dir: &std::path::Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
    assert!(files(&demo) > 0);
    let deadline = std::time::Instant::now() + PUBLISH_WAIT;
    while files(&kept) == 0 {
        assert!(std::time::Instant::now() < deadline, "kept never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = w;
    admin.delete_site(SITE).await.unwrap();
    let deadline = std::time::Instant::now() + PUBLISH_WAIT;
    while files(&demo) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted site's blobs were never removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(files(&kept) > 0, "other sites keep their files");
    node.stop().await.unwrap();

    // A name taken again within the retention cancels the removal.
    let node = TestNode::start_with(|c| {
        fast(c);
        c.deleted_site_retention = Duration::from_secs(1);
    })
    .await
    .unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    get(&node, "/demo/alice", Some(index)).await;
    let blobs = node.data_dir().join("objects/sites/demo/blobs");
    let before = files(&blobs);
    admin.delete_site(SITE).await.unwrap();
    admin.create_site(SITE).await.unwrap();
    // Past the retention, and several looks of the janitor later.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(
        files(&blobs) >= before,
        "the files of a name taken again stay"
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn write_rate_limit_answers_429_and_spares_other_sites() {
    let node = TestNode::start_with(|c| {
        fast(c);
        c.write_rate = Some(sesame_node::http::limits::RateLimit {
            per_second: 0.5,
            burst: 2.0,
        });
    })
    .await
    .unwrap();
    let admin = node.admin();
    admin.create_site("busy").await.unwrap();
    admin.create_site("calm").await.unwrap();
    for i in 0..2 {
        admin.put("busy", "p", "k", json!(i), None).await.unwrap();
    }
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/sites/busy/tx", node.node.url()))
        .bearer_auth(&node.node.admin_token)
        .body(r#"{"ops":[{"put":{"collection":"p","key":"k","value":3}}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()[RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("retry after"));
    assert_eq!(
        admin.get("busy", "p", "k").await.unwrap().value.to_json(),
        json!(1),
        "nothing written"
    );
    admin
        .put("calm", "p", "k", json!(1), None)
        .await
        .expect("another site is not limited");
    node.stop().await.unwrap();
}

#[tokio::test]
async fn subdomain_mode_serves_by_host() {
    let node = TestNode::start_with(|c| {
        fast(c);
        c.domain = Some("sites.test".into());
        c.public_url = Some("https://sites.test".into());
    })
    .await
    .unwrap();
    let index = deploy_demo(&node.admin()).await;
    get(&node, "/demo/alice", Some(index)).await;
    let page = get_with(&node, "/alice", |r| {
        r.header("Host", "demo.sites.test")
            .header("Sesame-Min-Index", index.to_string())
    })
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body
            .contains(r#"<link rel="canonical" href="https://demo.sites.test/alice">"#),
        "{}",
        page.body
    );
    // Host names compare without case, a trailing dot or the port.
    for host in [
        "Demo.Sites.Test",
        "demo.sites.test.",
        "DEMO.sites.test.:8080",
    ] {
        let page = get_with(&node, "/alice", |r| r.header("Host", host)).await;
        assert_eq!(page.status, StatusCode::OK, "{host}");
    }
    // Path mode still works on the node's own address.
    assert_eq!(get(&node, "/demo/alice", None).await.status, StatusCode::OK);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn subdomain_links_keep_the_port_without_a_public_url() {
    let node = TestNode::start_with(|c| {
        fast(c);
        c.domain = Some("sites.test".into());
    })
    .await
    .unwrap();
    let index = deploy_demo(&node.admin()).await;
    let page = get(&node, "/demo/alice", Some(index)).await;
    let port = node.node.addr.port();
    assert!(
        page.body.contains(&format!(
            r#"<link rel="canonical" href="http://demo.sites.test:{port}/alice">"#
        )),
        "{}",
        page.body
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_burst_is_coalesced_into_at_most_two_renders_per_page() {
    let node = TestNode::start_with(|c| c.debounce = Duration::from_millis(1_000))
        .await
        .unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    get(&node, "/demo/", Some(index)).await;
    let before = rendered_total(&admin).await;
    let mut last = 0;
    for i in 0..10 {
        last = admin
            .put(
                SITE,
                "profiles",
                "alice",
                json!({"name": format!("Alice {i}")}),
                None,
            )
            .await
            .unwrap()
            .index;
    }
    assert!(get(&node, "/demo/alice", Some(last))
        .await
        .body
        .contains(">Alice 9</h1>"));
    // The first edit may render at once (an idle projector does not wait); every later
    // edit of the burst lands inside the window and shares one more round.
    let renders = rendered_total(&admin).await - before;
    assert!(
        renders == 2 || renders == 4,
        "alice and the index, in one or two rounds: {renders}"
    );

    // The root is mirrored to the object store for edge readers.
    let current = admin.versions(SITE, 1).await.unwrap().versions.remove(0);
    let root = std::fs::read(node.data_dir().join("objects/sites/demo/root")).unwrap();
    let root: serde_json::Value = serde_json::from_slice(&root).unwrap();
    assert_eq!(root["manifest"], current.manifest.as_str());
    let manifest = node.data_dir().join(format!(
        "objects/sites/demo/manifests/{}.json",
        current.manifest
    ));
    assert!(manifest.is_file(), "{}", manifest.display());
    node.stop().await.unwrap();
}

#[tokio::test]
async fn site_deploy_loads_a_folder_and_removes_what_it_lost() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    admin.create_site("blog").await.unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../node/demo");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&demo, dir.path());
    let url = node.node.url();
    let deploy = |dir: &std::path::Path| {
        let args = [
            "sesame",
            "--node",
            &url,
            "--token",
            &node.node.admin_token,
            "site",
            "deploy",
            "blog",
        ]
        .into_iter()
        .map(String::from)
        .chain([dir.display().to_string()]);
        sesame_node::cli::run(<sesame_node::cli::Cli as clap::Parser>::parse_from(args))
    };
    deploy(dir.path()).await.unwrap();
    let last = admin.changes("blog", 0, 1000).await.unwrap().next_since;
    assert!(get(&node, "/blog/carol", Some(last))
        .await
        .body
        .contains("Carol Shaw"));

    // Change a template, drop the 404 template: a second deploy applies both.
    std::fs::write(
        dir.path().join("templates/profile.html"),
        "<h1 class=\"new\">{{ page.tuple.value.name }}</h1>",
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("templates/404.html")).unwrap();
    deploy(dir.path()).await.unwrap();
    let last = admin.changes("blog", 0, 1000).await.unwrap().next_since;
    assert!(get(&node, "/blog/carol", Some(last))
        .await
        .body
        .contains(r#"<h1 class="new">Carol Shaw</h1>"#));
    assert!(
        admin.get("blog", "_templates", "404.html").await.is_err(),
        "removed from the folder, removed from the site"
    );
    let missing = get(&node, "/blog/nobody", None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(
        !missing.body.contains("See everyone"),
        "no 404 template any more"
    );

    let err = deploy(&dir.path().join("no-such-folder"))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("not a folder"), "{err:#}");
    node.stop().await.unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_failed_publish_keeps_the_old_version_and_recovers() {
    let node = TestNode::start_with(|c| {
        fast(c);
        c.min_index_wait = Duration::from_millis(300);
    })
    .await
    .unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    let good = get(&node, "/demo/alice", Some(index)).await.body;

    // Break the object store under the site: blob writes fail.
    let blobs = node.data_dir().join("objects/sites/demo/blobs");
    let aside = node.data_dir().join("objects/sites/demo/blobs.aside");
    std::fs::rename(&blobs, &aside).unwrap();
    std::fs::write(&blobs, b"not a folder").unwrap();

    let w = admin
        .put(
            SITE,
            "profiles",
            "alice",
            json!({"name": "Alice Later"}),
            None,
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let waiting = get_with(&node, "/demo/alice", |r| {
        r.header("Sesame-Min-Index", w.index.to_string())
    })
    .await;
    assert_eq!(
        waiting.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "not published, so not claimed"
    );
    assert!(waiting.headers.contains_key(RETRY_AFTER));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "a known index is waited for, up to the bound"
    );
    assert_eq!(
        get(&node, "/demo/alice", None).await.body,
        good,
        "the old version stays live"
    );
    let status = admin.status(SITE).await.unwrap();
    assert!(status.pending > 0);
    // The failure is in the site status, not only in the log.
    let deadline = std::time::Instant::now() + PUBLISH_WAIT;
    let mut status = status;
    while status.last_error.is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = admin.status(SITE).await.unwrap();
    }
    let problem = status.last_error.expect("a failing publish is reported");
    assert_eq!(problem.template, "(publish)");
    assert!(
        problem.message.contains("publishing failed"),
        "{}",
        problem.message
    );

    // Repair it: the projector retries and publishes the edit.
    std::fs::remove_file(&blobs).unwrap();
    std::fs::rename(&aside, &blobs).unwrap();
    let page = get(&node, "/demo/alice", Some(w.index)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(">Alice Later</h1>"), "{}", page.body);
    assert!(get(&node, "/demo/", None)
        .await
        .body
        .contains("Alice Later"));
    assert!(
        admin.status(SITE).await.unwrap().last_error.is_none(),
        "a publish that succeeds again clears the error"
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn demo_links_keep_javascript_urls_out() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    deploy_demo(&admin).await;
    let links = json!([
        { "title": "a", "url": "javascript:alert(1)" },
        { "title": "b", "url": " JaVa\tScRiPt:alert(2)" },
        { "title": "c", "url": "data:text/html,<script>alert(3)</script>" },
        { "title": "d", "url": "https://example.com/mallory?a=1&b=2" },
    ]);
    let w = admin
        .put(
            SITE,
            "profiles",
            "mallory",
            json!({ "name": "Mallory", "links": links }),
            None,
        )
        .await
        .unwrap();
    let page = get(&node, "/demo/mallory", Some(w.index)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let body = page.body.to_ascii_lowercase();
    assert!(
        !body.contains("script:") && !body.contains("data:"),
        "{body}"
    );
    assert_eq!(body.matches(r##"href="#""##).count(), 3, "{body}");
    assert!(page
        .body
        .contains(r#"href="https://example.com/mallory?a=1&amp;b=2""#));
    node.stop().await.unwrap();
}

/// What browsers and CDNs are told about pages, 304s, 404s and `asset_url()` assets.
const PAGE_CC: &str = "no-cache";
const PAGE_CDN_CC: &str = "max-age=10, stale-while-revalidate=60, stale-if-error=86400";
const IMMUTABLE_CC: &str = "max-age=31536000, immutable";
const NOT_FOUND_CC: &str = "no-cache";
const NOT_FOUND_CDN_CC: &str = "max-age=10";

impl Page {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// The stylesheet link of a demo page, as a path on the node.
fn stylesheet(node: &TestNode, page: &Page) -> String {
    let (_, rest) = page
        .body
        .split_once(r#"<link rel="stylesheet" href=""#)
        .unwrap_or_else(|| panic!("no stylesheet link in {}", page.body));
    let href = rest.split('"').next().unwrap();
    href.strip_prefix(&node.node.url())
        .unwrap_or_else(|| panic!("{href} is not on the node"))
        .to_string()
}

#[tokio::test]
async fn caching_headers_for_pages_304s_404s_and_versioned_assets() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;

    // A page: browsers revalidate every time (a cheap 304), CDNs keep it briefly.
    let page = get(&node, "/demo/alice", Some(index)).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(page.header("cache-control"), Some(PAGE_CC));
    assert_eq!(page.header("cdn-cache-control"), Some(PAGE_CDN_CC));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    let etag = page.header("etag").unwrap().to_string();

    // Its 304 carries the same ETag, caching and version headers.
    let not_modified = get_with(&node, "/demo/alice", |r| r.header(IF_NONE_MATCH, &etag)).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    for name in [
        "etag",
        "cache-control",
        "cdn-cache-control",
        "sesame-version",
    ] {
        assert_eq!(not_modified.header(name), page.header(name), "{name}");
    }
    assert_eq!(
        not_modified.header("x-content-type-options"),
        Some("nosniff")
    );

    // A 404 with the site's own 404 page: short caching, no validator, never a 304.
    let missing = get(&node, "/demo/nobody", None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.body.contains("Not found"), "{}", missing.body);
    assert_eq!(missing.header("cache-control"), Some(NOT_FOUND_CC));
    assert_eq!(missing.header("cdn-cache-control"), Some(NOT_FOUND_CDN_CC));
    assert_eq!(missing.header("etag"), None);
    assert_eq!(
        missing.header("sesame-version"),
        page.header("sesame-version")
    );
    let conditional = get_with(&node, "/demo/nobody", |r| r.header(IF_NONE_MATCH, "*")).await;
    assert_eq!(conditional.status, StatusCode::NOT_FOUND);
    // A site that does not exist: the same caching.
    let no_site = get(&node, "/nosite/x", None).await;
    assert_eq!(no_site.status, StatusCode::NOT_FOUND);
    assert_eq!(no_site.header("cache-control"), Some(NOT_FOUND_CC));
    assert_eq!(no_site.header("cdn-cache-control"), Some(NOT_FOUND_CDN_CC));

    // The layout links the stylesheet by asset_url(): its URL names the bytes served.
    let css_url = stylesheet(&node, &page);
    let bare = get(&node, "/demo/style.css", None).await;
    let css_hash = bare.header("etag").unwrap().trim_matches('"').to_string();
    assert_eq!(css_url, format!("/demo/style.css?v={}", &css_hash[..16]));
    assert_eq!(bare.header("cache-control"), Some(PAGE_CC), "no ?v=");
    let asset = get(&node, &css_url, None).await;
    assert_eq!(asset.status, StatusCode::OK);
    assert_eq!(asset.body, bare.body);
    assert_eq!(asset.header("cache-control"), Some(IMMUTABLE_CC));
    assert_eq!(
        asset.header("cdn-cache-control"),
        None,
        "a CDN reads Cache-Control"
    );
    assert_eq!(asset.header("x-content-type-options"), Some("nosniff"));
    let asset_304 = get_with(&node, &css_url, |r| {
        r.header(IF_NONE_MATCH, asset.header("etag").unwrap())
    })
    .await;
    assert_eq!(asset_304.status, StatusCode::NOT_MODIFIED);
    assert_eq!(asset_304.header("cache-control"), Some(IMMUTABLE_CC));
    assert_eq!(asset_304.header("etag"), asset.header("etag"));
    // The whole hash names it too; a bogus or too short one does not.
    let full = get(&node, &format!("/demo/style.css?v={css_hash}"), None).await;
    assert_eq!(full.header("cache-control"), Some(IMMUTABLE_CC));
    for query in [
        "v=0123456789abcdef".to_string(),
        format!("v={}", &css_hash[..8]),
        format!("v={}", css_hash.to_uppercase()),
        format!("x={}", &css_hash[..16]),
    ] {
        let other = get(&node, &format!("/demo/style.css?{query}"), None).await;
        assert_eq!(other.status, StatusCode::OK);
        assert_eq!(other.header("cache-control"), Some(PAGE_CC), "{query}");
        assert_eq!(
            other.header("cdn-cache-control"),
            Some(PAGE_CDN_CC),
            "{query}"
        );
    }

    // Editing the stylesheet re-renders the pages with a new URL; the old URL now answers
    // the new bytes, so never as immutable.
    let w = admin
        .put(
            SITE,
            "_assets",
            "style.css",
            json!("body { color: red; }"),
            None,
        )
        .await
        .unwrap();
    let edited = get(&node, "/demo/alice", Some(w.index)).await;
    let new_url = stylesheet(&node, &edited);
    assert_ne!(new_url, css_url);
    let new_asset = get(&node, &new_url, None).await;
    assert_eq!(new_asset.body, "body { color: red; }");
    assert_eq!(new_asset.header("cache-control"), Some(IMMUTABLE_CC));
    let stale = get(&node, &css_url, None).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.body, "body { color: red; }");
    assert_eq!(stale.header("cache-control"), Some(PAGE_CC));
    assert_eq!(stale.header("cdn-cache-control"), Some(PAGE_CDN_CC));
    assert_eq!(stale.header("etag"), new_asset.header("etag"));
    assert!(
        get(&node, "/demo/", None).await.body.contains(&new_url),
        "every page using the asset follows it"
    );
    node.stop().await.unwrap();
}

/// The service worker's file route: a file by hash, typed by the page it is asked for (a
/// lookup of that one path, never a scan of the site), untyped and never sniffed otherwise.
#[tokio::test]
async fn files_by_hash_are_typed_by_the_path_they_are_asked_for() {
    let node = TestNode::start_with(fast).await.unwrap();
    let admin = node.admin();
    let index = deploy_demo(&admin).await;
    let page = get(&node, "/demo/alice", Some(index)).await;
    assert_eq!(page.status, StatusCode::OK);
    let manifest: serde_json::Value =
        reqwest::get(format!("{}/_sesame/manifest/demo", node.node.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let hash = manifest["files"]["/alice"]["hash"]
        .as_str()
        .unwrap()
        .to_string();

    let typed = get(
        &node,
        &format!("/_sesame/blob/demo/{hash}?path=%2Falice"),
        None,
    )
    .await;
    assert_eq!(typed.status, StatusCode::OK);
    assert_eq!(typed.body, page.body);
    assert!(typed
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(typed.header("x-content-type-options"), Some("nosniff"));
    for query in ["", "?path=%2Fstyle.css", "?path=%2Fnobody"] {
        let untyped = get(&node, &format!("/_sesame/blob/demo/{hash}{query}"), None).await;
        assert_eq!(untyped.status, StatusCode::OK, "{query}");
        assert_eq!(
            untyped.header("content-type"),
            Some("application/octet-stream"),
            "{query}"
        );
        assert_eq!(untyped.header("x-content-type-options"), Some("nosniff"));
    }
    let missing = "0".repeat(64);
    let gone = get(
        &node,
        &format!("/_sesame/blob/demo/{missing}?path=%2Falice"),
        None,
    )
    .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    let bad = get(&node, "/_sesame/blob/demo/not-a-hash", None).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}
