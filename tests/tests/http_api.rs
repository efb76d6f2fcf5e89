//! End to end against a real node over HTTP on loopback: writes, reads, scans, the change
//! feed, conflicts, auth, bad input, and restarts.

use reqwest::StatusCode;
use serde_json::{json, Value as Json};
use sesame_client::ClientError;
use sesame_proto::api::TxRequest;
use sesame_proto::Role;
use sesame_tests::TestNode;

/// Sends a raw request and returns the status and the parsed body (or the text as a string).
async fn raw(
    node: &TestNode,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, Json) {
    let client = reqwest::Client::new();
    let mut req = client.request(
        method.parse().unwrap(),
        format!("{}{path}", node.node.url()),
    );
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Json::String(text)),
    )
}

fn error_of(body: &Json) -> (&str, &str) {
    (
        body["error"]["code"].as_str().unwrap_or("?"),
        body["error"]["message"].as_str().unwrap_or("?"),
    )
}

fn api_status(e: &ClientError) -> u16 {
    match e {
        ClientError::Api { status, .. } => *status,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn writes_reads_scans_changes_and_conflicts() {
    let node = TestNode::start().await.unwrap();
    let admin = node.admin();
    let site = admin.create_site("demo").await.unwrap();
    assert_eq!(site.name, "demo");
    assert_eq!(
        api_status(&admin.create_site("demo").await.unwrap_err()),
        409
    );
    assert_eq!(admin.list_sites().await.unwrap().sites.len(), 1);

    let a = admin
        .put("demo", "profiles", "alice", json!({"name": "Alice"}), None)
        .await
        .unwrap();
    let b = admin
        .put("demo", "profiles", "bob", json!({"name": "Bob"}), Some(0))
        .await
        .unwrap();
    assert!(b.index > a.index);
    let got = admin.get("demo", "profiles", "alice").await.unwrap();
    assert_eq!(
        (got.value.to_json(), got.version),
        (json!({"name": "Alice"}), a.index)
    );
    assert_eq!(
        api_status(&admin.get("demo", "profiles", "carol").await.unwrap_err()),
        404
    );

    // A key with a slash and unicode travels through the URL intact.
    admin
        .put("demo", "_assets", "css/site.css", json!("body{}"), None)
        .await
        .unwrap();
    assert_eq!(
        admin
            .get("demo", "_assets", "css/site.css")
            .await
            .unwrap()
            .value
            .to_json(),
        json!("body{}")
    );
    admin
        .put("demo", "profiles", "zoë", json!(1), None)
        .await
        .unwrap();
    assert_eq!(
        admin
            .get("demo", "profiles", "zoë")
            .await
            .unwrap()
            .value
            .to_json(),
        json!(1)
    );

    // Conflict: names the key and its current version, writes nothing.
    let err = admin
        .put(
            "demo",
            "profiles",
            "alice",
            json!({"name": "A2"}),
            Some(a.index + 100),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), 409);
    let ClientError::Api { message, .. } = &err else {
        unreachable!()
    };
    assert!(
        message.contains("profiles/alice") && message.contains(&a.index.to_string()),
        "{message}"
    );
    let mut ops = vec![serde_json::from_value(
        json!({"put": {"collection": "profiles", "key": "dave", "value": 1}}),
    )
    .unwrap()];
    ops.push(
        serde_json::from_value(
            json!({"delete": {"collection": "profiles", "key": "bob", "if_version": 1}}),
        )
        .unwrap(),
    );
    let err = admin
        .tx(
            "demo",
            &TxRequest {
                ops,
                client_id: None,
                seq: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), 409);
    assert_eq!(
        api_status(&admin.get("demo", "profiles", "dave").await.unwrap_err()),
        404,
        "all or nothing"
    );
    // The right version succeeds.
    admin
        .delete("demo", "profiles", "bob", Some(b.index))
        .await
        .unwrap();
    assert_eq!(
        api_status(&admin.get("demo", "profiles", "bob").await.unwrap_err()),
        404
    );

    // Scans: prefix, limit, cursor.
    for k in ["p1", "p2", "p3", "q1"] {
        admin.put("demo", "pages", k, json!(k), None).await.unwrap();
    }
    let page = admin.scan("demo", "pages", "p", None, 2).await.unwrap();
    let keys: Vec<_> = page.tuples.iter().map(|t| t.key.as_str()).collect();
    assert_eq!((keys, page.next.as_deref()), (vec!["p1", "p2"], Some("p2")));
    let page = admin
        .scan("demo", "pages", "p", page.next.as_deref(), 2)
        .await
        .unwrap();
    let keys: Vec<_> = page.tuples.iter().map(|t| t.key.as_str()).collect();
    assert_eq!((keys, page.next), (vec!["p3"], None));

    // Changes: ordered, compacted, paged; a delete shows as such.
    let all = admin.changes("demo", 0, 1000).await.unwrap();
    let indexes: Vec<u64> = all.changes.iter().map(|c| c.index).collect();
    assert!(indexes.windows(2).all(|w| w[0] <= w[1]), "{indexes:?}");
    let bob = all.changes.iter().find(|c| c.key == "bob").unwrap();
    assert_eq!(serde_json::to_value(bob.op).unwrap(), json!("delete"));
    let since = all.changes[2].index;
    let later = admin.changes("demo", since, 2).await.unwrap();
    assert!(later.changes.iter().all(|c| c.index > since));
    assert!(later.next_since > since);

    // At most once per (client_id, seq).
    let op = || {
        serde_json::from_value(json!({"put": {"collection": "c", "key": "k", "value": 1}})).unwrap()
    };
    let req = TxRequest {
        ops: vec![op()],
        client_id: Some("phone-1".into()),
        seq: Some(7),
    };
    let first = admin.tx("demo", &req).await.unwrap();
    let again = admin.tx("demo", &req).await.unwrap();
    assert_eq!(
        (again.index, again.duplicate, first.duplicate),
        (first.index, true, false)
    );

    node.stop().await.unwrap();
}

#[tokio::test]
async fn auth_roles_and_tokens() {
    let node = TestNode::start().await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    admin.create_site("blog").await.unwrap();

    let (status, body) = raw(&node, "GET", "/v1/sites", None, None).await;
    assert_eq!(
        (status, error_of(&body).0),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let (status, _) = raw(&node, "GET", "/v1/sites", Some("ssm_nope"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = raw(&node, "GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = raw(&node, "GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);

    let owner = node.client(Some(
        &admin.create_token("demo", Role::Owner).await.unwrap().token,
    ));
    let editor_token = owner
        .create_token("demo", Role::Editor)
        .await
        .unwrap()
        .token;
    let editor = node.client(Some(&editor_token));
    let reader = node.client(Some(
        &owner
            .create_token("demo", Role::Reader)
            .await
            .unwrap()
            .token,
    ));

    editor.put("demo", "p", "k", json!(1), None).await.unwrap();
    assert_eq!(
        reader.get("demo", "p", "k").await.unwrap().value.to_json(),
        json!(1)
    );
    let err = reader
        .put("demo", "p", "k", json!(2), None)
        .await
        .unwrap_err();
    assert_eq!((api_status(&err), err.code()), (403, Some("forbidden")));
    assert_eq!(
        api_status(&editor.create_token("demo", Role::Reader).await.unwrap_err()),
        403
    );
    assert_eq!(
        api_status(
            &editor
                .put("blog", "p", "k", json!(1), None)
                .await
                .unwrap_err()
        ),
        403
    );
    assert_eq!(
        api_status(&owner.create_site("mine").await.unwrap_err()),
        403
    );
    assert_eq!(
        api_status(&owner.create_token("blog", Role::Reader).await.unwrap_err()),
        403
    );
    // A site token lists only its own site.
    let names: Vec<_> = reader
        .list_sites()
        .await
        .unwrap()
        .sites
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["demo"]);

    // Only the hash is stored: the secret appears nowhere in the data directory.
    let secret = editor_token.as_bytes();
    for entry in std::fs::read_dir(node.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && !path.ends_with("admin-token") {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "token secret found in {}",
                path.display()
            );
        }
    }
    node.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let node = TestNode::start().await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    let first = admin.put("demo", "p", "k", json!(1), None).await.unwrap();
    let t = Some(node.node.admin_token.as_str());

    let big_value = format!(
        r#"{{"ops":[{{"put":{{"collection":"p","key":"big","value":"{}"}}}}]}}"#,
        "x".repeat(1_100_000)
    );
    let long_key = format!(
        r#"{{"ops":[{{"put":{{"collection":"p","key":"{}","value":1}}}}]}}"#,
        "k".repeat(600)
    );
    let many_ops = format!(
        r#"{{"ops":[{}]}}"#,
        vec![r#"{"delete":{"collection":"p","key":"x"}}"#; 10_001].join(",")
    );
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "/v1/sites/demo/tx",
            "{not json".into(),
            400,
            "bad_request",
            "invalid JSON",
        ),
        ("/v1/sites/demo/tx", "".into(), 400, "bad_request", "empty"),
        (
            "/v1/sites/demo/tx",
            r#"{"ops":[],"colour":1}"#.into(),
            400,
            "bad_request",
            "colour",
        ),
        (
            "/v1/sites/demo/tx",
            r#"{"ops":[]}"#.into(),
            400,
            "bad_request",
            "no operations",
        ),
        (
            "/v1/sites/demo/tx",
            r#"{"ops":[{"put":{"collection":"p","key":"k"}}]}"#.into(),
            400,
            "bad_request",
            "value",
        ),
        (
            "/v1/sites/demo/tx",
            r#"{"ops":[{"put":{"collection":"bad/coll","key":"k","value":1}}]}"#.into(),
            400,
            "bad_request",
            "collection",
        ),
        (
            "/v1/sites/demo/tx",
            r#"{"ops":[{"put":{"collection":"_secret","key":"k","value":1}}]}"#.into(),
            400,
            "bad_request",
            "reserved",
        ),
        (
            "/v1/sites/demo/tx",
            r#"{"ops":[{"put":{"collection":"p","key":"","value":1}}]}"#.into(),
            400,
            "bad_request",
            "empty",
        ),
        ("/v1/sites/demo/tx", long_key, 400, "bad_request", "512"),
        ("/v1/sites/demo/tx", big_value, 413, "too_large", "1048576"),
        ("/v1/sites/demo/tx", many_ops, 413, "too_large", "10000"),
        (
            "/v1/sites/demo/tx",
            r#"{"ops":[{"put":{"collection":"p","key":"k","value":1}}],"client_id":"c"}"#.into(),
            400,
            "bad_request",
            "seq",
        ),
        (
            "/v1/sites/demo/tx",
            r#"{"ops":[{"put":{"collection":"p","key":"k","value":{"$bytes":"!"}}}]}"#.into(),
            400,
            "bad_request",
            "base64",
        ),
        (
            "/v1/sites/nope/tx",
            r#"{"ops":[{"put":{"collection":"p","key":"k","value":1}}]}"#.into(),
            404,
            "unknown_site",
            "nope",
        ),
        (
            "/v1/sites/Bad_Site/tx",
            r#"{"ops":[{"put":{"collection":"p","key":"k","value":1}}]}"#.into(),
            400,
            "bad_request",
            "site name",
        ),
        (
            "/v1/sites",
            r#"{"name":"-bad"}"#.into(),
            400,
            "bad_request",
            "site name",
        ),
        (
            "/v1/sites",
            r#"{"name":"ok","extra":true}"#.into(),
            400,
            "bad_request",
            "extra",
        ),
        (
            "/v1/sites/demo/tokens",
            r#"{"role":"god"}"#.into(),
            400,
            "bad_request",
            "expected one of `reader`",
        ),
    ];
    for (path, body, status, code, needle) in &cases {
        let (got, resp) = raw(&node, "POST", path, t, Some(body)).await;
        let (got_code, message) = error_of(&resp);
        assert_eq!(
            (got.as_u16(), got_code),
            (*status, *code),
            "{path} {}: {resp}",
            &body[..body.len().min(80)]
        );
        assert!(
            message.contains(needle),
            "{path}: message {message:?} should mention {needle:?}"
        );
    }
    // A body over the HTTP limit.
    let huge = "x".repeat(sesame_node::api::BODY_BYTES_MAX + 1);
    let (status, resp) = raw(&node, "POST", "/v1/sites/demo/tx", t, Some(&huge)).await;
    assert_eq!((status.as_u16(), error_of(&resp).0), (413, "too_large"));

    let gets = [
        ("/v1/sites/demo/tuples/p?limit=0", 400, "limit"),
        ("/v1/sites/demo/tuples/p?limit=100000", 400, "maximum"),
        ("/v1/sites/demo/tuples/p?bogus=1", 400, "bogus"),
        ("/v1/sites/demo/changes?since=-1", 400, "since"),
        ("/v1/sites/demo/tuples/bad%2Fcoll/k", 400, "collection"),
        ("/v1/sites/nope/tuples/p/k", 404, "nope"),
        ("/v1/nothing", 404, "endpoint"),
    ];
    for (path, status, needle) in gets {
        let (got, resp) = raw(&node, "GET", path, t, None).await;
        assert_eq!(got.as_u16(), status, "{path}: {resp}");
        assert!(error_of(&resp).1.contains(needle), "{path}: {resp}");
    }

    // Nothing above changed the site: the only change is the first write.
    let feed = admin.changes("demo", 0, 100).await.unwrap();
    assert_eq!(feed.changes.len(), 1);
    assert_eq!(feed.changes[0].index, first.index);
    assert_eq!(admin.list_sites().await.unwrap().sites.len(), 1);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn restart_keeps_every_acknowledged_write() {
    let node = TestNode::start().await.unwrap();
    let admin = node.admin();
    let token = node.node.admin_token.clone();
    admin.create_site("demo").await.unwrap();
    let mut acked = Vec::new();
    for i in 0..50 {
        let r = admin
            .put("demo", "p", &format!("k{i:02}"), json!(i), None)
            .await
            .unwrap();
        acked.push((format!("k{i:02}"), r.index));
    }
    let reader_token = admin
        .create_token("demo", Role::Reader)
        .await
        .unwrap()
        .token;
    let dir = node.stop().await.unwrap().expect("owned temp dir");

    let node = TestNode::start_in(dir.path()).await.unwrap();
    assert_eq!(node.node.admin_token, token, "admin token is kept");
    let admin = node.admin();
    for (i, (key, index)) in acked.iter().enumerate() {
        let t = admin.get("demo", "p", key).await.unwrap();
        assert_eq!((t.value.to_json(), t.version), (json!(i), *index));
    }
    let reader = node.client(Some(&reader_token));
    assert!(
        reader.get("demo", "p", "k00").await.is_ok(),
        "site tokens survive restart"
    );
    let next = admin
        .put("demo", "p", "after", json!(true), None)
        .await
        .unwrap();
    assert!(next.index > acked.last().unwrap().1);
    node.stop().await.unwrap();
}
