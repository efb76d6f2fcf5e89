//! Full projection of a generated site, side by side with Hugo building the same pages.
//!
//! Sesame: a site of N profiles (a page each, plus the list page, the 404 page and the
//! sitemap), every page rendered again by a change to the layout they all extend, so that
//! every page's bytes change and the new version is really published. Two figures per run:
//! the node's own `last_publish_ms` (render + publish: blobs, manifest, root through Raft),
//! and the wall-clock from the layout write until status shows the new publish, polled every
//! few milliseconds (it also holds the projector's debounce).
//!
//! Hugo (Debian's `hugo`): one markdown file per profile with the same fields as front
//! matter, and the same layout, list page, profile page and 404 page written as Hugo
//! templates; `hugo --quiet` into a fresh temporary folder, wall-clock of the whole process.
//!
//! Both run on the same filesystem (the bench folder: the disk, or tmpfs with `--tmpfs`;
//! Hugo's many small writes make its time depend on the filesystem far more than Sesame's).
//! Each side reports best and median of `--runs`, and its CPU time (user / sys): Hugo's from
//! `/usr/bin/time` (the child's own rusage), Sesame's as the delta of this process (where
//! the node runs) and its live children (the render workers) over the rebuild, read from
//! `/proc`, so it also holds the harness's status polling. Ratios are on medians; a side
//! whose slowest run took more than 1.5× its fastest is flagged.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sesame_client::Http;
use sesame_proto::api::SiteStatus;
use sesame_proto::LogIndex;

use crate::cpu::{self, Cpu};
use crate::report::{best_median, count, dur, median, spread_flag, Row};
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
    let fs = crate::fs::fs_type(base)?;
    let sesame = sesame_rebuilds(args, base, n, runs).await?;
    let hugo = hugo_builds(base, n, runs).await;

    let debounce = args.debounce().unwrap_or(Duration::from_millis(
        sesame_node::pages::projection::DEBOUNCE_MS_DEFAULT,
    ));
    let (peer, hugo_median) = match &hugo {
        Ok(h) => (
            format!(
                "Hugo {} `hugo --quiet`, same content ({} HTML files), source and output on \
                 {fs}: {}",
                h.version,
                count(h.html_files),
                best_median(&h.times)
            ),
            Some(median(&h.times)),
        ),
        Err(e) => (format!("Hugo unavailable: {e:#}"), None),
    };
    let hugo_times = hugo.as_ref().map(|h| h.times.clone()).unwrap_or_default();
    let ratio = |ours: &[Duration], theirs: Option<Duration>, what: &str| {
        let mut out = match theirs {
            Some(h) => format!(
                "{:.2}× {what} Hugo, on medians{}",
                h.as_secs_f64() / median(ours).as_secs_f64(),
                // The target is for time; the CPU row only compares.
                if what == "faster than" {
                    " (target ≥ 3×)"
                } else {
                    ""
                }
            ),
            None => "—".into(),
        };
        for flag in [
            spread_flag("Sesame", ours),
            spread_flag("Hugo", &hugo_times),
        ]
        .into_iter()
        .flatten()
        {
            out.push_str(&format!("; {flag}"));
        }
        out
    };
    let what = format!(
        "full projection, {} profiles → {} pages + 404 + sitemap, data on {fs}",
        count(n),
        count(n + 1)
    );
    rows.push(Row::new(
        format!("{what}: node's render + publish (`last_publish_ms` after the full re-render)"),
        best_median(&sesame.node),
        peer.clone(),
        ratio(&sesame.node, hugo_median, "faster than"),
    ));
    rows.push(Row::new(
        format!(
            "{what}: layout write → status shows the new publish (wall-clock, incl. the {} \
             debounce)",
            dur(debounce)
        ),
        best_median(&sesame.wall),
        peer,
        ratio(&sesame.wall, hugo_median, "faster than"),
    ));
    let sesame_cpu: Vec<Duration> = sesame.cpu.iter().map(Cpu::total).collect();
    let (hugo_cpu, hugo_cpu_median) = match &hugo {
        Ok(h) if !h.cpu.is_empty() => {
            let totals: Vec<Duration> = h.cpu.iter().map(Cpu::total).collect();
            (
                format!("Hugo, user / sys per run: {}", cpu_runs(&h.cpu)),
                Some(median(&totals)),
            )
        }
        Ok(_) => (
            "Hugo's CPU time unavailable (no /usr/bin/time)".into(),
            None,
        ),
        Err(_) => ("—".into(), None),
    };
    rows.push(Row::new(
        format!(
            "{what}: CPU time of the rebuild, user / sys per run (the node's process, incl. \
             the harness's status polling, and its render workers)"
        ),
        cpu_runs(&sesame.cpu),
        hugo_cpu,
        ratio(&sesame_cpu, hugo_cpu_median, "less CPU than"),
    ));
    Ok(())
}

/// `0.41 s / 0.05 s, 0.39 s / 0.04 s`: user / sys of each run.
fn cpu_runs(runs: &[Cpu]) -> String {
    runs.iter()
        .map(|c| format!("{} / {}", dur(c.user), dur(c.sys)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the Sesame runs measured.
struct Rebuilds {
    node: Vec<Duration>,
    wall: Vec<Duration>,
    cpu: Vec<Cpu>,
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
            cpu: Vec::new(),
        };
        let mut footer = String::new();
        for run in 0..runs {
            tokio::time::sleep(SETTLE).await;
            let before = admin.status(SITE).await?;
            footer = format!("Static pages projected by Sesame (build {run}).");
            // A new footer in the layout every page extends: one round renders every page
            // again and publishes them (a rebuild request as well would start a round at once
            // and the write would land in a second one: two full renders).
            let cpu_before = cpu::self_and_children()?;
            let started = Instant::now();
            let index = site::put_layout_footer(&admin, &footer).await?;
            let after = wait_new_publish(&admin, &before, index).await?;
            let wall = started.elapsed();
            let cpu = cpu::self_and_children()?.since(cpu_before);
            let node_ms = after
                .last_publish_ms
                .context("status has no last_publish_ms after a publish")?;
            let rendered = after.pages_rendered_total - before.pages_rendered_total;
            eprintln!(
                "   sesame rebuild {run}: node {node_ms} ms, wall-clock {wall:.1?}, \
                 {rendered} page renders, CPU user {:.2?} sys {:.2?}",
                cpu.user, cpu.sys
            );
            if rendered > 2 * n as u64 {
                eprintln!("   (this run holds two full renders)");
            }
            anyhow::ensure!(
                rendered > n as u64,
                "a rebuild rendered only {rendered} pages of {}",
                n + 1
            );
            out.node.push(Duration::from_millis(node_ms));
            out.wall.push(wall);
            out.cpu.push(cpu);
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
    /// User and system time of each build (empty without `/usr/bin/time`).
    cpu: Vec<Cpu>,
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
    // `/usr/bin/time` reports the child's own rusage (wait4): exact user and system time.
    let time = tools::which("time").filter(|p| p.starts_with("/usr/bin"));
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    let mut html_files = 0;
    for run in 0..runs {
        let out = tempfile::Builder::new()
            .prefix("hugo-out-")
            .tempdir_in(base)?;
        let usage = src.path().join("rusage");
        let mut cmd = match &time {
            Some(time) => {
                let mut cmd = tokio::process::Command::new(time);
                cmd.arg("-f").arg("%U %S").arg("-o").arg(&usage).arg(&hugo);
                cmd
            }
            None => tokio::process::Command::new(&hugo),
        };
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
        let used = match &time {
            Some(_) => Some(parse_time(&std::fs::read_to_string(&usage)?)?),
            None => None,
        };
        eprintln!(
            "   hugo build {run}: {took:.1?}{}",
            used.map(|c| format!(", CPU user {:.2?} sys {:.2?}", c.user, c.sys))
                .unwrap_or_default()
        );
        times.push(took);
        cpu.extend(used);
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
        cpu,
        html_files,
    })
}

/// `/usr/bin/time -f "%U %S"`'s output: user and system seconds (its last line: a failing
/// child's exit status comes before it).
fn parse_time(text: &str) -> anyhow::Result<Cpu> {
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("/usr/bin/time wrote nothing")?;
    let mut fields = line.split_whitespace().map(|f| f.parse::<f64>());
    match (fields.next(), fields.next()) {
        (Some(Ok(user)), Some(Ok(sys))) => Ok(Cpu {
            user: Duration::from_secs_f64(user),
            sys: Duration::from_secs_f64(sys),
        }),
        _ => anyhow::bail!("unexpected /usr/bin/time output {line:?}"),
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn time_output_parses() {
        let c = super::parse_time("0.85 13.20\n").unwrap();
        assert_eq!(c.user.as_millis(), 850);
        assert_eq!(c.sys.as_millis(), 13_200);
        assert!(super::parse_time("Command exited with non-zero status 1\n").is_err());
    }
}
