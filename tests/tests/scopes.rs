//! Scoped tokens against a real node: a token limited to one person's tuples edits them
//! and nothing else, through every write path (HTTP transactions, previews, app clients over
//! QUIC), reads only inside its scopes, and reaches nothing site-wide.

use std::time::Duration;

use serde_json::json;
use sesame_client::{Client, ClientError, Http, Options, SyncError};
use sesame_node::pages::bundle;
use sesame_proto::api::TxRequest;
use sesame_proto::sync::Target;
use sesame_proto::{Op, Role, Scope, Value};
use sesame_tests::TestNode;

const SITE: &str = "demo";

fn put(collection: &str, key: &str, value: serde_json::Value) -> Op {
    Op::Put {
        collection: collection.into(),
        key: key.into(),
        value: Value::from_json(value).unwrap(),
        if_version: None,
    }
}

fn alice_scopes() -> Vec<Scope> {
    vec![
        Scope {
            collection: "profiles".into(),
            key: "alice".into(),
            prefix: false,
        },
        Scope {
            collection: "_assets".into(),
            key: "avatars/alice".into(),
            prefix: true,
        },
    ]
}

fn forbidden<T: std::fmt::Debug>(r: Result<T, ClientError>, what: &str) {
    match r {
        Err(ClientError::Api { status: 403, .. }) => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    }
}

async fn tx(http: &Http, ops: Vec<Op>) -> Result<sesame_proto::api::TxResponse, ClientError> {
    http.tx(
        SITE,
        &TxRequest {
            ops,
            client_id: None,
            seq: None,
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_token_touches_its_own_tuples_and_nothing_else() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site(SITE).await.unwrap();
    tx(&admin, bundle::deploy_ops(&bundle::demo(), &[]))
        .await
        .unwrap();
    let bob_before = admin.get(SITE, "profiles", "bob").await.unwrap();

    let created = admin
        .create_scoped_token(SITE, Role::Editor, None, alice_scopes())
        .await
        .unwrap();
    let alice = node.client(Some(&created.token));
    let listed = admin.list_tokens(SITE).await.unwrap();
    assert!(
        listed.tokens.iter().any(|t| t.scopes == alice_scopes()),
        "{listed:?}"
    );

    // Writes inside the scopes go through; anything outside is refused whole.
    tx(
        &alice,
        vec![put("profiles", "alice", json!({"name": "Alice Scoped"}))],
    )
    .await
    .unwrap();
    tx(
        &alice,
        vec![put(
            "_assets",
            "avatars/alice.png",
            json!({"$bytes": "iVBORw=="}),
        )],
    )
    .await
    .unwrap();
    forbidden(
        tx(
            &alice,
            vec![put("profiles", "bob", json!({"name": "Mallory"}))],
        )
        .await,
        "put someone else's profile",
    );
    forbidden(
        tx(
            &alice,
            vec![
                put("profiles", "alice", json!({"name": "Alice Again"})),
                put("profiles", "bob", json!({"name": "Mallory"})),
            ],
        )
        .await,
        "a transaction reaching outside",
    );
    forbidden(
        tx(
            &alice,
            vec![Op::Delete {
                collection: "profiles".into(),
                key: "bob".into(),
                if_version: None,
            }],
        )
        .await,
        "delete someone else's profile",
    );
    forbidden(
        tx(
            &alice,
            vec![put("profiles", "alice2", json!({"name": "x"}))],
        )
        .await,
        "a key that merely starts with the scoped key",
    );
    forbidden(
        tx(&alice, vec![put("_assets", "avatars/bob.png", json!(1))]).await,
        "someone else's avatar",
    );
    forbidden(
        tx(
            &alice,
            vec![put(
                "_templates",
                "profile.html",
                json!({"source": "pwned"}),
            )],
        )
        .await,
        "a template",
    );
    assert_eq!(
        admin.get(SITE, "profiles", "bob").await.unwrap(),
        bob_before
    );
    let mine = admin.get(SITE, "profiles", "alice").await.unwrap();
    assert_eq!(
        mine.value.to_json(),
        json!({"name": "Alice Scoped"}),
        "the refused transaction left nothing behind"
    );

    // Previews are writes too.
    alice
        .preview(
            SITE,
            &[put("profiles", "alice", json!({"name": "A?"}))],
            None,
        )
        .await
        .unwrap();
    forbidden(
        alice
            .preview(SITE, &[put("profiles", "bob", json!({"name": "B?"}))], None)
            .await,
        "a preview of someone else's page",
    );

    // Reads inside the scopes only; nothing site-wide.
    alice.get(SITE, "profiles", "alice").await.unwrap();
    forbidden(alice.get(SITE, "profiles", "bob").await, "read bob");
    forbidden(
        alice.scan(SITE, "profiles", "", None, 10).await,
        "scan everyone",
    );
    alice
        .scan(SITE, "_assets", "avatars/alice", None, 10)
        .await
        .unwrap();
    forbidden(alice.status(SITE).await, "status");
    forbidden(alice.versions(SITE, 10).await, "versions");
    forbidden(alice.rollback(SITE, 1).await, "rollback");
    forbidden(alice.rebuild(SITE).await, "rebuild");
    forbidden(alice.list_tokens(SITE).await, "tokens");
    forbidden(alice.create_token(SITE, Role::Reader).await, "make a token");
    forbidden(alice.export_zip(SITE).await, "export");

    // Bad scoped tokens are refused when made.
    for (scopes, role, why) in [
        (alice_scopes(), Role::Owner, "owner"),
        (vec![alice_scopes()[0].clone(); 9], Role::Editor, "too many"),
        (
            vec![Scope {
                collection: "no such/collection".into(),
                key: "a".into(),
                prefix: false,
            }],
            Role::Editor,
            "bad name",
        ),
    ] {
        match admin.create_scoped_token(SITE, role, None, scopes).await {
            Err(ClientError::Api { status: 400, .. }) => {}
            other => panic!("{why}: {other:?}"),
        }
    }

    // The same over QUIC: pushes outside the scopes are rejected, inside they commit, and
    // a subscription reaching outside ends the session.
    let client = Client::connect(Options::new([node.node.url()], &created.token))
        .await
        .unwrap();
    client
        .transact_wait(SITE, vec![put("profiles", "alice", json!({"name": "Q"}))])
        .await
        .unwrap();
    let err = client
        .transact_wait(SITE, vec![put("profiles", "bob", json!({"name": "Q"}))])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Rejected { code, .. } if code == "forbidden"),
        "{err}"
    );
    assert_eq!(
        admin.get(SITE, "profiles", "bob").await.unwrap(),
        bob_before
    );
    let mut events = client.events();
    let _ = client
        .subscribe(Target::Site {
            site: SITE.into(),
            collection: Some("profiles".into()),
            prefix: String::new(),
        })
        .unwrap();
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(sesame_client::Event::Disconnected { code, .. }) = events.recv().await {
                return code;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(code, "forbidden");
    node.stop().await.unwrap();
}
