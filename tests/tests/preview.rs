//! Preview builds against a real node: a proposed change renders into a private URL, the
//! live site and its history do not move, the preview expires, and garbage collection keeps
//! its files exactly as long as it lives.

use std::time::{Duration, Instant};

use serde_json::json;
use sesame_client::{ClientError, Http};
use sesame_node::pages::bundle;
use sesame_node::pages::gc::HistoryConfig;
use sesame_proto::api::TxRequest;
use sesame_proto::{Op, Role, Value};
use sesame_tests::TestNode;

const SITE: &str = "demo";

async fn deploy_demo(admin: &Http) -> u64 {
    admin.create_site(SITE).await.unwrap();
    admin
        .tx(
            SITE,
            &TxRequest {
                ops: bundle::deploy_ops(&bundle::demo(), &[]),
                client_id: None,
                seq: None,
            },
        )
        .await
        .unwrap()
        .index
}

fn put(collection: &str, key: &str, value: serde_json::Value) -> Op {
    Op::Put {
        collection: collection.into(),
        key: key.into(),
        value: Value::from_json(value).unwrap(),
        if_version: None,
    }
}

async fn get(url: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_renders_a_proposed_change_privately_and_expires() {
    let node = TestNode::start_with(|c| {
        c.history = HistoryConfig {
            grace: Duration::ZERO,
            interval: Duration::from_millis(50),
            ..HistoryConfig::default()
        };
    })
    .await
    .unwrap();
    let admin = node.admin();
    let deployed = deploy_demo(&admin).await;
    let base = node.node.url();
    let live = reqwest::Client::new()
        .get(format!("{base}/demo/alice"))
        .header("Sesame-Min-Index", deployed.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let versions_before = admin.versions(SITE, 100).await.unwrap().versions;

    let ops = vec![
        put("profiles", "alice", json!({"name": "Alice Previewed"})),
        put("profiles", "zed", json!({"name": "Zed New"})),
    ];
    let built = admin.preview(SITE, &ops, Some(600)).await.unwrap();
    let url = built["url"].as_str().unwrap().to_string();
    let id = built["id"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("{base}/_preview/demo/{id}")),
        "{built}"
    );
    assert!(built["pages"].as_u64().unwrap() >= 3, "{built}");
    assert_eq!(built["errors"], json!([]));

    // The preview shows the change, links inside it stay inside it, and it is private.
    let (status, headers, body) = get(&format!("{url}alice")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Alice Previewed"), "{body}");
    assert!(body.contains(&format!("/_preview/demo/{id}/")), "{body}");
    assert_eq!(headers["cache-control"], "private, no-store");
    assert_eq!(headers["x-robots-tag"], "noindex, nofollow");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let (status, _, body) = get(&format!("{url}zed")).await;
    assert_eq!(status, 200);
    assert!(body.contains("Zed New"));
    let (status, _, index) = get(&url).await;
    assert_eq!(status, 200);
    assert!(
        index.contains("Zed New"),
        "the home page lists the new person"
    );

    // Nothing moved on the live site: pages, root and history are as before.
    assert_eq!(get(&format!("{base}/demo/alice")).await.2, live);
    assert_eq!(get(&format!("{base}/demo/zed")).await.0, 404);
    assert_eq!(
        admin.versions(SITE, 100).await.unwrap().versions,
        versions_before
    );
    assert!(admin.get(SITE, "profiles", "zed").await.is_err());

    // Anyone without the id gets nothing; a reader cannot make one; bad requests say why.
    let wrong = format!("{base}/_preview/demo/{}/alice", "0".repeat(32));
    assert_eq!(get(&wrong).await.0, 404);
    assert_eq!(
        get(&format!("{base}/_preview/demo/nothex/alice")).await.0,
        404
    );
    let reader = admin.create_token(SITE, Role::Reader).await.unwrap();
    let err = node
        .client(Some(&reader.token))
        .preview(SITE, &ops, None)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 403, .. }), "{err}");
    let err = admin.preview(SITE, &ops, Some(0)).await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 400, .. }), "{err}");
    let send = Op::Send {
        to: "client-1".into(),
        collection: "notes".into(),
        key: "a".into(),
        value: Value::from_json(json!(1)).unwrap(),
    };
    let err = admin.preview(SITE, &[send], None).await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 400, .. }), "{err}");
    let err = admin.preview("nosuchsite", &ops, None).await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 404, .. }), "{err}");

    // A broken template in the change is reported, and the live site keeps working.
    let broken = vec![put(
        "_templates",
        "profile.html",
        json!({"source": "{% extends \"layout.html\" %}{% block main %}{{ broken( }}{% endblock %}"}),
    )];
    let built_broken = admin.preview(SITE, &broken, None).await.unwrap();
    assert_ne!(built_broken["errors"], json!([]), "{built_broken}");
    assert_eq!(get(&format!("{base}/demo/alice")).await.2, live);

    // A short-lived preview expires, and then its files go; the long one's stay.
    let short = admin
        .preview(
            SITE,
            &[put("profiles", "alice", json!({"name": "Alice Briefly"}))],
            Some(1),
        )
        .await
        .unwrap();
    let short_url = format!("{}alice", short["url"].as_str().unwrap());
    assert_eq!(get(&short_url).await.0, 200);
    let objects = node.data_dir().join("objects/sites/demo/blobs");
    let has_blob_with = |needle: &str| {
        std::fs::read_dir(&objects).unwrap().any(|e| {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            String::from_utf8_lossy(&bytes).contains(needle)
        })
    };
    assert!(has_blob_with("Alice Briefly"));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(get(&short_url).await.0, 404, "an expired preview is gone");
    let deadline = Instant::now() + Duration::from_secs(30);
    while has_blob_with("Alice Briefly") {
        assert!(
            Instant::now() < deadline,
            "the expired preview's files stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        has_blob_with("Alice Previewed"),
        "a live preview keeps its files"
    );
    assert_eq!(get(&format!("{url}alice")).await.0, 200);
    assert_eq!(get(&format!("{base}/demo/alice")).await.0, 200);
}
