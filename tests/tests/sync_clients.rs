//! App clients over QUIC: subscriptions, pushes, the offline queue, mailboxes, rights, and
//! hostile frames, against a real node on loopback.

use std::time::Duration;

use futures::StreamExt;
use sesame_client::{Client, Options, SyncError};
use sesame_proto::sync::Target;
use sesame_proto::{Op, Role, Value};
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
