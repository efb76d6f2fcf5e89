//! Headless Chromium for the tests, driven over WebDriver (`chromedriver`): installed from
//! Debian when missing, one driver process per test, sessions with or without JavaScript,
//! and screenshots kept under `target/test-artifacts/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Makes sure `chromium` and `chromedriver` are installed (Debian packages `chromium` and
/// `chromium-driver`), installing them with apt-get when they are not.
pub fn ensure_chromium() -> anyhow::Result<()> {
    let have = |bin: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("chromium") && have("chromedriver") {
        return Ok(());
    }
    eprintln!("installing chromium and chromium-driver with apt-get");
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            "(apt-get install -y -q chromium chromium-driver || \
              (apt-get update -q && apt-get install -y -q chromium chromium-driver)) >/dev/null",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get")?;
    anyhow::ensure!(
        status.success() && have("chromium") && have("chromedriver"),
        "could not install chromium and chromium-driver (apt-get: {status})"
    );
    Ok(())
}

/// A running chromedriver; stopped when dropped.
pub struct Driver {
    child: std::process::Child,
    pub url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    pub async fn start() -> anyhow::Result<Driver> {
        ensure_chromium()?;
        let port = crate::cluster::free_tcp_port()?;
        let child = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chromedriver")?;
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if reqwest::get(format!("{url}/status")).await.is_ok() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Driver { child, url })
    }

    /// A new browser (its own profile), headless; `javascript: false` turns scripts off.
    pub async fn session(&self, javascript: bool) -> anyhow::Result<fantoccini::Client> {
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1000,1200".into(),
        ];
        if !javascript {
            args.push("--blink-settings=scriptEnabled=false".into());
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "args": args }),
        );
        // fantoccini's TLS asks for the process-wide provider (chromedriver is plain HTTP;
        // any provider will do).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = fantoccini::ClientBuilder::rustls()?
            .capabilities(caps)
            .connect(&self.url)
            .await
            .context("open a Chromium session")?;
        Ok(client)
    }
}

/// Where tests keep what a person would look at (screenshots).
pub fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Polls `f` until it returns `Some`, for at most `wait`.
pub async fn wait_for<T, F, Fut>(wait: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + wait;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {wait:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// axe-core's script (the accessibility checker), installed from npm under the target
/// folder when missing.
pub fn axe_script() -> anyhow::Result<String> {
    const VERSION: &str = "4.10.2";
    let dir = artifacts_dir().join(format!("../axe-core-{VERSION}"));
    let script = dir.join("node_modules/axe-core/axe.min.js");
    if !script.is_file() {
        std::fs::create_dir_all(&dir)?;
        let status = std::process::Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(format!("axe-core@{VERSION}"))
            .status()
            .context("run npm (install Node.js and npm)")?;
        anyhow::ensure!(status.success(), "npm install axe-core@{VERSION} failed");
    }
    std::fs::read_to_string(&script).with_context(|| format!("read {}", script.display()))
}

/// Runs axe-core on the page the browser shows and returns its violations (WCAG 2.x A and
/// AA rules), each as `id: help (targets)`.
pub async fn axe_violations(b: &fantoccini::Client, axe: &str) -> anyhow::Result<Vec<String>> {
    b.execute(axe, vec![]).await.context("load axe-core")?;
    let result = b
        .execute_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice'] } })
               .then(r => done(r.violations.map(v => v.id + ': ' + v.help + ' (' + v.nodes.map(n => n.target.join(' ')).join(', ') + ')')))
               .catch(e => done(['axe failed: ' + e]));",
            vec![],
        )
        .await
        .context("run axe-core")?;
    Ok(serde_json::from_value(result)?)
}
