//! Online backup and restore through the `sesame` binary against a real node: a backup
//! taken while writes go on is one consistent index, restores as a new single node that
//! serves the same pages, history and tokens and takes new writes; a corrupt or cut backup
//! is refused whole.

use std::time::Duration;

use serde_json::json;
use sesame_node::pages::bundle;
use sesame_proto::api::TxRequest;
use sesame_proto::Role;
use sesame_tests::{run_sesame, TestNode};

const SITE: &str = "demo";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_as_a_new_node_at_one_index() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site(SITE).await.unwrap();
    let deployed = admin
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
        .index;
    let reader = admin.create_token(SITE, Role::Reader).await.unwrap();
    let url = node.node.url();
    let alice = reqwest::Client::new()
        .get(format!("{url}/demo/alice"))
        .header("Sesame-Min-Index", deployed.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // Writes go on while the backup streams: each records the index it committed at.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let admin = admin.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut written = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let w = admin
                    .put(SITE, "load", &format!("k{i:06}"), json!(i), None)
                    .await
                    .unwrap();
                written.push((format!("k{i:06}"), w.index));
                i += 1;
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.backup");
    let (ok, out, err) = run_sesame(
        &["backup", file.to_str().unwrap()],
        &url,
        &node.node.admin_token,
    )
    .await;
    assert!(ok, "backup failed: {err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = load.await.unwrap();
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let at = summary["info"]["applied_index"].as_u64().unwrap();
    assert!(summary["objects"].as_u64().unwrap() > 3, "{summary}");
    let before = written.iter().filter(|(_, idx)| *idx <= at).count();
    assert!(
        before > 0 && before < written.len(),
        "the backup should fall inside the load: {before} of {} writes at or below {at}",
        written.len()
    );

    // Only the admin may take one.
    let (ok, _, err) = run_sesame(
        &["backup", dir.path().join("x").to_str().unwrap()],
        &url,
        &reader.token,
    )
    .await;
    assert!(!ok && err.contains("admin"), "{err}");
    assert!(!dir.path().join("x").exists() && !dir.path().join("x.part").exists());

    // Restore into a new folder and start a node on it.
    let data = dir.path().join("restored");
    let (ok, _, err) = run_sesame(
        &[
            "restore",
            file.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
        &url,
        "unused",
    )
    .await;
    assert!(ok, "restore failed: {err}");
    assert!(err.contains("sesame dev --data"), "{err}");
    let original_versions = admin.versions(SITE, 1000).await.unwrap().versions;
    node.stop().await.unwrap();
    let restored = TestNode::start_in_with(&data, |c| c.write_rate = None)
        .await
        .unwrap();
    let admin2 = restored.admin();

    // Exactly the writes at or below the backup's index are there: one consistent cut.
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = admin2
            .scan(SITE, "load", "", after.as_deref(), 1000)
            .await
            .unwrap();
        keys.extend(page.tuples.into_iter().map(|t| t.key));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let expected: Vec<String> = written
        .iter()
        .filter(|(_, idx)| *idx <= at)
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        keys, expected,
        "the restored store is the store at index {at}"
    );

    // The same pages, history and tokens; new writes continue after the backup's index.
    let served = reqwest::get(format!("{}/demo/alice", restored.node.url()))
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    // The same page; links carry the new node's address once it re-renders.
    assert_eq!(
        served
            .text()
            .await
            .unwrap()
            .replace(&restored.node.url(), &url),
        alice
    );
    let restored_versions = admin2.versions(SITE, 1000).await.unwrap().versions;
    // The history came along (the restored node may have published once more since:
    // its links name its own address).
    let old: Vec<_> = restored_versions
        .iter()
        .filter(|v| !v.current || original_versions.iter().any(|o| o.manifest == v.manifest))
        .collect();
    assert!(!old.is_empty(), "{restored_versions:?}");
    for v in old {
        assert!(
            original_versions.iter().any(|o| o.manifest == v.manifest),
            "restored version {v:?} was never published"
        );
    }
    let as_reader = restored.client(Some(&reader.token));
    as_reader.get(SITE, "load", "k000000").await.unwrap();
    let w = admin2
        .put(
            SITE,
            "profiles",
            "alice",
            json!({"name": "Alice Restored"}),
            None,
        )
        .await
        .unwrap();
    assert!(w.index > at, "{} > {at}", w.index);
    let page = reqwest::Client::new()
        .get(format!("{}/demo/alice", restored.node.url()))
        .header("Sesame-Min-Index", w.index.to_string())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Alice Restored"), "{page}");
    // A rollback to a version from before the backup works: its files came along.
    let oldest = restored_versions.last().unwrap();
    admin2.rollback(SITE, oldest.index).await.unwrap();
    restored.stop().await.unwrap();

    // A restore never writes over a node's data.
    let (ok, _, err) = run_sesame(
        &[
            "restore",
            file.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
        "http://127.0.0.1:9",
        "unused",
    )
    .await;
    assert!(!ok && err.contains("not empty"), "{err}");

    // A flipped byte, or a cut, and nothing is restored.
    let bytes = std::fs::read(&file).unwrap();
    let mut flipped = bytes.clone();
    // Inside the store copy: past the header (12 bytes), the info record (kind, name
    // length, "info.json", length, JSON) and the store record's head.
    let info_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let store_data = 32 + info_len + 3 + "state.db".len() + 8;
    flipped[store_data + 4096] ^= 0x40;
    let bad = dir.path().join("flipped.backup");
    std::fs::write(&bad, &flipped).unwrap();
    let cut = dir.path().join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    for (name, why) in [(&bad, "corrupt"), (&cut, "cut short")] {
        let (ok, _, err) = run_sesame(
            &["verify-backup", name.to_str().unwrap()],
            "http://127.0.0.1:9",
            "x",
        )
        .await;
        assert!(!ok && err.contains(why), "{}: {err}", name.display());
        let into = dir.path().join(format!("from-{why}"));
        let (ok, _, err) = run_sesame(
            &[
                "restore",
                name.to_str().unwrap(),
                "--data",
                into.to_str().unwrap(),
            ],
            "http://127.0.0.1:9",
            "x",
        )
        .await;
        assert!(!ok && err.contains(why), "{err}");
        let left = std::fs::read_dir(&into).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "a failed restore leaves nothing behind");
    }
    let (ok, _, err) = run_sesame(
        &["verify-backup", file.to_str().unwrap()],
        "http://127.0.0.1:9",
        "x",
    )
    .await;
    assert!(ok, "{err}");
}
