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
    write_lines(&good, 12_000, |i| (format!("k{i:05}"), i));
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

/// Writes `lines` import lines to `path`: line i puts `{"n": n}` at key `key` of collection
/// `items`, where `(key, n) = line(i)`.
fn write_lines(path: &std::path::Path, lines: usize, line: impl Fn(usize) -> (String, usize)) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..lines {
        let (key, n) = line(i);
        writeln!(
            f,
            "{}",
            serde_json::json!({"collection": "items", "key": key, "value": {"n": n}})
        )
        .unwrap();
    }
    f.flush().unwrap();
}

fn item(i: usize, n: i64) -> sesame_proto::Op {
    sesame_proto::Op::Put {
        collection: "items".into(),
        key: format!("k{i:05}"),
        value: sesame_proto::Value::from_json(serde_json::json!({ "n": n })).unwrap(),
        if_version: None,
    }
}

/// With no key repeated, two transactions are in flight, each lane under its own client id.
/// A run that stopped with the second transaction committed but unrecorded resends it under
/// the same client id and sequence number: applied once, not twice. A file that repeats a
/// key keeps one transaction in flight, so the key's last line wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_in_two_lanes_resumes_at_most_once_and_a_repeated_key_keeps_its_last_line() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    let url = node.node.url();
    let token = node.node.admin_token.clone();
    let dir = tempfile::tempdir().unwrap();

    let good = dir.path().join("lanes.jsonl");
    write_lines(&good, 15_000, |i| (format!("k{i:05}"), i));
    // The earlier run: transaction 0 (lines 1-5,000) recorded, transaction 1 (lines
    // 5,001-10,000: lane 1, sequence 1) committed, its answer lost.
    let lost = sesame_proto::api::TxRequest {
        ops: (5_000..10_000).map(|i| item(i, i as i64)).collect(),
        client_id: Some("import-test-1".into()),
        seq: Some(1),
    };
    let first = admin.tx("demo", &lost).await.unwrap();
    std::fs::write(
        dir.path().join("lanes.jsonl.progress"),
        r#"{"client_id": "import-test", "line": 5000, "txs": 1}"#,
    )
    .unwrap();
    let (ok, _, err) = sesame(&["import", "demo", good.to_str().unwrap()], &url, &token).await;
    assert!(ok, "{err}");
    let before = admin.get("demo", "items", "k05000").await.unwrap();
    assert_eq!(
        before.version, first.index,
        "the resent transaction was applied once, by the earlier run"
    );
    let after = admin.get("demo", "items", "k14999").await.unwrap();
    assert!(after.version > first.index);
    assert!(admin.get("demo", "items", "k04999").await.is_err());

    // A key written at the start and again near the end, transactions apart.
    let repeats = dir.path().join("repeats.jsonl");
    write_lines(&repeats, 15_000, |i| {
        let key = if i % 5_000 == 0 {
            "same".to_string()
        } else {
            format!("r{i:05}")
        };
        (key, i)
    });
    let (ok, _, err) = sesame(&["import", "demo", repeats.to_str().unwrap()], &url, &token).await;
    assert!(ok, "{err}");
    assert_eq!(
        admin
            .get("demo", "items", "same")
            .await
            .unwrap()
            .value
            .to_json(),
        serde_json::json!({"n": 10_000}),
        "the last line of a repeated key wins"
    );
    node.stop().await.unwrap();
}
