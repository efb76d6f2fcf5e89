//! The node's log: JSON lines with `--log-format json`, a request id on what an HTTP request
//! logs (the caller's `X-Request-Id` or a new one, returned in the answer), and no secret in
//! it, however verbose the log is.

use std::ffi::OsString;
use std::time::Duration;

use sesame_proto::Role;
use sesame_tests::process::NodeProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_request_ids_and_never_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let port = sesame_tests::cluster::free_tcp_port().unwrap();
    let http: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin_token = "log-test-admin-token-5f0c2a9e71";
    let args: Vec<OsString> = [
        "dev",
        "--data",
        &dir.path().join("data").display().to_string(),
        "--http",
        &http.to_string(),
        "--admin-token",
        admin_token,
        "--log-format",
        "json",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let log = dir.path().join("node.log");
    let mut node = NodeProcess::new(
        "node",
        &sesame_tests::sesame_binary(),
        args,
        // As verbose as it gets for our own code.
        vec![("SESAME_LOG".into(), "debug,openraft=info".into())],
        http,
        log.clone(),
    );
    node.start().await.unwrap();
    let url = node.url();
    let admin = sesame_client::Http::new(&url, Some(admin_token.to_string()));

    // Secrets in every place they travel: a new token, used over HTTP, QUIC and signalling.
    let created = admin.create_token("demo", Role::Editor).await.unwrap();
    let secret = created.token.clone();
    let editor = sesame_client::Http::new(&url, Some(secret.clone()));
    editor
        .put(
            "demo",
            "profiles",
            "zed",
            serde_json::json!({"name": "Zed"}),
            None,
        )
        .await
        .unwrap();
    // A preview's id is the key to it: it is in its URL, never in the log.
    let preview = editor
        .preview(
            "demo",
            &[sesame_proto::Op::Put {
                collection: "profiles".into(),
                key: "zed".into(),
                value: sesame_proto::Value::from_json(serde_json::json!({"name": "Zed?"})).unwrap(),
                if_version: None,
            }],
            None,
        )
        .await
        .unwrap();
    let preview_id = preview["id"].as_str().unwrap().to_string();
    for path in ["zed", "no-such-page"] {
        reqwest::get(format!("{}{path}", preview["url"].as_str().unwrap()))
            .await
            .unwrap();
    }
    let client =
        sesame_client::Client::connect(sesame_client::Options::new([url.clone()], &secret))
            .await
            .unwrap();
    drop(client);
    let rtc = reqwest::Client::new()
        .post(format!("{url}/v1/rtc"))
        .bearer_auth(&secret)
        .json(&serde_json::json!({"type": "offer", "sdp": "v=0", "site": "demo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(rtc.status(), 400);
    // A refused token and a request with its own id.
    let wrong = reqwest::Client::new()
        .get(format!("{url}/v1/sites"))
        .bearer_auth("ssm_not_a_token_at_all")
        .header("x-request-id", "req-from-test-42")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(wrong.headers()["x-request-id"], "req-from-test-42");
    // A page is answered outside a span; its line names the request itself.
    let page = reqwest::Client::new()
        .get(format!("{url}/demo/zed"))
        .header("x-request-id", "page-req-7")
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["x-request-id"], "page-req-7");
    let made = reqwest::get(format!("{url}/healthz")).await.unwrap();
    let id = made.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!id.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.kill().unwrap();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(admin_token), "the admin token is in the log");
    assert!(!text.contains(&secret), "a site token is in the log");
    assert!(!text.contains(&preview_id), "a preview id is in the log");
    assert!(
        text.contains("/_preview/demo/(id)"),
        "preview requests are logged, without the id"
    );
    let mut lines = 0;
    let mut with_id = 0;
    let mut page_lines = 0;
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        lines += 1;
        if line.contains("req-from-test-42") {
            with_id += 1;
            assert_eq!(v["span"]["request_id"], "req-from-test-42", "{line}");
        }
        if line.contains("page-req-7") {
            page_lines += 1;
            assert_eq!(v["fields"]["request_id"], "page-req-7", "{line}");
            assert_eq!(v["fields"]["path"], "/demo/zed", "{line}");
        }
    }
    assert_eq!(page_lines, 1, "a page's answer is one line");
    assert!(lines > 10, "{lines} JSON lines");
    assert!(with_id >= 1, "the request's own id is on its log lines");
    assert!(text.contains(&id), "a generated request id is logged too");
}
