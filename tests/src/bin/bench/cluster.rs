//! Replicated writes: three `sesame node` processes on loopback (fsync on), side by side with
//! a three-member etcd 3.4 cluster under the same load generator (HTTP/1.1 keep-alive JSON
//! puts to each cluster's leader), with data on the same filesystem. Then batched tuples per
//! second, and failover: the leader is killed (SIGKILL) and a client writing through the
//! surviving nodes measures the time until a write is accepted again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use sesame_client::Http;
use sesame_proto::api::TxRequest;
use sesame_proto::{Op, Value};
use tokio::process::{Child, Command};

use crate::etcd::{self, Etcd};
use crate::report::{ms, percentile, Row};
use crate::tools;
use crate::Args;

const TOKEN: &str = "bench-admin-token-0123456789";
/// How long the cluster may take to elect a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Tuples per transaction in the batched run.
const BATCH_TUPLES: usize = 1_000;
/// Concurrent writers in the batched run.
const BATCH_WRITERS: usize = 4;

/// Three `sesame node` processes; killed on drop.
struct Cluster {
    dir: PathBuf,
    nodes: Vec<Option<Child>>,
    http: Vec<String>,
    raft: Vec<String>,
}

impl Cluster {
    async fn start(dir: &Path) -> anyhow::Result<Cluster> {
        let bin = sesame_tests::sesame_binary();
        let certs = dir.join("certs");
        tools::run(
            Command::new(&bin)
                .args(["cluster", "certs", "--nodes", "1,2,3", "--out"])
                .arg(&certs),
            Duration::from_secs(60),
        )
        .await?;
        let mut http = Vec::new();
        let mut raft = Vec::new();
        for _ in 0..3 {
            http.push(format!("127.0.0.1:{}", tools::free_port()?));
            let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
            raft.push(format!("127.0.0.1:{}", udp.local_addr()?.port()));
        }
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            nodes: (0..3).map(|_| None).collect(),
            http,
            raft,
        };
        for i in 0..3 {
            cluster.start_node(i)?;
        }
        Ok(cluster)
    }

    fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let id = i + 1;
        let initial: Vec<String> = self
            .raft
            .iter()
            .enumerate()
            .map(|(j, a)| format!("{}={a}", j + 1))
            .collect();
        let child = Command::new(sesame_tests::sesame_binary())
            .arg("node")
            .args(["--id", &id.to_string()])
            .arg("--data")
            .arg(self.dir.join(format!("node{id}")))
            .args(["--http", &self.http[i], "--raft", &self.raft[i]])
            .arg("--certs")
            .arg(self.dir.join("certs").join(id.to_string()))
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--admin-token", TOKEN, "--write-rate", "0"])
            .env("SESAME_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start sesame node")?;
        self.nodes[i] = Some(child);
        Ok(())
    }

    fn url(&self, i: usize) -> String {
        format!("http://{}", self.http[i])
    }

    fn client(&self, i: usize) -> Http {
        Http::new(&self.url(i), Some(TOKEN.into()))
    }

    /// The index (0-based) of the node every running node names as leader.
    async fn leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for i in 0..3 {
                if self.nodes[i].is_none() {
                    continue;
                }
                if let Ok(status) = self.client(i).cluster_status().await {
                    if let Some(l) = status.leader {
                        let l = l as usize - 1;
                        if self.nodes[l].is_some() {
                            return Ok(l);
                        }
                    }
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the cluster elected no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill().await;
        }
    }
}

fn put_op(key: &str, value: serde_json::Value) -> Op {
    Op::Put {
        collection: "t".into(),
        key: key.into(),
        value: Value::from_json(value).expect("a JSON value"),
        if_version: None,
    }
}

/// Sequential writes, one at a time: their latencies, sorted.
async fn sequential<F, Fut>(n: usize, mut write: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        write(i).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok(lat)
}

/// `writers` concurrent loops for `seconds`: writes per second.
async fn concurrent<F, Fut>(writers: usize, seconds: u64, write: F) -> anyhow::Result<f64>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let write = Arc::new(write);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (write, done) = (write.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                write(w, i).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("cluster-")
        .tempdir_in(base)?;
    let single = args.single_writes();
    let seconds = args.seconds();

    // etcd first, then stopped, so the two never share the CPU.
    eprintln!("   etcd: 3 members");
    let etcd = Etcd::start(&dir.path().join("etcd")).await?;
    let etcd_leader = etcd.leader_url().await?;
    let http = reqwest::Client::new();
    let e_lat = {
        let (http, url) = (http.clone(), etcd_leader.clone());
        sequential(single, move |i| {
            let (http, url) = (http.clone(), url.clone());
            async move { etcd::put(&http, &url, &format!("s{i}"), "{\"n\":1}").await }
        })
        .await?
    };
    let e_tps = {
        let (http, url) = (http.clone(), etcd_leader.clone());
        concurrent(args.writers, seconds, move |w, i| {
            let (http, url) = (http.clone(), url.clone());
            async move { etcd::put(&http, &url, &format!("w{w}-{i}"), "{\"n\":1}").await }
        })
        .await?
    };
    let etcd_version = etcd.version.clone();
    etcd.stop().await;

    eprintln!("   sesame: 3 nodes");
    let mut cluster = Cluster::start(&dir.path().join("sesame")).await?;
    let leader = cluster.leader().await?;
    let client = cluster.client(leader);
    client.create_site("bench").await?;
    let s_lat = {
        let client = client.clone();
        sequential(single, move |i| {
            let client = client.clone();
            async move {
                client
                    .put("bench", "t", &format!("s{i}"), json!({"n": 1}), None)
                    .await?;
                Ok(())
            }
        })
        .await?
    };
    let s_tps = {
        let client = client.clone();
        concurrent(args.writers, seconds, move |w, i| {
            let client = client.clone();
            async move {
                client
                    .put("bench", "t", &format!("w{w}-{i}"), json!({"n": 1}), None)
                    .await?;
                Ok(())
            }
        })
        .await?
    };
    let batched = {
        let client = client.clone();
        concurrent(BATCH_WRITERS, seconds, move |w, i| {
            let client = client.clone();
            async move {
                let ops = (0..BATCH_TUPLES)
                    .map(|k| put_op(&format!("b{w}-{i}-{k}"), json!(k)))
                    .collect();
                let req = TxRequest {
                    ops,
                    client_id: None,
                    seq: None,
                };
                client.tx("bench", &req).await?;
                Ok(())
            }
        })
        .await?
            * BATCH_TUPLES as f64
    };

    let fs = crate::fs::fs_type(dir.path())?;
    let source = format!(
        "{etcd_version}, 3 members on loopback, data on {fs} (Sesame's too), measured in this \
         run by the same load generator (one run)"
    );
    let (s50, s99) = (percentile(&s_lat, 50.0), percentile(&s_lat, 99.0));
    let (e50, e99) = (percentile(&e_lat, 50.0), percentile(&e_lat, 99.0));
    rows.push(Row::new(
        "durable write, 1 client, 3 voters, p50 / p99",
        format!("{} / {}", ms(s50), ms(s99)),
        format!("{source}: {} / {}", ms(e50), ms(e99)),
        format!(
            "{:.2}× etcd's p50 (lower is better)",
            s50.as_secs_f64() / e50.as_secs_f64()
        ),
    ));
    rows.push(Row::new(
        format!("durable writes, {} clients, 3 voters", args.writers),
        format!("{s_tps:.0} tx/s"),
        format!("{source}: {e_tps:.0} puts/s"),
        format!("{:.2}× etcd", s_tps / e_tps),
    ));
    rows.push(Row::new(
        format!(
            "batched tuples, {BATCH_WRITERS} writers × {BATCH_TUPLES}-tuple transactions, 3 voters"
        ),
        format!("{batched:.0} tuples/s"),
        "no peer",
        "target ≥ 300,000/s (SPEC)",
    ));

    // Failover: kill the leader, write through the others until a write is accepted.
    let mut times = Vec::new();
    for round in 0..3 {
        let leader = cluster.leader().await?;
        let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        cluster.kill(leader).await;
        let killed = Instant::now();
        let mut n = 0usize;
        loop {
            let c = cluster.client(others[n % 2]);
            n += 1;
            let req = TxRequest {
                ops: vec![put_op(&format!("failover{round}"), json!(round))],
                client_id: Some(format!("failover-{round}")),
                seq: Some(1),
            };
            if c.tx("bench", &req).await.is_ok() {
                break;
            }
            anyhow::ensure!(
                killed.elapsed() < READY_TIMEOUT,
                "no write accepted after the leader died"
            );
        }
        times.push(killed.elapsed());
        cluster.start_node(leader)?;
        // Let the restarted node catch up before the next round.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    times.sort();
    rows.push(Row::new(
        "leader killed (SIGKILL) → first write accepted, 3 rounds, best / median / worst",
        format!("{} / {} / {}", ms(times[0]), ms(times[1]), ms(times[2])),
        "no peer",
        "target ≤ 1 s (SPEC)",
    ));
    for i in 0..3 {
        cluster.kill(i).await;
    }
    Ok(())
}
