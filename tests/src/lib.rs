//! Shared helpers for Sesame's integration tests and benchmark harness: start a real node on
//! a loopback port in a temporary directory and talk to it.

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
