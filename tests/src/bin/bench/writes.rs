//! Durable writes: one client writing one transaction at a time (latency), many clients at
//! once (throughput, which group commit earns by sharing fsyncs), and the disk's own fsync
//! latency in the same folder as the physical floor both are compared with.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::report::{ms, percentile, Row};
use crate::Args;

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

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("writes-")
        .tempdir_in(base)?;
    let fsyncs = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        let count = args.fsyncs();
        move || fsync_latencies(&dir, count)
    })
    .await??;
    let fsync_p50 = percentile(&fsyncs, 50.0);
    let fs = crate::fs::fs_type(dir.path())?;
    rows.push(Row::new(
        format!("{fs} fsync (4 KiB append + fdatasync, same folder as the node's data), p50 / p99"),
        format!("{} / {}", ms(fsync_p50), ms(percentile(&fsyncs, 99.0))),
        "—",
        "—",
    ));

    let node = crate::site::start_node(&dir.path().join("node"), None).await?;
    let admin = node.admin();
    admin.create_site("bench").await?;

    // One client, one write at a time: each is acknowledged only once durable.
    let single = args.single_writes();
    let mut lat = Vec::with_capacity(single);
    for i in 0..single {
        let t = Instant::now();
        admin
            .put("bench", "single", &format!("k{i}"), json!({ "n": i }), None)
            .await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let p50 = percentile(&lat, 50.0);
    rows.push(Row::new(
        "durable write, 1 client, 1 voter, p50 / p99",
        format!("{} / {}", ms(p50), ms(percentile(&lat, 99.0))),
        format!("fsync p50 {} (measured above, same run)", ms(fsync_p50)),
        format!("{:.2}× fsync", p50.as_secs_f64() / fsync_p50.as_secs_f64()),
    ));

    // Many writers at once: throughput comes from batching many entries per fsync.
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds());
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
    rows.push(Row::new(
        format!("durable writes, {} clients, 1 voter", args.writers),
        format!("{tps:.0} tx/s"),
        format!("one fsync per tx (from the fsync p50 above): {floor_tps:.0} tx/s"),
        format!("{:.1}× fsync-per-tx", tps / floor_tps),
    ));

    node.stop().await?;
    Ok(())
}
