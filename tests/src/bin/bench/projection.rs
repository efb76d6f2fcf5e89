//! Full projection of a generated site, side by side with Hugo building the same pages.
//!
//! Sesame: a site of N profiles (a page each, plus the list page, the 404 page and the
//! sitemap), rebuilt from scratch with a changed layout so that every page's bytes change
//! and the new version is really published (a rebuild that renders identical bytes
//! publishes nothing: there is no new version to wait for). Two figures per run: the node's
//! own `last_publish_ms` (render + publish: blobs, manifest, root through Raft), and the
//! wall-clock from the rebuild request until status shows the new publish, polled every few
//! milliseconds (it also holds the projector's debounce).
//!
//! Hugo (Debian's `hugo`): one markdown file per profile with the same fields as front
//! matter, and the same layout, list page, profile page and 404 page written as Hugo
//! templates; `hugo --quiet` into a fresh temporary folder, wall-clock of the whole process.
//!
//! Both report the median of `--runs`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sesame_client::Http;
use sesame_proto::api::SiteStatus;
use sesame_proto::LogIndex;

use crate::report::{count, dur, median, Row};
use crate::site::{self, SITE};
use crate::tools;
use crate::Args;

/// How often status is polled while waiting for a rebuild's publish.
const STATUS_POLL: Duration = Duration::from_millis(2);
/// Pause before each rebuild, so it finds the projector idle (not in the debounce of the
/// round that the previous publish's own root commit wakes).
const SETTLE: Duration = Duration::from_millis(300);
/// Longest one rebuild or one Hugo build may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n = args.profiles();
    let runs = args.runs();
    let sesame = sesame_rebuilds(args, base, n, runs).await?;
    let hugo = hugo_builds(base, n, runs).await;

    let debounce = args.debounce().unwrap_or(Duration::from_millis(
        sesame_node::pages::projection::DEBOUNCE_MS_DEFAULT,
    ));
    let (peer, hugo_median) = match &hugo {
        Ok(h) => (
            format!(
                "Hugo {} `hugo --quiet`, same content ({} HTML files), median of {runs}: {}",
                h.version,
                count(h.html_files),
                dur(median(&h.times))
            ),
            Some(median(&h.times)),
        ),
        Err(e) => (format!("Hugo unavailable: {e:#}"), None),
    };
    let ratio = |ours: Duration| match hugo_median {
        Some(h) => format!(
            "{:.2}× faster than Hugo (target ≥ 3×)",
            h.as_secs_f64() / ours.as_secs_f64()
        ),
        None => "—".into(),
    };
    let what = format!(
        "full projection, {} profiles → {} pages + 404 + sitemap",
        count(n),
        count(n + 1)
    );
    let node_ms = median(&sesame.node);
    rows.push(Row::new(
        format!(
            "{what}: node's render + publish (`last_publish_ms` after a rebuild), median of {runs}"
        ),
        dur(node_ms),
        peer.clone(),
        ratio(node_ms),
    ));
    let wall = median(&sesame.wall);
    rows.push(Row::new(
        format!(
            "{what}: rebuild request → status shows the new publish (wall-clock, incl. the {} debounce), median of {runs}",
            dur(debounce)
        ),
        dur(wall),
        peer,
        ratio(wall),
    ));
    Ok(())
}

/// What the Sesame runs measured.
struct Rebuilds {
    node: Vec<Duration>,
    wall: Vec<Duration>,
}

async fn sesame_rebuilds(
    args: &Args,
    base: &Path,
    n: usize,
    runs: usize,
) -> anyhow::Result<Rebuilds> {
    let dir = tempfile::Builder::new()
        .prefix("projection-")
        .tempdir_in(base)?;
    let node = site::start_node(dir.path(), args.debounce()).await?;
    let admin = node.admin();
    let result = async {
        site::create(&admin, n).await?;
        let mut out = Rebuilds {
            node: Vec::new(),
            wall: Vec::new(),
        };
        let mut footer = String::new();
        for run in 0..runs {
            tokio::time::sleep(SETTLE).await;
            let before = admin.status(SITE).await?;
            footer = format!("Static pages projected by Sesame (build {run}).");
            // The rebuild first: it wakes the projector, which gathers commits for one
            // debounce; the layout write lands inside it, so one round renders everything
            // from scratch with the new layout and publishes it.
            let started = Instant::now();
            admin.rebuild(SITE).await?;
            let index = site::put_layout_footer(&admin, &footer).await?;
            let after = wait_new_publish(&admin, &before, index).await?;
            let wall = started.elapsed();
            let node_ms = after
                .last_publish_ms
                .context("status has no last_publish_ms after a publish")?;
            let rendered = after.pages_rendered_total - before.pages_rendered_total;
            eprintln!(
                "   sesame rebuild {run}: node {node_ms} ms, wall-clock {wall:.1?}, \
                 {rendered} page renders"
            );
            if rendered > 2 * n as u64 {
                eprintln!(
                    "   (the layout write missed the rebuild's round: this run holds two full \
                     renders)"
                );
            }
            anyhow::ensure!(
                rendered > n as u64,
                "a rebuild rendered only {rendered} pages of {}",
                n + 1
            );
            out.node.push(Duration::from_millis(node_ms));
            out.wall.push(wall);
        }
        // The new version is what is served.
        let page = reqwest::get(format!("{}/{SITE}/{}", admin.base(), site::profile_key(0)))
            .await?
            .error_for_status()?
            .text()
            .await?;
        anyhow::ensure!(
            page.contains(&footer),
            "the served page lacks the last layout"
        );
        anyhow::Ok(out)
    }
    .await;
    node.stop().await?;
    result
}

/// Polls status until it shows a publish newer than `before` that reflects `index`.
async fn wait_new_publish(
    admin: &Http,
    before: &SiteStatus,
    index: LogIndex,
) -> anyhow::Result<SiteStatus> {
    let deadline = Instant::now() + BUILD_TIMEOUT;
    loop {
        let status = admin.status(SITE).await?;
        if status.last_publish_at != before.last_publish_at && status.projected_index >= index {
            return Ok(status);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no new publish within {BUILD_TIMEOUT:?} (last error {:?})",
            status.last_error
        );
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// What the Hugo runs measured.
struct HugoBuilds {
    version: String,
    times: Vec<Duration>,
    /// HTML files the last build wrote.
    html_files: usize,
}

async fn hugo_builds(base: &Path, n: usize, runs: usize) -> anyhow::Result<HugoBuilds> {
    let hugo = tools::ensure("hugo", "hugo").await?;
    let version = tools::version(&hugo, &["version"])
        .await?
        .split_whitespace()
        .nth(1)
        .unwrap_or("?")
        .to_string();
    let src = tempfile::Builder::new()
        .prefix("hugo-src-")
        .tempdir_in(base)?;
    write_hugo_site(src.path(), n)?;
    let mut times = Vec::new();
    let mut html_files = 0;
    for run in 0..runs {
        let out = tempfile::Builder::new()
            .prefix("hugo-out-")
            .tempdir_in(base)?;
        let mut cmd = tokio::process::Command::new(&hugo);
        cmd.arg("--quiet")
            .arg("--source")
            .arg(src.path())
            .arg("--destination")
            .arg(out.path())
            .arg("--cacheDir")
            .arg(src.path().join("cache"));
        let started = Instant::now();
        tools::run(&mut cmd, BUILD_TIMEOUT).await?;
        let took = started.elapsed();
        eprintln!("   hugo build {run}: {took:.1?}");
        times.push(took);
        html_files = count_html(out.path())?;
    }
    anyhow::ensure!(
        html_files > n,
        "Hugo wrote {html_files} HTML files, expected {} or more: the site is not equivalent",
        n + 1
    );
    Ok(HugoBuilds {
        version,
        times,
        html_files,
    })
}

/// Hugo's version of the demo site: the same layout, list, profile and 404 templates, and a
/// markdown file per profile whose front matter holds the profile's fields.
fn write_hugo_site(dir: &Path, n: usize) -> anyhow::Result<()> {
    let write = |rel: &str, text: &str| -> anyhow::Result<()> {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    };
    // Only what Sesame makes: pages, the 404 page and the sitemap (no feeds, taxonomies or
    // section lists).
    write(
        "hugo.toml",
        r#"baseURL = "http://127.0.0.1/bench/"
title = "bench"
disableKinds = ["taxonomy", "term", "RSS", "section"]
[permalinks]
  profiles = "/:filename/"
"#,
    )?;
    write("layouts/_default/baseof.html", HUGO_LAYOUT)?;
    write("layouts/index.html", HUGO_INDEX)?;
    write("layouts/_default/single.html", HUGO_PROFILE)?;
    write("layouts/404.html", HUGO_404)?;
    write("static/style.css", &site::demo_asset("style.css")?)?;
    let content = dir.join("content").join("profiles");
    std::fs::create_dir_all(&content)?;
    for i in 0..n {
        let key = site::profile_key(i);
        let mut front = site::profile(i);
        front["title"] = serde_json::Value::String(key.clone());
        // JSON front matter: the profile's own fields, serialized as Sesame stores them.
        std::fs::write(content.join(format!("{key}.md")), format!("{front}\n"))?;
    }
    Ok(())
}

fn count_html(dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else if entry.path().extension().is_some_and(|e| e == "html") {
                n += 1;
            }
        }
    }
    Ok(n)
}

const HUGO_LAYOUT: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ block "title" . }}{{ site.Title }}{{ end }}</title>
<link rel="stylesheet" href="{{ site.BaseURL }}style.css">
</head>
<body>
<header><a class="home" href="{{ site.BaseURL }}">{{ site.Title }}</a></header>
<main>
{{ block "main" . }}{{ end }}
</main>
<footer>Static pages projected by Sesame.</footer>
</body>
</html>
"#;

const HUGO_INDEX: &str = r#"{{ define "title" }}People · {{ site.Title }}{{ end }}
{{ define "main" }}
<h1>People</h1>
<ul class="people">
{{ range first 100 (where site.RegularPages "Section" "profiles").ByTitle }}
  <li><a href="{{ .RelPermalink }}">{{ .Params.name }}</a> <span class="bio">{{ .Params.bio }}</span></li>
{{ else }}
  <li>No one yet.</li>
{{ end }}
</ul>
{{ end }}
"#;

const HUGO_PROFILE: &str = r#"{{ define "title" }}{{ .Params.name }} · {{ site.Title }}{{ end }}
{{ define "main" }}
<article class="profile">
  <h1>{{ .Params.name }}</h1>
  <p class="bio">{{ .Params.bio }}</p>
  {{ with .Params.links }}
  <ul class="links">
    {{ range . }}
    <li><a href="{{ .url }}" rel="me">{{ .title }}</a></li>
    {{ end }}
  </ul>
  {{ end }}
</article>
<p><a href="{{ site.BaseURL }}">All people</a></p>
{{ end }}
"#;

const HUGO_404: &str = r#"{{ define "title" }}Not found · {{ site.Title }}{{ end }}
{{ define "main" }}
<h1>Not found</h1>
<p>There is no page here. <a href="{{ site.BaseURL }}">See everyone</a>.</p>
{{ end }}
"#;
