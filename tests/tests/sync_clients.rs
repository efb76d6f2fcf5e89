//! App clients over QUIC: subscriptions, pushes, the offline queue, mailboxes, rights, and
//! hostile frames, against a real node on loopback.

use std::time::Duration;

use futures::StreamExt;
use sesame_client::{Client, Options, SyncError};
use sesame_proto::sync::Target;
use sesame_proto::{Op, Role, Value};
use sesame_tests::run_sesame as sesame;
use sesame_tests::TestNode;

fn put(collection: &str, key: &str, value: serde_json::Value) -> Op {
    Op::Put {
        collection: collection.into(),
        key: key.into(),
        value: Value::from_json(value).unwrap(),
        if_version: None,
    }
}

fn profiles(site: &str) -> Target {
    Target::Site {
        site: site.into(),
        collection: Some("profiles".into()),
        prefix: String::new(),
    }
}

async fn next_change(
    stream: &mut (impl futures::Stream<Item = sesame_client::Change> + Unpin),
) -> sesame_client::Change {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a change within 10 s")
        .expect("the stream goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_push_and_read_the_replica() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    admin
        .put(
            "demo",
            "profiles",
            "alice",
            serde_json::json!({"name": "Alice"}),
            None,
        )
        .await
        .unwrap();

    let client = Client::connect(Options::new([node.node.url()], &node.node.admin_token))
        .await
        .unwrap();
    let mut changes = client.subscribe(profiles("demo")).unwrap();
    // The snapshot first.
    let first = next_change(&mut changes).await;
    assert_eq!(first.key, "alice");
    // Then live changes, as they commit (from HTTP here).
    admin
        .put(
            "demo",
            "profiles",
            "bob",
            serde_json::json!({"name": "Bob"}),
            None,
        )
        .await
        .unwrap();
    let live = next_change(&mut changes).await;
    assert_eq!(live.key, "bob");
    assert!(client.get("demo", "profiles", "bob").unwrap().is_some());

    // A push commits, comes back as a change, and reads see it.
    let index = client
        .transact_wait(
            "demo",
            vec![put(
                "profiles",
                "carol",
                serde_json::json!({"name": "Carol"}),
            )],
        )
        .await
        .unwrap();
    let mine = next_change(&mut changes).await;
    assert_eq!((mine.key.as_str(), mine.index), ("carol", index));
    let over_http = admin.get("demo", "profiles", "carol").await.unwrap();
    assert_eq!(over_http.version, index);
    let all = client.scan("demo", "profiles", "", 100).unwrap();
    let keys: Vec<_> = all.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["alice", "bob", "carol"]);

    // A failed guard is rejected and leaves the pending view.
    let stale = Op::Put {
        collection: "profiles".into(),
        key: "carol".into(),
        value: Value::from_json(serde_json::json!({"name": "Mallory"})).unwrap(),
        if_version: Some(1),
    };
    let err = client.transact_wait("demo", vec![stale]).await.unwrap_err();
    assert!(
        matches!(&err, SyncError::Rejected { code, .. } if code == "conflict"),
        "{err}"
    );
    let carol = client.get("demo", "profiles", "carol").unwrap().unwrap();
    assert!(!carol.pending);
    assert_eq!(carol.value.to_json()["name"], "Carol");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_are_enforced() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    admin.create_site("other").await.unwrap();
    let url = node.node.url();

    // A bad token gets nothing: the session is refused.
    let err = Client::connect(Options::new([url.clone()], "ssm_not_a_token"))
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, SyncError::Refused { code, .. } if code == "unauthorized"),
        "{err}"
    );

    // A reader may subscribe but not push.
    let reader = admin
        .create_token("demo", Role::Reader)
        .await
        .unwrap()
        .token;
    let client = Client::connect(Options::new([url.clone()], &reader))
        .await
        .unwrap();
    let err = client
        .transact_wait("demo", vec![put("profiles", "x", serde_json::json!(1))])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Rejected { code, .. } if code == "forbidden"),
        "{err}"
    );
    assert!(client.get("demo", "profiles", "x").unwrap().is_none());

    // A token of one site cannot follow another: the session ends.
    let mut events = client.events();
    let _ = client.subscribe(profiles("other")).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(sesame_client::Event::Disconnected { code, .. }) = events.recv().await {
                return code;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(refused, "forbidden");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_writes_queue_survive_a_restart_and_apply_once() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    let url = node.node.url();
    let addr = node.node.addr;
    let token = node.node.admin_token.clone();
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica.db");
    let options = || {
        let mut o = Options::new([url.clone()], &token);
        o.replica = Some(replica.clone());
        o
    };

    // Online: subscribe, so the replica follows the collection.
    let client = Client::connect(options()).await.unwrap();
    let _changes = client.subscribe(profiles("demo")).unwrap();
    client
        .transact_wait("demo", vec![put("profiles", "a", serde_json::json!(1))])
        .await
        .unwrap();
    let data = node.stop().await.unwrap().unwrap();

    // Offline: writes queue and show in reads at once, pending.
    for (k, v) in [("b", 2), ("c", 3), ("a", 10)] {
        client
            .transact("demo", vec![put("profiles", k, serde_json::json!(v))])
            .unwrap();
    }
    assert_eq!(client.pending_count().unwrap(), 3);
    let a = client.get("demo", "profiles", "a").unwrap().unwrap();
    assert!(a.pending);
    assert_eq!(a.value.to_json(), serde_json::json!(10));
    assert_eq!(client.scan("demo", "profiles", "", 10).unwrap().len(), 3);
    let client_id = client.client_id();
    // The client's process ends with its queue on disk.
    drop(client);

    // The node comes back on the same address; the client's process starts again.
    let node = TestNode::start_in_with(data.path(), |c| {
        c.http_addr = addr;
        c.write_rate = None;
    })
    .await
    .unwrap();
    let client = Client::connect(options()).await.unwrap();
    assert_eq!(client.client_id(), client_id);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client.pending_count().unwrap() > 0 {
        assert!(std::time::Instant::now() < deadline, "the queue drains");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = node.admin();
    for (k, v) in [("a", 10), ("b", 2), ("c", 3)] {
        let t = admin.get("demo", "profiles", k).await.unwrap();
        assert_eq!(t.value.to_json(), serde_json::json!(v), "{k}");
        let mine = client.get("demo", "profiles", k).unwrap().unwrap();
        assert!(!mine.pending);
        assert_eq!(
            mine.version, t.version,
            "{k}: the replica has the committed version"
        );
    }
    // Each queued write applied once: the change feed holds one commit per client seq.
    let changes = admin.changes("demo", 0, 1000).await.unwrap();
    assert_eq!(changes.changes.len(), 3);
    node.stop().await.unwrap();
    drop(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_delivers_later_and_the_sender_sees_the_receipt() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site("chat").await.unwrap();
    let url = node.node.url();
    let token = node.node.admin_token.clone();
    let as_client = |id: &str| {
        let mut o = Options::new([url.clone()], &token);
        o.client_id = Some(id.into());
        o
    };
    let mailbox = Target::Mailbox {
        site: "chat".into(),
    };

    // Alice writes to Bob, who is not connected.
    let alice = Client::connect(as_client("alice")).await.unwrap();
    let mut alice_box = alice.subscribe(mailbox.clone()).unwrap();
    alice
        .transact_wait(
            "chat",
            vec![Op::Send {
                to: "bob".into(),
                collection: "messages".into(),
                key: "m1".into(),
                value: Value::from_json(serde_json::json!({"text": "hi bob"})).unwrap(),
            }],
        )
        .await
        .unwrap();
    // It is not in anyone's site subscription.
    let carol = Client::connect(as_client("carol")).await.unwrap();
    let _site = carol
        .subscribe(Target::Site {
            site: "chat".into(),
            collection: None,
            prefix: String::new(),
        })
        .unwrap();
    let mut carol_box = carol.subscribe(mailbox.clone()).unwrap();

    // Bob connects later and gets it.
    let bob = Client::connect(as_client("bob")).await.unwrap();
    let mut bob_box = bob.subscribe(mailbox.clone()).unwrap();
    let got = next_change(&mut bob_box).await;
    assert_eq!(
        (got.collection.as_str(), got.key.as_str()),
        ("messages", "m1")
    );
    assert_eq!(got.value.unwrap().to_json()["text"], "hi bob");
    assert_eq!(got.origin.unwrap().client_id, "alice");

    // Alice sees the delivery: a receipt in her mailbox.
    let receipt = next_change(&mut alice_box).await;
    assert_eq!(receipt.collection, "_receipts");
    assert_eq!(receipt.key, "messages/m1");
    assert_eq!(receipt.value.unwrap().to_json()["to"], "bob");

    // Carol saw neither.
    assert!(carol.scan("chat", "messages", "", 10).unwrap().is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), carol_box.next())
            .await
            .is_err(),
        "carol's mailbox stays empty"
    );
    node.stop().await.unwrap();
}

/// A raw QUIC session to a node's client endpoint, for hostile clients.
async fn raw_session(node: &TestNode) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let info: serde_json::Value = reqwest::get(format!("{}/v1/sync", node.node.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let addr: std::net::SocketAddr = info["quic"].as_str().unwrap().parse().unwrap();
    let tls = sesame_client::sync_tls_config(None, info["cert_blake3"].as_str().unwrap()).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    )));
    let conn = endpoint
        .connect(addr, info["server_name"].as_str().unwrap())
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (conn, send, recv)
}

/// Reads frames until the node's error, and returns its code.
async fn read_error(recv: &mut quinn::RecvStream) -> String {
    let mut reader = sesame_proto::sync::FrameReader::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
            .await
            .expect("the node answers")
            .expect("read")
            .expect("the node says why before closing");
        reader.push(&buf[..n]);
        while let Some(frame) = reader.next_frame().unwrap() {
            if let sesame_proto::sync::ServerMsg::Error { code, .. } =
                sesame_proto::sync::decode(&frame).unwrap()
            {
                return code;
            }
        }
    }
}

fn hello(token: &str) -> Vec<u8> {
    sesame_proto::sync::encode_prefixed(&sesame_proto::sync::ClientMsg::Hello {
        version: sesame_proto::sync::SYNC_PROTOCOL_VERSION,
        token: token.into(),
        client_id: "raw".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_only_their_own_connection() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    node.admin().create_site("demo").await.unwrap();
    let token = node.node.admin_token.clone();
    // A well-behaved client, subscribed throughout.
    let good = Client::connect(Options::new([node.node.url()], &token))
        .await
        .unwrap();
    let mut changes = good.subscribe(profiles("demo")).unwrap();

    // Garbage after a good hello.
    let (_c1, mut send, mut recv) = raw_session(&node).await;
    send.write_all(&hello(&token)).await.unwrap();
    send.write_all(&[0, 0, 0, 5, 1, 2, 3, 4, 5]).await.unwrap();
    assert_eq!(read_error(&mut recv).await, "bad_frame");

    // A frame that says it is larger than the limit.
    let (_c2, mut send, mut recv) = raw_session(&node).await;
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert_eq!(read_error(&mut recv).await, "too_large");

    // No hello first; a wrong protocol version; a bad token.
    let (_c3, mut send, mut recv) = raw_session(&node).await;
    send.write_all(&sesame_proto::sync::encode_prefixed(
        &sesame_proto::sync::ClientMsg::Ping { nonce: 1 },
    ))
    .await
    .unwrap();
    assert_eq!(read_error(&mut recv).await, "bad_request");
    let (_c4, mut send, mut recv) = raw_session(&node).await;
    send.write_all(&sesame_proto::sync::encode_prefixed(
        &sesame_proto::sync::ClientMsg::Hello {
            version: 999,
            token: token.clone(),
            client_id: "raw".into(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(read_error(&mut recv).await, "version");
    let (_c5, mut send, mut recv) = raw_session(&node).await;
    send.write_all(&hello("ssm_wrong")).await.unwrap();
    assert_eq!(read_error(&mut recv).await, "unauthorized");

    // The good client never noticed.
    good.transact_wait("demo", vec![put("profiles", "k", serde_json::json!(1))])
        .await
        .unwrap();
    assert_eq!(next_change(&mut changes).await.key, "k");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_slows_nobody() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    let token = node.node.admin_token.clone();

    // The slow one: subscribes, then never reads.
    let (_slow, mut send, _recv) = raw_session(&node).await;
    send.write_all(&hello(&token)).await.unwrap();
    send.write_all(&sesame_proto::sync::encode_prefixed(
        &sesame_proto::sync::ClientMsg::Subscribe(sesame_proto::sync::Subscription {
            id: 1,
            target: profiles("demo"),
            since: 0,
        }),
    ))
    .await
    .unwrap();
    // A fast one.
    let fast = Client::connect(Options::new([node.node.url()], &token))
        .await
        .unwrap();
    let mut changes = fast.subscribe(profiles("demo")).unwrap();

    // 40 writes of 64 KiB: far more than the slow reader's flow-control window holds, so
    // the node cannot send it everything; it must not wait for it either.
    let big = "x".repeat(64 << 10);
    for i in 0..40 {
        admin
            .put(
                "demo",
                "profiles",
                &format!("k{i:02}"),
                serde_json::json!(big),
                None,
            )
            .await
            .unwrap();
        // The fast subscriber has each write before the next one is made: nothing queues
        // behind the slow one.
        let c = next_change(&mut changes).await;
        assert_eq!(c.key, format!("k{i:02}"));
    }
    assert_eq!(node.node.node.feed.sessions(), 2);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_watch_put_send_and_inbox() {
    use tokio::io::AsyncBufReadExt as _;
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    node.admin().create_site("demo").await.unwrap();
    let url = node.node.url();
    let token = node.node.admin_token.clone();

    // `sesame watch` prints each change as one JSON line as it commits.
    let mut watch = tokio::process::Command::new(sesame_tests::sesame_bin().unwrap())
        .args([
            "watch", "demo", "profiles", "--node", &url, "--token", &token,
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    // Wait until the watcher's session is open (it is the only one).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while node.node.node.feed.sessions() == 0 {
        assert!(std::time::Instant::now() < deadline, "watch connects");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, out, err) = sesame(
        &[
            "put",
            "demo",
            "profiles",
            "alice",
            r#"{"name": "Alice"}"#,
            "--via",
            "quic",
        ],
        &url,
        &token,
    )
    .await;
    assert!(ok, "{err}");
    let put: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let change: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        change,
        serde_json::json!({"index": put["index"], "collection": "profiles", "key": "alice",
                           "value": {"name": "Alice"}})
    );
    // A delete shows as value null.
    node.admin()
        .delete("demo", "profiles", "alice", None)
        .await
        .unwrap();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let change: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(change["value"], serde_json::Value::Null);
    assert_eq!(change["key"], "alice");
    watch.kill().await.unwrap();

    // Mail to a client that is not there; it reads its inbox later.
    let (ok, _, err) = sesame(
        &[
            "send",
            "--to",
            "bob",
            "demo",
            "messages",
            "m1",
            r#""hi bob""#,
            "--client-id",
            "alice",
        ],
        &url,
        &token,
    )
    .await;
    assert!(ok, "{err}");
    let (ok, out, err) = sesame(&["inbox", "demo", "--client-id", "bob"], &url, &token).await;
    assert!(ok, "{err}");
    let got: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(got["key"], "m1");
    assert_eq!(got["value"], "hi bob");
    // Alice's inbox has the receipt.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = sesame(&["inbox", "demo", "--client-id", "alice"], &url, &token).await;
        assert!(ok, "{err}");
        if out.contains("_receipts") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice gets the receipt"
        );
    }

    // A bad token: a non-zero exit and a clear message.
    for args in [
        &["watch", "demo"][..],
        &["put", "demo", "p", "k", "1", "--via", "quic"][..],
        &["inbox", "demo", "--client-id", "x"][..],
    ] {
        let (ok, _, err) = sesame(args, &url, "ssm_bad").await;
        assert!(!ok, "{args:?}");
        assert!(
            err.contains("unauthorized") && err.contains("unknown token"),
            "{err}"
        );
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_feed_is_refused_to_old_readers_and_snapshots_clients() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    let url = node.node.url();
    let token = node.node.admin_token.clone();
    let dir = tempfile::tempdir().unwrap();
    let mut options = Options::new([url.clone()], &token);
    options.replica = Some(dir.path().join("r.db"));

    let first = admin
        .put("demo", "profiles", "a", serde_json::json!(1), None)
        .await
        .unwrap()
        .index;
    let client = Client::connect(options.clone()).await.unwrap();
    let mut changes = client.subscribe(profiles("demo")).unwrap();
    assert_eq!(next_change(&mut changes).await.key, "a");
    drop(changes);
    drop(client);

    // Away: `a` is deleted, then the feed is compacted (an owner or admin may).
    admin.delete("demo", "profiles", "a", None).await.unwrap();
    let reader = admin
        .create_token("demo", Role::Reader)
        .await
        .unwrap()
        .token;
    let err = node
        .client(Some(&reader))
        .compact("demo", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("owner"), "{err}");
    let compacted = admin.compact("demo", None).await.unwrap();
    assert_eq!(compacted["removed"], 1);
    let horizon = compacted["horizon"].as_u64().unwrap();
    assert!(horizon > first);

    // An HTTP reader from before the horizon is told to read whole; from 0 it is fine.
    let err = admin.changes("demo", first, 100).await.unwrap_err();
    assert!(err.to_string().contains("compacted"), "{err}");
    assert!(admin
        .changes("demo", 0, 100)
        .await
        .unwrap()
        .changes
        .is_empty());

    // The client comes back: a snapshot, so `a` goes from its replica too.
    let client = Client::connect(options).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.get("demo", "profiles", "a").unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica drops `a`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await.unwrap();
}
