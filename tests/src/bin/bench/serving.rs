//! Serving one page under load: `wrk` (keep-alive, `--wrk-threads`, `--wrk-connections`,
//! `--wrk-seconds`) against a profile page served by a node in this process, then against
//! nginx serving the same bytes from a file on the same machine, and the ratio of their
//! requests per second.
//!
//! nginx is started here with a minimal configuration in a temporary folder (`daemon off`,
//! `access_log off`, its pid file and temporary paths in that folder, listening on a free
//! 127.0.0.1 port) and stopped here, also when the run fails. Each wrk run follows a
//! one-second warm-up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::process::{Child, Command};

use crate::report::{count, Row};
use crate::site::{self, SITE};
use crate::tools;
use crate::Args;

/// Profiles in the site whose page is served (its size does not matter here).
const SITE_PROFILES: usize = 100;
/// Longest nginx may take to start listening, or to stop.
const NGINX_WAIT: Duration = Duration::from_secs(10);
/// Extra time a wrk run may take past its own duration.
const WRK_GRACE: Duration = Duration::from_secs(30);

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let wrk = tools::ensure("wrk", "wrk").await?;
    let key = site::profile_key(42 % SITE_PROFILES);

    let dir = tempfile::Builder::new()
        .prefix("serving-")
        .tempdir_in(base)?;
    let node = site::start_node(dir.path(), args.debounce()).await?;
    let measured = async {
        site::create(&node.admin(), SITE_PROFILES).await?;
        let url = format!("{}/{SITE}/{key}", node.node.url());
        let body = reqwest::get(&url)
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let rate = wrk_run(&wrk, &url, args).await?;
        anyhow::Ok((body, rate))
    }
    .await;
    node.stop().await?;
    let (body, sesame) = measured?;
    eprintln!("   sesame: {:.0} req/s", sesame.rps);

    let nginx = nginx_run(&wrk, &body, &key, args).await;
    if let Ok((version, r)) = &nginx {
        eprintln!("   {version}: {:.0} req/s", r.rps);
    }

    let mut value = format!("{:.0} req/s", sesame.rps);
    if let Some(e) = &sesame.errors {
        value.push_str(&format!(" ({e})"));
    }
    let (peer, ratio) = match &nginx {
        Ok((version, r)) => (
            format!(
                "{version}, same bytes from disk: {:.0} req/s{}",
                r.rps,
                r.errors
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
            format!("{:.2}× nginx (target ≥ 1.0×)", sesame.rps / r.rps),
        ),
        Err(e) => (format!("nginx unavailable: {e:#}"), "—".into()),
    };
    rows.push(Row::new(
        format!(
            "serving one page ({} bytes), keep-alive, `wrk -t{} -c{} -d{}s`",
            count(body.len()),
            args.wrk_threads,
            args.wrk_connections,
            args.wrk_seconds()
        ),
        value,
        peer,
        ratio,
    ));
    Ok(())
}

/// What one wrk run reported.
struct Rate {
    rps: f64,
    /// wrk's "Non-2xx or 3xx responses" and "Socket errors" lines, if it printed any.
    errors: Option<String>,
}

/// A one-second warm-up, then the measured run.
async fn wrk_run(wrk: &Path, url: &str, args: &Args) -> anyhow::Result<Rate> {
    let run = |seconds: u64| {
        let mut cmd = Command::new(wrk);
        cmd.arg(format!("-t{}", args.wrk_threads))
            .arg(format!("-c{}", args.wrk_connections))
            .arg(format!("-d{seconds}s"))
            .arg(url);
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

/// Serves `body` at `/<SITE>/<key>` with nginx and measures it; returns nginx's version too.
async fn nginx_run(
    wrk: &Path,
    body: &[u8],
    key: &str,
    args: &Args,
) -> anyhow::Result<(String, Rate)> {
    let bin = tools::ensure("nginx", "nginx").await?;
    let version = tools::version(&bin, &["-v"])
        .await?
        .trim_start_matches("nginx version: ")
        .replace('/', " ");
    let mut nginx = Nginx::start(&bin, body, key).await?;
    let measured = async {
        let url = format!("http://127.0.0.1:{}/{SITE}/{key}", nginx.port);
        let served = reqwest::get(&url)
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        anyhow::ensure!(served == body, "nginx serves other bytes than Sesame");
        wrk_run(wrk, &url, args).await
    }
    .await;
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
    async fn start(bin: &Path, body: &[u8], key: &str) -> anyhow::Result<Nginx> {
        // Under /tmp and world-readable: nginx's workers drop root for an unprivileged user.
        let dir = tempfile::Builder::new()
            .prefix("sesame-bench-nginx-")
            .tempdir()?;
        let root = dir.path().to_path_buf();
        let www = root.join("www").join(SITE);
        std::fs::create_dir_all(&www)?;
        std::fs::create_dir_all(root.join("tmp"))?;
        std::fs::write(www.join(key), body)?;
        for p in [root.clone(), root.join("www"), www.clone()] {
            set_mode(&p, 0o755)?;
        }
        set_mode(&www.join(key), 0o644)?;
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
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(NGINX_WAIT, self.child.wait()).await {
            Ok(status) => {
                status.context("wait for nginx")?;
                Ok(())
            }
            Err(_) => {
                self.child.kill().await.context("kill nginx")?;
                anyhow::bail!("nginx did not stop within {NGINX_WAIT:?}; killed its master")
            }
        }
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

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
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
