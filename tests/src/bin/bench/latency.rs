//! Commit → new page served: how long after an editor sends a single-profile edit the
//! edited page is served with the new content, on sites of growing size.
//!
//! Each edit rewrites one random profile's bio with a unique marker, then asks for that
//! profile's page with `Sesame-Min-Index: <the write's index>` (which holds the request
//! until the projection reflects the write) and checks the body has the marker. The time is
//! from sending the write to having the whole page. Edits are sequential with an idle gap
//! (`--edit-gap-ms`), so each one finds the projector idle, as a lone editor would; a few
//! warm-up edits are not counted. Each size runs on a node of its own.
//!
//! A second row per size splits the median: the write's acknowledgement, the node's own
//! render + publish time for that edit (`last_publish_ms`, whole milliseconds), and the rest
//! (the projector's debounce, reading the change feed, the page request).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::report::{count, dur, percentile, Row};
use crate::site::{self, Rng, SITE};
use crate::Args;

/// Edits made before measuring, to warm connections and caches.
const WARMUP_EDITS: usize = 5;
/// Longest one page request may take (the node itself gives up waiting after 2 s).
const PAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the edits on one site measured, each sorted.
struct Edits {
    total: Vec<Duration>,
    ack: Vec<Duration>,
    publish: Vec<Duration>,
    rest: Vec<Duration>,
    failed: usize,
    first_failure: Option<String>,
}

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let mut reference: Option<(usize, Duration, Duration)> = None;
    for asked in args.latency_sizes() {
        // The bench nodes' page limit fits sizes up to 1,000,000 (a run of minutes).
        let n = asked.min(site::PROFILES_MAX);
        if n < asked {
            eprintln!("   {asked} profiles pass the page limit; measuring {n}");
        }
        let e = measure(args, base, n).await?;
        let (p50, p99) = (percentile(&e.total, 50.0), percentile(&e.total, 99.0));
        let mut value = format!("{} / {}", dur(p50), dur(p99));
        if e.failed > 0 {
            value.push_str(&format!(
                " ({} edits not served in time or stale: {})",
                e.failed,
                e.first_failure.as_deref().unwrap_or("?")
            ));
        }
        let ratio = match reference {
            None => "(reference size)".to_string(),
            Some((m, r50, r99)) => format!(
                "p50 {:.2}×, p99 {:.2}× the {}-profile site",
                p50.as_secs_f64() / r50.as_secs_f64(),
                p99.as_secs_f64() / r99.as_secs_f64(),
                count(m)
            ),
        };
        reference.get_or_insert((n, p50, p99));
        rows.push(Row::new(
            format!(
                "commit → new page served, {} profiles ({} pages), p50 / p99 over {} edits",
                count(n),
                count(n + 1),
                e.total.len()
            ),
            value,
            "no peer; SPEC target at every size: p50 ≤ 10 ms, p99 ≤ 50 ms",
            ratio,
        ));
        rows.push(Row::new(
            format!(
                "↳ {} profiles, p50 of: write acknowledged / node render + publish (`last_publish_ms`) / rest (debounce, change feed, page request)",
                count(n)
            ),
            format!(
                "{} / {} / {}",
                dur(percentile(&e.ack, 50.0)),
                dur(percentile(&e.publish, 50.0)),
                dur(percentile(&e.rest, 50.0))
            ),
            "—",
            "—",
        ));
    }
    Ok(())
}

async fn measure(args: &Args, base: &Path, n: usize) -> anyhow::Result<Edits> {
    anyhow::ensure!(n > 0, "a latency site needs at least one profile");
    let dir = tempfile::Builder::new()
        .prefix("latency-")
        .tempdir_in(base)?;
    let node = site::start_node(dir.path(), args.debounce()).await?;
    let result = edits(args, &node, n).await;
    node.stop().await?;
    result
}

async fn edits(args: &Args, node: &sesame_tests::TestNode, n: usize) -> anyhow::Result<Edits> {
    let admin = node.admin();
    site::create(&admin, n).await?;
    let pages = reqwest::Client::builder().timeout(PAGE_TIMEOUT).build()?;
    let mut rng = Rng::new(0x5e5a_3e00 ^ n as u64);
    let gap = Duration::from_millis(args.edit_gap_ms);
    let mut out = Edits {
        total: Vec::new(),
        ack: Vec::new(),
        publish: Vec::new(),
        rest: Vec::new(),
        failed: 0,
        first_failure: None,
    };
    for i in 0..WARMUP_EDITS + args.edits() {
        tokio::time::sleep(gap).await;
        let k = rng.below(n);
        let key = site::profile_key(k);
        let marker = format!("edit-{i}-{:016x}", rng.next_u64());
        let mut value = site::profile(k);
        value["bio"] = serde_json::Value::String(marker.clone());

        let started = Instant::now();
        let index = site::put_profile(&admin, &key, value).await?;
        let ack = started.elapsed();
        let got = pages
            .get(format!("{}/{SITE}/{key}", admin.base()))
            .header("Sesame-Min-Index", index.to_string())
            .send()
            .await;
        let page = match got {
            Ok(resp) => {
                let status = resp.status();
                resp.text().await.map(|body| (status, body))
            }
            Err(e) => Err(e),
        };
        let total = started.elapsed();
        let problem = match &page {
            Err(e) => Some(format!("request failed: {e}")),
            Ok((status, _)) if !status.is_success() => Some(format!("status {status}")),
            Ok((_, body)) if !body.contains(&marker) => Some("page without the edit".into()),
            Ok(_) => None,
        };
        if i < WARMUP_EDITS {
            continue;
        }
        if let Some(p) = problem {
            out.failed += 1;
            out.first_failure.get_or_insert(p);
            continue;
        }
        // The edit's round was the last to publish: later rounds (woken by the root's own
        // commit) find nothing to change.
        let publish = Duration::from_millis(admin.status(SITE).await?.last_publish_ms.unwrap_or(0));
        out.total.push(total);
        out.ack.push(ack);
        out.publish.push(publish);
        out.rest
            .push(total.saturating_sub(ack).saturating_sub(publish));
    }
    anyhow::ensure!(
        !out.total.is_empty(),
        "no edit of the {n}-profile site was served: {}",
        out.first_failure.as_deref().unwrap_or("?")
    );
    // The slowest edits, whole (the sorted columns below no longer line up).
    let mut order: Vec<usize> = (0..out.total.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(out.total[i]));
    let slowest: Vec<String> = order
        .iter()
        .take(3)
        .map(|&i| {
            format!(
                "{:.1?} (ack {:.1?}, publish {:.0?})",
                out.total[i], out.ack[i], out.publish[i]
            )
        })
        .collect();
    for v in [
        &mut out.total,
        &mut out.ack,
        &mut out.publish,
        &mut out.rest,
    ] {
        v.sort();
    }
    eprintln!(
        "   {n} profiles: p50 {:.1?}, p99 {:.1?}, {} failed; slowest: {}",
        percentile(&out.total, 50.0),
        percentile(&out.total, 99.0),
        out.failed,
        slowest.join(", ")
    );
    Ok(out)
}
