//! REDbot (<https://redbot.org>, PyPI `redbot`), the HTTP linter, against a node on
//! loopback: a page, an `asset_url()` asset with its `?v=` (and with a wrong one), a 304
//! and a 404 must draw no warning and no bad note beyond the explicit allow-list below, each
//! entry with its reason.
//! REDbot's own revalidation check (it repeats a request with `If-None-Match`) must find a
//! 304 that keeps the headers the 200 had, for the page and the asset alike.
//!
//! REDbot is installed with pip (pinned, into the target directory, once) when it is
//! missing. Only when that is impossible here, without a way to PyPI, does the test skip,
//! loudly; under CI (`CI` set) it fails instead, as it does whenever the install fails while
//! PyPI is reachable.

use std::net::ToSocketAddrs as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value as Json;
use sesame_node::pages::bundle;
use sesame_proto::api::TxRequest;
use sesame_tests::TestNode;

/// The REDbot release the test runs (and its dependencies as pip resolves them).
const REDBOT_VERSION: &str = "2.7.1";
/// Longest one REDbot run may take. It makes a few requests to loopback; a run that takes
/// longer is stuck.
const REDBOT_RUN_MAX: Duration = Duration::from_secs(60);

/// Notes that may appear at level `WARN` or `BAD`: `(check, note id, why that is right)`.
/// A check of `"*"` means every check. Everything else at those levels fails the test.
/// Empty: REDbot 2.7.1 has nothing to say against any of the four answers. (It did warn
/// `STORE_PUBLIC_UNNECESSARY` about `Cache-Control: public, max-age=31536000, immutable`,
/// so the immutable answer goes without `public`, which only matters for requests with
/// `Authorization`.)
const ALLOWED: &[(&str, &str, &str)] = &[];

/// Runs REDbot on one request and prints its report as HAR (JSON), where every note has its
/// id and level. The CLI (`redbot URL`) cannot send request headers; this does what it does
/// with `set_request(url, headers=…)`. Arguments: the URL, then `Name: value` headers.
const DRIVER: &str = r#"
import sys
from configparser import ConfigParser

import thor
from redbot.formatter import find_formatter
from redbot.resource import HttpResource

url = sys.argv[1]
headers = [tuple(h.split(": ", 1)) for h in sys.argv[2:]]
parser = ConfigParser()
parser.read_dict({"redbot": {"enable_local_access": "True"}})
config = parser["redbot"]
resource = HttpResource(config)
resource.set_request(url, headers=headers)
formatter = find_formatter("har", "text", False)(
    config, resource, sys.stdout.write, {"tty_out": False, "descend": False}
)
formatter.bind_resource(resource)


@thor.events.on(formatter)
def formatter_done():
    thor.stop()


resource.check()
thor.run()
"#;

/// How to run REDbot: a Python and the folder REDbot was installed into.
struct Redbot {
    python: PathBuf,
    lib: PathBuf,
}

/// Python 3 with REDbot [`REDBOT_VERSION`] importable, installing it when it is missing;
/// `None` (after saying why, loudly) only when it cannot be installed for want of PyPI.
fn redbot() -> Option<Redbot> {
    let python = PathBuf::from(std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()));
    let lib = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("redbot-{REDBOT_VERSION}"));
    let redbot = Redbot { python, lib };
    if redbot.installed() {
        return Some(redbot);
    }
    // Into a folder of its own, then renamed: a test that runs meanwhile, or an install
    // cut short, never leaves a half-installed copy where the next run looks.
    let staging = tempfile::Builder::new()
        .prefix("redbot-install-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("make a folder to install REDbot into");
    let out = std::process::Command::new(&redbot.python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-input", "--target"])
        .arg(staging.path())
        .arg(format!("redbot=={REDBOT_VERSION}"))
        .output();
    let failure = match out {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "pip failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("{} -m pip: {e}", redbot.python.display())),
    };
    match failure {
        None => {
            let staged = staging.keep();
            if std::fs::rename(&staged, &redbot.lib).is_err() {
                // Another run installed it first; theirs is as good.
                let _ = std::fs::remove_dir_all(&staged);
            }
            assert!(
                redbot.installed(),
                "REDbot {REDBOT_VERSION} was installed into {} but does not import",
                redbot.lib.display()
            );
            Some(redbot)
        }
        Some(why) if pypi_reachable() || std::env::var_os("CI").is_some() => {
            panic!("cannot install REDbot {REDBOT_VERSION} with pip: {why}")
        }
        Some(why) => {
            eprintln!(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPED: the REDbot test did not run. PyPI cannot be reached from here, \n\
                 !!! so REDbot {REDBOT_VERSION} cannot be installed: {why}\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            None
        }
    }
}

impl Redbot {
    fn installed(&self) -> bool {
        let check = format!(
            "import redbot, sys; sys.exit(0 if redbot.__version__ == {REDBOT_VERSION:?} else 1)"
        );
        self.lib.is_dir()
            && std::process::Command::new(&self.python)
                .arg("-c")
                .arg(check)
                .env("PYTHONPATH", &self.lib)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    /// REDbot's report on `GET url` with `headers`: the status it got and its notes.
    async fn check(&self, url: &str, headers: &[String]) -> Report {
        let run = tokio::process::Command::new(&self.python)
            .arg("-c")
            .arg(DRIVER)
            .arg(url)
            .args(headers)
            .env("PYTHONPATH", &self.lib)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(REDBOT_RUN_MAX, run)
            .await
            .unwrap_or_else(|_| panic!("REDbot on {url} took over {REDBOT_RUN_MAX:?}"))
            .expect("run REDbot");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "REDbot on {url}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let har: Json = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("REDbot's HAR for {url}: {e}\n{stdout}"));
        let log = &har["log"];
        assert!(
            log.get("_red_error").is_none(),
            "REDbot on {url}: {}",
            log["_red_error"]
        );
        let entry = &log["entries"][0];
        let status = entry["response"]["status"]
            .as_u64()
            .unwrap_or_else(|| panic!("REDbot's HAR for {url} has no response status: {stdout}"));
        let notes = entry["_red_messages"]
            .as_array()
            .unwrap_or_else(|| panic!("REDbot's HAR for {url} has no notes: {stdout}"))
            .iter()
            .map(|n| Note {
                id: n["note_id"].as_str().unwrap_or_default().to_string(),
                level: n["level"].as_str().unwrap_or_default().to_string(),
                summary: n["summary"].as_str().unwrap_or_default().to_string(),
            })
            .collect();
        Report { status, notes }
    }
}

/// Whether PyPI answers on its HTTPS port (decides between skipping and failing).
fn pypi_reachable() -> bool {
    let Ok(addrs) = ("pypi.org", 443).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok())
}

struct Report {
    status: u64,
    notes: Vec<Note>,
}

#[derive(Debug)]
struct Note {
    id: String,
    level: String,
    summary: String,
}

impl Report {
    fn has(&self, id: &str) -> bool {
        self.notes.iter().any(|n| n.id == id)
    }
}

/// The failures in `report` of the check named `check`: notes at `WARN` or `BAD` that
/// [`ALLOWED`] does not name.
fn unexplained(check: &str, report: &Report) -> Vec<String> {
    let mut failures = Vec::new();
    for n in &report.notes {
        if n.level == "GOOD" || n.level == "INFO" {
            continue;
        }
        let allowed = ALLOWED
            .iter()
            .find(|(c, id, _)| (*c == "*" || *c == check) && *id == n.id);
        match allowed {
            Some((_, _, why)) => eprintln!("{check}: {} {} is allowed: {why}", n.level, n.id),
            None => failures.push(format!("{check}: {} {} ({})", n.level, n.id, n.summary)),
        }
    }
    failures
}

/// The page's stylesheet link, as `asset_url()` wrote it.
fn stylesheet(html: &str) -> String {
    let (_, rest) = html
        .split_once(r#"<link rel="stylesheet" href=""#)
        .unwrap_or_else(|| panic!("no stylesheet link in {html}"));
    rest.split('"').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redbot_finds_nothing_wrong_with_pages_assets_304s_and_404s() {
    let Some(redbot) = tokio::task::spawn_blocking(redbot).await.unwrap() else {
        return;
    };
    let node = TestNode::start_with(|c| c.debounce = Duration::from_millis(5))
        .await
        .unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    let request = TxRequest {
        ops: bundle::deploy_ops(&bundle::demo(), &[]),
        client_id: None,
        seq: None,
    };
    let index = admin.tx("demo", &request).await.unwrap().index;
    let url = node.node.url();
    let page = format!("{url}/demo/alice");
    let published = reqwest::get(format!("{page}?_min={index}")).await.unwrap();
    assert_eq!(published.status(), reqwest::StatusCode::OK);
    let etag = published.headers()["etag"].to_str().unwrap().to_string();
    let asset = stylesheet(&published.text().await.unwrap());
    assert!(
        asset.starts_with(&format!("{url}/demo/style.css?v=")),
        "{asset}"
    );

    let checks = [
        ("page", page.clone(), vec![], 200),
        ("asset", asset, vec![], 200),
        ("304", page, vec![format!("If-None-Match: {etag}")], 304),
        ("404", format!("{url}/demo/nobody"), vec![], 404),
        // A `?v=` that does not name the file: served like a page.
        (
            "stale asset",
            format!("{url}/demo/style.css?v=0123456789abcdef"),
            vec![],
            200,
        ),
    ];
    let reports = futures::future::join_all(
        checks
            .iter()
            .map(|(_, url, headers, _)| redbot.check(url, headers)),
    )
    .await;

    let mut failures = Vec::new();
    for ((check, url, _, status), report) in checks.iter().zip(&reports) {
        eprintln!("REDbot on {check} ({url}): {}", report.status);
        for n in &report.notes {
            eprintln!("  {:<5} {} ({})", n.level, n.id, n.summary);
        }
        assert_eq!(report.status, *status, "{check}: the status REDbot got");
        failures.extend(unexplained(check, report));
    }
    assert!(
        failures.is_empty(),
        "REDbot found problems:\n{}",
        failures.join("\n")
    );
    // REDbot's own revalidation found a 304 (a missing header there is a warning above).
    for (check, report) in checks.iter().zip(&reports).take(2) {
        assert!(
            report.has("INM_304"),
            "{}: no 304 on If-None-Match",
            check.0
        );
    }
    // The asset is fresh for a long time; the page (and a file at a wrong `?v=`) must be
    // revalidated each time.
    assert!(reports[1].has("FRESHNESS_FRESH"), "asset freshness");
    assert!(reports[0].has("FRESHNESS_NO_CACHE"), "page freshness");
    assert!(
        reports[4].has("FRESHNESS_NO_CACHE"),
        "stale asset freshness"
    );
    for (check, report) in checks.iter().zip(&reports) {
        assert!(report.has("CONTENT_TYPE_OPTIONS"), "{}: nosniff", check.0);
    }
    node.stop().await.unwrap();
}

/// The linter is not blind to what this is about: the headers pages had before
/// (`s-maxage` with `stale-while-revalidate`) draw its note that a shared cache cannot serve
/// them stale, and the `public` they carried its warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redbot_flags_the_old_page_headers() {
    let Some(redbot) = tokio::task::spawn_blocking(redbot).await.unwrap() else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "<!doctype html><title>t</title><p>hi</p>";
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nETag: \"abc\"\r\nConnection: close\r\n\
                     Cache-Control: public, max-age=0, s-maxage=10, stale-while-revalidate=60\r\n\
                     \r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    let report = redbot.check(&format!("http://{addr}/"), &[]).await;
    server.abort();
    assert_eq!(report.status, 200);
    assert!(report.has("FRESH_PROXY_REVALIDATE"), "{:#?}", report.notes);
    let failures = unexplained("old", &report);
    assert!(
        failures
            .iter()
            .any(|f| f.contains("STORE_PUBLIC_UNNECESSARY")),
        "{failures:#?}"
    );
}
