//! Publishing to real S3 (the protocol, as moto's server speaks it on loopback), and an edge
//! serving from it: `sesame dev --objects s3://bucket/prefix` with the `AWS_*` variables a
//! deployment sets, the root mirror and its conditional write, then `sesame edge` on the same
//! bucket following an edit and surviving the S3 server going away.
//!
//! moto is installed from PyPI into the target folder when missing. Without `CI` a failed
//! install skips the test with a message (a developer offline); with `CI` set it fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore as _, PutMode, PutOptions, UpdateVersion};
use reqwest::StatusCode;
use serde_json::json;
use sesame_client::Http;
use sesame_projector::{PublishError, Publisher, Root};
use sesame_tests::cluster::{free_tcp_port, free_udp_port, ADMIN_TOKEN};
use sesame_tests::process::NodeProcess;

/// The moto release installed and tested against.
const MOTO_VERSION: &str = "5.2.5";
const BUCKET: &str = "sesame";
const PREFIX: &str = "pages";
/// Longest moto may take to answer after it starts.
const MOTO_START_WAIT: Duration = Duration::from_secs(20);
/// Longest a publish may take to show on the node or the edge.
const PUBLISH_WAIT: Duration = Duration::from_secs(20);

/// Where moto is installed: `<target>/moto-<version>`, beside the build that runs this test
/// (`<target>/<profile>/deps/s3-<hash>`).
fn moto_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test runs from <target>/<profile>/deps");
    target.join(format!("moto-{MOTO_VERSION}"))
}

/// Installs moto when missing; `None` (the test is skipped) when that fails outside CI.
fn ensure_moto() -> Option<PathBuf> {
    let dir = moto_dir();
    if dir.join("moto/server.py").exists() {
        return Some(dir);
    }
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(&dir)
        .arg(format!("moto[server]=={MOTO_VERSION}"))
        .stdin(Stdio::null())
        .output();
    let failure = match output {
        Ok(o) if o.status.success() && dir.join("moto/server.py").exists() => return Some(dir),
        Ok(o) => format!(
            "pip exited with {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("run python3 -m pip: {e}"),
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "install moto[server]=={MOTO_VERSION} into {}: {failure}",
        dir.display()
    );
    eprintln!("SKIPPED: moto[server]=={MOTO_VERSION} could not be installed: {failure}");
    None
}

/// moto's S3 server on a loopback port; killed when dropped.
struct Moto {
    child: Option<Child>,
    addr: SocketAddr,
}

impl Moto {
    async fn start(dir: &Path) -> Moto {
        let port = free_tcp_port().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto's server");
        let mut moto = Moto {
            child: Some(child),
            addr,
        };
        let deadline = Instant::now() + MOTO_START_WAIT;
        while reqwest::get(moto.url()).await.is_err() {
            let exited = moto.child.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "moto exited: {exited:?}");
            assert!(Instant::now() < deadline, "moto did not answer in time");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `AWS_*` variables a deployment on S3 or R2 sets, pointed at moto.
fn aws_env(moto: &Moto) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT", moto.url()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn objects_url() -> String {
    format!("s3://{BUCKET}/{PREFIX}")
}

/// GETs `path` until it answers 200 at `index` or later.
async fn wait_page(base: &str, path: &str, index: u64) -> (String, String) {
    let deadline = Instant::now() + PUBLISH_WAIT;
    loop {
        if let Ok(resp) = reqwest::get(format!("{base}{path}")).await {
            let version = resp
                .headers()
                .get("sesame-version")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(0);
            let etag = resp
                .headers()
                .get("etag")
                .map(|v| v.to_str().unwrap().to_string());
            if resp.status() == StatusCode::OK && version >= index {
                return (etag.unwrap(), resp.text().await.unwrap());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{base}{path} not at index {index} in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_node_publishes_to_s3_and_an_edge_serves_from_it() {
    let Some(moto_dir) = ensure_moto() else {
        return;
    };
    let started = Instant::now();
    let mut moto = Moto::start(&moto_dir).await;
    let bucket = reqwest::Client::new()
        .put(format!("{}/{BUCKET}", moto.url()))
        .send()
        .await
        .unwrap();
    assert!(bucket.status().is_success(), "create bucket: {bucket:?}");

    let dir = tempfile::tempdir().unwrap();
    let bin = sesame_tests::sesame_binary();
    let node_addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port().unwrap())
        .parse()
        .unwrap();
    let objects = objects_url();
    let mut node = NodeProcess::new(
        "node",
        &bin,
        [
            "dev",
            "--data",
            dir.path().join("data").to_str().unwrap(),
            "--http",
            &node_addr.to_string(),
            "--quic",
            &format!("127.0.0.1:{}", free_udp_port().unwrap()),
            "--objects",
            &objects,
            "--admin-token",
            ADMIN_TOKEN,
            "--debounce-ms",
            "5",
        ]
        .iter()
        .map(Into::into)
        .collect(),
        aws_env(&moto),
        node_addr,
        dir.path().join("node.log"),
    );
    node.start().await.unwrap();
    // `sesame dev` seeds and publishes the demo site.
    let (node_etag, node_alice) = wait_page(&node.url(), "/demo/alice", 1).await;

    // The root mirror is in the bucket, names a manifest that is there, and agrees with it.
    let options: Vec<(String, String)> = aws_env(&moto)
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let publisher = Publisher::from_url(&objects, options).unwrap();
    let root = publisher.get_root("demo").await.unwrap().expect("a root");
    let manifest = publisher
        .get_manifest("demo", &root.manifest, None)
        .await
        .unwrap();
    assert_eq!(manifest.index, root.index);
    assert!(manifest.files.contains_key("/alice"));

    // The conditional write of a root, on a site of its own: creating over an existing root
    // and updating from a stale ETag are both refused (S3's If-None-Match and If-Match).
    let root_of = |index| Root {
        manifest: root.manifest.clone(),
        index,
    };
    publisher.mirror_root("cas", &root_of(1)).await.unwrap();
    let store = publisher.store().clone();
    let path = ObjectPath::from(format!("{PREFIX}/sites/cas/root"));
    let first = store.head(&path).await.unwrap();
    assert!(first.e_tag.is_some(), "S3 answers an ETag");
    let create = store
        .put_opts(&path, root_of(9).to_json().into(), PutMode::Create.into())
        .await;
    assert!(
        matches!(create, Err(object_store::Error::AlreadyExists { .. })),
        "create over an existing root: {create:?}"
    );
    publisher.mirror_root("cas", &root_of(2)).await.unwrap();
    let stale = PutOptions::from(PutMode::Update(UpdateVersion {
        e_tag: first.e_tag.clone(),
        version: first.version.clone(),
    }));
    let update = store
        .put_opts(&path, root_of(3).to_json().into(), stale)
        .await;
    assert!(
        matches!(update, Err(object_store::Error::Precondition { .. })),
        "an update from a stale ETag: {update:?}"
    );
    assert_eq!(publisher.get_root("cas").await.unwrap(), Some(root_of(2)));
    publisher.remove_root("cas").await.unwrap();
    assert_eq!(publisher.get_root("cas").await.unwrap(), None);
    assert!(matches!(
        publisher.get_manifest("demo", &"0".repeat(64), None).await,
        Err(PublishError::NotFound { .. })
    ));

    // An edge on the same bucket serves the same pages.
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port().unwrap())
        .parse()
        .unwrap();
    let mut edge = NodeProcess::new(
        "edge",
        &bin,
        [
            "edge",
            "--objects",
            &objects,
            "--http",
            &edge_addr.to_string(),
            "--poll-ms",
            "100",
        ]
        .iter()
        .map(Into::into)
        .collect(),
        aws_env(&moto),
        edge_addr,
        dir.path().join("edge.log"),
    );
    edge.start().await.unwrap();
    let (edge_etag, edge_alice) = wait_page(&edge.url(), "/demo/alice", root.index).await;
    assert_eq!((&edge_etag, &edge_alice), (&node_etag, &node_alice));

    // An edit reaches the edge through the bucket.
    let admin = Http::new(&node.url(), Some(ADMIN_TOKEN.to_string()));
    let w = admin
        .put(
            "demo",
            "profiles",
            "alice",
            json!({"name": "Alice on S3", "bio": "Edited"}),
            None,
        )
        .await
        .unwrap();
    let (_, edited) = wait_page(&edge.url(), "/demo/alice", w.index).await;
    assert!(edited.contains("Alice on S3"), "{edited}");
    let (_, home) = wait_page(&edge.url(), "/demo/", w.index).await;

    // S3 goes away: the edge keeps serving the version it installed.
    moto.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (path, body) in [("/demo/alice", &edited), ("/demo/", &home)] {
        let resp = reqwest::get(format!("{}{path}", edge.url())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(&resp.text().await.unwrap(), body, "{path}");
    }
    edge.kill().unwrap();
    node.kill().unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "took {took:?}");
}
