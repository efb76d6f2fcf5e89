//! `sesame export` and `sesame import`: JSON lines out and in, bad files refused whole with
//! their line numbers, and an interrupted import resumed where it stopped.

use std::io::Write as _;

use sesame_tests::TestNode;

use sesame_tests::run_sesame as sesame;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_export_round_trip_refuse_bad_files_and_resume() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    let url = node.node.url();
    let token = node.node.admin_token.clone();
    let dir = tempfile::tempdir().unwrap();

    // A bad file: every bad line is named, and nothing is written.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"collection\": \"c\", \"key\": \"a\", \"value\": 1}\n\
         not json\n\
         {\"collection\": \"_secret\", \"key\": \"b\", \"value\": 2}\n\
         {\"collection\": \"c\", \"key\": \"d\", \"value\": 4}\n",
    )
    .unwrap();
    let (ok, _, err) = sesame(&["import", "demo", bad.to_str().unwrap()], &url, &token).await;
    assert!(!ok);
    assert!(
        err.contains("2 bad line(s)") && err.contains("line 2:") && err.contains("line 3:"),
        "{err}"
    );
    assert!(
        admin.get("demo", "c", "a").await.is_err(),
        "nothing was imported"
    );

    // 12,000 good lines: three transactions.
    let good = dir.path().join("good.jsonl");
    let mut f = std::fs::File::create(&good).unwrap();
    for i in 0..12_000 {
        writeln!(
            f,
            "{}",
            serde_json::json!({"collection": "items", "key": format!("k{i:05}"), "value": {"n": i}})
        )
        .unwrap();
    }
    drop(f);
    // As if a run had stopped after line 6,000: the import resumes after it.
    std::fs::write(
        dir.path().join("good.jsonl.progress"),
        r#"{"client_id": "import-test", "line": 6000, "seq": 1}"#,
    )
    .unwrap();
    let (ok, out, err) = sesame(&["import", "demo", good.to_str().unwrap()], &url, &token).await;
    assert!(ok, "{err}");
    assert!(
        err.contains("resuming") && err.contains("imported 12000 of 12000 lines"),
        "{err}"
    );
    let imported: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(imported["imported"], 6_000);
    assert!(
        admin.get("demo", "items", "k05999").await.is_err(),
        "before the resume point"
    );
    assert_eq!(
        admin
            .get("demo", "items", "k06000")
            .await
            .unwrap()
            .value
            .to_json(),
        serde_json::json!({"n": 6000})
    );
    assert!(
        !dir.path().join("good.jsonl.progress").exists(),
        "done: no progress left"
    );

    // Export: every tuple once, as lines import takes.
    let (ok, out, err) = sesame(&["export", "demo"], &url, &token).await;
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6_000);
    assert_eq!(lines[0]["collection"], "items");
    let mut keys: Vec<&str> = lines.iter().map(|l| l["key"].as_str().unwrap()).collect();
    keys.sort();
    assert_eq!(keys.first(), Some(&"k06000"));
    assert_eq!(keys.last(), Some(&"k11999"));

    // And back into another site: the same tuples.
    admin.create_site("copy").await.unwrap();
    let file = dir.path().join("export.jsonl");
    std::fs::write(&file, &out).unwrap();
    let (ok, _, err) = sesame(&["import", "copy", file.to_str().unwrap()], &url, &token).await;
    assert!(ok, "{err}");
    assert_eq!(
        admin
            .get("copy", "items", "k11999")
            .await
            .unwrap()
            .value
            .to_json(),
        serde_json::json!({"n": 11999})
    );
    node.stop().await.unwrap();
}
