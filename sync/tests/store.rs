//! Behaviour of the tuple store: atomic transactions, guards, scans, the change feed,
//! at-most-once application, persistence and snapshots.

use sesame_proto::command::{DEAD_TOKENS_PER_SITE_MAX, TOKENS_PER_SITE_MAX};
use sesame_proto::tuple::CLIENT_SEQ_WINDOW;
use sesame_proto::{Command, CommandResult, Op, Origin, Role, TokenRecord, Transaction, Value};
use sesame_sync::{ReadPool, Store, StoreError};

fn put(coll: &str, key: &str, v: i64) -> Op {
    Op::Put {
        collection: coll.into(),
        key: key.into(),
        value: Value::Int(v),
        if_version: None,
    }
}

fn tx(ops: Vec<Op>) -> Command {
    Command::Txs(vec![Transaction {
        site: "demo".into(),
        ops,
        origin: None,
    }])
}

fn site(name: &str) -> Command {
    Command::CreateSite {
        name: name.into(),
        created_at_ms: 1,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    next: u64,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let mut f = Fixture {
            _dir: dir,
            store,
            next: 1,
        };
        assert_eq!(f.apply(site("demo")), CommandResult::SiteCreated);
        f
    }

    fn apply(&mut self, c: Command) -> CommandResult {
        let index = self.next;
        self.next += 1;
        // A single-transaction batch yields that transaction's result.
        match self
            .store
            .apply(&[(index, Some(&c))], &[])
            .unwrap()
            .remove(0)
        {
            CommandResult::Txs(mut results) if results.len() == 1 => results.remove(0),
            other => other,
        }
    }
}

#[test]
fn transaction_commits_all_ops_at_one_index() {
    let mut f = Fixture::new();
    let r = f.apply(tx(vec![put("p", "a", 1), put("p", "b", 2)]));
    assert_eq!(r, CommandResult::Committed { index: 2 });
    let v = f.store.view();
    assert_eq!(v.get("demo", "p", "a").unwrap().unwrap().version, 2);
    assert_eq!(
        v.get("demo", "p", "b").unwrap().unwrap().value,
        Value::Int(2)
    );
    assert_eq!(v.applied_index().unwrap(), 2);
}

#[test]
fn failed_guard_rejects_whole_transaction_and_names_the_key() {
    let mut f = Fixture::new();
    f.apply(tx(vec![put("p", "a", 1)])); // index 2
    let guarded = Op::Put {
        collection: "p".into(),
        key: "a".into(),
        value: Value::Int(9),
        if_version: Some(7),
    };
    let r = f.apply(tx(vec![put("p", "b", 5), guarded]));
    match r {
        CommandResult::Conflict(c) => {
            assert_eq!(
                (
                    c.op,
                    c.collection.as_str(),
                    c.key.as_str(),
                    c.expected,
                    c.current
                ),
                (1, "p", "a", 7, 2)
            );
        }
        other => panic!("expected conflict, got {other:?}"),
    }
    let v = f.store.view();
    assert!(
        v.get("demo", "p", "b").unwrap().is_none(),
        "first op must not apply"
    );
    assert_eq!(
        v.get("demo", "p", "a").unwrap().unwrap().value,
        Value::Int(1)
    );
    // The rejected entry still consumed its index.
    assert_eq!(v.applied_index().unwrap(), 3);

    // if_version 0: must not exist.
    let create = |k: &str| Op::Put {
        collection: "p".into(),
        key: k.into(),
        value: Value::Null,
        if_version: Some(0),
    };
    assert!(matches!(
        f.apply(tx(vec![create("a")])),
        CommandResult::Conflict(_)
    ));
    assert_eq!(
        f.apply(tx(vec![create("new")])),
        CommandResult::Committed { index: 5 }
    );
    // A correct guard passes.
    let ok = Op::Put {
        collection: "p".into(),
        key: "a".into(),
        value: Value::Int(3),
        if_version: Some(2),
    };
    assert_eq!(f.apply(tx(vec![ok])), CommandResult::Committed { index: 6 });
}

#[test]
fn delete_leaves_a_tombstone_in_the_feed_only() {
    let mut f = Fixture::new();
    f.apply(tx(vec![put("p", "a", 1), put("p", "b", 1)])); // 2
    let del = Op::Delete {
        collection: "p".into(),
        key: "a".into(),
        if_version: Some(2),
    };
    assert_eq!(
        f.apply(tx(vec![del])),
        CommandResult::Committed { index: 3 }
    );
    let v = f.store.view();
    assert!(v.get("demo", "p", "a").unwrap().is_none());
    assert_eq!(v.version("demo", "p", "a").unwrap(), 0);
    assert_eq!(v.scan("demo", "p", "", None, 10).unwrap().len(), 1);
    let feed = v.changes(Some("demo"), 2, 100).unwrap();
    assert_eq!(feed.changes.len(), 1);
    assert_eq!(
        (
            feed.changes[0].key.as_str(),
            feed.changes[0].value.is_none()
        ),
        ("a", true)
    );
    assert_eq!(feed.next_since, 3);
    // Deleting again, or deleting what never existed, changes nothing.
    let again = Op::Delete {
        collection: "p".into(),
        key: "a".into(),
        if_version: None,
    };
    f.apply(tx(vec![again]));
    assert_eq!(
        f.store
            .view()
            .changes(Some("demo"), 3, 100)
            .unwrap()
            .changes
            .len(),
        0
    );
}

#[test]
fn scan_by_prefix_with_limit_and_cursor() {
    let mut f = Fixture::new();
    let ops = ["a1", "a2", "a3", "b1", "a\u{10FFFF}", "ab"]
        .iter()
        .map(|k| put("p", k, 0))
        .collect();
    f.apply(tx(ops));
    f.apply(tx(vec![put("q", "a0", 0)]));
    let v = f.store.view();
    let keys = |ts: Vec<sesame_proto::Tuple>| ts.into_iter().map(|t| t.key).collect::<Vec<_>>();
    assert_eq!(
        keys(v.scan("demo", "p", "a", None, 100).unwrap()),
        ["a1", "a2", "a3", "ab", "a\u{10FFFF}"]
    );
    assert_eq!(
        keys(v.scan("demo", "p", "a", None, 2).unwrap()),
        ["a1", "a2"]
    );
    assert_eq!(
        keys(v.scan("demo", "p", "a", Some("a2"), 2).unwrap()),
        ["a3", "ab"]
    );
    assert_eq!(
        keys(v.scan("demo", "p", "", Some("ab"), 10).unwrap()),
        ["a\u{10FFFF}", "b1"]
    );
    // A cursor before the prefix starts at the prefix.
    assert_eq!(
        keys(v.scan("demo", "p", "b", Some("a"), 10).unwrap()),
        ["b1"]
    );
    assert!(v.scan("demo", "p", "zz", None, 10).unwrap().is_empty());
    assert!(v.scan("other", "p", "", None, 10).unwrap().is_empty());
    assert_eq!(v.collections("demo").unwrap(), ["p", "q"]);
}

#[test]
fn change_feed_pages_never_split_a_commit() {
    let mut f = Fixture::new();
    f.apply(tx(vec![put("p", "a", 1)])); // 2
    f.apply(tx((0..5).map(|i| put("p", &format!("k{i}"), i)).collect())); // 3
    f.apply(tx(vec![put("p", "z", 1)])); // 4
    f.apply(tx(vec![put("p", "a", 2)])); // 5: supersedes index 2
    let v = f.store.view();

    let all = v.changes(Some("demo"), 0, 100).unwrap();
    let idx: Vec<u64> = all.changes.iter().map(|c| c.index).collect();
    assert_eq!(
        idx,
        [3, 3, 3, 3, 3, 4, 5],
        "compacted: a's change at 2 is superseded"
    );
    assert_eq!(all.next_since, 5);

    let p1 = v.changes(Some("demo"), 0, 2).unwrap();
    assert_eq!(p1.changes.len(), 5, "index 3 is taken whole");
    assert_eq!(p1.next_since, 3);
    let p2 = v.changes(Some("demo"), p1.next_since, 1).unwrap();
    assert_eq!((p2.changes.len(), p2.next_since), (1, 4));
    let p3 = v.changes(Some("demo"), p2.next_since, 1).unwrap();
    assert_eq!((p3.changes[0].key.as_str(), p3.next_since), ("a", 5));
    let p4 = v.changes(Some("demo"), 5, 1).unwrap();
    assert_eq!((p4.changes.len(), p4.next_since), (0, 5));
}

#[test]
fn client_seq_is_applied_at_most_once() {
    let mut f = Fixture::new();
    let with_origin = |seq, v| {
        Command::Txs(vec![Transaction {
            site: "demo".into(),
            ops: vec![put("p", "a", v)],
            origin: Some(Origin {
                client_id: "phone".into(),
                seq,
            }),
        }])
    };
    assert_eq!(
        f.apply(with_origin(1, 10)),
        CommandResult::Committed { index: 2 }
    );
    assert_eq!(
        f.apply(with_origin(1, 11)),
        CommandResult::Duplicate { index: 2 }
    );
    assert_eq!(
        f.store.view().get("demo", "p", "a").unwrap().unwrap().value,
        Value::Int(10)
    );
    assert_eq!(
        f.apply(with_origin(2, 12)),
        CommandResult::Committed { index: 4 }
    );
    // A retry of an earlier seq reports that transaction's own index, not the latest.
    assert_eq!(
        f.apply(with_origin(1, 13)),
        CommandResult::Duplicate { index: 2 }
    );
    assert_eq!(
        f.apply(with_origin(2, 13)),
        CommandResult::Duplicate { index: 4 }
    );
    let t = f.store.view().get("demo", "p", "a").unwrap().unwrap();
    assert_eq!(t.value, Value::Int(12));
    assert_eq!(
        t.origin,
        Some(Origin {
            client_id: "phone".into(),
            seq: 2
        })
    );
}

#[test]
fn client_seqs_are_remembered_within_a_bounded_window() {
    let mut f = Fixture::new();
    let with_seq = |seq| {
        Command::Txs(vec![Transaction {
            site: "demo".into(),
            ops: vec![put("p", "a", 1)],
            origin: Some(Origin {
                client_id: "phone".into(),
                seq,
            }),
        }])
    };
    let first = f.next;
    assert_eq!(
        f.apply(with_seq(1)),
        CommandResult::Committed { index: first }
    );
    // A skipped seq below the highest was never applied: not a duplicate, not applied.
    f.apply(with_seq(3));
    assert_eq!(f.apply(with_seq(2)), CommandResult::StaleSeq { highest: 3 });
    // Still inside the window: the exact index.
    let far = 1 + CLIENT_SEQ_WINDOW - 1;
    f.apply(with_seq(far));
    assert_eq!(
        f.apply(with_seq(1)),
        CommandResult::Duplicate { index: first }
    );
    // One more and seq 1 leaves the window: answered truthfully as stale.
    f.apply(with_seq(far + 1));
    assert_eq!(
        f.apply(with_seq(1)),
        CommandResult::StaleSeq { highest: far + 1 }
    );
    // However many seqs a client writes, exactly the last CLIENT_SEQ_WINDOW are remembered.
    let last = far + 1 + CLIENT_SEQ_WINDOW;
    for seq in far + 2..=last {
        f.apply(with_seq(seq));
    }
    let remembered = (1..=last)
        .filter(|s| matches!(f.apply(with_seq(*s)), CommandResult::Duplicate { .. }))
        .count();
    assert_eq!(remembered as u64, CLIENT_SEQ_WINDOW);
}

#[test]
fn changes_past_the_largest_index_are_empty() {
    let mut f = Fixture::new();
    f.apply(tx(vec![put("p", "a", 1)]));
    let v = f.store.view();
    for since in [1u64 << 63, u64::MAX] {
        let page = v.changes(Some("demo"), since, 100).unwrap();
        assert!(page.changes.is_empty(), "{since}: {page:?}");
        assert!(v.changes(None, since, 100).unwrap().changes.is_empty());
    }
    assert!(v.version_at("demo", u64::MAX).unwrap().is_none());
    assert!(v.roots_since(u64::MAX).unwrap().is_empty());
}

fn token(hash: &str, site: &str, at: u64, expires: Option<u64>) -> TokenRecord {
    TokenRecord {
        hash: hash.into(),
        site: site.into(),
        role: Role::Reader,
        created_at_ms: at,
        expires_at_ms: expires,
    }
}

#[test]
fn tokens_expire_are_revoked_and_stay_bounded() {
    let mut f = Fixture::new();
    let id = f.next;
    assert_eq!(
        f.apply(Command::PutToken(token("h0", "demo", 100, Some(200)))),
        CommandResult::TokenStored
    );
    let row = f.store.view().token("h0").unwrap().unwrap();
    assert_eq!(
        (row.id, row.expires_at_ms, row.revoked_at_ms),
        (id, Some(200), None)
    );
    assert_eq!(f.store.view().tokens("demo").unwrap().len(), 1);

    let revoke = |id| Command::RevokeToken {
        site: "demo".into(),
        id,
        revoked_at_ms: 150,
    };
    assert_eq!(f.apply(revoke(id)), CommandResult::TokenRevoked);
    assert_eq!(f.apply(revoke(id)), CommandResult::UnknownToken { id });
    assert_eq!(
        f.apply(revoke(u64::MAX)),
        CommandResult::UnknownToken { id: u64::MAX }
    );
    assert_eq!(
        f.store.view().token("h0").unwrap().unwrap().revoked_at_ms,
        Some(150),
        "a revoked token is remembered as revoked"
    );
    assert!(f.store.view().tokens("demo").unwrap().is_empty());

    // Live tokens are bounded; expired ones (by the command's clock) do not count.
    for i in 0..TOKENS_PER_SITE_MAX {
        let t = token(&format!("live{i}"), "demo", 1_000, Some(5_000));
        assert_eq!(f.apply(Command::PutToken(t)), CommandResult::TokenStored);
    }
    assert_eq!(
        f.apply(Command::PutToken(token("one-more", "demo", 4_000, None))),
        CommandResult::TooManyTokens
    );
    assert_eq!(
        f.apply(Command::PutToken(token("later", "demo", 6_000, None))),
        CommandResult::TokenStored,
        "the others have expired by then"
    );
    // Dead tokens (expired or revoked) are kept up to a bound, newest first.
    let rows = f.store.view().tokens("demo").unwrap();
    assert_eq!(
        rows.len(),
        DEAD_TOKENS_PER_SITE_MAX + 1,
        "dead kept + the live one"
    );
    assert!(
        f.store.view().token("h0").unwrap().is_none(),
        "oldest dead forgotten"
    );
    assert!(f.store.view().token("later").unwrap().is_some());
}

#[test]
fn deleting_a_site_removes_everything_and_a_new_one_starts_empty() {
    let mut f = Fixture::new();
    let with_seq = |seq| {
        Command::Txs(vec![Transaction {
            site: "demo".into(),
            ops: vec![put("p", "a", 1)],
            origin: Some(Origin {
                client_id: "phone".into(),
                seq,
            }),
        }])
    };
    f.apply(with_seq(5));
    f.apply(Command::PutToken(token("h", "demo", 1, None)));
    assert_eq!(f.apply(site("blog")), CommandResult::SiteCreated);
    f.apply(Command::Txs(vec![Transaction {
        site: "blog".into(),
        ops: vec![put("p", "b", 1)],
        origin: None,
    }]));
    let publish = Command::Publish(sesame_proto::Publish {
        site: "demo".into(),
        manifest: "m1".into(),
        index: 2,
        files: 1,
        published_at_ms: 1,
        expected: None,
        rollback: false,
    });
    assert_eq!(f.apply(publish), CommandResult::Published);

    let delete = || Command::DeleteSite {
        name: "demo".into(),
        deleted_at_ms: 1_000,
    };
    assert_eq!(f.apply(delete()), CommandResult::SiteDeleted);
    assert!(matches!(
        f.apply(delete()),
        CommandResult::UnknownSite { .. }
    ));
    let v = f.store.view();
    assert!(v.site("demo").unwrap().is_none());
    assert!(v.get("demo", "p", "a").unwrap().is_none());
    assert!(v.changes(Some("demo"), 0, 100).unwrap().changes.is_empty());
    assert!(v.token("h").unwrap().is_none());
    assert!(v.root("demo").unwrap().is_none());
    assert!(v.versions("demo", 10).unwrap().is_empty());
    assert!(
        v.get("blog", "p", "b").unwrap().is_some(),
        "other sites stay"
    );
    // Its files may go once the retention after the deletion has passed.
    assert!(v.deleted_sites(999).unwrap().is_empty());
    let deleted = v.deleted_sites(1_000).unwrap();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].0, "demo");

    assert_eq!(f.apply(site("demo")), CommandResult::SiteCreated);
    assert!(
        f.store.view().deleted_sites(u64::MAX).unwrap().is_empty(),
        "a site created again under the name keeps its files"
    );
    assert!(
        matches!(f.apply(with_seq(1)), CommandResult::Committed { .. }),
        "a new site under the old name forgot the old clients' seqs"
    );
}

#[test]
fn unknown_sites_sites_and_tokens() {
    let mut f = Fixture::new();
    let mut c = tx(vec![put("p", "a", 1)]);
    if let Command::Txs(t) = &mut c {
        t[0].site = "nope".into();
    }
    assert_eq!(
        f.apply(c),
        CommandResult::UnknownSite {
            site: "nope".into()
        }
    );
    assert_eq!(f.apply(site("demo")), CommandResult::SiteExists);
    assert_eq!(f.apply(site("blog")), CommandResult::SiteCreated);
    let names: Vec<_> = f
        .store
        .view()
        .sites()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["blog", "demo"]);

    let token = TokenRecord {
        hash: "h1".into(),
        site: "blog".into(),
        role: Role::Editor,
        created_at_ms: 7,
        expires_at_ms: None,
    };
    assert_eq!(
        f.apply(Command::PutToken(token.clone())),
        CommandResult::TokenStored
    );
    let row = f.store.view().token("h1").unwrap().unwrap();
    assert_eq!(
        (row.site.as_str(), row.role, row.created_at_ms),
        ("blog", Role::Editor, 7)
    );
    assert_eq!(f.store.view().token("h2").unwrap(), None);
    let orphan = TokenRecord {
        hash: "h3".into(),
        site: "gone".into(),
        role: Role::Owner,
        created_at_ms: 7,
        expires_at_ms: None,
    };
    assert!(matches!(
        f.apply(Command::PutToken(orphan)),
        CommandResult::UnknownSite { .. }
    ));
}

#[test]
fn batches_are_atomic_and_ordered_with_meta() {
    let mut f = Fixture::new();
    let a = tx(vec![put("p", "a", 1)]);
    let b = tx(vec![put("p", "b", 1)]);
    let results = f
        .store
        .apply(
            &[(2, Some(&a)), (3, None), (4, Some(&b))],
            &[("raft.applied", b"x")],
        )
        .unwrap();
    let one = |index| CommandResult::Txs(vec![CommandResult::Committed { index }]);
    assert_eq!(results, [one(2), CommandResult::Ok, one(4)]);
    assert_eq!(
        f.store.meta("raft.applied").unwrap().as_deref(),
        Some(&b"x"[..])
    );
    assert_eq!(f.store.applied_index().unwrap(), 4);
    // Re-applying an old index is a caller bug, reported, and changes nothing.
    let err = f
        .store
        .apply(&[(5, Some(&a)), (4, Some(&b))], &[])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::OutOfOrder {
                index: 4,
                applied: 5
            }
        ),
        "{err}"
    );
    assert_eq!(f.store.applied_index().unwrap(), 4);
}

#[test]
fn reopen_keeps_everything_and_readers_see_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let mut store = Store::open(&path).unwrap();
        store
            .apply(
                &[
                    (1, Some(&site("demo"))),
                    (2, Some(&tx(vec![put("p", "a", 7)]))),
                ],
                &[],
            )
            .unwrap();
    }
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.applied_index().unwrap(), 2);
    let pool = ReadPool::open(&path, 2).unwrap();
    let got = pool.read(|v| v.get("demo", "p", "a")).unwrap().unwrap();
    assert_eq!(got.value, Value::Int(7));
    store
        .apply(&[(3, Some(&tx(vec![put("p", "a", 8)])))], &[])
        .unwrap();
    let got = pool.read(|v| v.get("demo", "p", "a")).unwrap().unwrap();
    assert_eq!((got.value, got.version), (Value::Int(8), 3));
}

#[test]
fn export_and_replace_with_round_trip() {
    let mut f = Fixture::new();
    f.apply(tx(vec![put("p", "a", 1)]));
    let snap = f._dir.path().join("snap.db");
    f.store.export(&snap).unwrap();
    f.apply(tx(vec![put("p", "later", 1)]));

    let dir2 = tempfile::tempdir().unwrap();
    let mut other = Store::open(&dir2.path().join("state.db")).unwrap();
    other.apply(&[(1, Some(&site("junk")))], &[]).unwrap();
    other.replace_with(&snap).unwrap();
    let v = other.view();
    assert_eq!(v.applied_index().unwrap(), 2);
    assert!(v.get("demo", "p", "a").unwrap().is_some());
    assert!(v.get("demo", "p", "later").unwrap().is_none());
    assert!(v.site("junk").unwrap().is_none());

    let garbage = f._dir.path().join("garbage.db");
    std::fs::write(&garbage, b"not a database").unwrap();
    assert!(other.replace_with(&garbage).is_err());
    assert_eq!(
        other.view().applied_index().unwrap(),
        2,
        "failed install changes nothing"
    );
}

#[test]
fn corrupt_value_is_an_error_not_a_panic() {
    let f = Fixture::new();
    let path = f.store.path().to_path_buf();
    let mut f = f;
    f.apply(tx(vec![put("p", "a", 1)]));
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE tuples SET value = x'00ff' WHERE key = 'a'", [])
        .unwrap();
    let err = f.store.view().get("demo", "p", "a").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
}

#[test]
fn publish_is_compare_and_set_and_keeps_history() {
    use sesame_proto::Publish;
    let mut f = Fixture::new();
    let publish = |manifest: &str, index, expected: Option<&str>, rollback| {
        Command::Publish(Publish {
            site: "demo".into(),
            manifest: manifest.into(),
            index,
            files: 3,
            published_at_ms: 5,
            expected: expected.map(str::to_string),
            rollback,
        })
    };
    assert_eq!(
        f.apply(publish("m1", 1, None, false)),
        CommandResult::Published
    ); // log 2
       // A stale projector (expecting no root) loses.
    assert_eq!(
        f.apply(publish("mX", 1, None, false)),
        CommandResult::RootMoved {
            current: Some("m1".into())
        }
    );
    assert_eq!(
        f.apply(publish("m2", 3, Some("m1"), false)),
        CommandResult::Published
    ); // log 4
    assert_eq!(
        f.apply(publish("m1", 1, Some("m2"), true)),
        CommandResult::Published
    ); // log 5
    let v = f.store.view();
    let root = v.root("demo").unwrap().unwrap();
    assert_eq!(
        (root.manifest.as_str(), root.index, root.log_index),
        ("m1", 1, 5)
    );
    let history: Vec<_> = v
        .versions("demo", 10)
        .unwrap()
        .into_iter()
        .map(|r| (r.manifest, r.rollback))
        .collect();
    assert_eq!(
        history,
        [
            ("m1".into(), true),
            ("m2".into(), false),
            ("m1".into(), false)
        ]
    );
    assert_eq!(v.version_at("demo", 3).unwrap().unwrap().manifest, "m2");
    assert!(v.version_at("demo", 9).unwrap().is_none());
    assert_eq!(v.roots_since(4).unwrap().len(), 1);
    assert_eq!(v.roots_since(5).unwrap().len(), 0);
    let mut unknown = publish("m", 1, None, false);
    if let Command::Publish(p) = &mut unknown {
        p.site = "nope".into();
    }
    assert!(matches!(
        f.apply(unknown),
        CommandResult::UnknownSite { .. }
    ));
}

#[test]
fn a_batch_applies_each_transaction_on_its_own_at_one_index() {
    let mut f = Fixture::new();
    f.apply(tx(vec![put("p", "a", 1)])); // 2
    let guarded = |v| Op::Put {
        collection: "p".into(),
        key: "a".into(),
        value: Value::Int(v),
        if_version: Some(2),
    };
    let t = |ops| Transaction {
        site: "demo".into(),
        ops,
        origin: None,
    };
    let batch = Command::Txs(vec![
        t(vec![guarded(10), put("p", "b", 1)]),
        // Sees the first transaction's write: the guard on version 2 now fails.
        t(vec![guarded(11)]),
        t(vec![put("p", "c", 1)]),
    ]);
    let results = f.store.apply(&[(3, Some(&batch))], &[]).unwrap();
    let CommandResult::Txs(results) = &results[0] else {
        panic!("{results:?}")
    };
    assert_eq!(results[0], CommandResult::Committed { index: 3 });
    assert!(matches!(&results[1], CommandResult::Conflict(c) if c.current == 3));
    assert_eq!(results[2], CommandResult::Committed { index: 3 });
    let v = f.store.view();
    assert_eq!(
        v.get("demo", "p", "a").unwrap().unwrap().value,
        Value::Int(10)
    );
    assert!(v.get("demo", "p", "c").unwrap().is_some());
}

/// The projector's question: which keys of a site were written (put or deleted) after an
/// index, without their values, and "too many" past a bound.
#[test]
fn changed_keys_name_puts_and_deletes_after_an_index_and_stop_at_the_bound() {
    let mut f = Fixture::new();
    f.apply(tx(vec![
        put("p", "a", 1),
        put("p", "b", 1),
        put("q", "c", 1),
    ])); // 2
    f.apply(site("other")); // 3
    f.apply(Command::Txs(vec![Transaction {
        site: "other".into(),
        ops: vec![put("p", "x", 1)],
        origin: None,
    }])); // 4
    let del = Op::Delete {
        collection: "p".into(),
        key: "a".into(),
        if_version: None,
    };
    f.apply(tx(vec![del, put("p", "d", 1)])); // 5
    let v = f.store.view();
    let sorted = |keys: Option<Vec<(String, String)>>| {
        let mut keys = keys.expect("within the bound");
        keys.sort();
        keys.into_iter()
            .map(|(c, k)| format!("{c}/{k}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        sorted(v.changed_keys("demo", 0, 10).unwrap()),
        ["p/a", "p/b", "p/d", "q/c"]
    );
    assert_eq!(
        sorted(v.changed_keys("demo", 2, 10).unwrap()),
        ["p/a", "p/d"],
        "the delete is a change; keys at or below the index are not"
    );
    assert_eq!(
        sorted(v.changed_keys("demo", 5, 10).unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(sorted(v.changed_keys("other", 0, 10).unwrap()), ["p/x"]);
    assert_eq!(
        v.changed_keys("demo", 0, 4).unwrap().map(|k| k.len()),
        Some(4)
    );
    assert_eq!(
        v.changed_keys("demo", 0, 3).unwrap(),
        None,
        "past the bound"
    );
}

/// With its checkpoints in the background, a store's log is copied into the database file
/// by the checkpoint thread, not by the writer: the writer alone (automatic checkpoints only
/// past 64 MiB of log) would leave the file as it was after a few MiB of writes.
#[test]
fn a_background_checkpointer_copies_the_log_into_the_file() {
    let mut f = Fixture::new();
    let checkpointer = f.store.checkpoint_in_background().unwrap();
    let file = f.store.path().to_path_buf();
    let size = || std::fs::metadata(&file).unwrap().len();
    let before = size();
    let big = "x".repeat(8_000);
    for i in 0..400 {
        let op = Op::Put {
            collection: "p".into(),
            key: format!("k{i:04}"),
            value: Value::String(big.clone()),
            if_version: None,
        };
        f.apply(tx(vec![op]));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while size() < before + 3_000_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the file stayed at {} bytes (from {before}) after 3.2 MB of writes",
            size()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(checkpointer);
    assert_eq!(
        f.store
            .view()
            .get("demo", "p", "k0399")
            .unwrap()
            .unwrap()
            .value,
        Value::String(big)
    );
}
