//! Serving pages under load: `wrk` (keep-alive, `--wrk-threads`, `--wrk-connections`,
//! `--wrk-seconds`) against a node in this process, then against nginx serving the same bytes
//! from files on the same filesystem (the bench folder: disk, or tmpfs with `--tmpfs`), and
//! the ratio of their requests per second. Two workloads: one profile page again and again,
//! and `--serving-pages` distinct profile pages, each request a random one (a wrk Lua script
//! picks the path), so neither side is measured on one hot file only.
//!
//! An edge server (`sesame edge --objects file://<the node's objects> --http 127.0.0.1:<port>`,
//! the built `sesame` binary as its own process, as nginx is) serves the same published site
//! and is measured with the same runs. Node, edge and nginx all stay up (idle, a server takes
//! no CPU from the one measured), and each of `--runs` rounds measures each in turn: the
//! table gives the median and best of the rounds, and the ratios compare medians.
//!
//! wrk runs on the same two cores as the server it measures, so a server's requests per
//! second also depend on how the scheduler shares them out, which moves from run to run.
//! Each run therefore also reads the server's own CPU time (user + sys, from `/proc`: this
//! process for the node, the process and its children for the edge and for nginx's master
//! and workers) and reports it per request: what the server spends on an answer, which
//! the sharing of the cores changes much less.
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

/// What a server measured, round after round: the one-page runs and the random-pages runs.
#[derive(Default)]
struct Rates {
    one: Runs,
    random: Runs,
}

/// One server under measurement: where it answers, or why it could not be started.
struct Server {
    name: &'static str,
    base_url: Result<String, String>,
    /// Whose CPU time its answers cost (`None`: not known).
    cpu: Option<Cpu>,
    rates: Rates,
}

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let wrk = tools::ensure("wrk", "wrk").await?;
    let n = args.serving_pages().max(ONE_PAGE + 1);
    let key = site::profile_key(ONE_PAGE);

    let dir = tempfile::Builder::new()
        .prefix("serving-")
        .tempdir_in(base)?;
    let node = site::start_node(dir.path(), args.debounce()).await?;
    let mut edge = None;
    let mut nginx = None;
    let measured = async {
        site::create(&node.admin(), n).await?;
        let node_url = node.node.url();
        let pages = copy_pages(&node_url, n).await?;
        let objects = dir.path().join(sesame_node::app::OBJECTS_DIR);
        let (edge_url, edge_cpu) = match EdgeProcess::start(&objects, base).await {
            Ok(e) => {
                let e = edge.insert(e);
                (Ok(format!("http://127.0.0.1:{}", e.port)), e.child.id())
            }
            Err(e) => (Err(format!("{e:#}")), None),
        };
        let (nginx_url, nginx_cpu) = match Nginx::start_serving(&pages, base).await {
            Ok((version, n)) => {
                let n = nginx.insert(n);
                let url = format!("http://127.0.0.1:{}", n.port);
                (Ok((version, url)), n.child.id())
            }
            Err(e) => (Err(format!("{e:#}")), None),
        };
        let mut servers = [
            Server::new("sesame", Ok(node_url), Some(Cpu::This)),
            Server::new("sesame edge", edge_url, edge_cpu.map(Cpu::Tree)),
            Server::new(
                "nginx",
                nginx_url
                    .as_ref()
                    .map(|(_, url)| url.clone())
                    .map_err(Clone::clone),
                nginx_cpu.map(Cpu::Tree),
            ),
        ];
        for server in &mut servers {
            if let Ok(url) = &server.base_url {
                if let Err(e) = check_serves(url, &pages).await {
                    server.base_url = Err(format!("{e:#}"));
                }
            }
        }
        // All three stay up and each round measures each in turn, so a change in the
        // machine's load during the section falls on all of them alike; idle, the others
        // take no CPU from the one measured.
        for round in 0..args.runs() {
            for server in servers.iter_mut() {
                let Ok(url) = server.base_url.clone() else {
                    continue;
                };
                let cpu = server.cpu;
                let one = wrk_run(&wrk, &format!("{url}/{SITE}/{key}"), None, cpu, args).await?;
                let random = random_pages(&wrk, &url, n, base, cpu, args).await?;
                eprintln!(
                    "   round {round}, {}: one page {:.0} req/s ({}), {n} random pages {:.0} \
                     req/s ({})",
                    server.name,
                    one.rps,
                    describe_cpu(one.cpu_per_request()),
                    random.rps,
                    describe_cpu(random.cpu_per_request()),
                );
                server.rates.one.0.push(one);
                server.rates.random.0.push(random);
            }
        }
        let version = nginx_url.map(|(v, _)| v);
        anyhow::Ok((pages, servers, version))
    }
    .await;
    if let Some(mut e) = edge {
        e.stop().await?;
    }
    if let Some(mut n) = nginx {
        n.stop().await?;
    }
    node.stop().await?;
    let (pages, [sesame, edge, nginx], version) = measured?;
    let sesame_rates = &sesame.rates;

    let one_bytes = pages
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, b)| b.len())
        .unwrap_or(0);
    let total_bytes: usize = pages.iter().map(|(_, b)| b.len()).sum();
    let wrk_flags = format!(
        "`wrk -t{} -c{} -d{}s`, {} rounds, each measuring node, edge and nginx in turn",
        args.wrk_threads,
        args.wrk_connections,
        args.wrk_seconds(),
        args.runs()
    );
    let fs = crate::fs::fs_type(base).unwrap_or_else(|_| "?".into());
    let available = |s: &Server| s.base_url.as_ref().map(|_| ()).map_err(Clone::clone);
    // The node and the edge in one cell each, so the table keeps its columns.
    let row = |what: String, pick: fn(&Rates) -> &Runs| {
        let ours = pick(sesame_rates);
        let value = match available(&edge) {
            Ok(()) => format!(
                "node {}; edge {}",
                ours.describe(),
                pick(&edge.rates).describe()
            ),
            Err(why) => format!("node {}; edge failed: {why}", ours.describe()),
        };
        let (peer, ratio) = match (&version, available(&nginx)) {
            (Ok(version), Ok(())) => {
                let theirs = pick(&nginx.rates);
                (
                    format!(
                        "{version}, same bytes from files on {fs}: {}",
                        theirs.describe()
                    ),
                    match available(&edge) {
                        Ok(()) => format!(
                            "node {:.2}×, edge {:.2}× nginx, on medians (target ≥ 1.0×); \
                             CPU per request: nginx's / node's {}, nginx's / edge's {}",
                            ours.median() / theirs.median(),
                            pick(&edge.rates).median() / theirs.median(),
                            cpu_ratio(theirs, ours),
                            cpu_ratio(theirs, pick(&edge.rates)),
                        ),
                        Err(_) => format!(
                            "node {:.2}× nginx, on medians (target ≥ 1.0×); CPU per request: \
                             nginx's / node's {}",
                            ours.median() / theirs.median(),
                            cpu_ratio(theirs, ours),
                        ),
                    },
                )
            }
            (Err(e), _) => (format!("nginx unavailable: {e}"), "—".into()),
            (_, Err(e)) => (format!("nginx unavailable: {e}"), "—".into()),
        };
        Row::new(what, value, peer, ratio)
    };
    rows.push(row(
        format!(
            "serving one page ({} bytes), keep-alive, {wrk_flags}",
            count(one_bytes)
        ),
        |r| &r.one,
    ));
    rows.push(row(
        format!(
            "serving {} distinct pages at random ({} bytes in all; a wrk Lua script picks each \
             request's path), keep-alive, {wrk_flags}",
            count(n),
            count(total_bytes)
        ),
        |r| &r.random,
    ));
    Ok(())
}

/// `peer`'s median CPU per request over `ours` ("1.10×": ours costs less), or "?".
fn cpu_ratio(peer: &Runs, ours: &Runs) -> String {
    match (peer.median_cpu(), ours.median_cpu()) {
        (Some(p), Some(o)) if o > 0.0 => format!("{:.2}×", p / o),
        _ => "?".to_string(),
    }
}

impl Server {
    fn new(name: &'static str, base_url: Result<String, String>, cpu: Option<Cpu>) -> Server {
        Server {
            name,
            base_url,
            cpu,
            rates: Rates::default(),
        }
    }
}

/// Checks that the server at `base_url` serves the node's bytes for the one page.
async fn check_serves(base_url: &str, pages: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
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
        "{base_url} serves other bytes than the node"
    );
    Ok(())
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
    server: Option<Cpu>,
    args: &Args,
) -> anyhow::Result<Rate> {
    let script = tempfile::Builder::new()
        .prefix("random-pages-")
        .suffix(".lua")
        .tempfile_in(scratch)?;
    std::fs::write(script.path(), random_pages_lua(n))?;
    wrk_run(wrk, base_url, Some(script.path()), server, args).await
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

/// What one wrk run reported, and what the server spent on it.
struct Rate {
    rps: f64,
    /// Requests answered in the measured run (wrk's "N requests in").
    requests: u64,
    /// The server's CPU time (user + sys) during the measured run, when it can be read.
    cpu: Option<Duration>,
    /// wrk's "Non-2xx or 3xx responses" and "Socket errors" lines, if it printed any.
    errors: Option<String>,
}

/// The wrk runs of one workload against one server, one per round.
#[derive(Default)]
struct Runs(Vec<Rate>);

impl Runs {
    fn median(&self) -> f64 {
        median_of(self.0.iter().map(|r| r.rps).collect()).unwrap_or(f64::NAN)
    }

    fn best(&self) -> f64 {
        self.0.iter().map(|r| r.rps).fold(f64::NAN, f64::max)
    }

    /// The median of the runs' server CPU per request, in µs, if every run could read it.
    fn median_cpu(&self) -> Option<f64> {
        median_of(
            self.0
                .iter()
                .map(Rate::cpu_per_request)
                .collect::<Option<_>>()?,
        )
    }

    /// "median M req/s (best B of N), C µs of server CPU per request", with wrk's error
    /// lines of any run.
    fn describe(&self) -> String {
        let errors: Vec<&str> = self.0.iter().filter_map(|r| r.errors.as_deref()).collect();
        let mut text = format!(
            "median {:.0} req/s (best {:.0} of {}), {}",
            self.median(),
            self.best(),
            self.0.len(),
            describe_cpu(self.median_cpu())
        );
        if !errors.is_empty() {
            text.push_str(&format!(" ({})", errors.join("; ")));
        }
        text
    }
}

/// The median of `values` (the mean of the middle two when their number is even), or
/// `None` when there are none.
fn median_of(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[n / 2]),
        n => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

impl Rate {
    /// The server's CPU time per request answered, in µs.
    fn cpu_per_request(&self) -> Option<f64> {
        let cpu = self.cpu?;
        (self.requests > 0).then(|| cpu.as_secs_f64() * 1e6 / self.requests as f64)
    }
}

/// "C µs of server CPU per request" (median, when of several runs).
fn describe_cpu(us: Option<f64>) -> String {
    match us {
        Some(us) => format!("{us:.1} µs of server CPU per request"),
        None => "server CPU not read".to_string(),
    }
}

/// A one-second warm-up, then the measured run; with `script`, wrk runs that Lua script.
/// The server's CPU time is read around the measured run.
async fn wrk_run(
    wrk: &Path,
    url: &str,
    script: Option<&Path>,
    server: Option<Cpu>,
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
    let before = server.and_then(Cpu::time);
    let out = tools::run(&mut cmd, limit).await?;
    let after = server.and_then(Cpu::time);
    let mut rate = parse_wrk(&String::from_utf8_lossy(&out.stdout))?;
    rate.cpu = before.zip(after).map(|(b, a)| a.saturating_sub(b));
    Ok(rate)
}

/// Linux reports process times in clock ticks of `USER_HZ`, which is 100 on every
/// architecture it runs on (the kernel's `HZ` may differ; what it reports does not).
const USER_HZ: u32 = 100;

/// Whose CPU time a server's answers cost.
#[derive(Debug, Clone, Copy)]
enum Cpu {
    /// This process: the node runs in it (the bench's own threads only wait for wrk then).
    This,
    /// A process and its children: the edge; nginx's master and its workers.
    Tree(u32),
}

impl Cpu {
    /// User + system time so far, or `None` when `/proc` cannot tell.
    fn time(self) -> Option<Duration> {
        match self {
            Cpu::This => process_time("self"),
            Cpu::Tree(pid) => {
                let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default();
                let mut total = process_time(&pid.to_string())?;
                for child in children.split_whitespace() {
                    total += process_time(child).unwrap_or_default();
                }
                Some(total)
            }
        }
    }
}

/// `utime + stime` of `/proc/<pid>/stat` (every thread of the process).
fn process_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing paren,
    // where field 3 (state) comes first; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / f64::from(USER_HZ)))
}

fn parse_wrk(text: &str) -> anyhow::Result<Rate> {
    let mut rps = None;
    let mut requests = None;
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some((n, _)) = line.split_once(" requests in ") {
            requests = n.trim().parse::<u64>().ok();
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if line.starts_with("Non-2xx or 3xx responses:")
            || line.starts_with("Socket errors:")
        {
            errors.push(line.to_string());
        }
    }
    Ok(Rate {
        rps: rps.with_context(|| format!("no Requests/sec in wrk's output: {text}"))?,
        requests: requests.with_context(|| format!("no request count in wrk's output: {text}"))?,
        cpu: None,
        errors: (!errors.is_empty()).then(|| errors.join("; ")),
    })
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
    /// Starts nginx serving `pages` at `/<SITE>/<key>` from files under `base`; returns its
    /// version too.
    async fn start_serving(
        pages: &[(String, Vec<u8>)],
        base: &Path,
    ) -> anyhow::Result<(String, Nginx)> {
        let bin = tools::ensure("nginx", "nginx").await?;
        let version = tools::version(&bin, &["-v"])
            .await?
            .trim_start_matches("nginx version: ")
            .replace('/', " ");
        Ok((version, Nginx::start(&bin, pages, base).await?))
    }

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

/// A static-file configuration as a site serving many small files would have: as many
/// workers as cores, no access log, `sendfile` with `tcp_nopush` (head and body in one
/// packet), open files and their metadata cached (`open_file_cache`: the node keeps its
/// pages in memory, so nginx need not open and stat each file per request either), and
/// keep-alive connections never closed for their request count (as the node does not close
/// them).
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
    open_file_cache max=20000 inactive=60s;
    open_file_cache_valid 60s;
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
                    \x20 512345 requests in 10.00s, 600.00MB read\n\
                    Requests/sec:  51234.56\nTransfer/sec:      60.00MB\n";
        let r = super::parse_wrk(text).unwrap();
        assert!((r.rps - 51234.56).abs() < 1e-6);
        assert_eq!(r.requests, 512_345);
        assert!(r.errors.is_none());
        assert!(r.cpu.is_none(), "wrk does not say the server's CPU");
        let r = super::parse_wrk(
            "  100 requests in 10.00s, 1.00MB read\n  Non-2xx or 3xx responses: 12\n\
             Requests/sec: 10\n",
        )
        .unwrap();
        assert_eq!(r.errors.as_deref(), Some("Non-2xx or 3xx responses: 12"));
        assert!(super::parse_wrk("nothing").is_err());
        assert!(
            super::parse_wrk("Requests/sec: 10\n").is_err(),
            "no request count"
        );
    }

    #[test]
    fn process_times_are_read_from_proc() {
        let t = super::Cpu::This.time().expect("this process's times");
        // Burn some CPU: the reading must not go backwards, and must move within 2 s of work.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while super::Cpu::This.time().unwrap() <= t {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            assert!(
                started.elapsed().as_secs() < 2,
                "CPU time did not move ({x})"
            );
        }
        let me = std::process::id();
        assert!(super::Cpu::Tree(me).time().is_some());
        assert!(
            super::Cpu::Tree(u32::MAX).time().is_none(),
            "no such process"
        );
    }
}
