//! etcd 3.4 (Debian `etcd-server`) as a 3-member cluster on loopback: the peer the
//! replicated write path is compared with. Writes go through etcd's JSON gateway
//! (`POST /v3/kv/put`), under the same load generator as Sesame's HTTP API.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use tokio::process::{Child, Command};

use crate::tools;

/// How long the members may take to elect a leader and answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running 3-member etcd cluster; the processes are killed on drop.
pub struct Etcd {
    members: Vec<Member>,
    pub version: String,
}

struct Member {
    child: Child,
    client_url: String,
}

impl Etcd {
    /// Starts three members with their data under `dir` (same filesystem as Sesame's).
    pub async fn start(dir: &Path) -> anyhow::Result<Etcd> {
        let bin = tools::ensure("etcd", "etcd-server").await?;
        let version = tools::version(&bin, &["--version"]).await?;
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| Ok((tools::free_port()?, tools::free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.join(format!("etcd-m{i}"));
            std::fs::create_dir_all(&data)?;
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new(&bin)
                .arg(format!("--name=m{i}"))
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=sesame-bench")
                .arg("--log-level=error")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start etcd")?;
            members.push(Member { child, client_url });
        }
        let etcd = Etcd { members, version };
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + READY_TIMEOUT;
        for m in &self.members {
            loop {
                let ok = put(&client, &m.client_url, "ready", "1").await.is_ok();
                if ok {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "etcd at {} did not become ready",
                    m.client_url
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The client URL of the member that leads now.
    pub async fn leader_url(&self) -> anyhow::Result<String> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for m in &self.members {
                let status: serde_json::Value = client
                    .post(format!("{}/v3/maintenance/status", m.client_url))
                    .json(&serde_json::json!({}))
                    .send()
                    .await?
                    .json()
                    .await?;
                let me = status["header"]["member_id"].as_str();
                let leader = status["leader"].as_str();
                if me.is_some() && me == leader {
                    return Ok(m.client_url.clone());
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "etcd elected no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every member.
    pub async fn stop(mut self) {
        for m in &mut self.members {
            let _ = m.child.kill().await;
        }
    }
}

/// One put through the JSON gateway; acknowledged once committed by a quorum.
pub async fn put(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let resp = client
        .post(format!("{url}/v3/kv/put"))
        .json(&serde_json::json!({
            "key": b64.encode(key),
            "value": b64.encode(value),
        }))
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "etcd put: {}", resp.status());
    Ok(())
}
