//! Live pages: commit → DOM updated in headless Chromium, data-channel set-up time, and the
//! node's memory per open data channel. The node is a `sesame dev` process of its own (so
//! its memory is its own); visitors come from many loopback addresses (the node holds at
//! most 8 channels per address).

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use sesame_tests::browser::{wait_for, Driver};
use sesame_tests::process::NodeProcess;
use sesame_tests::rtc::RtcClient;

use crate::report::{ms, percentile, Row};
use crate::Args;

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("live-").tempdir_in(base)?;
    let port = sesame_tests::cluster::free_tcp_port()?;
    let http: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let token = "bench-admin-token-0123456789";
    let node_args: Vec<OsString> = [
        "dev",
        "--data",
        &dir.path().join("data").display().to_string(),
        "--http",
        &http.to_string(),
        "--admin-token",
        token,
        "--write-rate",
        "100000",
        "--write-burst",
        "100000",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let mut node = NodeProcess::new(
        "live node",
        &sesame_tests::sesame_binary(),
        node_args,
        vec![],
        http,
        dir.path().join("node.log"),
    );
    node.start().await?;
    let url = node.url();
    let admin = sesame_client::Http::new(&url, Some(token.to_string()));
    // The demo is published.
    let status = admin.status("demo").await?;
    reqwest::get(format!("{url}/demo/alice?_min={}", status.committed_index)).await?;
    let pid = node
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the node is not running"))?;

    // Memory: the node's resident set before and with the channels open.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid)?;
    let channels = args.live_channels();
    let mut open = Vec::with_capacity(channels);
    for i in 0..channels {
        let ip = format!("127.0.2.{}", 1 + i / 8).parse()?;
        let mut c = RtcClient::connect_from(&url, "demo", None, ip).await?;
        c.hello(&format!("m{i}")).await?;
        open.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with = rss_kib(pid)?;
    for c in open {
        c.close().await;
    }
    let per = (with.saturating_sub(before)) as f64 / channels as f64;
    rows.push(Row::new(
        format!("node memory per open data channel ({channels} channels)"),
        format!("{per:.0} KiB (RSS {before} → {with} KiB)"),
        "—",
        "—",
    ));

    // Set-up in Chromium: live.js's offer → the node's welcome, over fresh page loads.
    let driver = Driver::start().await?;
    let b = driver.session(true).await?;
    let n = args.live_setups();
    let mut setups = Vec::with_capacity(n);
    for _ in 0..n {
        b.goto(&format!("{url}/demo/alice")).await?;
        let ms = wait_for(Duration::from_secs(20), "live.js connects", || async {
            let v = b
                .execute(
                    "return window.sesameLive && window.sesameLive.setupMs()",
                    vec![],
                )
                .await?;
            Ok(v.as_f64())
        })
        .await?;
        setups.push(Duration::from_secs_f64(ms / 1000.0));
    }
    setups.sort();
    // The peer: an app client's QUIC session, to its welcome.
    let mut quic = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let c = sesame_client::Client::connect(sesame_client::Options::new([url.as_str()], token))
            .await?;
        quic.push(t.elapsed());
        drop(c);
    }
    quic.sort();
    let p50 = percentile(&setups, 50.0);
    let q50 = percentile(&quic, 50.0);
    rows.push(Row::new(
        format!("data channel set-up in Chromium (offer → welcome), p50 / p99 ({n} page loads)"),
        format!("{} / {}", ms(p50), ms(percentile(&setups, 99.0))),
        format!(
            "QUIC client session: {} / {}",
            ms(q50),
            ms(percentile(&quic, 99.0))
        ),
        format!("{:.1}× QUIC", p50.as_secs_f64() / q50.as_secs_f64()),
    ));

    // Commit → DOM updated, in Chromium.
    // The page notes when the name island shows each value.
    b.execute(
        "window.__seen = {}; var h = document.querySelector('h1'); \
         new MutationObserver(function () { window.__seen[h.textContent] = \
           performance.timeOrigin + performance.now(); }) \
           .observe(h, {childList: true, characterData: true, subtree: true});",
        vec![],
    )
    .await?;
    let edits = args.live_edits();
    let mut lat = Vec::with_capacity(edits);
    let mut acks = Vec::with_capacity(edits);
    let profile = admin
        .get("demo", "profiles", "alice")
        .await?
        .value
        .to_json();
    for i in 0..edits {
        let name = format!("Alice {i}");
        let mut value = profile.clone();
        value["name"] = name.clone().into();
        let t0 = epoch_ms();
        let started = Instant::now();
        admin.put("demo", "profiles", "alice", value, None).await?;
        acks.push(started.elapsed());
        let seen = wait_for(Duration::from_secs(10), "the DOM updates", || {
            let b = &b;
            let name = name.clone();
            async move {
                let v = b
                    .execute(
                        "return window.__seen[arguments[0]] || null",
                        vec![name.into()],
                    )
                    .await?;
                Ok(v.as_f64())
            }
        })
        .await?;
        lat.push(Duration::from_secs_f64(((seen - t0) / 1000.0).max(0.0)));
    }
    lat.sort();
    acks.sort();
    let p50 = percentile(&lat, 50.0);
    let a50 = percentile(&acks, 50.0);
    rows.push(Row::new(
        format!("commit → DOM updated in Chromium, p50 / p99 ({edits} edits)"),
        format!("{} / {}", ms(p50), ms(percentile(&lat, 99.0))),
        format!(
            "the write's HTTP ack: {} / {}",
            ms(a50),
            ms(percentile(&acks, 99.0))
        ),
        format!("{:.2}× the ack", p50.as_secs_f64() / a50.as_secs_f64()),
    ));
    b.close().await?;
    node.kill()?;
    Ok(())
}
