//! The Raft storage layer under test: openraft's own storage suite against our SQLite log and
//! state machine, then what the suite does not cover: restarts, snapshots moved between nodes
//! and bytes damaged on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, StorageIOError,
};
use sesame_node::raft::log_store::LOG_FILE_NAME;
use sesame_node::raft::snapshot::SNAPSHOT_DIR_NAME;
use sesame_node::raft::{
    open_storage, Entry, LogId, LogStore, LogStoreError, Member, Network, Raft, StateMachine,
    StorageError, StoredMembership, TypeConfig, Vote,
};
use sesame_proto::{Command, CommandResult, Op, Transaction, Value};
use tempfile::TempDir;

/// The node id the hand-made entries below are proposed by.
const NODE: u64 = 1;

/// Opens fresh storage in a new temporary directory for each suite test; the directory lives
/// as long as the stores.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = TempDir::new().map_err(|e| StorageIOError::write(&e))?;
        let (log_store, state_machine) =
            open_storage(dir.path()).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log_store, state_machine))
    }
}

/// The suite makes its own tokio runtime per test, so this is a plain test.
#[test]
fn openraft_storage_suite() -> anyhow::Result<()> {
    Suite::test_all(Builder)?;
    Ok(())
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, NODE), index)
}

fn entry(term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload,
    }
}

fn single_voter() -> Membership<u64, Member> {
    Membership::new(
        vec![BTreeSet::from([NODE])],
        BTreeMap::from([(NODE, Member::new("127.0.0.1:1", ""))]),
    )
}

fn create_site(name: &str) -> Command {
    Command::CreateSite {
        name: name.into(),
        created_at_ms: 1_700_000_000_000,
    }
}

fn put(site: &str, key: &str, json: serde_json::Value) -> anyhow::Result<Command> {
    Ok(Command::Txs(vec![Transaction {
        site: site.into(),
        ops: vec![Op::Put {
            collection: "profiles".into(),
            key: key.into(),
            value: Value::from_json(json).map_err(anyhow::Error::msg)?,
            if_version: None,
        }],
        origin: None,
    }]))
}

/// What a freshly initialised single-voter node logs and applies: the initial membership at
/// index 0, the leader's blank entry, a site and one tuple.
fn first_entries() -> anyhow::Result<Vec<Entry>> {
    Ok(vec![
        entry(0, 0, EntryPayload::Membership(single_voter())),
        entry(1, 1, EntryPayload::Blank),
        entry(1, 2, EntryPayload::Normal(create_site("demo"))),
        entry(
            1,
            3,
            EntryPayload::Normal(put("demo", "alice", serde_json::json!({"name": "Alice"}))?),
        ),
    ])
}

/// Reads one tuple's version through a read pool, as HTTP handlers do.
fn tuple_version(state_machine: &StateMachine, key: &str) -> anyhow::Result<Option<u64>> {
    let pool = state_machine.read_pool(1)?;
    let tuple = pool.read(|view| view.get("demo", "profiles", key))?;
    Ok(tuple.map(|t| t.version))
}

#[tokio::test]
async fn reopen_keeps_vote_log_committed_and_applied() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let entries = first_entries()?;
    let vote = Vote::new_committed(1, NODE);
    {
        let (mut log_store, mut state_machine) = open_storage(dir.path())?;
        log_store.save_vote(&vote).await?;
        log_store.blocking_append(entries.clone()).await?;
        log_store.save_committed(Some(log_id(1, 3))).await?;
        let results = state_machine.apply(entries.clone()).await?;
        assert_eq!(
            results,
            vec![
                CommandResult::Ok,
                CommandResult::Ok,
                CommandResult::SiteCreated,
                CommandResult::Txs(vec![CommandResult::Committed { index: 3 }])
            ]
        );
        assert_eq!(*state_machine.applied_index().borrow(), 3);
        log_store.purge(log_id(1, 1)).await?;
    }

    let (mut log_store, mut state_machine) = open_storage(dir.path())?;
    assert_eq!(log_store.read_vote().await?, Some(vote));
    assert_eq!(log_store.read_committed().await?, Some(log_id(1, 3)));
    let state = log_store.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1)));
    assert_eq!(state.last_log_id, Some(log_id(1, 3)));
    assert_eq!(
        log_store.try_get_log_entries(..).await?,
        entries[2..].to_vec()
    );
    let mut reader = log_store.get_log_reader().await;
    assert_eq!(
        reader.limited_get_log_entries(2, 3).await?,
        entries[2..3].to_vec()
    );

    let (last_applied, membership) = state_machine.applied_state().await?;
    assert_eq!(last_applied, Some(log_id(1, 3)));
    assert_eq!(
        membership,
        StoredMembership::new(Some(log_id(0, 0)), single_voter())
    );
    assert_eq!(*state_machine.applied_index().borrow(), 3);
    assert_eq!(tuple_version(&state_machine, "alice")?, Some(3));
    Ok(())
}

#[tokio::test]
async fn applied_index_watch_follows_each_batch() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (_log_store, mut state_machine) = open_storage(dir.path())?;
    let mut applied = state_machine.applied_index();
    assert_eq!(*applied.borrow_and_update(), 0);

    let entries = first_entries()?;
    state_machine.apply(entries[..2].to_vec()).await?;
    assert!(applied.has_changed()?);
    assert_eq!(*applied.borrow_and_update(), 1);

    state_machine.apply(entries[2..].to_vec()).await?;
    assert_eq!(*applied.borrow_and_update(), 3);
    Ok(())
}

/// Rewrites one column of one log row behind the store's back.
fn damage_log_row(dir: &Path, index: u64, assignment: &str) -> anyhow::Result<()> {
    let conn = rusqlite::Connection::open(dir.join(LOG_FILE_NAME))?;
    let changed = conn.execute(
        &format!("UPDATE log SET {assignment} WHERE idx = ?1"),
        [index],
    )?;
    anyhow::ensure!(changed == 1, "no log row {index} to damage");
    Ok(())
}

#[tokio::test]
async fn damaged_log_rows_are_errors_not_panics() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    {
        let (mut log_store, _) = open_storage(dir.path())?;
        log_store.blocking_append(first_entries()?).await?;
    }
    // A command frame with the right header and garbage after it.
    damage_log_row(dir.path(), 2, "payload = x'53534d01ffffffff'")?;
    // A payload kind this build does not know.
    damage_log_row(dir.path(), 3, "kind = 7")?;

    let (mut log_store, _) = open_storage(dir.path())?;
    let err = log_store
        .try_get_log_entries(2..3)
        .await
        .expect_err("damaged command decodes");
    assert!(
        err.to_string().contains("entry 2: cannot decode command"),
        "{err}"
    );
    let err = log_store
        .try_get_log_entries(3..4)
        .await
        .expect_err("unknown kind decodes");
    assert!(
        err.to_string().contains("entry 3: unknown payload kind 7"),
        "{err}"
    );
    let mut reader = log_store.get_log_reader().await;
    assert!(reader.limited_get_log_entries(0, 4).await.is_err());

    // Rows around the damage still read.
    assert_eq!(log_store.try_get_log_entries(..2).await?.len(), 2);
    Ok(())
}

/// The state machine gets each entry from memory, as it was appended: the core's read moves a
/// durable entry out of the log's cache (the file is not read), and a later read finds it in
/// the file. Shown by damaging the file's rows behind the store's back: only a read that
/// really goes to the file sees the damage.
#[tokio::test]
async fn the_core_reads_entries_to_apply_from_memory_once() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let (mut log_store, _) = open_storage(dir.path())?;
    let entries = first_entries()?;
    log_store.blocking_append(entries.clone()).await?;
    damage_log_row(dir.path(), 2, "kind = 7")?;
    damage_log_row(dir.path(), 3, "kind = 7")?;

    // A replication task copies: the entries stay for the core.
    let mut reader = log_store.get_log_reader().await;
    assert_eq!(reader.try_get_log_entries(2..4).await?, entries[2..]);
    // The core's read of entries 2 and 3 takes them from memory, and with them every durable
    // entry before them (0 and 1, which the file holds intact).
    assert_eq!(log_store.try_get_log_entries(2..4).await?, entries[2..]);
    // Now they are only in the file.
    let err = log_store
        .try_get_log_entries(3..4)
        .await
        .expect_err("entry 3 was read from the damaged file");
    assert!(
        err.to_string().contains("entry 3: unknown payload kind 7"),
        "{err}"
    );
    assert_eq!(log_store.try_get_log_entries(0..2).await?, entries[..2]);
    Ok(())
}

/// Durable entries wait in memory for the core within a byte bound: past it the oldest leave
/// (and are read from the file), the newest stay.
#[tokio::test]
async fn durable_entries_in_memory_are_bounded_in_bytes() -> anyhow::Result<()> {
    use sesame_node::raft::log_store::RECENT_DURABLE_BYTES_MAX;
    let dir = TempDir::new()?;
    let (mut log_store, _) = open_storage(dir.path())?;
    let value_bytes = 1 << 20;
    let count = (RECENT_DURABLE_BYTES_MAX / value_bytes + 8) as u64;
    let mut entries = vec![entry(1, 1, EntryPayload::Normal(create_site("demo")))];
    for i in 2..=count {
        let big = "x".repeat(value_bytes);
        let command = put("demo", &format!("k{i}"), serde_json::json!({ "big": big }))?;
        entries.push(entry(1, i, EntryPayload::Normal(command)));
    }
    log_store.blocking_append(entries.clone()).await?;
    damage_log_row(dir.path(), 1, "kind = 7")?;
    damage_log_row(dir.path(), count, "kind = 7")?;

    let err = log_store
        .try_get_log_entries(1..2)
        .await
        .expect_err("the oldest entry left memory");
    assert!(
        err.to_string().contains("entry 1: unknown payload kind 7"),
        "{err}"
    );
    let last = log_store.try_get_log_entries(count..count + 1).await?;
    assert_eq!(last[..], entries[entries.len() - 1..]);
    Ok(())
}

#[tokio::test]
async fn damaged_vote_is_an_error() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    {
        let (mut log_store, _) = open_storage(dir.path())?;
        log_store.save_vote(&Vote::new(1, NODE)).await?;
    }
    let conn = rusqlite::Connection::open(dir.path().join(LOG_FILE_NAME))?;
    conn.execute("UPDATE meta SET value = x'7b' WHERE key = 'vote'", [])?;
    drop(conn);

    let (mut log_store, _) = open_storage(dir.path())?;
    assert!(log_store.read_vote().await.is_err());
    Ok(())
}

#[test]
fn refuses_a_database_that_is_not_a_raft_log() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let conn = rusqlite::Connection::open(dir.path().join(LOG_FILE_NAME))?;
    conn.execute_batch("CREATE TABLE something_else (x INTEGER)")?;
    drop(conn);

    let err = LogStore::open(dir.path())
        .err()
        .context("opened a foreign database as a log")?;
    assert!(matches!(err, LogStoreError::NotALog { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn snapshot_streams_to_another_node_and_survives_restart() -> anyhow::Result<()> {
    let leader_dir = TempDir::new()?;
    let follower_dir = TempDir::new()?;

    let (_leader_log, mut leader) = open_storage(leader_dir.path())?;
    leader.apply(first_entries()?).await?;
    let built = leader.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(built.meta.last_log_id, Some(log_id(1, 3)));
    assert!(
        built.meta.snapshot_id.starts_with("1-1-3-"),
        "{}",
        built.meta.snapshot_id
    );

    // Stream the bytes the way a network would: read the leader's file, write the follower's.
    let (_follower_log, mut follower) = open_storage(follower_dir.path())?;
    let mut sent = leader
        .get_current_snapshot()
        .await?
        .context("leader has a snapshot")?;
    let mut received = follower.begin_receiving_snapshot().await?;
    tokio::io::copy(&mut sent.snapshot, &mut received).await?;
    follower.install_snapshot(&sent.meta, received).await?;

    let expected_state = (
        Some(log_id(1, 3)),
        StoredMembership::new(Some(log_id(0, 0)), single_voter()),
    );
    assert_eq!(follower.applied_state().await?, expected_state);
    assert_eq!(*follower.applied_index().borrow(), 3);
    assert_eq!(tuple_version(&follower, "alice")?, Some(3));

    // The follower carries on applying after the snapshot.
    let next = entry(
        1,
        4,
        EntryPayload::Normal(put("demo", "bob", serde_json::json!({"name": "Bob"}))?),
    );
    assert_eq!(
        follower.apply([next]).await?,
        vec![CommandResult::Txs(vec![CommandResult::Committed {
            index: 4
        }])]
    );
    drop(follower);
    drop(leader);

    // Both keep their current snapshot across a restart.
    let (_, mut leader) = open_storage(leader_dir.path())?;
    let kept = leader
        .get_current_snapshot()
        .await?
        .context("leader kept its snapshot")?;
    assert_eq!(kept.meta, built.meta);
    let (_, mut follower) = open_storage(follower_dir.path())?;
    let kept = follower
        .get_current_snapshot()
        .await?
        .context("follower kept its snapshot")?;
    assert_eq!(kept.meta, built.meta);
    assert_eq!(follower.applied_state().await?.0, Some(log_id(1, 4)));
    Ok(())
}

#[tokio::test]
async fn a_store_behind_its_snapshot_is_restored_from_it_on_open() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    {
        let (_log_store, mut state_machine) = open_storage(dir.path())?;
        state_machine.apply(first_entries()?).await?;
        state_machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await?;
    }
    // Lose the store but keep the snapshots, as a power cut could lose the store's unsynced
    // tail after the snapshot was made.
    let fresh = TempDir::new()?;
    let snapshots = fresh.path().join(SNAPSHOT_DIR_NAME);
    std::fs::create_dir(&snapshots)?;
    for item in std::fs::read_dir(dir.path().join(SNAPSHOT_DIR_NAME))? {
        let item = item?;
        std::fs::copy(item.path(), snapshots.join(item.file_name()))?;
    }

    let (_log_store, mut state_machine) = open_storage(fresh.path())?;
    assert_eq!(state_machine.applied_state().await?.0, Some(log_id(1, 3)));
    assert_eq!(*state_machine.applied_index().borrow(), 3);
    assert_eq!(tuple_version(&state_machine, "alice")?, Some(3));
    Ok(())
}

/// How long the end-to-end test waits for Raft to reach a state before failing.
const RAFT_WAIT: Duration = Duration::from_secs(10);

/// Starts a single-voter Raft node on the storage under `dir`.
async fn start_raft(dir: &Path) -> anyhow::Result<(Raft, tokio::sync::watch::Receiver<u64>)> {
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Default::default()
    }
    .validate()?;
    let (log_store, state_machine) = open_storage(dir)?;
    let applied = state_machine.applied_index();
    let raft = Raft::new(
        NODE,
        Arc::new(config),
        Network::unconnected(NODE),
        log_store,
        state_machine,
    )
    .await?;
    Ok((raft, applied))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_voter_raft_commits_snapshots_and_restarts_on_this_storage() -> anyhow::Result<()> {
    let dir = TempDir::new()?;

    let (raft, mut applied) = start_raft(dir.path()).await?;
    raft.initialize(BTreeMap::from([(NODE, Member::new("127.0.0.1:1", ""))]))
        .await?;
    raft.wait(Some(RAFT_WAIT))
        .current_leader(NODE, "become leader")
        .await?;
    let created = raft.client_write(create_site("demo")).await?;
    assert_eq!(created.data, CommandResult::SiteCreated);
    let written = raft
        .client_write(put("demo", "alice", serde_json::json!({"name": "Alice"}))?)
        .await?;
    assert_eq!(
        written.data,
        CommandResult::Txs(vec![CommandResult::Committed {
            index: written.log_id.index
        }])
    );
    // The watch moves before openraft answers the write: read-your-writes can rely on it.
    assert_eq!(*applied.borrow_and_update(), written.log_id.index);

    raft.trigger().snapshot().await?;
    raft.wait(Some(RAFT_WAIT))
        .snapshot(written.log_id, "build a snapshot")
        .await?;
    raft.trigger().purge_log(written.log_id.index).await?;
    raft.wait(Some(RAFT_WAIT))
        .purged(Some(written.log_id), "purge the log")
        .await?;
    raft.shutdown().await?;
    drop(raft);

    // Restart on the purged log and the snapshot; the node leads again and keeps writing.
    let (raft, applied) = start_raft(dir.path()).await?;
    assert!(*applied.borrow() >= written.log_id.index);
    raft.wait(Some(RAFT_WAIT))
        .current_leader(NODE, "become leader after restart")
        .await?;
    let more = raft
        .client_write(put("demo", "bob", serde_json::json!({"name": "Bob"}))?)
        .await?;
    assert!(more.log_id.index > written.log_id.index);
    assert_eq!(
        more.data,
        CommandResult::Txs(vec![CommandResult::Committed {
            index: more.log_id.index
        }])
    );
    raft.shutdown().await?;
    Ok(())
}
