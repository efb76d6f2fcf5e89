//! Shared helpers for Sesame's integration tests and benchmark harness: start a real node on
//! a loopback port in a temporary directory and talk to it, or find the `sesame` binary to
//! run nodes as processes.
//!
//! A node renders pages in worker processes that run the `sesame` binary. A test process is
//! not `sesame`, so every node started here is given the built binary ([`sesame_binary`]).

pub mod browser;
pub mod cluster;
pub mod disk;
pub mod faults;
pub mod linearizable;
pub mod process;
pub mod rtc;
pub mod store;
pub mod studio;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

use anyhow::Context as _;

use sesame_client::Http;
use sesame_node::{NodeConfig, RunningNode};
use sesame_projector::sandbox::WorkerCommand;

/// A node running in a temporary data directory, on `127.0.0.1:0`.
pub struct TestNode {
    pub node: RunningNode,
    dir: Dir,
}

enum Dir {
    Owned(tempfile::TempDir),
    Borrowed(PathBuf),
}

impl TestNode {
    /// Starts a node in a fresh temporary directory.
    pub async fn start() -> anyhow::Result<TestNode> {
        let dir = tempfile::tempdir()?;
        let node = sesame_node::start(config(dir.path())).await?;
        Ok(TestNode {
            node,
            dir: Dir::Owned(dir),
        })
    }

    /// Starts a node in a fresh temporary directory with its configuration adjusted by
    /// `adjust` (e.g. `|c| c.write_rate = None`).
    pub async fn start_with(adjust: impl FnOnce(&mut NodeConfig)) -> anyhow::Result<TestNode> {
        let dir = tempfile::tempdir()?;
        let mut cfg = config(dir.path());
        adjust(&mut cfg);
        let node = sesame_node::start(cfg).await?;
        Ok(TestNode {
            node,
            dir: Dir::Owned(dir),
        })
    }

    /// Starts a node on an existing data directory with an adjusted configuration.
    pub async fn start_in_with(
        data: &Path,
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> anyhow::Result<TestNode> {
        let mut cfg = config(data);
        adjust(&mut cfg);
        let node = sesame_node::start(cfg).await?;
        Ok(TestNode {
            node,
            dir: Dir::Borrowed(data.to_path_buf()),
        })
    }

    /// Starts a node on an existing data directory (to test restarts).
    pub async fn start_in(data: &Path) -> anyhow::Result<TestNode> {
        let node = sesame_node::start(config(data)).await?;
        Ok(TestNode {
            node,
            dir: Dir::Borrowed(data.to_path_buf()),
        })
    }

    pub fn data_dir(&self) -> &Path {
        match &self.dir {
            Dir::Owned(d) => d.path(),
            Dir::Borrowed(p) => p,
        }
    }

    /// A client holding the admin token.
    pub fn admin(&self) -> Http {
        Http::new(&self.node.url(), Some(self.node.admin_token.clone()))
    }

    /// A client holding `token` (or none).
    pub fn client(&self, token: Option<&str>) -> Http {
        Http::new(&self.node.url(), token.map(str::to_string))
    }

    /// Stops the node, keeping the data directory if it is owned (returned to the caller).
    pub async fn stop(self) -> anyhow::Result<Option<tempfile::TempDir>> {
        self.node.shutdown().await?;
        Ok(match self.dir {
            Dir::Owned(d) => Some(d),
            Dir::Borrowed(_) => None,
        })
    }
}

fn config(data: &Path) -> NodeConfig {
    let mut config = NodeConfig::new(
        data,
        "127.0.0.1:0".parse().expect("parse a loopback address"),
    );
    config.render_worker = Some(render_worker());
    // Any free UDP port for app clients: the default (the HTTP port's number) could be a
    // port another test's node picked for its peers.
    config.quic_addr = Some("127.0.0.1:0".parse().expect("a loopback address"));
    config
}

/// The render worker a node started by a test runs: the built `sesame` binary.
pub fn render_worker() -> WorkerCommand {
    WorkerCommand::new(sesame_binary()).arg(sesame_node::cli::RENDER_WORKER_COMMAND)
}

/// The `sesame` binary of this build ([`sesame_bin`]). Panics when it cannot be had: no node
/// test can run without it.
pub fn sesame_binary() -> PathBuf {
    sesame_bin().unwrap_or_else(|e| panic!("the sesame binary: {e:#}"))
}

/// An HTTP/1.1 answer read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The status line and headers, as sent.
    pub head: String,
    pub body: String,
}

impl RawResponse {
    /// The first value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` byte for byte (HTTP clients normalise odd paths and refuse odd headers)
/// and reads the answer until the server closes the connection; the request should say
/// `Connection: close`.
pub async fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the node");
    // The server may answer and close before reading everything (hyper's own limits).
    let _ = stream.write_all(request).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    RawResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Names the `sesame` binary to run instead of finding (and building) it.
pub const SESAME_BIN_ENV: &str = "SESAME_BIN";

/// The path of a built `sesame` binary, for tests that run real node processes.
///
/// `SESAME_BIN` names one outright. Otherwise it is `<target>/<profile>/sesame` beside the
/// running test executable (which cargo puts in `<target>/<profile>/deps/`), the way
/// assert_cmd's `cargo_bin` finds it. Cargo builds a package's binaries only for that
/// package's own tests, never for a dependent's like this crate, so the binary is built here
/// (`cargo build -p sesame-node --bin sesame`, same target directory and profile, the
/// environment passed on) when it is missing, or older than the test executable: the test
/// is rebuilt whenever `sesame-node` changes, so an older binary may be stale (cargo then
/// has nothing to do if it is not). Once per test process; later calls return the first
/// answer.
pub fn sesame_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| find_or_build_sesame().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Prefixes of the variables cargo sets for the package whose test runs, not for a build.
const TEST_ONLY_CARGO_VARS: [&str; 8] = [
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

fn find_or_build_sesame() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os(SESAME_BIN_ENV) {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(
            bin.is_file(),
            "{SESAME_BIN_ENV}={} is not a file",
            bin.display()
        );
        return Ok(bin);
    }
    let exe = std::env::current_exe().context("find the test executable")?;
    let mut profile_dir = exe.parent().context("the test executable has no folder")?;
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir.parent().context("deps/ has no parent folder")?;
    }
    let bin = profile_dir.join(format!("sesame{}", std::env::consts::EXE_SUFFIX));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let test_built = modified(&exe).unwrap_or(SystemTime::UNIX_EPOCH);
    if modified(&bin).is_some_and(|built| built >= test_built) {
        return Ok(bin);
    }
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("the profile folder has no name")?;
    let target_dir = profile_dir
        .parent()
        .context("the profile folder has no parent")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(&cargo);
    build
        .current_dir(workspace)
        .args(["build", "--quiet", "-p", "sesame-node", "--bin", "sesame"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    // Cargo runs a test with the package's own variables set (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, ...). Build scripts ask to rerun when such a variable changes (ring's
    // does), so passing them on would rebuild half the tree here, and again in the next
    // `cargo test`.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if TEST_ONLY_CARGO_VARS.iter().any(|p| name.starts_with(p)) {
            build.env_remove(name);
        }
    }
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let what = format!(
        "cargo build -p sesame-node --bin sesame (profile folder {profile}, target {})",
        target_dir.display()
    );
    eprintln!("building {} with {what}", bin.display());
    let output = build
        .output()
        .with_context(|| format!("run {}", Path::new(&cargo).display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    anyhow::ensure!(
        bin.is_file(),
        "{what} succeeded but left no {}; set {SESAME_BIN_ENV} to the binary",
        bin.display()
    );
    Ok(bin)
}

/// Runs `sesame ARGS --node URL --token TOKEN` and returns (success, stdout, stderr).
pub async fn run_sesame(args: &[&str], url: &str, token: &str) -> (bool, String, String) {
    let out = tokio::process::Command::new(sesame_bin().expect("the sesame binary"))
        .args(args)
        .args(["--node", url, "--token", token])
        .output()
        .await
        .expect("run sesame");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
