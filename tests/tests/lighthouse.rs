//! Lighthouse (from npm, with Debian's Chromium) scores the studio's welcome page, a
//! logged-in person's editor and their public page at 0.95 or more in every category
//! (performance, accessibility, best practices, SEO), with the mobile and the desktop
//! preset. The JSON reports and a summary go to `target/test-artifacts/lighthouse/`; a
//! category below the bar fails the test with the audits that cost it points.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::header::LOCATION;
use serde_json::Value;
use sesame_tests::browser::{
    all_ended, artifacts_dir, ensure_chromium, kill, lighthouse_bin, processes,
};
use sesame_tests::TestNode;

/// The lowest score a category may have.
const SCORE_MIN: f64 = 0.95;
/// The categories scored.
const CATEGORIES: [&str; 4] = ["performance", "accessibility", "best-practices", "seo"];
/// Longest one Lighthouse run may take (a run takes about ten seconds here).
const RUN_WAIT: Duration = Duration::from_secs(180);

/// A person with a profile: their session cookie (`name=value`).
async fn person_with_a_profile(url: &str, username: &str) -> String {
    let (cookie, csrf) = sesame_tests::studio::http_sign_up(url, username).await;
    let saved = sesame_tests::studio::http_post_form(
        url,
        "/_studio/save",
        &cookie,
        &[
            ("_csrf", csrf.as_str()),
            ("name", "Lena Lighthouse"),
            (
                "bio",
                "Keeps the lamp lit and the pages fast: tuples in, static pages out.",
            ),
            (
                "links",
                "Blog https://example.com/lena\nCode https://example.com/lena/code",
            ),
            ("theme", "classic"),
        ],
    )
    .await;
    assert_eq!(saved.status(), 303);
    let index: u64 = saved.headers()[LOCATION]
        .to_str()
        .unwrap()
        .rsplit('=')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The public page is published before Lighthouse looks at it.
    let page = reqwest::Client::new()
        .get(format!("{url}/demo/{username}"))
        .header("Sesame-Min-Index", index.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    cookie
}

/// One page's Lighthouse run: its report and, per category, its score.
struct Scored {
    report: Value,
    scores: Vec<(&'static str, f64)>,
}

/// Runs Lighthouse on `url` with `preset` ("mobile" or "desktop"), the request headers
/// `headers` (JSON) if given; the report goes to `out`.
async fn lighthouse(
    bin: &Path,
    url: &str,
    preset: &str,
    headers: Option<&str>,
    out: &Path,
) -> anyhow::Result<Scored> {
    let chromium = std::process::Command::new("sh")
        .args(["-c", "command -v chromium"])
        .output()
        .context("find chromium")?;
    let chromium = String::from_utf8(chromium.stdout)?.trim().to_string();
    // Lighthouse's Chromium gets its profile from `mktemp` (under TMPDIR) and its crash
    // handler's database under XDG_CONFIG_HOME: both in a folder of this run, which names
    // the run's processes (`processes`: those naming it, and their process groups).
    let tmp = tempfile::Builder::new()
        .prefix("sesame-lighthouse-")
        .tempdir()?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg(url)
        .arg("--output=json")
        .arg(format!("--output-path={}", out.display()))
        .arg("--quiet")
        .arg("--chrome-flags=--headless=new --no-sandbox --disable-dev-shm-usage")
        .arg(format!("--only-categories={}", CATEGORIES.join(",")))
        .env("CHROME_PATH", &chromium)
        .env("TMPDIR", tmp.path())
        .env("XDG_CONFIG_HOME", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // In the test's process group, so a Ctrl-C reaches it (it then ends its Chromium).
        .kill_on_drop(true);
    if preset == "desktop" {
        cmd.arg("--preset=desktop");
    }
    if let Some(h) = headers {
        cmd.arg(format!("--extra-headers={h}"));
    }
    let child = cmd.spawn().context("start lighthouse")?;
    let output = match tokio::time::timeout(RUN_WAIT, child.wait_with_output()).await {
        Ok(o) => o.context("run lighthouse")?,
        Err(_) => {
            // Lighthouse itself is killed as the future is dropped; its Chromium (a process
            // group of its own) here.
            for (pid, _) in processes(None, tmp.path()) {
                let _ = kill(pid);
            }
            anyhow::bail!("lighthouse on {url} ({preset}) took over {RUN_WAIT:?}");
        }
    };
    // Lighthouse ends the Chromium it started; a run leaves nothing behind.
    all_ended(None, tmp.path())
        .await
        .with_context(|| format!("after lighthouse on {url} ({preset})"))?;
    anyhow::ensure!(
        output.status.success(),
        "lighthouse on {url} ({preset}): {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(
        &std::fs::read(out).with_context(|| format!("read {}", out.display()))?,
    )
    .context("parse the lighthouse report")?;
    if let Some(e) = report.get("runtimeError") {
        anyhow::bail!("lighthouse on {url} ({preset}): {e}");
    }
    let mut scores = Vec::new();
    for id in CATEGORIES {
        let score = report["categories"][id]["score"]
            .as_f64()
            .with_context(|| format!("no {id} score for {url} ({preset})"))?;
        scores.push((id, score));
    }
    Ok(Scored { report, scores })
}

/// The audits of `category` that cost it points: `id: title (what was found)`.
fn lost_points(report: &Value, category: &str) -> Vec<String> {
    let refs = report["categories"][category]["auditRefs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    refs.iter()
        .filter(|r| r["weight"].as_f64().unwrap_or(0.0) > 0.0)
        .filter_map(|r| {
            let id = r["id"].as_str()?;
            let audit = &report["audits"][id];
            let score = audit["score"].as_f64()?;
            (score < 1.0).then(|| {
                format!(
                    "{id}: {} (score {score}{})",
                    audit["title"].as_str().unwrap_or_default(),
                    audit["displayValue"]
                        .as_str()
                        .map(|d| format!(", {d}"))
                        .unwrap_or_default()
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studio_and_public_page_score_well_in_lighthouse() {
    ensure_chromium().unwrap();
    let bin = lighthouse_bin().unwrap();
    let node = TestNode::start_with(|c| {
        c.write_rate = None;
        c.studio_site = Some("demo".into());
    })
    .await
    .unwrap();
    assert!(sesame_node::cli::seed_demo(&node.node.node).await.unwrap());
    let url = node.node.url();
    let cookie = person_with_a_profile(&url, "lena").await;
    let headers = serde_json::json!({ "Cookie": cookie }).to_string();

    let dir = artifacts_dir().join("lighthouse");
    std::fs::create_dir_all(&dir).unwrap();
    let pages = [
        ("studio-welcome", format!("{url}/_studio/"), None),
        (
            "studio-editor",
            format!("{url}/_studio/"),
            Some(headers.as_str()),
        ),
        ("public-page", format!("{url}/demo/lena"), None),
    ];
    let mut summary = String::new();
    let mut failures = Vec::new();
    for preset in ["mobile", "desktop"] {
        for (page, page_url, headers) in &pages {
            let out = dir.join(format!("{page}-{preset}.json"));
            let scored = lighthouse(&bin, page_url, preset, *headers, &out)
                .await
                .unwrap();
            // The editor run was logged in: its script asked for the publish status (the
            // welcome page has no status to poll).
            let polled = scored.report["audits"]["network-requests"]["details"]["items"]
                .as_array()
                .is_some_and(|items| {
                    items.iter().any(|i| {
                        i["url"]
                            .as_str()
                            .is_some_and(|u| u.contains("/_studio/status?index="))
                    })
                });
            assert_eq!(polled, headers.is_some(), "{page} ({preset}): logged in");
            let line = scored
                .scores
                .iter()
                .map(|(c, s)| format!("{c} {s:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            eprintln!("lighthouse {page} ({preset}): {line}");
            if summary.is_empty() {
                summary.push_str(&format!(
                    "Lighthouse {} on {}\n",
                    scored.report["lighthouseVersion"].as_str().unwrap_or("?"),
                    scored.report["environment"]["hostUserAgent"]
                        .as_str()
                        .unwrap_or("?")
                ));
            }
            summary.push_str(&format!("{page} ({preset}): {line}\n"));
            for (category, score) in &scored.scores {
                if *score < SCORE_MIN {
                    failures.push(format!(
                        "{page} ({preset}) {category} {score:.2} < {SCORE_MIN}:\n  {}",
                        lost_points(&scored.report, category).join("\n  ")
                    ));
                }
            }
        }
    }
    std::fs::write(dir.join("summary.txt"), &summary).unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    node.stop().await.unwrap();
}
