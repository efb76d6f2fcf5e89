//! The node's running Raft, and what keeps it running.
//!
//! openraft stops an instance for good on any storage error (a full disk, an I/O error). The
//! node therefore reaches Raft only through a [`RaftHandle`], and [`supervise`] replaces a
//! stopped instance with a fresh one on the same storage once the storage opens and works
//! again. While it is down, [`RaftHandle::problem`] says why (health checks report it).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use sesame_proto::LogIndex;
use sesame_sync::ReadPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{open_storage, Member, Network, NodeId, Raft};

/// Idle reader connections kept open for reads.
const READ_POOL_IDLE_MAX: usize = 16;
/// First wait before restarting a Raft that stopped on a storage failure; doubles per failed
/// attempt up to [`RAFT_RESTART_MS_MAX`].
const RAFT_RESTART_MS_MIN: u64 = 250;
const RAFT_RESTART_MS_MAX: u64 = 10_000;
/// Bytes written (and removed) to check that the data folder takes writes again before
/// Raft restarts on it.
const DISK_PROBE_BYTES: usize = 4 << 20;

/// Raft's timing and snapshots. Failover takes about one election timeout after the
/// leader's last heartbeat, plus a vote round trip; a leader's read lease is shorter than the
/// shortest election timeout by [`LEASE_MARGIN_MS`], so no new leader can exist while it
/// holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// A snapshot is taken after this many log entries; older entries are then purged, and a
    /// follower that lags past them is sent the snapshot.
    pub snapshot_every: u64,
}

/// Log entries between snapshots by default.
pub const SNAPSHOT_EVERY_DEFAULT: u64 = 10_000;

/// Defaults tuned for failover within 1 s on a LAN. Heartbeats go every 100 ms; openraft
/// also uses that interval as the timeout of each append-entries request, so it must cover
/// a follower's fsync of a full batch. A follower that heard from its leader waits the
/// leader's lease (openraft sets it to `election_max_ms`) plus a random election timeout
/// (`election_min_ms..election_max_ms`) before it stands: 500–600 ms after the last
/// heartbeat, five missed heartbeats at least.
impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 100,
            election_min_ms: 200,
            election_max_ms: 300,
            snapshot_every: SNAPSHOT_EVERY_DEFAULT,
        }
    }
}

/// How much shorter a leader's read lease is than the shortest election timeout: room for
/// clock drift between nodes and for the time the last acknowledgement took to arrive.
pub const LEASE_MARGIN_MS: u64 = 100;

impl RaftTuning {
    /// How long after its last quorum acknowledgement a leader may serve lease reads.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.election_min_ms.saturating_sub(LEASE_MARGIN_MS))
    }

    fn config(&self) -> anyhow::Result<openraft::Config> {
        openraft::Config {
            cluster_name: "sesame".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.snapshot_every.min(1_000),
            ..Default::default()
        }
        .validate()
        .context("validate raft config")
    }
}

/// The node's Raft: the running instance, and why none runs when one does not.
pub struct RaftHandle {
    id: NodeId,
    timing: RaftTuning,
    current: RwLock<Raft>,
    problem: RwLock<Option<String>>,
}

/// What this node knows of the cluster now.
#[derive(Debug, Clone)]
pub struct RaftView {
    pub id: NodeId,
    pub term: u64,
    pub leader: Option<NodeId>,
    /// The leader's member record, when the leader is known.
    pub leader_member: Option<Member>,
    pub last_log_index: LogIndex,
    pub applied_index: LogIndex,
    /// The leader's last acknowledgement by a quorum, if this node leads.
    pub millis_since_quorum_ack: Option<u64>,
}

impl RaftView {
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.id)
    }
}

impl RaftHandle {
    pub fn new(id: NodeId, timing: RaftTuning, raft: Raft) -> RaftHandle {
        RaftHandle {
            id,
            timing,
            current: RwLock::new(raft),
            problem: RwLock::new(None),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn timing(&self) -> RaftTuning {
        self.timing
    }

    /// The running instance (cheap: a handle).
    pub fn get(&self) -> Raft {
        self.current
            .read()
            .expect("raft handle lock poisoned")
            .clone()
    }

    /// Why Raft is not running, or `None` when it runs.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .read()
            .expect("raft problem lock poisoned")
            .clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        *self.problem.write().expect("raft problem lock poisoned") = problem;
    }

    /// What this node knows now: term, leader, log and applied indexes.
    pub fn view(&self) -> RaftView {
        let raft = self.get();
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let leader_member = m
            .current_leader
            .and_then(|id| m.membership_config.membership().get_node(&id).cloned());
        RaftView {
            id: self.id,
            term: m.current_term,
            leader: m.current_leader,
            leader_member,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
        }
    }

    /// Waits until Raft's metrics change (a new leader, a new term, progress), at most
    /// `timeout`.
    pub async fn changed(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        // `Raft::metrics` clones a receiver that has never marked anything seen, so without
        // this `changed` would return at once, every time, and its callers would spin.
        let mut metrics = self.get().metrics();
        metrics.borrow_and_update();
        if let Ok(Err(_)) = tokio::time::timeout_at(deadline, metrics.changed()).await {
            // A stopped instance's metrics never change again, and `changed` fails at once:
            // wait out the timeout instead, or callers that loop on this (waiting for a
            // leader, watching one) spin until the supervisor replaces the instance, or, on
            // shutdown, until their own deadline.
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// What it takes to (re)start this node's Raft on its storage.
pub struct RaftParts {
    pub dir: PathBuf,
    pub node_id: NodeId,
    pub timing: RaftTuning,
    pub network: Network,
    /// The applied index, shared by every instance so followers of it need not resubscribe.
    pub applied: Arc<watch::Sender<LogIndex>>,
    /// Where sites and roots last changed, shared the same way.
    pub landmarks: Arc<watch::Sender<super::Landmarks>>,
}

impl RaftParts {
    /// Opens the log and the state machine and starts a Raft on them; also returns a read
    /// pool on the tuple store.
    pub async fn open(&self) -> anyhow::Result<(Raft, ReadPool)> {
        let dir = self.dir.clone();
        let (log_store, state_machine) = tokio::task::spawn_blocking(move || open_storage(&dir))
            .await
            .context("join storage opening")?
            .context("open raft storage")?;
        let state_machine = state_machine
            .with_applied_watch(self.applied.clone())
            .with_landmarks_watch(self.landmarks.clone());
        let reads = state_machine
            .read_pool(READ_POOL_IDLE_MAX)
            .context("open tuple store readers")?;
        let raft = Raft::new(
            self.node_id,
            Arc::new(self.timing.config()?),
            self.network.clone(),
            log_store,
            state_machine,
        )
        .await
        .context("start raft")?;
        Ok((raft, reads))
    }
}

/// Watches Raft and, when a storage failure stops it, shuts it down and starts a new
/// instance on the same storage, retrying with backoff until the storage opens and works
/// again. Writes that were in flight are answered `outcome_unknown`; the log on disk decides
/// what committed. Ends when `cancel` fires.
pub async fn supervise(handle: Arc<RaftHandle>, parts: RaftParts, cancel: CancellationToken) {
    loop {
        let raft = handle.get();
        let mut metrics = raft.metrics();
        let stopped = tokio::select! {
            _ = cancel.cancelled() => return,
            m = metrics.wait_for(|m| m.running_state.is_err()) => match m {
                Ok(m) => m.running_state.clone().err(),
                // The metrics sender is gone: the instance ended without saying why.
                Err(_) => None,
            },
        };
        let reason = stopped.map_or_else(|| "raft ended".to_string(), |e| e.to_string());
        tracing::error!("raft stopped: {reason}; restarting it on the same storage");
        handle.set_problem(Some(format!(
            "raft stopped: {reason}; restarting it on the same storage"
        )));
        // The stopped instance reports its fatal error again here; it is logged above.
        let _ = raft.shutdown().await;
        drop(raft);
        let mut attempt: u32 = 0;
        loop {
            let wait = RAFT_RESTART_MS_MIN
                .saturating_mul(1 << attempt.min(6))
                .min(RAFT_RESTART_MS_MAX);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
            // A restarted node may resume leading at once (its vote is committed), so it
            // must not come back before its disk takes writes, or it would hold the
            // cluster's leadership while failing every append.
            if let Err(e) = probe_disk(&parts.dir).await {
                tracing::warn!("raft stays stopped: the data folder does not take writes: {e:#}");
                attempt = attempt.saturating_add(1);
                continue;
            }
            match parts.open().await {
                Ok((raft, _reads)) => {
                    *handle.current.write().expect("raft handle lock poisoned") = raft;
                    handle.set_problem(None);
                    tracing::info!("raft restarted after a storage failure");
                    break;
                }
                Err(e) => {
                    tracing::error!("restart raft: {e:#}; retrying");
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }
}

/// Writes, syncs and removes a file of [`DISK_PROBE_BYTES`] in `dir`: whether the disk takes
/// writes now.
async fn probe_disk(dir: &std::path::Path) -> anyhow::Result<()> {
    let path = dir.join(".disk-probe");
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use std::io::Write as _;
        let written = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&vec![0u8; DISK_PROBE_BYTES])?;
            f.sync_all()
        })();
        let removed = std::fs::remove_file(&path);
        written.with_context(|| format!("write {}", path.display()))?;
        removed.with_context(|| format!("remove {}", path.display()))?;
        Ok(())
    })
    .await
    .context("join the disk probe")?
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A single voter that leads, on storage in `dir`.
    async fn leader(dir: &std::path::Path) -> RaftHandle {
        let timing = RaftTuning::default();
        let parts = RaftParts {
            dir: dir.to_path_buf(),
            node_id: 1,
            timing,
            network: Network::unconnected(1),
            applied: Arc::new(watch::channel(0).0),
            landmarks: Arc::new(watch::channel(crate::raft::Landmarks::default()).0),
        };
        let (raft, _reads) = parts.open().await.expect("open raft");
        raft.initialize(BTreeMap::from([(1, Member::new("", ""))]))
            .await
            .expect("initialise");
        raft.wait(Some(Duration::from_secs(10)))
            .current_leader(1, "lead")
            .await
            .expect("lead");
        RaftHandle::new(1, timing, raft)
    }

    #[tokio::test]
    async fn changed_waits_for_a_change_and_a_stopped_raft_does_not_spin() {
        let dir = tempfile::tempdir().expect("temp dir");
        let handle = leader(dir.path()).await;
        // An idle leader's metrics change only on its own ticks and heartbeats: a waiter
        // wakes a few times in half a second, not thousands.
        let watching = Duration::from_millis(500);
        let started = tokio::time::Instant::now();
        let mut wakeups = 0;
        while started.elapsed() < watching {
            handle.changed(Duration::from_millis(200)).await;
            wakeups += 1;
        }
        assert!(
            wakeups < 100,
            "{wakeups} wakeups in {watching:?}: changed() spins"
        );

        handle.get().shutdown().await.expect("shut down");
        let started = tokio::time::Instant::now();
        handle.changed(Duration::from_millis(100)).await;
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "a stopped raft's changed() returned at once"
        );
    }
}
