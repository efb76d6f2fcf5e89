//! The render pool: pages render in worker processes with memory and time bounded, a page
//! that breaks a limit (or whose worker dies) fails alone, and concurrent batches share the
//! workers fairly.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use sesame_projector::sandbox::{PoolConfig, RenderPool, WorkerCommand};
use sesame_projector::{
    Config, MemorySource, Renderer, SiteProjector, Source, SourceError, TemplateError,
};
use sesame_proto::Tuple;

const MEMORY_BYTES_MAX: u64 = 128 << 20;

fn pool_with(command: WorkerCommand, workers: usize) -> Arc<RenderPool> {
    let mut config = PoolConfig::new(command);
    config.workers = workers;
    config.memory_bytes_max = MEMORY_BYTES_MAX;
    config.page_time_max = Duration::from_secs(2);
    Arc::new(RenderPool::new(config))
}

fn worker() -> WorkerCommand {
    WorkerCommand::new(env!("CARGO_BIN_EXE_sesame-render-worker"))
}

fn pooled(pool: &Arc<RenderPool>) -> Config {
    let mut config = Config::new(BASE_URL);
    config.renderer = Renderer::Pool(Arc::clone(pool));
    config
}

fn error_at<'e>(errors: &'e [TemplateError], path: &str) -> &'e TemplateError {
    errors
        .iter()
        .find(|e| e.path.as_deref() == Some(path))
        .unwrap_or_else(|| panic!("no error for {path} in {errors:#?}"))
}

#[test]
fn the_pool_renders_what_threads_render() {
    let pool = pool_with(worker(), 2);
    let mut threads = Harness::demo();
    let mut workers = Harness::demo_with(pooled(&pool));
    for h in [&mut threads, &mut workers] {
        h.template(
            "feed.xml",
            r#"<feed>{% for p in list("profiles") %}<e>{{ p.value.name }}</e>{% endfor %}</feed>"#,
        );
        h.put("_routes", "/feed.xml", json!({ "template": "feed.xml" }));
        h.put("settings", "site", json!({ "title": "T" }));
        h.template(
            "index",
            &INDEX.replace(
                "<h1>People</h1>",
                r#"<h1>{{ get("settings", "site").value.title }}</h1>"#,
            ),
        );
    }
    let a = threads.full();
    let b = workers.full();
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(a.manifest_id, b.manifest_id);
    assert_eq!(
        workers.page("/feed.xml"),
        "<feed><e>Alice</e><e>Bob</e></feed>"
    );

    // Incremental renders read through the pool too, and record the same dependencies.
    for h in [&mut threads, &mut workers] {
        h.put("settings", "site", json!({ "title": "New title" }));
    }
    let a = threads.apply();
    let b = workers.apply();
    assert_eq!(b.manifest.delta.changed, ["/"]);
    assert_eq!(a.manifest_id, b.manifest_id);
    assert!(workers.page("/").contains("<h1>New title</h1>"));
}

#[test]
fn many_pages_pipelined_through_the_pool_match_threads() {
    let pool = pool_with(worker(), 2);
    let mut threads = Harness::demo();
    let mut workers = Harness::demo_with(pooled(&pool));
    for h in [&mut threads, &mut workers] {
        for i in 0..300 {
            h.put(
                "profiles",
                &format!("user{i:03}"),
                json!({ "name": format!("User {i}"), "bio": "<b>hi</b>" }),
            );
        }
        // Every profile page also reads a list that is not preloaded (a computed name), so
        // reads cross the pipe while the next page waits in it.
        h.template(
            "profile",
            &PROFILE.replace(
                "<p>{{ page.tuple.value.bio }}</p>",
                r#"{% set c = "profiles" %}<p>{{ list(c, limit=3)|length }}</p>"#,
            ),
        );
    }
    let a = threads.full();
    let b = workers.full();
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(b.pages_rendered, 303);
    assert_eq!(a.manifest_id, b.manifest_id);
    assert!(workers.page("/user299").contains("<p>3</p>"));
}

/// A worker answers reads of a collection it was sent whole itself; each such read must
/// still be a dependency of its page, or an edit there would leave the page stale. The
/// threads renderer is the reference: same files after every edit, and only the pages that
/// read the edited key render again.
#[test]
fn reads_a_worker_answers_itself_are_dependencies() {
    const PROFILES: usize = 100;
    let pool = pool_with(worker(), 1);
    let mut threads = Harness::demo();
    let mut workers = Harness::demo_with(pooled(&pool));
    for h in [&mut threads, &mut workers] {
        for i in 0..PROFILES {
            h.put(
                "profiles",
                &format!("user{i:03}"),
                json!({ "name": format!("User {i}") }),
            );
        }
        h.put("settings", "site", json!({ "title": "T" }));
        h.put("guestbook", "user042/1", json!({ "text": "hello" }));
        // Literal collection names: a full render preloads both, so the worker gets them
        // whole after its first read of each.
        h.template(
            "profile",
            &PROFILE.replace(
                "<p>{{ page.tuple.value.bio }}</p>",
                r#"<p>{{ get("settings", "site").value.title }}</p>{% for e in list("guestbook", prefix=page.key ~ "/") %}<q>{{ e.value.text }}</q>{% endfor %}"#,
            ),
        );
    }
    let a = threads.full();
    let b = workers.full();
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(a.manifest_id, b.manifest_id);
    assert!(
        pool.collections_sent() >= 2,
        "the worker answered no reads itself ({} collections sent)",
        pool.collections_sent()
    );
    assert!(workers.page("/user042").contains("<q>hello</q>"));

    // Every profile page read the settings, most of them in the worker.
    for h in [&mut threads, &mut workers] {
        h.put("settings", "site", json!({ "title": "New title" }));
    }
    let a = threads.apply();
    let b = workers.apply();
    assert!(b.pages_rendered >= PROFILES as u64, "{}", b.pages_rendered);
    assert_eq!(b.pages_rendered, a.pages_rendered);
    assert_eq!(a.manifest_id, b.manifest_id);
    assert!(workers.page("/user077").contains("<p>New title</p>"));

    // One page listed this guestbook prefix (in the worker, in the render just before).
    for h in [&mut threads, &mut workers] {
        h.put("guestbook", "user042/2", json!({ "text": "again" }));
        h.put("guestbook", "user043/1", json!({ "text": "first" }));
    }
    let a = threads.apply();
    let b = workers.apply();
    assert_eq!(b.manifest.delta.changed, ["/user042", "/user043"]);
    assert_eq!(a.manifest_id, b.manifest_id);
    assert!(workers.page("/user043").contains("<q>first</q>"));
}

/// Pages whose tuples and bodies are larger than a pipe's buffer (64 KiB) over a run: the
/// driver must not write runs the worker cannot take while it writes results the driver
/// is not reading (they would wait for each other for good).
#[test]
fn runs_of_large_pages_do_not_fill_the_pipes() {
    let pool = pool_with(worker(), 1);
    let mut threads = Harness::demo();
    let mut workers = Harness::demo_with(pooled(&pool));
    let bio = "x".repeat(20 << 10);
    for h in [&mut threads, &mut workers] {
        for i in 0..100 {
            h.put(
                "profiles",
                &format!("user{i:03}"),
                json!({ "name": format!("User {i}"), "bio": bio }),
            );
        }
    }
    let a = threads.full();
    let b = workers.full();
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(b.pages_rendered, a.pages_rendered);
    assert_eq!(a.manifest_id, b.manifest_id);
}

/// Templates that fuel and the output limit do not stop: each must fail alone.
const POISON: [(&str, &str, &str); 5] = [
    (
        "/replace",
        r#"{% set s = "a" * 1000 %}{% set s = s|replace("a", s) %}{% set s = s|replace("a", s) %}{{ s|length }}"#,
        "the page needed more than its memory limit of 128 MiB",
    ),
    (
        "/indent",
        r#"{{ 'a\nb'|indent(1000000000) }}"#,
        "the page needed more than its memory limit of 128 MiB",
    ),
    (
        "/doubling",
        r#"{% set ns = namespace(s="ab") %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"#,
        "the page needed more than its memory limit of 128 MiB",
    ),
    (
        "/recursion",
        r#"{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"#,
        "recursion limit exceeded",
    ),
    (
        "/slow",
        r#"{% set s = "ab" * 10000000 %}{% for i in range(100000) %}{{ (s|replace("a", "c"))|length }}{% endfor %}"#,
        "the page took longer than its time limit of 2 s",
    ),
];

#[test]
fn a_page_past_its_memory_or_time_fails_alone() {
    let pool = pool_with(worker(), 2);
    let mut h = Harness::demo_with(pooled(&pool));
    for (path, source, _) in POISON {
        let name = format!("{}.html", &path[1..]);
        h.template(&name, source);
        h.put("_routes", path, json!({ "template": name }));
    }
    let p = h.full();
    for (path, _, message) in POISON {
        let e = error_at(&p.errors, path);
        assert!(e.message.contains(message), "{path}: {e}");
        assert_eq!(e.template, format!("{}.html", &path[1..]));
        assert!(!p.manifest.files.contains_key(path), "{path}");
    }
    assert_eq!(p.errors.len(), POISON.len(), "{:#?}", p.errors);
    assert!(h.page("/alice").contains("<h1>Alice</h1>"));
    assert!(h.page("/").contains("Bob"));

    // Workers that died were replaced: the site keeps updating, and healthy pages keep
    // their workers (each of the two slots starts at most one more).
    let started = pool.workers_started();
    assert!(
        started >= 4,
        "poisoned workers were replaced ({started} started)"
    );
    for n in 0..5 {
        let name = format!("Alice {n}");
        h.put("profiles", "alice", json!({ "name": name, "bio": "" }));
        let p = h.apply();
        assert!(h.page("/alice").contains(&format!("<h1>{name}</h1>")));
        assert!(p.errors.is_empty(), "{:?}", p.errors);
    }
    assert!(
        pool.workers_started() <= started + 2,
        "healthy pages kill no worker"
    );

    // A fixed template recovers its page, and the problem clears.
    h.template("replace.html", "fine");
    h.apply();
    assert!(h.page("/replace").ends_with(">fine"));
    assert!(!h
        .projector
        .errors()
        .iter()
        .any(|e| e.path.as_deref() == Some("/replace")));
}

#[test]
fn a_worker_that_will_not_start_fails_its_pages_with_a_clear_error() {
    for (command, expected) in [
        (WorkerCommand::new("true"), "the renderer could not start"),
        (
            WorkerCommand::new("sh")
                .arg("-c")
                .arg("echo garbage-garbage"),
            "malformed message",
        ),
        (
            WorkerCommand::new("/nonexistent/sesame"),
            "running /nonexistent/sesame",
        ),
    ] {
        let pool = pool_with(command, 1);
        let mut h = Harness::demo_with(pooled(&pool));
        let p = h.full();
        let e = error_at(&p.errors, "/alice");
        assert!(e.message.contains(expected), "{e}");
        assert_eq!(e.template, "profile");
        assert!(!p.manifest.files.contains_key("/alice"));
        // Assets and generated files do not need a renderer.
        assert!(p.manifest.files.contains_key("/style.css"));
    }
}

/// A `Source` that counts the reads it answers.
struct Counting {
    inner: MemorySource,
    reads: Arc<AtomicUsize>,
}

impl Source for Counting {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Tuple>, SourceError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(collection, key)
    }

    fn list(
        &self,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Tuple>, SourceError> {
        self.inner.list(collection, prefix, limit)
    }
}

#[test]
fn a_large_batch_does_not_hold_up_a_small_one() {
    const SLOW_PAGES: usize = 100;
    let pool = pool_with(worker(), 1);

    // Site "slow": pages that burn fuel, each first reading one tuple through the store (a
    // computed collection name is not preloaded), so the test can watch its progress.
    let mut slow = MemorySource::new();
    let page = r#"{% set c = "counted" %}{{ get(c, page.key).value }}{% for i in range(10000) %}{% endfor %}"#;
    slow.insert(tuple("_templates", "page", json!({ "source": page }), 1));
    slow.insert(tuple(
        "_routes",
        "/{key}",
        json!({ "template": "page", "each": "items" }),
        1,
    ));
    for i in 0..SLOW_PAGES {
        slow.insert(tuple("items", &format!("i{i:03}"), json!(i), 1));
        slow.insert(tuple("counted", &format!("i{i:03}"), json!(i), 1));
    }
    let reads = Arc::new(AtomicUsize::new(0));
    let slow = Counting {
        inner: slow,
        reads: Arc::clone(&reads),
    };
    let slow_pool = Arc::clone(&pool);
    let slow_site = std::thread::spawn(move || {
        let mut projector = SiteProjector::new("slow", pooled(&slow_pool));
        let p = projector
            .render_all(&slow, 1)
            .expect("render the slow site");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        p.pages_rendered
    });

    // Site "quick": one page, rendered and then edited while "slow" renders.
    let mut quick = Harness::new(pooled(&pool));
    quick.template("p", "{{ get('profiles', 'alice').value.name }}");
    quick.put("_routes", "/", json!({ "template": "p" }));
    quick.put("profiles", "alice", json!({ "name": "Alice" }));
    while reads.load(Ordering::SeqCst) < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    quick.full();
    quick.put("profiles", "alice", json!({ "name": "Alice Edited" }));
    let p = quick.apply();
    let slow_done_meanwhile = reads.load(Ordering::SeqCst);
    assert_eq!(p.pages_rendered, 1);
    assert!(quick.page("/").ends_with(">Alice Edited"));
    assert!(
        slow_done_meanwhile < SLOW_PAGES / 2,
        "the small batches waited for {slow_done_meanwhile} of the large batch's {SLOW_PAGES} pages"
    );
    assert_eq!(
        slow_site.join().expect("the slow site renders"),
        SLOW_PAGES as u64
    );
    assert_eq!(reads.load(Ordering::SeqCst), SLOW_PAGES);
}

#[test]
fn a_store_failure_fails_the_batch_not_the_pool() {
    struct Failing;
    impl Source for Failing {
        fn get(&self, _: &str, _: &str) -> Result<Option<Tuple>, SourceError> {
            Err(SourceError::new("disk on fire"))
        }
        fn list(&self, c: &str, _: &str, _: usize) -> Result<Vec<Tuple>, SourceError> {
            // The site description lists fine; data reads fail.
            let mut src = MemorySource::new();
            src.insert(tuple(
                "_templates",
                "p",
                json!({ "source": "{% set c = 'x' %}{{ get(c, 'k') }}" }),
                1,
            ));
            src.insert(tuple("_routes", "/", json!({ "template": "p" }), 1));
            src.list(c, "", usize::MAX)
        }
    }
    let pool = pool_with(worker(), 1);
    let mut projector = SiteProjector::new("demo", pooled(&pool));
    let e = projector.render_all(&Failing, 1).unwrap_err();
    assert!(e.to_string().contains("disk on fire"), "{e}");

    // The same pool renders the next batch.
    let mut h = Harness::demo_with(pooled(&pool));
    assert!(h.full().errors.is_empty());
}

#[test]
fn asset_url_in_workers_matches_threads() {
    let pool = pool_with(worker(), 1);
    let mut threads = Harness::demo();
    let mut workers = Harness::demo_with(pooled(&pool));
    let layout = BASE_HTML.replace(
        "{{ site.base_url }}/style.css",
        "{{ asset_url('style.css') }}",
    );
    for h in [&mut threads, &mut workers] {
        h.template("base.html", &layout);
    }
    let (a, b) = (threads.full(), workers.full());
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(a.manifest_id, b.manifest_id);
    let hash = &b.manifest.files["/style.css"].hash;
    assert!(workers
        .page("/alice")
        .contains(&format!("{BASE_URL}/style.css?v={}\"", &hash[..16])));

    for h in [&mut threads, &mut workers] {
        h.put("_assets", "style.css", json!("body { color: red; }"));
    }
    let (a, b) = (threads.apply(), workers.apply());
    assert_eq!((a.pages_rendered, b.pages_rendered), (3, 3));
    assert_eq!(a.manifest_id, b.manifest_id);

    // An unknown asset is the same error in a worker.
    for h in [&mut threads, &mut workers] {
        h.template("base.html", &layout.replace("style.css", "nope.css"));
    }
    let (a, b) = (threads.apply(), workers.apply());
    assert_eq!(a.errors, b.errors);
    assert!(
        error_at(&b.errors, "/").message.contains("nope.css"),
        "{:?}",
        b.errors
    );
}
