//! End to end against a real node over HTTP on loopback: writes, reads, scans, the change
//! feed, conflicts, auth, bad input, and restarts.

use reqwest::StatusCode;
use serde_json::{json, Value as Json};
use sesame_client::ClientError;
use sesame_proto::api::TxRequest;
use sesame_proto::Role;
use sesame_tests::{raw_http, TestNode};

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
    // After a later seq, a retry of the earlier one still reports its own index.
    let later = admin
        .tx(
            "demo",
            &TxRequest {
                seq: Some(8),
                ..req.clone()
            },
        )
        .await
        .unwrap();
    assert!(later.index > first.index);
    let retry = admin.tx("demo", &req).await.unwrap();
    assert_eq!((retry.index, retry.duplicate), (first.index, true));
    // A lower seq that was never applied is not passed off as a duplicate.
    let skipped = TxRequest {
        seq: Some(3),
        ..req.clone()
    };
    let err = admin.tx("demo", &skipped).await.unwrap_err();
    assert_eq!((api_status(&err), err.code()), (409, Some("stale_seq")));

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
    let huge = "x".repeat(sesame_node::http::api::BODY_BYTES_MAX + 1);
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

#[tokio::test]
async fn numbers_past_the_store_s_integers_are_400() {
    let node = TestNode::start().await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    admin.put("demo", "p", "k", json!(1), None).await.unwrap();
    let t = Some(node.node.admin_token.as_str());
    for since in [1u64 << 63, u64::MAX] {
        let (status, body) = raw(
            &node,
            "GET",
            &format!("/v1/sites/demo/changes?since={since}"),
            t,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{since}: {body}");
        assert!(error_of(&body).1.contains("since"), "{body}");
    }
    let cases = [
        (
            "/v1/sites/demo/rollback",
            format!(r#"{{"index":{}}}"#, u64::MAX),
            "index",
        ),
        (
            "/v1/sites/demo/tx",
            format!(
                r#"{{"ops":[{{"delete":{{"collection":"p","key":"k"}}}}],"client_id":"c","seq":{}}}"#,
                u64::MAX
            ),
            "seq",
        ),
        (
            "/v1/sites/demo/tx",
            format!(
                r#"{{"ops":[{{"delete":{{"collection":"p","key":"k","if_version":{}}}}}]}}"#,
                1u64 << 63
            ),
            "if_version",
        ),
    ];
    for (path, body, needle) in &cases {
        let (status, resp) = raw(&node, "POST", path, t, Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {resp}");
        assert!(error_of(&resp).1.contains(needle), "{resp}");
    }
    let (status, _) = raw(
        &node,
        "DELETE",
        "/v1/sites/demo/tokens/99999999999999999999",
        t,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        admin.changes("demo", 0, 100).await.unwrap().changes.len(),
        1
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn tokens_are_listed_revoked_and_expire() {
    let node = TestNode::start().await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    admin.create_site("blog").await.unwrap();
    let owner = admin.create_token("demo", Role::Owner).await.unwrap();
    let owner_client = node.client(Some(&owner.token));
    let editor = owner_client
        .create_token("demo", Role::Editor)
        .await
        .unwrap();
    let short = owner_client
        .create_token_for("demo", Role::Reader, Some(1))
        .await
        .unwrap();
    assert!(short.expires_at_ms.is_some() && editor.expires_at_ms.is_none());

    // Listed by the owner (and admin): ids, roles, times; never a secret or its hash.
    let listed = owner_client.list_tokens("demo").await.unwrap().tokens;
    let ids: Vec<u64> = listed.iter().map(|t| t.id).collect();
    assert_eq!(ids, [owner.id, editor.id, short.id]);
    let raw_list = raw(
        &node,
        "GET",
        "/v1/sites/demo/tokens",
        Some(&owner.token),
        None,
    )
    .await
    .1
    .to_string();
    for secret in [&owner.token, &editor.token, &short.token] {
        assert!(!raw_list.contains(secret.as_str()), "{raw_list}");
        let hash = sesame_node::http::auth::hash_token(secret);
        assert!(!raw_list.contains(&hash[..16]), "{raw_list}");
    }
    assert_eq!(admin.list_tokens("demo").await.unwrap().tokens.len(), 3);
    let editor_client = node.client(Some(&editor.token));
    assert_eq!(
        api_status(&editor_client.list_tokens("demo").await.unwrap_err()),
        403
    );
    assert_eq!(
        api_status(&owner_client.list_tokens("blog").await.unwrap_err()),
        403
    );
    assert_eq!(
        api_status(
            &owner_client
                .revoke_token("blog", editor.id)
                .await
                .unwrap_err()
        ),
        403
    );

    // Revoked: refused with 401 saying so; revoking again is 404.
    editor_client
        .put("demo", "p", "k", json!(1), None)
        .await
        .unwrap();
    owner_client.revoke_token("demo", editor.id).await.unwrap();
    let err = editor_client
        .put("demo", "p", "k", json!(2), None)
        .await
        .unwrap_err();
    let ClientError::Api {
        status, message, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*status, 401);
    assert!(message.contains("revoked"), "{message}");
    assert_eq!(
        api_status(
            &owner_client
                .revoke_token("demo", editor.id)
                .await
                .unwrap_err()
        ),
        404
    );
    assert_eq!(
        owner_client.list_tokens("demo").await.unwrap().tokens.len(),
        2
    );

    // Expired: refused with 401 saying so.
    let reader = node.client(Some(&short.token));
    let expires = short.expires_at_ms.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(std::time::Duration::from_millis(
        expires.saturating_sub(now) + 50,
    ))
    .await;
    let err = reader.get("demo", "p", "k").await.unwrap_err();
    let ClientError::Api {
        status, message, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*status, 401);
    assert!(message.contains("expired"), "{message}");
    let listed = admin.list_tokens("demo").await.unwrap().tokens;
    assert!(listed.iter().any(|t| t.id == short.id && t.expired));

    // A lifetime out of range is refused.
    for ttl in ["0", "315360001", "-1"] {
        let (status, body) = raw(
            &node,
            "POST",
            "/v1/sites/demo/tokens",
            Some(&owner.token),
            Some(&format!(r#"{{"role":"reader","ttl_s":{ttl}}}"#)),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ttl}: {body}");
    }
    node.stop().await.unwrap();
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let node = TestNode::start().await.unwrap();
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let resp = reqwest::Client::new()
            .get(format!("{}/v1/sites", node.node.url()))
            .header(
                "Authorization",
                format!("{scheme} {}", node.node.admin_token),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{scheme}");
    }
    node.stop().await.unwrap();
}

/// A raw request with `Connection: close` and the given extra header lines.
fn request(method: &str, target: &str, extra: &str) -> Vec<u8> {
    format!("{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n")
        .into_bytes()
}

fn json_error(resp: &sesame_tests::RawResponse) -> (String, String) {
    let body: Json = serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", resp.head, resp.body));
    let (code, message) = error_of(&body);
    (code.to_string(), message.to_string())
}

#[tokio::test]
async fn every_answer_is_nosniff_and_protocol_errors_are_json() {
    let node = TestNode::start().await.unwrap();
    let addr = node.node.addr;
    let auth = format!("Authorization: Bearer {}\r\n", node.node.admin_token);

    // 405 from routing: JSON, with Allow.
    let resp = raw_http(addr, &request("DELETE", "/v1/sites", &auth)).await;
    assert_eq!(resp.status, 405, "{}", resp.head);
    assert!(
        resp.header("allow").is_some_and(|a| a.contains("POST")),
        "{}",
        resp.head
    );
    assert_eq!(json_error(&resp).0, "method_not_allowed");
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));

    // 414: a request target over our limit, under hyper's.
    let long = format!(
        "/demo/{}",
        "a".repeat(sesame_node::http::answer::URI_BYTES_MAX)
    );
    let resp = raw_http(addr, &request("GET", &long, "")).await;
    assert_eq!(resp.status, 414, "{}", resp.head);
    let (code, message) = json_error(&resp);
    assert_eq!(code, "uri_too_long");
    assert!(
        message.contains(&sesame_node::http::answer::URI_BYTES_MAX.to_string()),
        "{message}"
    );

    // 431: too many headers, and headers too large.
    let many: String = (0..sesame_node::http::answer::HEADERS_MAX + 1)
        .map(|i| format!("X-H{i}: v\r\n"))
        .collect();
    // The same limits hold for pages, which do not pass the router.
    for target in ["/healthz", "/demo/alice", "/"] {
        let resp = raw_http(addr, &request("GET", target, &many)).await;
        assert_eq!(resp.status, 431, "{target}: {}", resp.head);
        assert_eq!(json_error(&resp).0, "headers_too_large", "{target}");
    }
    let big = format!(
        "X-Big: {}\r\n",
        "b".repeat(sesame_node::http::answer::HEADER_BYTES_MAX)
    );
    let resp = raw_http(addr, &request("GET", "/v1/sites", &big)).await;
    assert_eq!(resp.status, 431, "{}", resp.head);
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(json_error(&resp).0, "headers_too_large");

    // nosniff on API answers, API errors, health and pages.
    for (target, extra, status) in [
        ("/v1/sites", auth.as_str(), 200),
        ("/v1/sites", "", 401),
        ("/v1/nothing", auth.as_str(), 404),
        ("/healthz", "", 200),
        ("/nosuchsite/page", "", 404),
    ] {
        let resp = raw_http(addr, &request("GET", target, extra)).await;
        assert_eq!(resp.status, status, "{target}: {}", resp.head);
        assert_eq!(
            resp.header("x-content-type-options"),
            Some("nosniff"),
            "{target}"
        );
        assert!(resp.header("x-request-id").is_some(), "{target}");
    }
    node.stop().await.unwrap();
}

#[tokio::test]
async fn the_data_directory_is_private_and_short_admin_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let err = TestNode::start_in_with(&data, |c| c.admin_token = Some("short-token".into()))
        .await
        .err()
        .expect("a short admin token is refused");
    assert!(format!("{err:#}").contains("at least 16"), "{err:#}");

    std::fs::create_dir_all(&data).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let node = TestNode::start_in(&data).await.unwrap();
    node.admin().create_site("demo").await.unwrap();
    let node_dir = node.data_dir().to_path_buf();
    node.stop().await.unwrap();
    // Start again: whatever the first run made is fixed now too.
    let node = TestNode::start_in(&node_dir).await.unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&node_dir), 0o700);
        for entry in std::fs::read_dir(&node_dir).unwrap() {
            let path = entry.unwrap().path();
            let want = if path.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(&path), want, "{}", path.display());
        }
    }
    node.stop().await.unwrap();
}
