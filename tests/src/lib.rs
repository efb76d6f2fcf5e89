//! Shared helpers for Sesame's integration tests and benchmark harness: start a real node on
//! a loopback port in a temporary directory and talk to it.
//!
//! A node renders pages in worker processes that run the `sesame` binary. A test process is
//! not `sesame`, so every node started here is given the built binary ([`sesame_binary`]).

pub mod cluster;
pub mod disk;
pub mod linearizable;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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
    config
}

/// The render worker a node started by a test runs: the built `sesame` binary.
pub fn render_worker() -> WorkerCommand {
    WorkerCommand::new(sesame_binary()).arg(sesame_node::cli::RENDER_WORKER_COMMAND)
}

/// The `sesame` binary of this build: `target/<profile>/sesame`, next to the running test
/// or benchmark executable (which lives in `target/<profile>/` or its `deps/`), built with
/// `cargo build -p sesame-node --bin sesame` first if it is missing or older than this
/// executable. Panics when it cannot be had: no node test can run without it.
pub fn sesame_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(find_or_build_sesame).clone()
}

fn find_or_build_sesame() -> PathBuf {
    let exe = std::env::current_exe().expect("find the running executable");
    let mut dir = exe
        .parent()
        .expect("an executable lives in a folder")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let binary = dir.join(format!("sesame{}", std::env::consts::EXE_SUFFIX));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (modified(&binary), modified(&exe)) {
        (Some(binary), Some(exe)) => binary >= exe,
        _ => false,
    };
    if fresh {
        return binary;
    }
    // `dir` is `<target>/<profile>`: build into the same target folder and profile.
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("the profile folder has a name")
        .to_string();
    let target = dir.parent().expect("the profile folder lives in target/");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "--quiet", "-p", "sesame-node", "--bin", "sesame"])
        .env("CARGO_TARGET_DIR", target);
    // Cargo sets these for the running test; build scripts that watch them (ring watches
    // CARGO_MANIFEST_DIR) would see a change and rebuild half the tree, here and again in
    // the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let set_for_tests = ["CARGO_PKG_", "CARGO_BIN_EXE_"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&name);
        if set_for_tests {
            build.env_remove(name);
        }
    }
    match profile.as_str() {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("run cargo to build the sesame binary: {e}"));
    assert!(
        status.success() && binary.is_file(),
        "building the sesame binary ({}) failed: {status}",
        binary.display()
    );
    binary
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
