//! The `sesame` binary against a real node: output paths survive a reader that goes away
//! (`sesame site status demo | head -1`), and the token and site commands work end to end.

use std::process::{Command, Stdio};

use sesame_node::NodeConfig;

fn sesame(url: &str, token: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sesame"));
    cmd.arg("--node")
        .arg(url)
        .arg("--token")
        .arg(token)
        .args(args)
        .env("SESAME_LOG", "error");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = sesame_node::start(NodeConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let url = node.url();
    let token = node.admin_token.clone();
    let commands: [&[&str]; 4] = [
        &["site", "create", "demo"],
        &["site", "status", "demo"],
        &["site", "list"],
        &["token", "list", "demo"],
    ];
    for args in commands {
        let (url, token) = (url.clone(), token.clone());
        let output = tokio::task::spawn_blocking(move || {
            let mut child = sesame(&url, &token, args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The reader goes away before the command writes anything.
            drop(child.stdout.take());
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            output.status.success(),
            "{args:?}: {:?} {stderr}",
            output.status
        );
    }
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_site_commands() {
    let dir = tempfile::tempdir().unwrap();
    let node = sesame_node::start(NodeConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let (url, token) = (node.url(), node.admin_token.clone());
    let run = move |args: &[&str]| {
        let (url, token) = (url.clone(), token.clone());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                sesame(&url, &token, &args).output().unwrap()
            })
            .await
            .unwrap()
        }
    };
    assert!(run(&["site", "create", "demo"]).await.status.success());
    let created = run(&["token", "create", "demo", "reader", "--ttl", "3600"]).await;
    assert!(created.status.success(), "{created:?}");
    let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    assert!(created["expires_at_ms"].as_u64().is_some(), "{created}");
    let id = created["id"].as_u64().unwrap();
    let listed = run(&["token", "list", "demo"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["tokens"][0]["id"].as_u64(), Some(id), "{listed}");
    assert!(!listed
        .to_string()
        .contains(created["token"].as_str().unwrap()));
    let id = id.to_string();
    assert!(run(&["token", "revoke", "demo", &id])
        .await
        .status
        .success());
    let listed = run(&["token", "list", "demo"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        listed["tokens"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    assert!(run(&["site", "delete", "demo"]).await.status.success());
    let gone = run(&["site", "status", "demo"]).await;
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("does not exist"));
    node.shutdown().await.unwrap();
}
