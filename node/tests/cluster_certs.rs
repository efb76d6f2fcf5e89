//! `sesame cluster certs` end to end: the binary writes a CA and node folders a node can load,
//! and adds a node later with the same CA.

use std::process::Command;

use sesame_node::peer::tls::{CA_CERT_FILE, CA_KEY_FILE, NODE_CERT_FILE, NODE_KEY_FILE};
use sesame_node::peer::NodeCerts;
use tempfile::TempDir;

fn certs(out: &std::path::Path, nodes: &str) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_sesame"))
        .args(["cluster", "certs", "--out"])
        .arg(out)
        .args(["--nodes", nodes])
        .output()?)
}

#[test]
fn makes_a_ca_and_node_folders_then_adds_a_node() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let out = dir.path().join("certs");
    let made = certs(&out, "1,2,3")?;
    assert!(made.status.success(), "{made:?}");
    assert!(String::from_utf8(made.stdout)?.contains("--certs"));
    for id in [1, 2, 3] {
        let folder = out.join(id.to_string());
        for file in [CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE] {
            assert!(folder.join(file).is_file(), "{}/{file}", folder.display());
        }
        assert_eq!(NodeCerts::load(&folder)?.node_id(), id);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for key in [out.join(CA_KEY_FILE), out.join("2").join(NODE_KEY_FILE)] {
            let mode = std::fs::metadata(&key)?.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }
    let ca = std::fs::read(out.join(CA_CERT_FILE))?;

    let added = certs(&out, "4")?;
    assert!(added.status.success(), "{added:?}");
    assert_eq!(NodeCerts::load(&out.join("4"))?.node_id(), 4);
    assert_eq!(std::fs::read(out.join("4").join(CA_CERT_FILE))?, ca);

    let again = certs(&out, "2")?;
    assert!(!again.status.success());
    assert!(String::from_utf8(again.stderr)?.contains("already has a certificate"));
    Ok(())
}

#[test]
fn skip_existing_keeps_what_is_there_and_makes_the_rest() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let out = dir.path().join("certs");
    let run = |nodes: &str| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_sesame"))
            .args(["cluster", "certs", "--skip-existing", "--out"])
            .arg(&out)
            .args(["--nodes", nodes])
            .output()?)
    };
    let first = run("1,2")?;
    assert!(first.status.success(), "{first:?}");
    let key = std::fs::read(out.join("1").join(NODE_KEY_FILE))?;
    // Again, as at every `docker compose up`: nothing is remade; a new id is added.
    let again = run("1,2,3")?;
    assert!(again.status.success(), "{again:?}");
    let said = String::from_utf8(again.stdout)?;
    assert!(
        said.contains("node 1: --certs") && said.contains("(kept)"),
        "{said}"
    );
    assert_eq!(std::fs::read(out.join("1").join(NODE_KEY_FILE))?, key);
    assert_eq!(NodeCerts::load(&out.join("3"))?.node_id(), 3);
    // A kept folder that does not load is an error now, not at the node's start.
    std::fs::write(out.join("2").join(NODE_KEY_FILE), "not a key")?;
    let broken = run("1,2,3")?;
    assert!(!broken.status.success());
    assert!(String::from_utf8(broken.stderr)?.contains("node 2"));
    Ok(())
}
