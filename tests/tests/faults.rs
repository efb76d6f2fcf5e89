//! Seeded randomized fault test of the replicated cluster.
//!
//! Each run starts a fresh in-process cluster whose peer messages all go through
//! [`RandomFaults`], then:
//! - a safety phase: the seed's plan changes the weather every few hundred milliseconds
//!   (the leader isolated, minority/majority splits, one-way cuts, loss, delay, duplication)
//!   and stops and restarts nodes, at most one down at a time, while several clients, each
//!   on a random node, put unique values to a few keys and read them linearizably. Every
//!   operation is recorded with its call and return times;
//! - a liveness phase: the faults stop and the stopped node comes back; the cluster must
//!   agree on a leader, take a write through every node, converge to the same value of every
//!   key on every node, and read that value linearizably;
//! - the history, final reads included, must be linearizable per key (a register each).
//!
//! The seed is printed at the start and in every failure. Replay one with
//! `SESAME_FAULT_SEED=<seed> SESAME_FAULT_RUNS=1`: the same plan, cluster shape and client
//! choices (thread timing still varies, so which message a loss hits may differ). Run a
//! campaign with `SESAME_FAULT_RUNS=N` (seeds `seed`, `seed+1`, ...) and a longer safety
//! phase with `SESAME_FAULT_SAFETY_MS`.
//!
//! Beside it, fixed schedules for what the random one found or is unlikely to hit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use sesame_client::{ClientError, Http};
use sesame_proto::api::TxRequest;
use sesame_tests::cluster::{ClusterOptions, TestCluster};
use sesame_tests::faults::{self, Crash, Period, RandomFaults, Target};
use sesame_tests::linearizable::{self, Action, Op, Value};

const SITE: &str = "f";
const COLLECTION: &str = "reg";
/// Few keys, so that operations on one key overlap and conflict.
const KEYS: usize = 5;
const CLIENTS: usize = 5;
/// Runs when `SESAME_FAULT_RUNS` is not set: enough for CI on a small machine.
const RUNS_DEFAULT: u64 = 2;
const SAFETY_MS_DEFAULT: u64 = 5_000;
/// Longest a client waits for one answer; past it, a write's outcome is unknown.
const OP_TIMEOUT_MS: u64 = 1_500;
/// Longest a client pauses between two operations.
const THINK_MS_MAX: u64 = 20;
/// How long a client pauses after an operation failed, as a real one would back off.
const FAILED_PAUSE_MS: u64 = 50;
/// Attempts of a write that carries `(client_id, seq)` and is retried while its outcome is
/// unknown (each retry is the same write: it applies at most once).
const WRITE_ATTEMPTS_MAX: u32 = 3;
/// How long the liveness phase may take to agree, take writes and converge.
const LIVENESS: Duration = Duration::from_secs(60);
/// How much longer than twice its safety phase one run may take: start, liveness, stop.
const RUN_SLACK: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_keep_the_cluster_linearizable_and_it_recovers() {
    let runs = env_u64("SESAME_FAULT_RUNS").unwrap_or(RUNS_DEFAULT);
    let base = env_u64("SESAME_FAULT_SEED").unwrap_or_else(faults::fresh_seed);
    let safety =
        Duration::from_millis(env_u64("SESAME_FAULT_SAFETY_MS").unwrap_or(SAFETY_MS_DEFAULT));
    println!("fault test: {runs} run(s) from seed {base}, safety phase {safety:?}");
    let mut failed = Vec::new();
    for i in 0..runs {
        let seed = base.wrapping_add(i);
        let started = Instant::now();
        // A run that hangs (a node that never stops, a phase that never ends) fails, with
        // its seed, instead of holding the test forever.
        let bound = safety * 2 + RUN_SLACK;
        let finished = tokio::time::timeout(bound, run(seed, safety))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the run did not finish within {bound:?}")));
        match finished {
            Ok(summary) => println!(
                "[seed {seed}] passed in {:.1} s: {summary}",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                println!("[seed {seed}] FAILED: {e:#}");
                failed.push((seed, format!("{e:#}")));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {runs} run(s) failed; replay one with SESAME_FAULT_SEED=<seed> \
         SESAME_FAULT_RUNS=1:\n{}",
        failed.len(),
        failed
            .iter()
            .map(|(seed, e)| format!("seed {seed}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?} is not a number: {e}")),
    )
}

/// The shape of one run's cluster, drawn from its seed.
#[derive(Debug)]
struct Shape {
    voters: u64,
    snapshot_every: u64,
}

impl Shape {
    fn of(seed: u64) -> Shape {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5ea5_0a7e);
        Shape {
            // Five voters let a minority of two be cut off; they cost more CPU, so fewer.
            voters: if rng.random_bool(0.25) { 5 } else { 3 },
            // Small values make nodes that fell behind catch up from snapshots.
            snapshot_every: [30, 200, 10_000][rng.random_range(0..3)],
        }
    }
}

/// One run: a fresh cluster, the safety phase, the liveness phase, the check. The cluster
/// is stopped whatever happens.
async fn run(seed: u64, safety: Duration) -> anyhow::Result<String> {
    let shape = Shape::of(seed);
    let plan = faults::plan(seed, shape.voters, safety);
    println!("[seed {seed}] {shape:?}, {} periods", plan.len());
    let faults = Arc::new(RandomFaults::new(seed));
    let mut options = ClusterOptions::default();
    options.tuning.snapshot_every = shape.snapshot_every;
    options.faults = Some(faults.clone());
    let started = Instant::now();
    let mut cluster = TestCluster::start(shape.voters, options)
        .await
        .context("start the cluster")?;
    let start_s = started.elapsed().as_secs_f64();
    let result = phases(seed, &mut cluster, &faults, plan).await;
    faults.heal();
    let stopping = Instant::now();
    let stopped = cluster.stop().await;
    let summary = result?;
    stopped.context("stop the cluster")?;
    Ok(format!(
        "{summary}; start {start_s:.1} s, stop {:.1} s",
        stopping.elapsed().as_secs_f64()
    ))
}

async fn phases(
    seed: u64,
    cluster: &mut TestCluster,
    faults: &Arc<RandomFaults>,
    plan: Vec<Period>,
) -> anyhow::Result<String> {
    let clock = Clock(Instant::now());
    let leader = cluster.wait_leader(LIVENESS).await?;
    cluster
        .admin(leader)
        .create_site(SITE)
        .await
        .context("create the site")?;
    let nodes: Vec<(u64, Http)> = cluster
        .running()
        .iter()
        .map(|id| (*id, cluster.admin(*id)))
        .collect();
    let history = History::default();

    // Safety: clients run while the plan plays out.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let client = Client {
            id: c,
            rng: ChaCha8Rng::seed_from_u64(seed.wrapping_add(1 + c as u64) ^ 0x00c1_1e47),
            nodes: nodes.clone(),
            history: history.clone(),
            clock,
            seq: 0,
        };
        clients.spawn(client.run(stop.clone()));
    }
    let safety = Instant::now();
    let played = play(seed, cluster, faults, &plan, clock).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(done) = clients.join_next().await {
        done.context("join a client")?;
    }
    played?;
    let safety_s = safety.elapsed().as_secs_f64();
    let liveness = Instant::now();

    // Liveness: no more faults, every node back.
    faults.heal();
    for id in cluster.members.keys().copied().collect::<Vec<_>>() {
        if !cluster.running().contains(&id) {
            println!("[seed {seed}] liveness: restart node {id}");
            cluster.restart_node(id).await?;
        }
    }
    let leader = cluster
        .wait_leader(LIVENESS)
        .await
        .context("liveness: agree on a leader")?;
    let deadline = Instant::now() + LIVENESS;
    let mut last = 0;
    for node in &nodes {
        let value = format!("live-{}", node.0);
        let index = write_until_acknowledged(node, &history, clock, &value, deadline)
            .await
            .with_context(|| format!("liveness: a write through node {}", node.0))?;
        last = last.max(index);
    }
    let finals = converge(&nodes, &history, clock, last, deadline).await?;
    let liveness_s = liveness.elapsed().as_secs_f64();

    // Every read saw a write that was not refused, and the final values with them.
    let records = history.take();
    let refused: BTreeSet<&str> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Refused)
        .filter_map(|r| r.value.as_deref())
        .collect();
    for (key, value) in &finals {
        if let Some(v) = value {
            anyhow::ensure!(
                !refused.contains(v.as_str()),
                "key {key} ended at {v:?}, a write the cluster said it refused (nothing written)"
            );
            anyhow::ensure!(
                records
                    .iter()
                    .any(|r| r.is_write && r.value.as_deref() == Some(v)),
                "key {key} ended at {v:?}, which no client wrote"
            );
        }
    }
    let ops: Vec<Op> = records.iter().filter_map(Record::op).collect();
    if let Err(violation) = linearizable::check(&ops) {
        let detail: Vec<String> = records
            .iter()
            .filter(|r| r.key == violation.key)
            .map(|r| r.to_string())
            .collect();
        anyhow::bail!(
            "not linearizable (seed {seed}): {violation}\nevery operation on that key:\n{}",
            detail.join("\n")
        );
    }
    // Which nodes took (or installed) a snapshot: with a small `snapshot_every`, a node that
    // fell behind the purged log catches up from one.
    let snapshots: BTreeMap<u64, u64> = cluster
        .running()
        .into_iter()
        .filter_map(|id| {
            let raft = cluster.node(id).node.raft.get();
            let snapshot = raft.metrics().borrow().snapshot.map(|l| l.index);
            Some((id, snapshot?))
        })
        .collect();
    Ok(format!(
        "{}; snapshots at {snapshots:?}; safety {safety_s:.1} s, liveness {liveness_s:.1} s",
        summarize(&records, leader)
    ))
}

/// Plays the plan: each period sets the weather (with "the leader" resolved to whoever
/// leads as it starts) and stops or restarts a node.
async fn play(
    seed: u64,
    cluster: &mut TestCluster,
    faults: &RandomFaults,
    plan: &[Period],
    clock: Clock,
) -> anyhow::Result<()> {
    let all: Vec<u64> = cluster.members.keys().copied().collect();
    let mut stopped: Option<u64> = None;
    for period in plan {
        let leader = current_leader(cluster);
        match period.crash {
            Crash::None => {}
            Crash::Stop(target) => {
                let id = match target {
                    Target::Leader => leader,
                    Target::Node(id) => Some(id),
                };
                if let Some(id) = id {
                    cluster
                        .stop_node(id)
                        .await
                        .with_context(|| format!("stop node {id}"))?;
                    stopped = Some(id);
                }
            }
            Crash::Restart => {
                if let Some(id) = stopped.take() {
                    cluster
                        .restart_node(id)
                        .await
                        .with_context(|| format!("restart node {id}"))?;
                }
            }
        }
        // "The leader" of the weather is whoever leads after the crash, if anyone does yet.
        let leader = current_leader(cluster);
        faults.set(period, &all, leader);
        println!(
            "[seed {seed}] {:>6} ms leader {leader:?} down {stopped:?}: {period}; cut {:?}",
            clock.now() / 1_000,
            faults.cut_links()
        );
        tokio::time::sleep(period.length).await;
    }
    Ok(())
}

/// The node that leads now, as the running nodes see it (the newest term's, if two think
/// they lead).
fn current_leader(cluster: &TestCluster) -> Option<u64> {
    cluster
        .running()
        .into_iter()
        .map(|id| cluster.node(id).node.raft.view())
        .filter(|v| v.is_leader())
        .max_by_key(|v| v.term)
        .map(|v| v.id)
}

/// Writes `value` to a key of its own through `node` until it is acknowledged; its index.
async fn write_until_acknowledged(
    (id, node): &(u64, Http),
    history: &History,
    clock: Clock,
    value: &str,
    deadline: Instant,
) -> anyhow::Result<u64> {
    loop {
        let req = put_request("live", value, None);
        let call = clock.now();
        let answer = tokio::time::timeout(op_timeout(), node.tx(SITE, &req)).await;
        let ret = clock.now();
        let (outcome, error) = classify_write(&answer);
        history.push(Record {
            key: "live".into(),
            client: usize::MAX,
            node: *id,
            what: "put".into(),
            call,
            ret,
            is_write: true,
            value: Some(value.into()),
            outcome,
            error: error.clone(),
        });
        if let Ok(Ok(r)) = answer {
            return Ok(r.index);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not acknowledged within {LIVENESS:?}: {error:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node has applied `last` and holds the same value of every key, then
/// reads each key linearizably (recorded in the history) and requires the same value. Late
/// writes from timed-out clients may still land, so a mismatch is retried until `deadline`.
async fn converge(
    nodes: &[(u64, Http)],
    history: &History,
    clock: Clock,
    last: u64,
    deadline: Instant,
) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut problem;
    loop {
        match stale_values(nodes, last).await {
            Err(e) => problem = e,
            Ok(agreed) => {
                let mut mismatch = None;
                for (i, (key, value)) in agreed.iter().enumerate() {
                    let (id, node) = &nodes[i % nodes.len()];
                    let call = clock.now();
                    let answer = tokio::time::timeout(
                        op_timeout(),
                        node.get_with(SITE, COLLECTION, key, "linearizable", None),
                    )
                    .await;
                    let ret = clock.now();
                    let seen = match answer {
                        Ok(read) => read_value(read),
                        Err(_) => None,
                    };
                    if let Some(seen) = &seen {
                        history.push(Record {
                            key: key.clone(),
                            client: usize::MAX,
                            node: *id,
                            what: "final linearizable read".into(),
                            call,
                            ret,
                            is_write: false,
                            value: seen.clone(),
                            outcome: Outcome::Acknowledged,
                            error: None,
                        });
                    }
                    if seen.as_ref() != Some(value) {
                        mismatch = Some(anyhow::anyhow!(
                            "key {key}: every node holds {value:?}, a linearizable read gave \
                             {seen:?}"
                        ));
                        break;
                    }
                }
                match mismatch {
                    None => return Ok(agreed),
                    Some(e) => problem = e,
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "liveness: the nodes did not converge within {LIVENESS:?}: {problem:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each key's value on every node, read at `stale` no older than `last`, if they all agree.
async fn stale_values(nodes: &[(u64, Http)], last: u64) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut agreed = BTreeMap::new();
    for k in 0..KEYS {
        let key = key_name(k);
        let mut seen = Vec::new();
        for (id, node) in nodes {
            let answer = node
                .get_with(SITE, COLLECTION, &key, "stale", Some(last))
                .await;
            let value = read_value(answer)
                .with_context(|| format!("node {id} gave no value of {key} at index {last}"))?;
            seen.push(value);
        }
        anyhow::ensure!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "the nodes disagree on {key} at index {last}: {seen:?}"
        );
        agreed.insert(key, seen.swap_remove(0));
    }
    Ok(agreed)
}

/// The value a read saw (`Some(None)`: absent), or `None` when the read failed.
fn read_value(answer: Result<sesame_proto::api::TupleBody, ClientError>) -> Option<Value> {
    match answer {
        Ok(t) => match t.value.to_json() {
            serde_json::Value::String(s) => Some(Some(s)),
            other => Some(Some(other.to_string())),
        },
        Err(ClientError::Api {
            status: 404, code, ..
        }) if code == "not_found" => Some(None),
        Err(_) => None,
    }
}

fn key_name(k: usize) -> String {
    format!("k{k}")
}

fn op_timeout() -> Duration {
    Duration::from_millis(OP_TIMEOUT_MS)
}

fn put_request(key: &str, value: &str, seq: Option<(String, u64)>) -> TxRequest {
    let (client_id, seq) = seq.map_or((None, None), |(c, s)| (Some(c), Some(s)));
    TxRequest {
        ops: vec![sesame_proto::Op::Put {
            collection: COLLECTION.into(),
            key: key.into(),
            value: sesame_proto::Value::from_json(json!(value)).expect("a string is a value"),
            if_version: None,
        }],
        client_id,
        seq,
    }
}

/// What became of a write, as its client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged: it took effect between its call and its return.
    Acknowledged,
    /// It may or may not take effect, at any time after its call.
    Unknown,
    /// The cluster said nothing was written.
    Refused,
    /// A read that failed: it saw nothing.
    Failed,
}

/// Sorts a write's answer: which outcome, and the error if any.
fn classify_write<T>(
    answer: &Result<Result<T, ClientError>, tokio::time::error::Elapsed>,
) -> (Outcome, Option<String>) {
    match answer {
        Ok(Ok(_)) => (Outcome::Acknowledged, None),
        Err(_) => (Outcome::Unknown, Some("client timeout".into())),
        Ok(Err(e)) => {
            let outcome = match e {
                ClientError::Api { code, .. } if code == "outcome_unknown" => Outcome::Unknown,
                // The node said so: `not_leader`, `unavailable` ("nothing was written"),
                // 4xx refusals.
                ClientError::Api { status, code, .. }
                    if code == "not_leader" || code == "unavailable" || *status < 500 =>
                {
                    Outcome::Refused
                }
                // The request never reached the node.
                ClientError::Transport(t) if t.is_connect() => Outcome::Refused,
                // Anything else (a broken connection, an internal error) might have written.
                _ => Outcome::Unknown,
            };
            (outcome, Some(e.to_string()))
        }
    }
}

/// A monotonic clock shared by every client: microseconds since the run started.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

/// One operation as a client saw it, with what the report needs.
#[derive(Debug, Clone)]
struct Record {
    key: String,
    client: usize,
    node: u64,
    what: String,
    call: u64,
    ret: u64,
    is_write: bool,
    /// What was written, or what was read (`None`: absent).
    value: Value,
    outcome: Outcome,
    error: Option<String>,
}

impl Record {
    /// The operation for the checker: refused writes did not happen; failed reads saw
    /// nothing.
    fn op(&self) -> Option<Op> {
        let ret = match self.outcome {
            Outcome::Acknowledged => Some(self.ret),
            Outcome::Unknown if self.is_write => None,
            Outcome::Unknown | Outcome::Refused | Outcome::Failed => return None,
        };
        let action = if self.is_write {
            Action::Write(self.value.clone())
        } else {
            Action::Read(self.value.clone())
        };
        Some(Op {
            key: self.key.clone(),
            call: self.call,
            ret,
            action,
        })
    }
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let client = if self.client == usize::MAX {
            "check".to_string()
        } else {
            format!("c{}", self.client)
        };
        write!(
            f,
            "  [{} .. {}] {client} via node {} {} {:?}: {:?}",
            self.call, self.ret, self.node, self.what, self.value, self.outcome
        )?;
        if let Some(e) = &self.error {
            write!(f, " ({e})")?;
        }
        Ok(())
    }
}

/// Every operation of a run, in the order they returned.
#[derive(Clone, Default)]
struct History(Arc<Mutex<Vec<Record>>>);

impl History {
    fn push(&self, record: Record) {
        self.0.lock().expect("history lock").push(record);
    }

    fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.0.lock().expect("history lock"))
    }
}

/// One client: each operation through a random node, on a random key.
struct Client {
    id: usize,
    rng: ChaCha8Rng,
    nodes: Vec<(u64, Http)>,
    history: History,
    clock: Clock,
    seq: u64,
}

impl Client {
    async fn run(mut self, stop: Arc<AtomicBool>) {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let node = self.nodes[self.rng.random_range(0..self.nodes.len())].clone();
            let key = key_name(self.rng.random_range(0..KEYS));
            let think = self.rng.random_range(0..=THINK_MS_MAX);
            let (reached, failed) = if self.rng.random_bool(0.5) {
                n += 1;
                let value = format!("c{}-{n}", self.id);
                let exactly_once = self.rng.random_bool(0.5);
                self.write(&node, &key, &value, exactly_once, &stop).await
            } else {
                let lease = self.rng.random_bool(0.2);
                self.read(&node, &key, lease).await
            };
            // A stopped node refuses at once: go to another without pausing.
            if reached {
                let pause = think + if failed { FAILED_PAUSE_MS } else { 0 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }

    /// A put of a unique value. With `exactly_once` it carries `(client_id, seq)` and is
    /// retried while its outcome is unknown: one write, from its first call to its last
    /// return.
    /// Whether the node was reached, and whether the write failed.
    async fn write(
        &mut self,
        (id, node): &(u64, Http),
        key: &str,
        value: &str,
        exactly_once: bool,
        stop: &AtomicBool,
    ) -> (bool, bool) {
        let seq = exactly_once.then(|| {
            self.seq += 1;
            (format!("client-{}", self.id), self.seq)
        });
        let req = put_request(key, value, seq);
        let call = self.clock.now();
        let attempts = if exactly_once { WRITE_ATTEMPTS_MAX } else { 1 };
        let mut outcome = Outcome::Unknown;
        let mut error = None;
        let mut written_maybe = false;
        let mut reached = true;
        for _ in 0..attempts {
            let answer = tokio::time::timeout(op_timeout(), node.tx(SITE, &req)).await;
            reached &= !unreachable(&answer);
            (outcome, error) = classify_write(&answer);
            if outcome == Outcome::Unknown {
                written_maybe = true;
            }
            if outcome == Outcome::Acknowledged || stop.load(Ordering::SeqCst) {
                break;
            }
        }
        // A retry refused after an attempt that may have written leaves it unknown.
        if outcome == Outcome::Refused && written_maybe {
            outcome = Outcome::Unknown;
        }
        self.history.push(Record {
            key: key.into(),
            client: self.id,
            node: *id,
            what: if exactly_once { "put (seq)" } else { "put" }.into(),
            call,
            ret: self.clock.now(),
            is_write: true,
            value: Some(value.into()),
            outcome,
            error,
        });
        (reached, outcome != Outcome::Acknowledged)
    }

    /// Whether the node was reached, and whether the read failed.
    async fn read(&mut self, (id, node): &(u64, Http), key: &str, lease: bool) -> (bool, bool) {
        let consistency = if lease { "lease" } else { "linearizable" };
        let call = self.clock.now();
        let answer = tokio::time::timeout(
            op_timeout(),
            node.get_with(SITE, COLLECTION, key, consistency, None),
        )
        .await;
        let ret = self.clock.now();
        let reached = !unreachable(&answer);
        let (seen, error) = match answer {
            Err(_) => (None, Some("client timeout".to_string())),
            Ok(answer) => {
                let error = answer.as_ref().err().map(|e| e.to_string());
                (read_value(answer), error)
            }
        };
        let (value, outcome) = match seen {
            Some(v) => (v, Outcome::Acknowledged),
            None => (None, Outcome::Failed),
        };
        self.history.push(Record {
            key: key.into(),
            client: self.id,
            node: *id,
            what: format!("{consistency} read"),
            call,
            ret,
            is_write: false,
            value,
            outcome,
            error,
        });
        (reached, outcome != Outcome::Acknowledged)
    }
}

/// Whether a request failed to connect (the node is stopped).
fn unreachable<T>(answer: &Result<Result<T, ClientError>, tokio::time::error::Elapsed>) -> bool {
    matches!(answer, Ok(Err(ClientError::Transport(e))) if e.is_connect())
}

/// Counts for the run's line in the log.
fn summarize(records: &[Record], leader: u64) -> String {
    let count = |write: bool, outcome: Outcome| {
        records
            .iter()
            .filter(|r| r.is_write == write && r.outcome == outcome)
            .count()
    };
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        if let Some(e) = &r.error {
            let code = e.split(':').take(2).collect::<Vec<_>>().join(":");
            *errors.entry(code).or_default() += 1;
        }
    }
    format!(
        "{} writes acknowledged, {} unknown, {} refused; {} reads, {} failed; final leader \
         {leader}; errors {errors:?}",
        count(true, Outcome::Acknowledged),
        count(true, Outcome::Unknown),
        count(true, Outcome::Refused),
        count(false, Outcome::Acknowledged),
        count(false, Outcome::Failed),
    )
}

/// The path by which a write could apply twice: a leader cut off from its peers appends a
/// write, a new leader is elected without it and truncates it from the old leader's log when
/// the cut heals. Raft answers the old leader's client "forward to the leader", as it does
/// for a write it turned away at once; taken for "nothing was written", the write used to be
/// retried on the new leader. With three voters the truncated entry is gone for good, but
/// with five a copy on another node can still be committed by a later leader, and the retry
/// would apply a second time. So the client must hear that the outcome is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_truncated_from_a_deposed_leader_is_not_reported_as_refused() {
    let partitions = Arc::new(sesame_node::peer::Partitions::new());
    let options = ClusterOptions {
        faults: Some(partitions.clone()),
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(3, options).await.unwrap();
    let old = cluster.wait_leader(LIVENESS).await.unwrap();
    cluster.admin(old).create_site(SITE).await.unwrap();
    let all = cluster.running();

    partitions.isolate(old, &all);
    let appended = cluster.node(old).node.raft.view().last_log_index + 1;
    let client = cluster.admin(old);
    let write =
        tokio::spawn(async move { client.tx(SITE, &put_request("x", "cut-off", None)).await });
    // The old leader appends the write but cannot commit it; the others elect a new leader.
    let deadline = Instant::now() + LIVENESS;
    while cluster.node(old).node.raft.view().last_log_index < appended {
        assert!(Instant::now() < deadline, "the old leader never appended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let others: Vec<u64> = all.iter().copied().filter(|id| *id != old).collect();
    while !others
        .iter()
        .any(|id| cluster.node(*id).node.raft.view().is_leader())
    {
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    partitions.heal();

    let answer = write.await.unwrap();
    assert!(
        matches!(&answer, Err(ClientError::Api { code, .. }) if code == "outcome_unknown"),
        "a write truncated from the old leader's log was answered {answer:?}"
    );
    // With three voters the truncated entry is gone: the write did not happen.
    let new = cluster.wait_leader(LIVENESS).await.unwrap();
    assert_ne!(new, old);
    let read = cluster
        .admin(old)
        .get_with(SITE, COLLECTION, "x", "linearizable", None)
        .await;
    assert_eq!(read_value(read), Some(None));
    cluster.stop().await.unwrap();
}

/// Found by the seeded test: a leader cut off from its followers still leads in its own
/// eyes, so a write to it waited for a commit that could not come, and stopping the node
/// (which lets in-flight requests finish) waited with it, for as long as the cut lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_gives_up_its_writes_and_stops() {
    let partitions = Arc::new(sesame_node::peer::Partitions::new());
    let options = ClusterOptions {
        faults: Some(partitions.clone()),
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start(3, options).await.unwrap();
    let leader = cluster.wait_leader(LIVENESS).await.unwrap();
    cluster.admin(leader).create_site(SITE).await.unwrap();
    partitions.isolate(leader, &cluster.running());
    let client = cluster.admin(leader);
    let write =
        tokio::spawn(async move { client.tx(SITE, &put_request("x", "cut-off", None)).await });
    let appended = cluster.node(leader).node.raft.view().last_log_index + 1;
    let deadline = Instant::now() + LIVENESS;
    while cluster.node(leader).node.raft.view().last_log_index < appended {
        assert!(Instant::now() < deadline, "the leader never appended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let bound = Duration::from_millis(sesame_node::write::COMMIT_WAIT_MS) + Duration::from_secs(5);
    tokio::time::timeout(bound, cluster.stop_node(leader))
        .await
        .unwrap_or_else(|_| panic!("the cut-off leader did not stop within {bound:?}"))
        .unwrap();
    let answer = write.await.unwrap();
    assert!(
        matches!(&answer, Err(ClientError::Api { code, .. }) if code == "outcome_unknown"),
        "a write the cut-off leader could not commit was answered {answer:?}"
    );
    partitions.heal();
    cluster.stop().await.unwrap();
}
