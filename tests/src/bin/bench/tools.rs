//! The external programs peers need: finding them (installing them with `apt-get` when they
//! are missing), running them with a time limit, and picking a free loopback port.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::Command;

/// Longest an `apt-get` step may take.
const APT_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a `--version`-style call may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// The program `bin` on `PATH` (or in the sbin folders, where nginx lives).
pub fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

/// The path of `bin`, installing Debian's `package` first if it is missing.
pub async fn ensure(bin: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = which(bin) {
        return Ok(p);
    }
    eprintln!("   {bin} is missing: apt-get install {package}");
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
            "install",
            "-y",
            "--no-install-recommends",
            package,
        ]);
        cmd
    };
    if run(&mut install(), APT_TIMEOUT).await.is_err() {
        // The package lists may be missing or stale.
        run(Command::new("apt-get").arg("update"), APT_TIMEOUT)
            .await
            .context("apt-get update")?;
        run(&mut install(), APT_TIMEOUT)
            .await
            .with_context(|| format!("apt-get install {package}"))?;
    }
    which(bin).with_context(|| format!("{package} is installed but {bin} is not on PATH"))
}

/// Runs `cmd` to completion within `timeout` (killing it past that) and returns its output;
/// an unsuccessful exit is an error carrying the end of its stderr.
pub async fn run(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let out = output(cmd, timeout).await?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join(" / ");
        anyhow::bail!("{cmd:?} exited with {}: {tail}", out.status);
    }
    Ok(out)
}

/// Runs `cmd` to completion within `timeout`, whatever its exit status.
async fn output(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {cmd:?}"))?;
    // On timeout the future, and with it the child, is dropped: kill_on_drop ends it.
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("{cmd:?} did not finish within {timeout:?}"))?
        .with_context(|| format!("wait for {cmd:?}"))
}

/// The first line a program prints when asked its version (some print it on stderr, some
/// exit non-zero after printing it).
pub async fn version(bin: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = output(Command::new(bin).args(args), VERSION_TIMEOUT).await?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .with_context(|| format!("{} printed no version", bin.display()))
}

/// A loopback port nothing listens on now (a tiny race with other programs remains).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
