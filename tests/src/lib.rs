//! Shared helpers for Sesame's integration tests and benchmark harness: start a real node on
//! a loopback port in a temporary directory and talk to it.

pub mod cluster;
pub mod faults;
pub mod linearizable;

use std::path::{Path, PathBuf};

use sesame_client::Http;
use sesame_node::{NodeConfig, RunningNode};

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
    NodeConfig::new(
        data,
        "127.0.0.1:0".parse().expect("parse a loopback address"),
    )
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
