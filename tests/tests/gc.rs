//! Garbage collection of published files against a real node: the history is pruned to its
//! retention, files only pruned versions used are deleted, and nothing a retained version,
//! an in-flight publish or a rollback needs is ever deleted (raced on purpose).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use sesame_client::{ClientError, Http};
use sesame_node::pages::bundle;
use sesame_node::pages::gc::HistoryConfig;
use sesame_projector::Publisher;
use sesame_proto::api::TxRequest;
use sesame_tests::TestNode;

const SITE: &str = "demo";
const WAIT: Duration = Duration::from_secs(30);

fn history(keep: usize, interval_ms: u64) -> impl FnOnce(&mut sesame_node::NodeConfig) {
    move |c| {
        c.history = HistoryConfig {
            keep,
            max_age: Duration::ZERO,
            grace: Duration::ZERO,
            interval: Duration::from_millis(interval_ms),
        };
        c.write_rate = None;
    }
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

/// Puts alice's name and waits until her page reflects the commit; with `check`, that it
/// shows the name (no rollback runs meanwhile).
async fn rename(node: &TestNode, name: &str, check: bool) -> u64 {
    let w = node
        .admin()
        .put(SITE, "profiles", "alice", json!({ "name": name }), None)
        .await
        .unwrap();
    let page = reqwest::Client::new()
        .get(format!("{}/demo/alice", node.node.url()))
        .header("Sesame-Min-Index", w.index.to_string())
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    if check {
        assert_eq!(page.status(), 200);
        assert!(page.text().await.unwrap().contains(name));
    } else {
        // A rollback committed after the write holds until the next write, so the wait for
        // this one may end unfulfilled; a file that cannot be read is what must not happen.
        let status = page.status();
        let body = page.text().await.unwrap();
        assert!(
            !status.is_server_error() || body.contains("is not published yet"),
            "{status}: {body}"
        );
    }
    w.index
}

fn objects(node: &TestNode) -> std::path::PathBuf {
    node.data_dir().join("objects/sites").join(SITE)
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Every manifest `ids` names is in the store, and so is every chunk of its file tree (read
/// and hash-checked) and every file it names.
async fn assert_complete(node: &TestNode, ids: &BTreeSet<String>) {
    let dir = objects(node);
    let blobs = names(&dir.join("blobs"));
    let store = Publisher::local(node.data_dir().join("objects")).unwrap();
    for id in ids {
        let manifest = store
            .get_manifest(SITE, id, None)
            .await
            .unwrap_or_else(|e| panic!("retained manifest {id} cannot be read whole: {e}"));
        for (path, f) in &manifest.files {
            assert!(
                blobs.contains(&f.hash),
                "retained manifest {id} names {path} = blob {}, which was deleted",
                f.hash
            );
        }
    }
}

/// Blobs in the store whose bytes contain `needle`.
fn blobs_containing(node: &TestNode, needle: &str) -> usize {
    let dir = objects(node).join("blobs");
    names(&dir)
        .iter()
        .filter(|n| {
            std::fs::read(dir.join(n))
                .map(|b| String::from_utf8_lossy(&b).contains(needle))
                .unwrap_or(false)
        })
        .count()
}

async fn retained(admin: &Http) -> BTreeSet<String> {
    admin
        .versions(SITE, 1000)
        .await
        .unwrap()
        .versions
        .into_iter()
        .map(|v| v.manifest)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_pruned_and_files_only_pruned_versions_used_are_collected() {
    let node = TestNode::start_with(history(3, 50)).await.unwrap();
    let admin = node.admin();
    deploy_demo(&admin).await;
    let mut indexes = Vec::new();
    for i in 0..8 {
        indexes.push(rename(&node, &format!("Alice Generation {i}"), true).await);
    }
    // The history shrinks to the newest three versions.
    let deadline = Instant::now() + WAIT;
    while admin.versions(SITE, 100).await.unwrap().versions.len() > 3 {
        assert!(Instant::now() < deadline, "the history was never pruned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The pages only pruned versions had are deleted; the retained ones are whole.
    let deadline = Instant::now() + WAIT;
    while (0..5).any(|i| blobs_containing(&node, &format!("Alice Generation {i}<")) > 0) {
        assert!(
            Instant::now() < deadline,
            "unused files were never collected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 5..8 {
        assert!(
            blobs_containing(&node, &format!("Alice Generation {i}<")) >= 1,
            "generation {i} is retained"
        );
    }
    let kept = retained(&admin).await;
    assert_eq!(kept.len(), 3);
    assert_complete(&node, &kept).await;
    assert_eq!(
        names(&objects(&node).join("manifests")).len(),
        3,
        "only the retained manifests stay"
    );
    // And only the chunks of their file trees: those of pruned versions went too.
    let store = Publisher::local(node.data_dir().join("objects")).unwrap();
    let mut reachable = BTreeSet::new();
    for id in &kept {
        let m = store.get_manifest(SITE, id, None).await.unwrap();
        reachable.extend(m.files.chunk_ids().into_iter().map(|c| format!("{c}.json")));
    }
    assert_eq!(names(&objects(&node).join("chunks")), reachable);

    // A pruned version cannot be rolled back to; a retained one can, and is served.
    let err = admin.rollback(SITE, indexes[1]).await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 404, .. }), "{err}");
    admin.rollback(SITE, indexes[5]).await.unwrap();
    let body = reqwest::get(format!("{}/demo/alice", node.node.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("Alice Generation 5"), "{body}");

    // Collection counted what it deleted.
    let metrics = reqwest::get(format!("{}/metrics", node.node.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let deleted: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sesame_gc_objects_deleted_total "))
        .expect("the gc counter is exported")
        .parse()
        .unwrap();
    assert!(deleted >= 10.0, "{deleted}");
}

/// Publishing, rollbacks and collection at once. Names cycle through three values with a
/// history of two, so a new version keeps reusing a page body that only a version pruned a
/// moment ago had: exactly the file a collector must not delete under a publish that found
/// it present and skipped writing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_races_publishing_and_rollback_without_losing_a_file() {
    let node = TestNode::start_with(history(2, 5)).await.unwrap();
    let admin = node.admin();
    deploy_demo(&admin).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rollbacks = {
        let admin = admin.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut done = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let versions = admin.versions(SITE, 10).await.unwrap().versions;
                if let Some(older) = versions.get(1) {
                    match admin.rollback(SITE, older.index).await {
                        Ok(_) => done += 1,
                        // Pruned or overtaken meanwhile: the race this test is about.
                        Err(ClientError::Api {
                            status: 404 | 409, ..
                        }) => {}
                        Err(e) => panic!("rollback: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            done
        })
    };
    let url = node.node.url();
    for i in 0..45 {
        rename(&node, ["Ann", "Bea", "Cid"][i % 3], false).await;
        // Whatever is served now is whole: its page reads back (or is absent from it, when
        // a rollback went back to before the demo was deployed), never a missing file.
        let page = reqwest::get(format!("{url}/demo/alice")).await.unwrap();
        assert!(
            matches!(page.status().as_u16(), 200 | 404),
            "after edit {i}: {}",
            page.status()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rolled_back = rollbacks.await.unwrap();
    assert!(rolled_back > 0, "the test raced no rollback");
    // Let collection run on the final state, then check every retained version is whole,
    // including after a restart (nothing cached hides a hole).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kept = retained(&admin).await;
    assert_complete(&node, &kept).await;
    let dir = node.stop().await.unwrap().expect("owned dir");
    let node = TestNode::start_in_with(dir.path(), history(2, 5))
        .await
        .unwrap();
    let versions = node.admin().versions(SITE, 10).await.unwrap().versions;
    assert!(!versions.is_empty());
    for v in versions {
        // Each rollback is a version too, so the one before may leave the history meanwhile.
        match node.admin().rollback(SITE, v.index).await {
            Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
            Err(e) => panic!("rollback to {}: {e}", v.index),
        }
        for path in ["/demo/", "/demo/alice", "/demo/sitemap.xml"] {
            let r = reqwest::get(format!("{}{path}", node.node.url()))
                .await
                .unwrap();
            assert!(
                !r.status().is_server_error(),
                "{path} rolled back to {} after a restart: {}",
                v.index,
                r.status()
            );
        }
    }
}

/// A version published before tree manifests (a format-1 manifest, every file inline, no
/// chunks) is still served after a rollback to it and a restart, is backed up and restored,
/// keeps its files while retained and is collected once pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_version_is_served_backed_up_and_collected() {
    let node = TestNode::start_with(history(2, 50)).await.unwrap();
    let admin = node.admin();
    deploy_demo(&admin).await;
    let first = rename(&node, "Alice Flat", true).await;
    rename(&node, "Alice Tree", true).await;
    let v1 = admin
        .versions(SITE, 10)
        .await
        .unwrap()
        .versions
        .into_iter()
        .find(|v| v.index >= first && !v.current)
        .expect("the first rename is in the history");

    // Stored as an older build stored it: the same files, format 1, under its own id; the
    // history names that manifest instead of the tree one.
    let dir = node.stop().await.unwrap().expect("owned dir");
    let objects_dir = dir.path().join("objects");
    let store = Publisher::local(&objects_dir).unwrap();
    let mut flat = store.get_manifest(SITE, &v1.manifest, None).await.unwrap();
    flat.format = sesame_projector::MANIFEST_FORMAT_FLAT;
    let flat_id = store.put_manifest(&flat).await.unwrap();
    let flat_path = objects_dir.join(format!("sites/{SITE}/manifests/{flat_id}.json"));
    let text = std::fs::read_to_string(&flat_path).unwrap();
    assert!(text.starts_with(r#"{"format":1,"#), "{text}");
    std::fs::remove_file(objects_dir.join(format!("sites/{SITE}/manifests/{}.json", v1.manifest)))
        .unwrap();
    {
        let db = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
        let changed = db
            .execute(
                "UPDATE versions SET manifest = ?1 WHERE manifest = ?2",
                (&flat_id, &v1.manifest),
            )
            .unwrap();
        assert_eq!(changed, 1);
    }

    // Rolled back to and served, also across a restart.
    let node = TestNode::start_in_with(dir.path(), history(2, 50))
        .await
        .unwrap();
    let admin = node.admin();
    admin.rollback(SITE, v1.index).await.unwrap();
    let url = node.node.url();
    let page = |url: String| async move {
        reqwest::get(format!("{url}/demo/alice"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(page(url.clone()).await.contains("Alice Flat"));
    assert_eq!(
        admin.versions(SITE, 1).await.unwrap().versions[0].manifest,
        flat_id
    );
    // Collection runs meanwhile: the retained flat version keeps its files.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_complete(&node, &retained(&admin).await).await;
    assert!(flat_path.is_file(), "a retained flat manifest stays");

    // Backed up with its files, and restored as a node that serves it.
    let restored_dir = tempfile::tempdir().unwrap();
    let backup = restored_dir.path().join("flat.backup");
    let summary = sesame_node::backup::download(&url, Some(&node.node.admin_token), &backup)
        .await
        .unwrap();
    assert!(summary.objects > 3, "{summary:?}");
    let data = restored_dir.path().join("data");
    sesame_node::backup::restore(tokio::fs::File::open(&backup).await.unwrap(), &data, 1)
        .await
        .unwrap();
    std::fs::remove_file(&backup).unwrap();
    let restored = TestNode::start_in_with(&data, history(2, 50))
        .await
        .unwrap();
    assert!(page(restored.node.url()).await.contains("Alice Flat"));
    restored.stop().await.unwrap();

    // Pruned by newer versions, it is collected like any other.
    for i in 0..3 {
        rename(&node, &format!("Alice After {i}"), true).await;
    }
    let deadline = Instant::now() + WAIT;
    while flat_path.is_file() {
        assert!(
            Instant::now() < deadline,
            "the pruned flat manifest was never collected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_complete(&node, &retained(&admin).await).await;
    node.stop().await.unwrap();
}
