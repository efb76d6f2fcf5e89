//! Measures a full projection of a generated 10,000-profile site, then incremental ones, with
//! each renderer: threads of this process, and the render pool's worker processes (what the
//! node uses; this executable is its own worker).
//!
//! `cargo run --release -p sesame-projector --example full_projection [profiles [threads|pool]]`

use std::sync::Arc;
use std::time::Instant;

use sesame_projector::sandbox::{worker_main, PoolConfig, RenderPool, WorkerCommand};
use sesame_projector::{ChangedKey, Config, MemorySource, Renderer, SiteProjector};
use sesame_proto::{Home, Tuple, Value};

const PROFILES_DEFAULT: usize = 10_000;
/// Incremental projections measured after the full one.
const EDITS: usize = 20;

const BASE: &str = r#"<!doctype html>
<html><head><title>{% block title %}{{ site.name }}{% endblock %}</title><link rel="stylesheet" href="{{ site.base_url }}/style.css"></head>
<body>{% block body %}{% endblock %}</body></html>"#;
const INDEX: &str = r#"{% extends "base.html" %}{% block body %}<ul>{% for p in list("profiles", limit=10000) %}<li><a href="{{ site.base_url }}/{{ p.key }}">{{ p.value.name }}</a></li>{% endfor %}</ul>{% endblock %}"#;
const PROFILE: &str = r#"{% extends "base.html" %}{% block title %}{{ page.tuple.value.name }}{% endblock %}{% block body %}<h1>{{ page.tuple.value.name }}</h1><p>{{ page.tuple.value.bio }}</p><ul>{% for link in page.tuple.value.links %}<li><a href="{{ link }}">{{ link }}</a></li>{% endfor %}</ul>{% endblock %}"#;

fn tuple(collection: &str, key: &str, json: serde_json::Value, version: u64) -> Tuple {
    Tuple {
        site: "bench".into(),
        collection: collection.into(),
        key: key.into(),
        value: Value::from_json(json).expect("generated values are valid"),
        version,
        origin: None,
        home: Home::Site,
    }
}

/// The argument that makes this executable a render worker.
const WORKER_ARG: &str = "render-worker";

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some(WORKER_ARG) {
        return worker_main();
    }
    let profiles: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("the argument is a number of profiles"))
        .unwrap_or(PROFILES_DEFAULT);
    let mut src = MemorySource::new();
    let t = |name: &str, source: &str| {
        tuple(
            "_templates",
            name,
            serde_json::json!({ "source": source }),
            1,
        )
    };
    src.insert(t("base.html", BASE));
    src.insert(t("index", INDEX));
    src.insert(t("profile", PROFILE));
    src.insert(tuple(
        "_routes",
        "/",
        serde_json::json!({ "template": "index" }),
        1,
    ));
    src.insert(tuple(
        "_routes",
        "/{key}",
        serde_json::json!({ "template": "profile", "each": "profiles" }),
        1,
    ));
    src.insert(tuple(
        "_assets",
        "style.css",
        serde_json::json!("body { font-family: sans-serif; }"),
        1,
    ));
    for i in 0..profiles {
        let value = serde_json::json!({
            "name": format!("User {i}"),
            "bio": format!("I am user number {i} & I like <angle brackets>."),
            "links": [format!("https://example.com/{i}"), "https://example.org/"],
        });
        src.insert(tuple("profiles", &format!("user{i:06}"), value, 2));
    }

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let command = WorkerCommand::current_exe(&[WORKER_ARG]).expect("find this executable");
    let pool = Arc::new(RenderPool::new(PoolConfig::new(command)));
    let only = std::env::args().nth(2);
    for (name, what, renderer) in [
        (
            "threads",
            format!("{threads} threads"),
            Renderer::Threads(threads),
        ),
        (
            "pool",
            format!("{threads} worker processes"),
            Renderer::Pool(pool),
        ),
    ] {
        if only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        println!("== {what}");
        let mut config = Config::new("https://bench.example.com");
        config.renderer = renderer;
        measure(config, src.clone(), profiles);
    }
    std::process::ExitCode::SUCCESS
}

fn measure(config: Config, mut src: MemorySource, profiles: usize) {
    let t = |name: &str, source: &str| {
        tuple(
            "_templates",
            name,
            serde_json::json!({ "source": source }),
            1,
        )
    };
    let mut projector = SiteProjector::new("bench", config);
    let started = Instant::now();
    let p = projector.render_all(&src, 2).expect("render_all");
    let full = started.elapsed();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let bytes: usize = p.new_blobs.iter().map(|(_, b)| b.len()).sum();
    println!(
        "full projection: {} pages rendered, {} files, {:.1} MiB: {full:?}",
        p.pages_rendered,
        p.manifest.files.len(),
        bytes as f64 / (1 << 20) as f64
    );

    // Incremental: edit one profile at a time. With the index listing every profile, each
    // edit re-renders a 10,000-item page; a paginated index (the second run) is the usual case.
    let mut index = 2;
    measure_edits(
        &mut projector,
        &mut src,
        &mut index,
        profiles,
        "index lists all profiles",
    );
    let paginated = INDEX.replace("limit=10000", "limit=100");
    index += 1;
    src.insert(t("index", &paginated));
    projector
        .render_changes(&src, index, &[ChangedKey::new("_templates", "index")])
        .expect("render_changes");
    measure_edits(
        &mut projector,
        &mut src,
        &mut index,
        profiles,
        "index lists 100 profiles",
    );
}

fn measure_edits(
    projector: &mut SiteProjector,
    src: &mut MemorySource,
    index: &mut u64,
    profiles: usize,
    what: &str,
) {
    let mut times = Vec::new();
    for edit in 0..EDITS {
        // Keys past the first 100, so a paginated index does not list them.
        let key = format!("user{:06}", (100 + edit * 7) % profiles.max(1));
        *index += 1;
        let value =
            serde_json::json!({ "name": format!("Renamed at {index}"), "bio": "", "links": [] });
        src.insert(tuple("profiles", &key, value, *index));
        let started = Instant::now();
        let p = projector
            .render_changes(src, *index, &[ChangedKey::new("profiles", key)])
            .expect("render_changes");
        times.push(started.elapsed());
        assert!(p.changed && p.errors.is_empty());
    }
    times.sort();
    println!(
        "one profile edit, {what} ({EDITS} edits): p50 {:?}, max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
