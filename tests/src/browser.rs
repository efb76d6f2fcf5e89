//! Headless Chromium for the tests, driven over WebDriver (`chromedriver`): installed from
//! Debian when missing, one driver process per test, sessions with or without JavaScript,
//! and screenshots kept under `target/test-artifacts/`; a driver ends the browsers it
//! started, and can tell which processes are still theirs. Also the checkers the tests run
//! on pages, installed from npm under the target folder: axe-core and Lighthouse.

use std::os::unix::process::CommandExt as _;
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

/// Longest the browsers of an ended driver (or Lighthouse run) may take to be gone.
const BROWSERS_GONE_WAIT: Duration = Duration::from_secs(10);

/// Runs chromedriver on port `$1` for as long as process `$2` (the test) runs, then ends
/// the process group (chromedriver and its browsers).
const WATCHED_CHROMEDRIVER: &str = "chromedriver --port=\"$1\" &
while kill -0 \"$2\" 2>/dev/null; do sleep 1; done
kill -KILL 0";

/// A running chromedriver and the browsers it started, in a process group of their own:
/// [`Driver::quit`] closes the sessions, ends the group and checks that no browser is left;
/// dropping the driver (a failing test) ends the group, and so does the test process ending
/// any other way (Ctrl-C, a kill).
pub struct Driver {
    child: std::process::Child,
    /// The process group of chromedriver and its browsers (the id of its shell, `child`).
    group: u32,
    /// The profiles of the sessions (`--user-data-dir`), one folder each; the path also names
    /// this driver's browsers on their command lines.
    profiles: tempfile::TempDir,
    /// Every session handed out, to close them at the end.
    sessions: std::sync::Mutex<Vec<fantoccini::Client>>,
    /// Sessions opened so far (names their profile folders).
    opened: std::sync::atomic::AtomicUsize,
    ended: bool,
    pub url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.end();
    }
}

impl Driver {
    pub async fn start() -> anyhow::Result<Driver> {
        Driver::start_watching(std::process::id()).await
    }

    /// A driver whose browsers end when process `watched` ends (or the driver does); the
    /// test process for [`Driver::start`].
    pub async fn start_watching(watched: u32) -> anyhow::Result<Driver> {
        ensure_chromium()?;
        let port = crate::cluster::free_tcp_port()?;
        let profiles = tempfile::Builder::new()
            .prefix("sesame-browsers-")
            .tempdir()
            .context("make the browsers' profile folder")?;
        // chromedriver under a shell that leads a process group of their own, which the
        // browsers join (see `end`). Out of the test's group, a Ctrl-C or a kill of the test
        // would not reach them: the shell ends the group once the test process is gone.
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(WATCHED_CHROMEDRIVER)
            .arg("sh")
            .arg(port.to_string())
            .arg(watched.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            // Chromium's crash handlers keep their database under the configuration folder:
            // in the profile folder, their command lines name it too (see `browsers`).
            .env("XDG_CONFIG_HOME", profiles.path())
            .spawn()
            .context("start chromedriver")?;
        let group = child.id();
        let url = format!("http://127.0.0.1:{port}");
        let driver = Driver {
            child,
            group,
            profiles,
            sessions: std::sync::Mutex::new(Vec::new()),
            opened: std::sync::atomic::AtomicUsize::new(0),
            ended: false,
            url,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if reqwest::get(format!("{}/status", driver.url)).await.is_ok() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(driver)
    }

    /// Closes every session (chromedriver quits their browsers), ends chromedriver's process
    /// group, and fails if a process of it, or a browser with one of this driver's profiles,
    /// is still running afterwards.
    pub async fn quit(mut self) -> anyhow::Result<()> {
        let sessions = std::mem::take(&mut *self.sessions.lock().expect("sessions lock"));
        for s in sessions {
            // A session the test closed itself answers with an error: nothing to do.
            let _ = s.close().await;
        }
        self.end();
        all_ended(Some(self.group), self.profiles.path())
            .await
            .context("after the driver ended")
    }

    /// Ends chromedriver and every process of its group (the browsers), at once.
    fn end(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        // Before the shell is reaped: until then no other process can have its id.
        let _ = kill_group(self.group);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The live processes of this driver: in chromedriver's process group, or naming its
    /// profile folder on their command line (a browser that left the group, and the crash
    /// handlers, which start sessions of their own). `(pid, command line)` each.
    pub fn browsers(&self) -> Vec<(u32, String)> {
        processes(Some(self.group), self.profiles.path())
    }

    /// A new browser (its own profile), headless; `javascript: false` turns scripts off.
    pub async fn session(&self, javascript: bool) -> anyhow::Result<fantoccini::Client> {
        let n = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let profile = self.profiles.path().join(format!("session-{n}"));
        let mut args = vec![
            format!("--user-data-dir={}", profile.display()),
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
        self.sessions
            .lock()
            .expect("sessions lock")
            .push(client.clone());
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

/// The text of the element `css` selects, or `None` while there is none. For polling
/// across a navigation: between a form's submit and the next page's load, the old page may
/// be gone and the new one not there yet.
pub async fn text_if_there(b: &fantoccini::Client, css: &str) -> Option<String> {
    let element = b.find(fantoccini::Locator::Css(css)).await.ok()?;
    element.text().await.ok()
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

/// Sends SIGKILL to every process in the process group `group` (a child started with
/// `process_group(0)` leads a group whose id is its own process id).
pub fn kill_group(group: u32) -> std::io::Result<()> {
    rustix::process::kill_process_group(pid(group)?, rustix::process::Signal::KILL)?;
    Ok(())
}

/// Sends SIGKILL to process `id`.
pub fn kill(id: u32) -> std::io::Result<()> {
    rustix::process::kill_process(pid(id)?, rustix::process::Signal::KILL)?;
    Ok(())
}

fn pid(id: u32) -> std::io::Result<rustix::process::Pid> {
    i32::try_from(id)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("not a process id: {id}")))
}

/// The running processes whose command line names `path`, and those in their process
/// groups or in group `group` (never the test's own group), read from `/proc`:
/// `(pid, command line)` each. Zombies (ended, waiting to be reaped) do not count.
pub fn processes(group: Option<u32>, path: &std::path::Path) -> Vec<(u32, String)> {
    struct Proc {
        pid: u32,
        group: u32,
        cmdline: String,
    }
    let path = path.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut all = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process can end while it is read: then it is not there.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
        let Some((state, pgrp)) = stat.rsplit_once(')').and_then(|(_, rest)| {
            let mut f = rest.split_whitespace();
            let state = f.next()?;
            let _ppid = f.next()?;
            Some((state.to_string(), f.next()?.parse::<u32>().ok()?))
        }) else {
            continue;
        };
        if state == "Z" || state == "X" {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        all.push(Proc {
            pid,
            group: pgrp,
            cmdline: cmdline.trim_end().to_string(),
        });
    }
    let own = rustix::process::getpgrp()
        .as_raw_nonzero()
        .get()
        .unsigned_abs();
    let mut groups: Vec<u32> = all
        .iter()
        .filter(|p| p.cmdline.contains(&path))
        .map(|p| p.group)
        .chain(group)
        .collect();
    groups.retain(|g| *g != own);
    all.into_iter()
        .filter(|p| p.cmdline.contains(&path) || groups.contains(&p.group))
        .map(|p| (p.pid, p.cmdline))
        .collect()
}

/// Waits for every process of [`processes`]`(group, path)` to end, for at most
/// [`BROWSERS_GONE_WAIT`]; past that, kills them and fails with their command lines.
pub async fn all_ended(group: Option<u32>, path: &std::path::Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + BROWSERS_GONE_WAIT;
    loop {
        let left = processes(group, path);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            for (pid, _) in &left {
                let _ = kill(*pid);
            }
            anyhow::bail!("processes left running: {left:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Lighthouse version the tests run (the 12 line runs on Node.js 18.16 and newer; 13
/// needs 22.19).
pub const LIGHTHOUSE_VERSION: &str = "12.8.2";

/// Lighthouse's command line, installed from npm under the target folder when missing.
pub fn lighthouse_bin() -> anyhow::Result<PathBuf> {
    let dir = artifacts_dir().join(format!("../lighthouse-{LIGHTHOUSE_VERSION}"));
    let bin = dir.join("node_modules/.bin/lighthouse");
    if !bin.is_file() {
        std::fs::create_dir_all(&dir)?;
        eprintln!("installing lighthouse@{LIGHTHOUSE_VERSION} with npm");
        let status = std::process::Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(format!("lighthouse@{LIGHTHOUSE_VERSION}"))
            .status()
            .context("run npm (install Node.js and npm)")?;
        anyhow::ensure!(
            status.success() && bin.is_file(),
            "npm install lighthouse@{LIGHTHOUSE_VERSION} failed"
        );
    }
    Ok(bin)
}
