//! Fuzzing what the node reads from the network before anything reaches the log: the JSON
//! body of every POST endpoint with the checks its handler makes (transactions through their
//! validator), request paths (`serve::normalize_path`) and the site a request names
//! (`serve::site_and_path`). Nothing panics; a refusal is always a 4xx with a message.
//!
//! Runs `SESAME_FUZZ_CASES` cases per property (default 256). A failure prints the minimal
//! input and the file proptest saves it in (`fuzz_api.proptest-regressions` beside this
//! one), which later runs replay first.

use axum::http::{header, HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sesame_node::http::api::{self, check_index, check_new_site, token_expiry, transaction_from};
use sesame_node::http::error::ApiError;
use sesame_node::pages::serve::{normalize_path, site_and_path, ServeConfig, PATH_BYTES_MAX};
use sesame_proto::api::{CreateSite, CreateToken, Rollback, TxRequest};

fn config() -> ProptestConfig {
    let cases = std::env::var("SESAME_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// A refusal must be the client's fault, and say why.
fn assert_clear_4xx(e: &ApiError) {
    assert!(e.status.is_client_error(), "{} {}", e.status, e.message);
    assert!(!e.message.trim().is_empty(), "{}: empty message", e.status);
}

/// Everything `POST` endpoints do with a body before proposing anything.
fn check_every_endpoint(body: &[u8]) {
    match api::parse_json::<CreateSite>(body) {
        Ok(req) => {
            if let Err(e) = check_new_site(&req) {
                assert_clear_4xx(&e);
            }
        }
        Err(e) => assert_clear_4xx(&e),
    }
    match api::parse_json::<TxRequest>(body) {
        Ok(req) => {
            if let Err(e) = transaction_from("demo", req) {
                assert_clear_4xx(&e);
            }
        }
        Err(e) => assert_clear_4xx(&e),
    }
    match api::parse_json::<CreateToken>(body) {
        Ok(req) => {
            if let Err(e) = token_expiry(&req, 1_700_000_000_000) {
                assert_clear_4xx(&e);
            }
        }
        Err(e) => assert_clear_4xx(&e),
    }
    match api::parse_json::<Rollback>(body) {
        Ok(req) => {
            if let Err(e) = check_index("index", req.index) {
                assert_clear_4xx(&e);
            }
        }
        Err(e) => assert_clear_4xx(&e),
    }
}

/// Field names and values the bodies use, so arbitrary JSON often gets past the first check.
const WORDS: [&str; 18] = [
    "ops",
    "put",
    "delete",
    "collection",
    "key",
    "value",
    "if_version",
    "client_id",
    "seq",
    "name",
    "role",
    "ttl_s",
    "index",
    "$bytes",
    "reader",
    "owner",
    "_templates",
    "demo",
];

fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        prop::sample::select(WORDS.to_vec()).prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    json_leaf().prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(WORDS.to_vec()).prop_map(String::from),
                        ".{0,12}"
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|fields| serde_json::Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// A transaction body of the right shape with arbitrary names, keys and values.
fn tx_body() -> impl Strategy<Value = serde_json::Value> {
    let op = (
        any::<bool>(),
        prop_oneof![Just("p".to_string()), ".{0,70}"],
        prop_oneof![Just("k".to_string()), ".{0,600}"],
        json_value(),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(is_put, collection, key, value, if_version)| {
            if is_put {
                serde_json::json!({"put": {"collection": collection, "key": key, "value": value, "if_version": if_version}})
            } else {
                serde_json::json!({"delete": {"collection": collection, "key": key, "if_version": if_version}})
            }
        });
    (
        prop::collection::vec(op, 0..6),
        prop::option::of(".{0,140}"),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(ops, client_id, seq)| {
            serde_json::json!({"ops": ops, "client_id": client_id, "seq": seq})
        })
}

/// Checks what `normalize_path` promises of a path it accepts.
fn check_normalized(raw: &str) {
    let Ok(path) = normalize_path(raw) else {
        return;
    };
    assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    assert!(path.len() <= PATH_BYTES_MAX + 1, "{raw:?} -> {path:?}");
    assert!(
        !path.chars().any(|c| c.is_ascii_control() || c == '\\'),
        "{raw:?} -> {path:?}"
    );
    let inner = path.trim_start_matches('/');
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if !inner.is_empty() {
        for segment in inner.split('/') {
            assert!(
                !segment.is_empty() && segment != "." && segment != "..",
                "{raw:?} -> {path:?}"
            );
        }
    }
    // Escapes are upper-case hex of bytes that are not unreserved.
    let bytes = path.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = &path[i + 1..i + 3];
            assert!(
                hex.bytes()
                    .all(|h| h.is_ascii_digit() || h.is_ascii_uppercase()),
                "{raw:?} -> {path:?}"
            );
            let v = u8::from_str_radix(hex, 16).expect("checked hex");
            assert!(
                !sesame_proto::names::is_unreserved(v),
                "{raw:?} -> {path:?}"
            );
        }
    }
    assert_eq!(
        normalize_path(&path).as_deref(),
        Ok(&*path),
        "normalising is idempotent"
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_to_every_body_parser(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_every_endpoint(&body);
    }

    #[test]
    fn arbitrary_json_to_every_body_parser(value in json_value()) {
        check_every_endpoint(value.to_string().as_bytes());
    }

    #[test]
    fn transaction_shaped_json_to_the_validator(value in tx_body()) {
        check_every_endpoint(value.to_string().as_bytes());
    }

    #[test]
    fn arbitrary_paths_normalise_safely(raw in ".{0,64}") {
        check_normalized(&raw);
    }

    #[test]
    fn path_like_strings_normalise_safely(
        parts in prop::collection::vec(
            prop_oneof![
                Just("/"), Just("."), Just(".."), Just("%2e"), Just("%2E"), Just("%2f"),
                Just("%2F"), Just("%5c"), Just("%"), Just("%0"), Just("%00"), Just("%7e"),
                Just("%C3%A9"), Just("a"), Just("é"), Just("\\\\"), Just("~"), Just("%+1"),
            ],
            0..24,
        ),
    ) {
        check_normalized(&parts.concat());
    }

    #[test]
    fn arbitrary_bytes_as_paths(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        check_normalized(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_hosts_and_paths_name_a_site_safely(
        host in prop::collection::vec(any::<u8>(), 0..64),
        path in "/.{0,64}",
        domain in prop_oneof![Just("sites.test".to_string()), "[a-zA-Z0-9.-]{1,20}"],
    ) {
        let config = ServeConfig {
            domain: Some(domain),
            ..ServeConfig::default()
        };
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_bytes(&host) {
            headers.insert(header::HOST, value);
        }
        let target = site_and_path(&config, &headers, &path);
        assert!(target.path.starts_with('/'), "{path:?} -> {target:?}");
        assert!(
            target.path == "/" || path.ends_with(target.path),
            "{path:?} -> {target:?}"
        );
        if target.by_host {
            assert!(!target.site.is_empty());
            assert_eq!(target.site.to_ascii_lowercase(), target.site.as_ref());
            assert_eq!(target.path, path);
        } else {
            assert!(!target.site.contains('/'), "{target:?}");
        }
        let _ = normalize_path(target.path);
    }
}
