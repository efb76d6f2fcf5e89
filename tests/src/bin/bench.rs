//! The benchmark harness: runs workloads against a real node in this process and prints a
//! markdown table. Absolute numbers are noisy; each figure is shown next to a peer measured
//! in the same run (here the disk's own fsync latency, the floor for a durable write).
//!
//! `cargo run --release -p sesame-tests --bin sesame-bench -- --help`

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde_json::json;
use sesame_tests::TestNode;

#[derive(Debug, Parser)]
#[command(about = "Sesame benchmark harness: prints a markdown table")]
struct Args {
    /// Sequential durable writes by one client.
    #[arg(long, default_value_t = 2_000)]
    single_writes: usize,
    /// Concurrent writers for the throughput run.
    #[arg(long, default_value_t = 64)]
    writers: usize,
    /// Length of the throughput run, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// fsyncs for the disk floor.
    #[arg(long, default_value_t = 2_000)]
    fsyncs: usize,
    /// Where to put the node's data (default: a temporary folder under the current one,
    /// so it is on the same disk as the fsync probe).
    #[arg(long)]
    dir: Option<PathBuf>,
}

struct Row {
    what: String,
    value: String,
    peer: String,
    ratio: String,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty(), "percentile of nothing");
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// The disk's floor: latency of a 4 KiB append plus fdatasync in the same folder.
fn fsync_latencies(dir: &Path, count: usize) -> anyhow::Result<Vec<Duration>> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let block = [7u8; 4096];
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        out.push(t.elapsed());
    }
    std::fs::remove_file(&path)?;
    out.sort();
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?,
    };
    let tmp = tempfile::Builder::new()
        .prefix("sesame-bench-")
        .tempdir_in(&base)
        .context("make bench dir")?;
    let mut rows = Vec::new();

    let fsyncs = fsync_latencies(tmp.path(), args.fsyncs)?;
    let fsync_p50 = percentile(&fsyncs, 50.0);
    rows.push(Row {
        what: "disk fsync (4 KiB append + fdatasync), p50 / p99".into(),
        value: format!("{} / {}", ms(fsync_p50), ms(percentile(&fsyncs, 99.0))),
        peer: "—".into(),
        ratio: "—".into(),
    });

    let data = tmp.path().join("node");
    let node = TestNode::start_in(&data).await?;
    let admin = node.admin();
    admin.create_site("bench").await?;

    // One client, one write at a time: each is acknowledged only once durable.
    let mut lat = Vec::with_capacity(args.single_writes);
    for i in 0..args.single_writes {
        let t = Instant::now();
        admin
            .put("bench", "single", &format!("k{i}"), json!({ "n": i }), None)
            .await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let p50 = percentile(&lat, 50.0);
    rows.push(Row {
        what: "durable write, 1 client, 1 voter, p50 / p99".into(),
        value: format!("{} / {}", ms(p50), ms(percentile(&lat, 99.0))),
        peer: format!("fsync p50 {}", ms(fsync_p50)),
        ratio: format!("{:.2}× fsync", p50.as_secs_f64() / fsync_p50.as_secs_f64()),
    });

    // Many writers at once: throughput comes from batching many entries per fsync.
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let client = admin.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                client
                    .put("bench", "many", &format!("w{w}-{i}"), json!(i), None)
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tps = done.load(Ordering::Relaxed) as f64 / elapsed;
    let floor_tps = 1.0 / fsync_p50.as_secs_f64();
    rows.push(Row {
        what: format!("durable writes, {} clients, 1 voter", args.writers),
        value: format!("{tps:.0} tx/s"),
        peer: format!("one fsync per tx: {floor_tps:.0} tx/s"),
        ratio: format!("{:.1}× fsync-per-tx", tps / floor_tps),
    });

    node.stop().await?;

    println!("| what | Sesame | peer (same run) | ratio |");
    println!("| --- | --- | --- | --- |");
    for r in rows {
        println!("| {} | {} | {} | {} |", r.what, r.value, r.peer, r.ratio);
    }
    Ok(())
}
