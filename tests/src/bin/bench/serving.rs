//! Serving pages under load: `wrk` (keep-alive, `--wrk-threads`, `--wrk-connections`,
//! `--wrk-seconds`) against a node in this process, then against nginx serving the same bytes
//! from files on the same filesystem (the bench folder: disk, or tmpfs with `--tmpfs`), and
//! the ratio of their requests per second. Two workloads: one profile page again and again,
//! and `--serving-pages` distinct profile pages, each request a random one (a wrk Lua script
//! picks the path), so neither side is measured on one hot file only.
//!
//! An edge server (`sesame edge --objects file://<the node's objects> --http 127.0.0.1:<port>`,
//! the built `sesame` binary as its own process, as nginx is) serves the same published site
//! after the node has stopped, and is measured with the same runs: node, edge and nginx each
//! have the machine to themselves while measured.
//!
//! nginx is started here with a minimal configuration in a temporary folder (`daemon off`,
//! `access_log off`, its pid file and temporary paths in that folder, listening on a free
//! 127.0.0.1 port) and stopped here, also when the run fails. Each wrk run follows a
//! one-second warm-up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use tokio::process::{Child, Command};

use crate::fs::set_mode;
use crate::report::{count, Row};
use crate::site::{self, SITE};
use crate::tools;
use crate::Args;

/// Longest nginx may take to start listening, or to stop.
const NGINX_WAIT: Duration = Duration::from_secs(10);
/// Extra time a wrk run may take past its own duration.
const WRK_GRACE: Duration = Duration::from_secs(30);
/// Page requests in flight while copying the node's pages for nginx.
const COPY_CONCURRENCY: usize = 16;
/// Longest an edge may take to start serving the site, or to stop.
const EDGE_WAIT: Duration = Duration::from_secs(30);
/// The profile whose page the one-page run asks for.
const ONE_PAGE: usize = 42;

/// What a server measured: the one-page run and the random-pages run.
struct Rates {
    one: Rate,
    random: Rate,
}

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let wrk = tools::ensure("wrk", "wrk").await?;
    let n = args.serving_pages().max(ONE_PAGE + 1);
    let key = site::profile_key(ONE_PAGE);

    let dir = tempfile::Builder::new()
        .prefix("serving-")
        .tempdir_in(base)?;
    let node = site::start_node(dir.path(), args.debounce()).await?;
    let measured = async {
        site::create(&node.admin(), n).await?;
        let base_url = node.node.url();
        let pages = copy_pages(&base_url, n).await?;
        let one = wrk_run(&wrk, &format!("{base_url}/{SITE}/{key}"), None, args).await?;
        let random = random_pages(&wrk, &base_url, n, base, args).await?;
        anyhow::Ok((pages, Rates { one, random }))
    }
    .await;
    node.stop().await?;
    let (pages, sesame) = measured?;
    eprintln!(
        "   sesame: one page {:.0} req/s, {n} random pages {:.0} req/s",
        sesame.one.rps, sesame.random.rps
    );

    let objects = dir.path().join(sesame_node::app::OBJECTS_DIR);
    let edge = edge_run(&wrk, &objects, &pages, base, args).await;
    match &edge {
        Ok(r) => eprintln!(
            "   sesame edge: one page {:.0} req/s, {n} random pages {:.0} req/s",
            r.one.rps, r.random.rps
        ),
        Err(e) => eprintln!("   sesame edge: {e:#}"),
    }

    let nginx = nginx_run(&wrk, &pages, base, args).await;
    if let Ok((version, r)) = &nginx {
        eprintln!(
            "   {version}: one page {:.0} req/s, {n} random pages {:.0} req/s",
            r.one.rps, r.random.rps
        );
    }

    let one_bytes = pages
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, b)| b.len())
        .unwrap_or(0);
    let total_bytes: usize = pages.iter().map(|(_, b)| b.len()).sum();
    let wrk_flags = format!(
        "`wrk -t{} -c{} -d{}s`",
        args.wrk_threads,
        args.wrk_connections,
        args.wrk_seconds()
    );
    let fs = crate::fs::fs_type(base).unwrap_or_else(|_| "?".into());
    // The node and the edge in one cell each, so the table keeps its columns.
    let row = |what: String, ours: &Rate, edge: Result<&Rate, String>, theirs: Option<&Rate>| {
        let value = match &edge {
            Ok(e) => format!("node {}; edge {}", ours.describe(), e.describe()),
            Err(why) => format!("node {}; edge failed: {why}", ours.describe()),
        };
        let (peer, ratio) = match (&nginx, theirs) {
            (Ok((version, _)), Some(r)) => (
                format!("{version}, same bytes from files on {fs}: {}", r.describe()),
                match &edge {
                    Ok(e) => format!(
                        "node {:.2}×, edge {:.2}× nginx (target ≥ 1.0×)",
                        ours.rps / r.rps,
                        e.rps / r.rps
                    ),
                    Err(_) => format!("node {:.2}× nginx (target ≥ 1.0×)", ours.rps / r.rps),
                },
            ),
            (Err(e), _) => (format!("nginx unavailable: {e:#}"), "—".into()),
            _ => ("—".into(), "—".into()),
        };
        Row::new(what, value, peer, ratio)
    };
    let theirs = nginx.as_ref().ok().map(|(_, r)| r);
    let edge_rate = |pick: fn(&Rates) -> &Rate| match &edge {
        Ok(r) => Ok(pick(r)),
        Err(e) => Err(format!("{e:#}")),
    };
    rows.push(row(
        format!(
            "serving one page ({} bytes), keep-alive, {wrk_flags}",
            count(one_bytes)
        ),
        &sesame.one,
        edge_rate(|r| &r.one),
        theirs.map(|r| &r.one),
    ));
    rows.push(row(
        format!(
            "serving {} distinct pages at random ({} bytes in all; a wrk Lua script picks each \
             request's path), keep-alive, {wrk_flags}",
            count(n),
            count(total_bytes)
        ),
        &sesame.random,
        edge_rate(|r| &r.random),
        theirs.map(|r| &r.random),
    ));
    Ok(())
}

/// Starts `sesame edge` over the node's object folder `objects`, checks that it serves the
/// bytes the node served, measures both workloads, and stops it (also when a step fails).
async fn edge_run(
    wrk: &Path,
    objects: &Path,
    pages: &[(String, Vec<u8>)],
    base: &Path,
    args: &Args,
) -> anyhow::Result<Rates> {
    anyhow::ensure!(
        objects.is_dir(),
        "the node's object folder {} is missing",
        objects.display()
    );
    let mut edge = EdgeProcess::start(objects, base).await?;
    let measured = check_and_measure("the edge", edge.port, wrk, pages, base, args).await;
    edge.stop().await?;
    measured
}

/// Checks that the server `who` on `port` serves the node's bytes for the one page, then
/// measures both workloads against it.
async fn check_and_measure(
    who: &str,
    port: u16,
    wrk: &Path,
    pages: &[(String, Vec<u8>)],
    base: &Path,
    args: &Args,
) -> anyhow::Result<Rates> {
    let base_url = format!("http://127.0.0.1:{port}");
    let key = site::profile_key(ONE_PAGE);
    let url = format!("{base_url}/{SITE}/{key}");
    let served = reqwest::get(&url)
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let ours = pages
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, b)| b.as_slice());
    anyhow::ensure!(
        ours == Some(&served[..]),
        "{who} serves other bytes than the node"
    );
    let one = wrk_run(wrk, &url, None, args).await?;
    let random = random_pages(wrk, &base_url, pages.len(), base, args).await?;
    Ok(Rates { one, random })
}

/// Sends `signal` (`-INT`, `-TERM`) to `child` and waits for it to end; kills it past `wait`.
async fn stop_child(
    child: &mut Child,
    signal: &str,
    wait: Duration,
    name: &str,
) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(wait, child.wait()).await {
        Ok(status) => {
            status.with_context(|| format!("wait for {name}"))?;
            Ok(())
        }
        Err(_) => {
            child.kill().await.with_context(|| format!("kill {name}"))?;
            anyhow::bail!("{name} did not stop within {wait:?}; killed it")
        }
    }
}

/// A `sesame edge` process started here; killed on drop if not stopped.
struct EdgeProcess {
    child: Child,
    port: u16,
    stopped: bool,
    /// Holds its log; removed on drop.
    dir: tempfile::TempDir,
}

impl EdgeProcess {
    async fn start(objects: &Path, base: &Path) -> anyhow::Result<EdgeProcess> {
        let dir = tempfile::Builder::new().prefix("edge-").tempdir_in(base)?;
        let log = std::fs::File::create(dir.path().join("edge.log"))?;
        let port = tools::free_port()?;
        let child = Command::new(sesame_tests::sesame_binary())
            .arg("edge")
            .arg("--objects")
            .arg(format!("file://{}", objects.display()))
            .arg("--http")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("start sesame edge")?;
        let mut edge = EdgeProcess {
            child,
            port,
            stopped: false,
            dir,
        };
        // It reads every root before it listens: once it answers, the site is installed.
        let deadline = Instant::now() + EDGE_WAIT;
        let health = format!("http://127.0.0.1:{port}/healthz");
        loop {
            if reqwest::get(&health)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(edge);
            }
            if let Some(status) = edge.child.try_wait()? {
                edge.stopped = true;
                anyhow::bail!("sesame edge exited with {status}: {}", edge.log_tail());
            }
            if Instant::now() > deadline {
                edge.stop().await?;
                anyhow::bail!("sesame edge did not answer within {EDGE_WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("edge.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Asks it to stop (SIGINT, as Ctrl-C) and waits; kills it past [`EDGE_WAIT`].
    async fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        stop_child(&mut self.child, "-INT", EDGE_WAIT, "sesame edge").await
    }
}

/// Every profile page the node serves, as `(key, body)`: what nginx is given to serve.
async fn copy_pages(base_url: &str, n: usize) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let client = reqwest::Client::new();
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let key = site::profile_key(i);
            let url = format!("{base_url}/{SITE}/{key}");
            async move {
                let body = client
                    .get(&url)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?
                    .to_vec();
                anyhow::Ok((key, body))
            }
        })
        .buffered(COPY_CONCURRENCY)
        .try_collect()
        .await
}

/// Requests per second for `n` distinct profile pages under `base_url` (`http://host:port`,
/// the site at `/<SITE>/`), each request a random one. Any server that serves the bench
/// site's paths can be measured with it: the node, nginx, an edge server.
async fn random_pages(
    wrk: &Path,
    base_url: &str,
    n: usize,
    scratch: &Path,
    args: &Args,
) -> anyhow::Result<Rate> {
    let script = tempfile::Builder::new()
        .prefix("random-pages-")
        .suffix(".lua")
        .tempfile_in(scratch)?;
    std::fs::write(script.path(), random_pages_lua(n))?;
    wrk_run(wrk, base_url, Some(script.path()), args).await
}

/// A wrk script whose every request asks for one of the `n` profile pages at random (seeded
/// per thread, so the threads do not walk the same sequence).
fn random_pages_lua(n: usize) -> String {
    format!(
        r#"local n = {n}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end
function init(args)
  math.randomseed(os.time() * 1000 + (seed or 0))
end
function request()
  return wrk.format("GET", string.format("/{SITE}/p%06d", math.random(0, n - 1)))
end
"#
    )
}

/// What one wrk run reported.
struct Rate {
    rps: f64,
    /// wrk's "Non-2xx or 3xx responses" and "Socket errors" lines, if it printed any.
    errors: Option<String>,
}

impl Rate {
    fn describe(&self) -> String {
        match &self.errors {
            Some(e) => format!("{:.0} req/s ({e})", self.rps),
            None => format!("{:.0} req/s", self.rps),
        }
    }
}

/// A one-second warm-up, then the measured run; with `script`, wrk runs that Lua script.
async fn wrk_run(
    wrk: &Path,
    url: &str,
    script: Option<&Path>,
    args: &Args,
) -> anyhow::Result<Rate> {
    let run = |seconds: u64| {
        let mut cmd = Command::new(wrk);
        cmd.arg(format!("-t{}", args.wrk_threads))
            .arg(format!("-c{}", args.wrk_connections))
            .arg(format!("-d{seconds}s"));
        if let Some(s) = script {
            cmd.arg("-s").arg(s);
        }
        cmd.arg(url);
        (cmd, Duration::from_secs(seconds) + WRK_GRACE)
    };
    let (mut warm, limit) = run(1);
    tools::run(&mut warm, limit).await?;
    let (mut cmd, limit) = run(args.wrk_seconds());
    let out = tools::run(&mut cmd, limit).await?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk(text: &str) -> anyhow::Result<Rate> {
    let mut rps = None;
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if line.starts_with("Non-2xx or 3xx responses:")
            || line.starts_with("Socket errors:")
        {
            errors.push(line.to_string());
        }
    }
    Ok(Rate {
        rps: rps.with_context(|| format!("no Requests/sec in wrk's output: {text}"))?,
        errors: (!errors.is_empty()).then(|| errors.join("; ")),
    })
}

/// Serves `pages` at `/<SITE>/<key>` with nginx from files under `base` and measures both
/// workloads; returns nginx's version too.
async fn nginx_run(
    wrk: &Path,
    pages: &[(String, Vec<u8>)],
    base: &Path,
    args: &Args,
) -> anyhow::Result<(String, Rates)> {
    let bin = tools::ensure("nginx", "nginx").await?;
    let version = tools::version(&bin, &["-v"])
        .await?
        .trim_start_matches("nginx version: ")
        .replace('/', " ");
    let mut nginx = Nginx::start(&bin, pages, base).await?;
    let measured = check_and_measure("nginx", nginx.port, wrk, pages, base, args).await;
    nginx.stop().await?;
    Ok((version, measured?))
}

/// An nginx master process started here, serving a temporary folder.
struct Nginx {
    child: Child,
    port: u16,
    stopped: bool,
    /// Holds the configuration, the page, the pid file and the logs; removed on drop.
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(bin: &Path, pages: &[(String, Vec<u8>)], base: &Path) -> anyhow::Result<Nginx> {
        // In the bench folder (the filesystem Sesame's data was on) and world-readable:
        // nginx's workers drop root for an unprivileged user.
        let dir = tempfile::Builder::new().prefix("nginx-").tempdir_in(base)?;
        let root = dir.path().to_path_buf();
        let www = root.join("www").join(SITE);
        std::fs::create_dir_all(&www)?;
        std::fs::create_dir_all(root.join("tmp"))?;
        for (key, body) in pages {
            let file = www.join(key);
            std::fs::write(&file, body).with_context(|| format!("write {}", file.display()))?;
            set_mode(&file, 0o644)?;
        }
        for p in [root.clone(), root.join("www"), www.clone()] {
            set_mode(&p, 0o755)?;
        }
        let port = tools::free_port()?;
        let conf = root.join("nginx.conf");
        std::fs::write(&conf, config(&root, port))?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&root)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(root.join("error.log"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("start nginx")?;
        let mut nginx = Nginx {
            child,
            port,
            stopped: false,
            _dir: dir,
        };
        let deadline = Instant::now() + NGINX_WAIT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(nginx);
            }
            if let Some(status) = nginx.child.try_wait()? {
                nginx.stopped = true;
                let log = std::fs::read_to_string(root.join("error.log")).unwrap_or_default();
                anyhow::bail!("nginx exited with {status}: {}", log.trim());
            }
            if Instant::now() > deadline {
                nginx.stop().await?;
                anyhow::bail!("nginx did not listen on 127.0.0.1:{port} within {NGINX_WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks the master to stop (SIGTERM: it stops its workers first) and waits for it.
    async fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        stop_child(&mut self.child, "-TERM", NGINX_WAIT, "nginx").await
    }
}

impl Drop for Nginx {
    /// The error path: stop the master without an async context.
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + NGINX_WAIT;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.start_kill();
        }
    }
}

/// A minimal static-file configuration: as many workers as cores, no access log, keep-alive
/// connections never closed for their request count (as the node does not close them).
fn config(root: &Path, port: u16) -> String {
    let p = |rel: &str| -> PathBuf { root.join(rel) };
    format!(
        r#"worker_processes auto;
daemon off;
pid {pid};
error_log {log} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type text/html;
    charset utf-8;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        location / {{ }}
    }}
}}
"#,
        pid = p("nginx.pid").display(),
        log = p("error.log").display(),
        tmp = p("tmp").display(),
        www = p("www").display(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrk_output_parses() {
        let text = "Running 10s test @ http://127.0.0.1:1/x\n  2 threads and 64 connections\n\
                    Requests/sec:  51234.56\nTransfer/sec:      60.00MB\n";
        let r = super::parse_wrk(text).unwrap();
        assert!((r.rps - 51234.56).abs() < 1e-6);
        assert!(r.errors.is_none());
        let r = super::parse_wrk("  Non-2xx or 3xx responses: 12\nRequests/sec: 10\n").unwrap();
        assert_eq!(r.errors.as_deref(), Some("Non-2xx or 3xx responses: 12"));
        assert!(super::parse_wrk("nothing").is_err());
    }
}
