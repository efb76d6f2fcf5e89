//! A real node with templates that fuel and the output limit do not stop: each such page
//! fails alone with its error in site status, while the node, the rest of its site and every
//! other site keep publishing, also after a restart (the same pages fail again, no crash
//! loop).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sesame_client::Http;
use sesame_node::pages::bundle;
use sesame_proto::api::{TemplateProblem, TxRequest};
use sesame_proto::Op;
use sesame_tests::TestNode;

const POISONED: &str = "poisoned";
const HEALTHY: &str = "healthy";
/// How long a test waits for a commit to show on a page before failing.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);

/// Templates that build huge values in a few instructions, recurse, or run long: each with
/// its route and what its page's error says.
const POISON: [(&str, &str, &str); 5] = [
    (
        "/replace",
        r#"{% set s = "a" * 1000 %}{% set s = s|replace("a", s) %}{% set s = s|replace("a", s) %}{{ s|length }}"#,
        "the page needed more than its memory limit of 128 MiB",
    ),
    (
        "/indent",
        r#"{{ 'a\nb'|indent(1000000000) }}"#,
        "the page needed more than its memory limit of 128 MiB",
    ),
    (
        "/doubling",
        r#"{% set ns = namespace(s="ab") %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"#,
        "the page needed more than its memory limit of 128 MiB",
    ),
    (
        "/recursion",
        r#"{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"#,
        "recursion limit exceeded",
    ),
    (
        "/slow",
        r#"{% set s = "ab" * 1000000 %}{% for i in range(100000) %}{{ (s|replace("a", "c"))|length }}{% endfor %}"#,
        "the page took longer than its time limit of 2 s",
    ),
];

fn limits(c: &mut sesame_node::NodeConfig) {
    c.debounce = Duration::from_millis(5);
    c.render_memory_bytes_max = 128 << 20;
    c.render_page_time_max = Duration::from_secs(2);
}

/// Creates a site with the demo bundle (plus `extra` ops); returns the commit index.
async fn deploy(admin: &Http, site: &str, extra: Vec<Op>) -> u64 {
    admin.create_site(site).await.unwrap();
    let mut ops = bundle::deploy_ops(&bundle::demo(), &[]);
    ops.extend(extra);
    let req = TxRequest {
        ops,
        client_id: None,
        seq: None,
    };
    admin.tx(site, &req).await.unwrap().index
}

fn put(collection: &str, key: &str, value: serde_json::Value) -> Op {
    Op::Put {
        collection: collection.into(),
        key: key.into(),
        value: sesame_proto::Value::from_json(value).unwrap(),
        if_version: None,
    }
}

fn poison_ops() -> Vec<Op> {
    let mut ops = Vec::new();
    for (path, source, _) in POISON {
        let name = format!("{}.html", &path[1..]);
        ops.push(put("_templates", &name, json!({ "source": source })));
        ops.push(put("_routes", path, json!({ "template": name })));
    }
    ops
}

/// GETs `/<site><path>` once the site's projection reflects `index`.
async fn page(node: &TestNode, site: &str, path: &str, index: u64) -> (StatusCode, String) {
    let deadline = Instant::now() + PUBLISH_WAIT;
    loop {
        let resp = reqwest::Client::new()
            .get(format!("{}/{site}{path}", node.node.url()))
            .header("Sesame-Min-Index", index.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        if status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            return (status, resp.text().await.unwrap());
        }
    }
}

/// Edits alice's profile on `site` and checks the page shows it.
async fn edit_shows(node: &TestNode, site: &str, key: &str, name: &str) {
    let w = node
        .admin()
        .put(site, "profiles", key, json!({ "name": name }), None)
        .await
        .unwrap();
    let (status, body) = page(node, site, &format!("/{key}"), w.index).await;
    assert_eq!(status, StatusCode::OK, "{site}/{key}");
    assert!(body.contains(name), "{site}/{key}: {body}");
}

async fn problems(admin: &Http, site: &str) -> Vec<TemplateProblem> {
    let status = admin.status(site).await.unwrap();
    assert_eq!(
        status.last_error.as_ref(),
        status.errors.first(),
        "{status:?}"
    );
    status.errors
}

fn assert_poison_reported(problems: &[TemplateProblem]) {
    for (path, _, message) in POISON {
        let p = problems
            .iter()
            .find(|p| p.path.as_deref() == Some(path))
            .unwrap_or_else(|| panic!("no problem for {path} in {problems:#?}"));
        assert!(p.message.contains(message), "{path}: {p:?}");
        assert_eq!(p.template, format!("{}.html", &path[1..]));
    }
}

#[tokio::test]
async fn poisoned_pages_fail_alone_and_the_node_lives_on_across_a_restart() {
    let node = TestNode::start_with(limits).await.unwrap();
    let admin = node.admin();
    deploy(&admin, HEALTHY, Vec::new()).await;
    let index = deploy(&admin, POISONED, poison_ops()).await;

    // The poisoned site's healthy pages are published; the poisoned ones are not, and say why.
    let (status, body) = page(&node, POISONED, "/alice", index).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Alice"), "{body}");
    for (path, _, _) in POISON {
        let (status, _) = page(&node, POISONED, path, index).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    assert_poison_reported(&problems(&admin, POISONED).await);
    assert!(problems(&admin, HEALTHY).await.is_empty());

    // Both sites keep updating.
    edit_shows(&node, HEALTHY, "alice", "Healthy Alice").await;
    edit_shows(&node, POISONED, "bob", "Poisoned Bob").await;

    // After a restart the poisoned pages fail again, and nothing else does.
    let dir = node.stop().await.unwrap().expect("the test owns its data");
    let node = TestNode::start_in_with(dir.path(), limits).await.unwrap();
    let admin = node.admin();
    edit_shows(&node, HEALTHY, "bob", "Healthy Bob after restart").await;
    edit_shows(&node, POISONED, "alice", "Poisoned Alice after restart").await;
    assert_poison_reported(&problems(&admin, POISONED).await);
    assert!(problems(&admin, HEALTHY).await.is_empty());

    // Fixing a template clears its problem.
    let w = admin
        .put(
            POISONED,
            "_templates",
            "replace.html",
            json!({ "source": "fixed" }),
            None,
        )
        .await
        .unwrap();
    let (status, body) = page(&node, POISONED, "/replace", w.index).await;
    assert_eq!((status, body.ends_with("fixed")), (StatusCode::OK, true));
    assert!(!problems(&admin, POISONED)
        .await
        .iter()
        .any(|p| p.path.as_deref() == Some("/replace")));
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_template_calling_debug_gets_an_unknown_function_error() {
    let node = TestNode::start_with(limits).await.unwrap();
    let admin = node.admin();
    let leak = put(
        "_templates",
        "profile.html",
        json!({ "source": "<pre>{{ debug() }}</pre>" }),
    );
    let index = deploy(&admin, HEALTHY, vec![leak]).await;
    let (status, body) = page(&node, HEALTHY, "/alice", index).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let problems = problems(&admin, HEALTHY).await;
    let p = problems
        .iter()
        .find(|p| p.path.as_deref() == Some("/alice"))
        .unwrap_or_else(|| panic!("{problems:#?}"));
    assert_eq!((p.template.as_str(), p.line), ("profile.html", Some(1)));
    assert!(p.message.contains("unknown function"), "{p:?}");
    node.stop().await.unwrap();
}

#[tokio::test]
async fn one_sites_slow_renders_do_not_delay_another_site() {
    let node = TestNode::start_with(limits).await.unwrap();
    let admin = node.admin();
    let fast = deploy(&admin, HEALTHY, vec![]).await;
    page(&node, HEALTHY, "/alice", fast).await;

    // 150 pages that each burn a lot of fuel (well under the time limit): the slow site
    // takes seconds to project.
    let mut ops = vec![
        put(
            "_templates",
            "slow.html",
            json!({ "source": "{% for i in range(200) %}{% for j in range(1000) %}{% endfor %}{% endfor %}{{ page.key }}" }),
        ),
        put(
            "_routes",
            "/{key}",
            json!({ "template": "slow.html", "each": "items" }),
        ),
    ];
    for i in 0..150 {
        ops.push(put("items", &format!("i{i}"), json!(i)));
    }
    admin.create_site("slow").await.unwrap();
    let slow = admin
        .tx(
            "slow",
            &TxRequest {
                ops,
                client_id: None,
                seq: None,
            },
        )
        .await
        .unwrap()
        .index;

    // An edit to the other site is served while the slow site is still rendering.
    edit_shows(&node, HEALTHY, "alice", "Alice Not Kept Waiting").await;
    let status = admin.status("slow").await.unwrap();
    assert!(
        status.projected_index < slow,
        "the slow site finished first, so this run shows nothing: {status:?}"
    );
    node.stop().await.unwrap();
}
