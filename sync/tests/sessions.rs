//! The two sides of the sync protocol, sans I/O, wired to each other in memory over a real
//! node store and a real (in-memory) client replica: what the node's driver and the client's
//! driver do, without sockets or clocks, so every ordering can be forced.

use std::sync::Arc;

use sesame_proto::sync::{decode, encode, ClientMsg, PushResult, ServerMsg, Target};
use sesame_proto::{Command, CommandResult, LogIndex, Op, Role, Transaction, Value};
use sesame_sync::client::{ClientSession, Event};
use sesame_sync::server::{self, Access, Batch, ServerSession, Task};
use sesame_sync::{Replica, Store};

fn put(key: &str, v: i64) -> Op {
    Op::Put {
        collection: "items".into(),
        key: key.into(),
        value: Value::Int(v),
        if_version: None,
    }
}

fn items() -> Target {
    Target::Site {
        site: "demo".into(),
        collection: Some("items".into()),
        prefix: String::new(),
    }
}

/// A node (store + its feed position) and one client, connected in memory.
struct World {
    _dir: tempfile::TempDir,
    store: Store,
    /// Where the feed has handed out changes up to.
    feed_at: LogIndex,
    server: ServerSession,
    client: ClientSession,
    access: Access,
    /// Pushes the driver holds back (to fail or answer them later).
    held: Vec<(Vec<u64>, Vec<Transaction>)>,
    hold_commits: bool,
}

impl World {
    fn new(access: Access) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        store
            .apply(
                &[(
                    1,
                    Some(&Command::CreateSite {
                        name: "demo".into(),
                        created_at_ms: 1,
                    }),
                )],
                &[],
            )
            .unwrap();
        let client =
            ClientSession::new(Replica::in_memory().unwrap(), "t".into(), Some("phone")).unwrap();
        World {
            _dir: dir,
            store,
            feed_at: 1,
            server: ServerSession::new(7),
            client,
            access,
            held: Vec::new(),
            hold_commits: false,
        }
    }

    /// Commits transactions directly (another writer).
    fn commit(&mut self, txs: Vec<Transaction>) -> Vec<CommandResult> {
        let index = self.store.applied_index().unwrap() + 1;
        match self
            .store
            .apply(&[(index, Some(&Command::Txs(txs)))], &[])
            .unwrap()
            .pop()
        {
            Some(CommandResult::Txs(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    /// The feed's next batch, as the node's feed reads it.
    fn batch(&mut self) -> Arc<Batch> {
        let page = self
            .store
            .view()
            .changes(None, self.feed_at, 10_000)
            .unwrap();
        let batch = Arc::new(Batch {
            from: self.feed_at,
            through: page.next_since,
            changes: page.changes,
        });
        self.feed_at = batch.through;
        batch
    }

    /// Moves messages both ways and does the server's tasks until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(msg) = self.client.poll_transmit() {
                self.server.receive(&encode(&msg));
                moved = true;
            }
            while let Some(task) = self.server.poll_task() {
                moved = true;
                self.task(task);
            }
            while let Some(msg) = self.server.poll_transmit() {
                let closing = matches!(msg, ServerMsg::Error { .. });
                self.client.receive(&encode(&msg)).unwrap();
                moved = true;
                if closing {
                    break;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn task(&mut self, task: Task) {
        match task {
            Task::Authenticate { .. } => {
                let applied = self.store.applied_index().unwrap();
                self.server
                    .authenticated(Ok(self.access.clone()), applied, self.feed_at);
            }
            Task::CatchUp { sub, target, since } => {
                let client_id = self.server.client_id().unwrap().to_string();
                let mut pages = Vec::new();
                server::read_catch_up::<String>(
                    self.store.view(),
                    &target,
                    &client_id,
                    since,
                    |p| {
                        pages.push(p);
                        Ok(())
                    },
                )
                .unwrap();
                for p in pages {
                    self.server
                        .catch_up(sub, p.at, p.snapshot, p.tuples, p.last);
                }
            }
            Task::Commit { ids, txs } => {
                if self.hold_commits {
                    self.held.push((ids, txs));
                    return;
                }
                let results = self.commit(txs);
                let index = self.store.applied_index().unwrap();
                let results = ids
                    .into_iter()
                    .zip(results)
                    .map(|(id, r)| (id, push_result(r, index)))
                    .collect();
                self.server.pushed(results);
            }
            Task::Deliver { .. } | Task::Presence { .. } | Task::WatchVersion { .. } => {}
        }
    }

    /// A new connection (the old one is gone).
    fn reconnect(&mut self) {
        if !self.client.is_offline() {
            self.client.disconnected("closed", "test");
        }
        self.server = ServerSession::new(7);
        self.client.connected();
        self.pump();
        assert!(self.client.is_open());
    }

    fn replica_items(&self) -> Vec<(String, i64, LogIndex)> {
        self.client
            .replica()
            .scan("demo", "items", "", 1000)
            .unwrap()
            .into_iter()
            .map(|e| match e.value {
                Value::Int(v) => (e.key, v, e.version),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn node_items(&self) -> Vec<(String, i64, LogIndex)> {
        self.store
            .view()
            .scan("demo", "items", "", None, 1000)
            .unwrap()
            .into_iter()
            .map(|t| match t.value {
                Value::Int(v) => (t.key, v, t.version),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.client.poll_event()).collect()
    }
}

fn push_result(r: CommandResult, index: LogIndex) -> PushResult {
    match r {
        CommandResult::Committed { .. } => PushResult::Committed { index },
        CommandResult::Duplicate { index } => PushResult::Duplicate { index },
        CommandResult::Conflict(_) => PushResult::Rejected {
            code: "conflict".into(),
            message: String::new(),
        },
        other => panic!("{other:?}"),
    }
}

fn site_tx(ops: Vec<Op>) -> Transaction {
    Transaction {
        site: "demo".into(),
        ops,
        origin: None,
    }
}

#[test]
fn snapshot_then_live_changes_without_gap_or_duplicate() {
    let mut w = World::new(Access::Admin);
    w.commit(vec![site_tx(vec![put("a", 1), put("b", 2)])]);
    w.client.subscribe(items()).unwrap();
    w.reconnect();
    assert_eq!(w.replica_items(), w.node_items());
    // A commit the feed has not handed out yet was already in the snapshot if it landed
    // before the catch-up read; here it lands after.
    w.commit(vec![site_tx(vec![put("a", 10), put("c", 3)])]);
    // Two batches: the first covers what the snapshot already had.
    let b = w.batch();
    w.server.commit(&b);
    w.pump();
    assert_eq!(w.replica_items(), w.node_items());
    let changed: Vec<_> = w
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Changed { tuples, .. } => Some(tuples.len()),
            _ => None,
        })
        .collect();
    // The snapshot's two tuples, then exactly the two changes.
    assert_eq!(changed, [2, 2]);
}

#[test]
fn a_batch_committed_before_the_catch_up_is_not_sent_twice() {
    let mut w = World::new(Access::Admin);
    w.client.subscribe(items()).unwrap();
    w.client.connected();
    // Hello and subscribe reach the node; the catch-up waits.
    while let Some(msg) = w.client.poll_transmit() {
        w.server.receive(&encode(&msg));
    }
    let auth = w.server.poll_task().unwrap();
    w.task(auth);
    w.commit(vec![site_tx(vec![put("a", 1)])]);
    // The catch-up reads the store now (it has `a`), then the batch with `a` arrives.
    w.pump();
    let b = w.batch();
    w.server.commit(&b);
    w.pump();
    let tuples: usize = w
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Changed { tuples, .. } => Some(tuples.len()),
            _ => None,
        })
        .sum();
    assert_eq!(tuples, 1, "`a` once, from the snapshot");
    assert_eq!(w.replica_items(), w.node_items());
}

#[test]
fn a_lost_batch_makes_a_resync_that_catches_up_from_where_the_client_was() {
    let mut w = World::new(Access::Admin);
    w.client.subscribe(items()).unwrap();
    w.reconnect();
    w.commit(vec![site_tx(vec![put("a", 1)])]);
    let _lost = w.batch(); // the driver's queue was full: never delivered
    w.commit(vec![site_tx(vec![put("b", 2)])]);
    let b = w.batch();
    w.server.commit(&b);
    w.pump();
    let resyncs = w
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Resync { .. }))
        .count();
    assert_eq!(resyncs, 1);
    assert_eq!(
        w.replica_items(),
        w.node_items(),
        "caught up from its own index"
    );
}

#[test]
fn an_unknown_push_outcome_ends_the_session_and_the_retry_applies_once() {
    let mut w = World::new(Access::Admin);
    w.client.subscribe(items()).unwrap();
    w.reconnect();
    w.hold_commits = true;
    for i in 0..5 {
        w.client
            .transact("demo", vec![put(&format!("k{i}"), i)])
            .unwrap();
    }
    w.pump();
    // The first push went alone (nothing was queued before it); the rest wait for it.
    let (ids, txs) = w.held.pop().unwrap();
    assert_eq!(ids.len(), 1);
    assert!(
        w.held.is_empty(),
        "nothing commits behind a commit in flight"
    );
    // The node committed it, but the answer was lost (the leader died): unknown.
    w.commit(txs);
    w.server.pushed(
        ids.into_iter()
            .map(|id| {
                (
                    id,
                    PushResult::Unknown {
                        message: "lost".into(),
                    },
                )
            })
            .collect(),
    );
    w.hold_commits = false;
    w.pump();
    assert!(w.client.is_offline(), "the node ended the session");
    assert!(
        w.held.is_empty(),
        "the pushes behind it were never committed"
    );
    assert_eq!(w.client.pending_count().unwrap(), 5);
    // Pushed again, in order, on a new session: the first is a duplicate (an entry of its
    // own, index 3), answered with its original index; the rest go together into index 4.
    w.reconnect();
    assert_eq!(w.client.pending_count().unwrap(), 0);
    let committed: Vec<(u64, LogIndex)> = w
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Committed { seq, index, .. } => Some((seq, index)),
            _ => None,
        })
        .collect();
    assert_eq!(committed, [(1, 2), (2, 4), (3, 4), (4, 4), (5, 4)]);
    let changes = w.store.view().changes(Some("demo"), 0, 100).unwrap();
    assert_eq!(changes.changes.len(), 5, "each applied once");
    assert_eq!(w.replica_items(), w.node_items());
}

#[test]
fn rights_and_rejections() {
    let mut w = World::new(Access::Site {
        site: "demo".into(),
        role: Role::Reader,
        scopes: Vec::new(),
    });
    w.client.subscribe(items()).unwrap();
    w.reconnect();
    w.client.transact("demo", vec![put("a", 1)]).unwrap();
    assert!(
        w.client
            .replica()
            .get("demo", "items", "a")
            .unwrap()
            .unwrap()
            .pending
    );
    w.pump();
    let rejected: Vec<String> = w
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Rejected { code, .. } => Some(code),
            _ => None,
        })
        .collect();
    assert_eq!(rejected, ["forbidden"]);
    assert!(w
        .client
        .replica()
        .get("demo", "items", "a")
        .unwrap()
        .is_none());
    assert!(w.node_items().is_empty());

    // A push claiming another client's origin is refused.
    let mut server = ServerSession::new(1);
    server.receive(&encode(&ClientMsg::Hello {
        version: sesame_proto::sync::SYNC_PROTOCOL_VERSION,
        token: "t".into(),
        client_id: "me".into(),
    }));
    server.poll_task();
    server.authenticated(Ok(Access::Admin), 1, 1);
    let mut tx = site_tx(vec![put("a", 1)]);
    tx.origin = Some(sesame_proto::Origin {
        client_id: "someone-else".into(),
        seq: 1,
    });
    server.receive(&encode(&ClientMsg::Push { id: 1, tx }));
    let msgs: Vec<ServerMsg> = std::iter::from_fn(|| server.poll_transmit()).collect();
    assert!(
        matches!(&msgs[1], ServerMsg::Acked { result: PushResult::Rejected { code, .. }, .. } if code == "bad_request"),
        "{msgs:?}"
    );
    assert!(server.poll_task().is_none());
}

#[test]
fn limits_end_the_session() {
    let mut server = ServerSession::new(1);
    server.receive(&encode(&ClientMsg::Hello {
        version: sesame_proto::sync::SYNC_PROTOCOL_VERSION,
        token: "t".into(),
        client_id: "me".into(),
    }));
    server.poll_task();
    server.authenticated(Ok(Access::Admin), 1, 1);
    for id in 0..=sesame_proto::sync::SUBSCRIPTIONS_PER_SESSION_MAX as u32 {
        server.receive(&encode(&ClientMsg::Subscribe(
            sesame_proto::sync::Subscription {
                id,
                target: items(),
                since: 0,
            },
        )));
    }
    assert!(server.is_closed());
    let last = std::iter::from_fn(|| server.poll_transmit())
        .last()
        .unwrap();
    assert!(matches!(last, ServerMsg::Error { code, .. } if code == "limit"));
    // Garbage closes too.
    let mut server = ServerSession::new(1);
    server.receive(b"\x00\x01garbage");
    assert!(server.is_closed());
    let msg = server.poll_transmit().unwrap();
    assert!(
        matches!(decode::<ServerMsg>(&encode(&msg)).unwrap(), ServerMsg::Error { code, .. } if code == "bad_frame")
    );
}

#[test]
fn a_site_made_again_is_caught_up_from_a_snapshot() {
    let mut w = World::new(Access::Admin);
    w.commit(vec![site_tx(vec![put("a", 1), put("b", 2)])]);
    w.client.subscribe(items()).unwrap();
    w.reconnect();
    assert_eq!(w.replica_items().len(), 2);
    w.client.disconnected("closed", "offline");
    // Meanwhile the site is deleted and made again: no tombstones reach back that far.
    let i = w.store.applied_index().unwrap();
    w.store
        .apply(
            &[
                (
                    i + 1,
                    Some(&Command::DeleteSite {
                        name: "demo".into(),
                        deleted_at_ms: 2,
                    }),
                ),
                (
                    i + 2,
                    Some(&Command::CreateSite {
                        name: "demo".into(),
                        created_at_ms: 3,
                    }),
                ),
            ],
            &[],
        )
        .unwrap();
    w.commit(vec![site_tx(vec![put("c", 3)])]);
    w.feed_at = w.store.applied_index().unwrap();
    w.reconnect();
    assert_eq!(w.replica_items(), w.node_items());
    assert_eq!(w.replica_items().len(), 1);
}

#[test]
fn reconnect_waits_grow_with_jitter_and_stay_bounded() {
    let mut c = ClientSession::new(Replica::in_memory().unwrap(), "t".into(), None).unwrap();
    let max = sesame_sync::client::RECONNECT_MAX;
    let mut last = std::time::Duration::ZERO;
    for _ in 0..30 {
        c.dial_failed();
        // Between half the step and the whole step, whatever the random number.
        let half = c.reconnect_delay(0);
        for r in [1, 7, 1_000, u64::MAX] {
            let d = c.reconnect_delay(r);
            assert!(d >= half && d <= half * 2 && d <= max, "{d:?}");
        }
        assert!(half >= last);
        last = half;
    }
    assert_eq!(last, max / 2);
    assert_eq!(c.reconnect_delay(5_000), max);
}

#[test]
fn subscribing_again_to_a_followed_target_sends_nothing() {
    let mut w = World::new(Access::Admin);
    w.commit(vec![site_tx(vec![put("a", 1)])]);
    let first = w.client.subscribe(items()).unwrap();
    w.reconnect();
    let _ = w.events();
    // An application that subscribes on every start, over a kept replica.
    let again = w.client.subscribe(items()).unwrap();
    assert_eq!(again.id, first.id);
    assert!(w.client.poll_transmit().is_none(), "no second catch-up");
}

#[test]
fn a_client_away_across_a_compaction_gets_a_snapshot_and_loses_the_deleted_key() {
    let mut w = World::new(Access::Admin);
    w.commit(vec![site_tx(vec![put("a", 1), put("b", 2)])]);
    w.client.subscribe(items()).unwrap();
    w.reconnect();
    w.client.disconnected("closed", "offline");
    // While it is away: `a` is deleted, and the feed forgets that delete.
    w.commit(vec![site_tx(vec![Op::Delete {
        collection: "items".into(),
        key: "a".into(),
        if_version: None,
    }])]);
    w.commit(vec![site_tx(vec![put("c", 3)])]);
    let i = w.store.applied_index().unwrap();
    let result = w
        .store
        .apply(
            &[(
                i + 1,
                Some(&Command::CompactFeed {
                    site: "demo".into(),
                    before: i + 1,
                }),
            )],
            &[],
        )
        .unwrap();
    assert_eq!(
        result,
        [CommandResult::FeedCompacted {
            removed: 1,
            horizon: i + 1
        }]
    );
    assert_eq!(w.store.view().feed_horizon("demo").unwrap(), i + 1);
    w.feed_at = w.store.applied_index().unwrap();
    w.reconnect();
    // The changes alone could not say `a` went: the snapshot does.
    assert_eq!(w.replica_items(), w.node_items());
    assert!(w
        .client
        .replica()
        .get("demo", "items", "a")
        .unwrap()
        .is_none());
}
