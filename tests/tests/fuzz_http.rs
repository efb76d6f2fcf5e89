//! Fuzzing a real node over HTTP: arbitrary bodies to every POST endpoint and arbitrary
//! request targets. The node never answers 5xx to them, every refusal of an API request is
//! the JSON error body, and the node keeps serving.
//!
//! Runs `SESAME_FUZZ_CASES` cases per property (default 64: each is a round trip). A failure
//! prints the minimal input and the file proptest saves it in
//! (`fuzz_http.proptest-regressions` beside this one).

use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestRunner};
use sesame_tests::{raw_http, TestNode};

const POST_ENDPOINTS: [&str; 5] = [
    "/v1/sites",
    "/v1/sites/demo/tx",
    "/v1/sites/demo/tokens",
    "/v1/sites/demo/rollback",
    "/v1/sites/demo/rebuild",
];

fn runner() -> TestRunner {
    let cases = std::env::var("SESAME_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    TestRunner::new(ProptestConfig {
        cases,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let json = prop_oneof![
        Just(r#"{"ops":[{"put":{"collection":"p","key":"k","value":1}}]}"#.to_string()),
        Just(r#"{"name":"x"}"#.to_string()),
        Just(r#"{"role":"reader","ttl_s":1}"#.to_string()),
        Just(r#"{"index":1}"#.to_string()),
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        // Valid bodies with a few bytes changed: mostly almost-right JSON.
        (
            json,
            prop::collection::vec((any::<usize>(), any::<u8>()), 0..4)
        )
            .prop_map(|(json, changes)| {
                let mut bytes = json.into_bytes();
                for (at, byte) in changes {
                    let i = at % bytes.len();
                    bytes[i] = byte;
                }
                bytes
            }),
    ]
}

#[test]
fn arbitrary_requests_never_get_a_5xx() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = rt
        .block_on(TestNode::start_with(|c| c.write_rate = None))
        .unwrap();
    rt.block_on(node.admin().create_site("demo")).unwrap();
    let client = reqwest::Client::new();
    let url = node.node.url();
    let token = node.node.admin_token.clone();

    let result = runner().run(&(0..POST_ENDPOINTS.len(), body()), |(which, body)| {
        let path = POST_ENDPOINTS[which];
        let (status, text) = rt.block_on(async {
            let resp = client
                .post(format!("{url}{path}"))
                .bearer_auth(&token)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            (resp.status(), resp.text().await.unwrap())
        });
        prop_assert!(status.as_u16() < 500, "{path}: {status} {text}");
        if status.is_client_error() {
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                TestCaseError::fail(format!("{path}: {status} not JSON ({e}): {text}"))
            })?;
            let message = json["error"]["message"].as_str().unwrap_or("");
            prop_assert!(!message.is_empty(), "{path}: {status} {text}");
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("POST bodies: {e}");
    }

    let addr = node.node.addr;
    let result = runner().run(&"/[ -~]{0,80}", |target| {
        let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let resp = rt.block_on(raw_http(addr, request.as_bytes()));
        // hyper refuses malformed request lines itself (400); anything else is ours.
        prop_assert!(
            resp.status != 0 && resp.status < 500,
            "{target:?}: {}",
            resp.head
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("request targets: {e}");
    }
    // Still serving.
    rt.block_on(node.admin().list_sites()).unwrap();
    rt.block_on(node.stop()).unwrap();
}
