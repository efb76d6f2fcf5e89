//! `sesame site export SITE FILE.zip`: the current version as files a static host serves,
//! clean URLs as `path/index.html`, links not pointing back at the node.

use std::io::Read as _;

use sesame_proto::Role;
use sesame_tests::TestNode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_exports_as_a_zip_a_static_host_serves() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    assert!(sesame_node::cli::seed_demo(&node.node.node).await.unwrap());
    let url = node.node.url();
    let status = node.admin().status("demo").await.unwrap();
    let _ = reqwest::get(format!("{url}/demo/?_min={}", status.committed_index))
        .await
        .unwrap();
    let reader = node
        .admin()
        .create_token("demo", Role::Reader)
        .await
        .unwrap()
        .token;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.zip");
    let out = tokio::process::Command::new(sesame_tests::sesame_bin().unwrap())
        .args(["site", "export", "demo"])
        .arg(&file)
        .args(["--node", &url, "--token", &reader])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut zip = zip::ZipArchive::new(std::fs::File::open(&file).unwrap()).unwrap();
    let names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
    for want in [
        "index.html",
        "alice/index.html",
        "bob/index.html",
        "style.css",
        "404.html",
        "sitemap.xml",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    let mut alice = String::new();
    zip.by_name("alice/index.html")
        .unwrap()
        .read_to_string(&mut alice)
        .unwrap();
    assert!(alice.contains("Alice Liddell"));
    assert!(
        !alice.contains(&format!("{url}/demo/")),
        "links point back at the node"
    );
    assert!(alice.contains("href=\"/style.css?v="), "{alice}");

    // No token, no copy.
    let anon = reqwest::get(format!("{url}/v1/sites/demo/export.zip"))
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    node.stop().await.unwrap();
}
