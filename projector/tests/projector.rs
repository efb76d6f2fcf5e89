//! The projection engine end to end over an in-memory site: what pages exist, what they
//! contain, and exactly which ones a change re-renders.

mod common;

use common::*;
use serde_json::json;
use sesame_projector::{
    ChangedKey, Config, MemorySource, ProjectError, SiteProjector, Source, SourceError,
    TemplateError,
};
use sesame_proto::Tuple;

const ALICE_HTML: &str = r#"<!doctype html>
<html>
<head><link rel="canonical" href="https://demo.example.com/alice"><title>Alice</title><link rel="stylesheet" href="https://demo.example.com/style.css"></head>
<body><h1>Alice</h1>
<p>Likes &lt;b&gt;bold&lt;/b&gt; claims</p></body>
</html>"#;

const INDEX_HTML: &str = r#"<!doctype html>
<html>
<head><link rel="canonical" href="https://demo.example.com/"><title>demo</title><link rel="stylesheet" href="https://demo.example.com/style.css"></head>
<body><h1>People</h1>
<ul>
<li><a href="https://demo.example.com/alice">Alice</a></li>
<li><a href="https://demo.example.com/bob">Bob</a></li>
</ul></body>
</html>"#;

const SITEMAP_XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
<url><loc>https://demo.example.com/</loc></url>
<url><loc>https://demo.example.com/alice</loc></url>
<url><loc>https://demo.example.com/bob</loc></url>
</urlset>
"#;

#[test]
fn demo_site_renders_expected_files() {
    let mut h = Harness::demo();
    let p = h.full();
    assert!(p.changed);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(p.pages_rendered, 3);
    assert_eq!(p.manifest.index, h.index);
    assert_eq!(p.manifest.previous, None);
    assert_eq!(
        h.paths(),
        [
            "/",
            "/alice",
            "/bob",
            "/robots.txt",
            "/sitemap.xml",
            "/style.css"
        ]
    );
    assert_eq!(p.manifest.delta.added, h.paths());

    // Autoescaped HTML with the canonical link inserted into <head>.
    assert_eq!(h.page("/alice"), ALICE_HTML);
    assert_eq!(h.page("/"), INDEX_HTML);
    assert_eq!(h.page("/sitemap.xml"), SITEMAP_XML);
    assert_eq!(
        h.page("/robots.txt"),
        "User-agent: *\nAllow: /\n\nSitemap: https://demo.example.com/sitemap.xml\n"
    );
    assert_eq!(h.page("/style.css"), STYLE);

    let files = &p.manifest.files;
    assert_eq!(files["/alice"].content_type, "text/html; charset=utf-8");
    assert_eq!(files["/style.css"].content_type, "text/css; charset=utf-8");
    assert_eq!(
        files["/sitemap.xml"].content_type,
        "application/xml; charset=utf-8"
    );
    assert_eq!(
        files["/robots.txt"].content_type,
        "text/plain; charset=utf-8"
    );
    assert_eq!(files["/alice"].size, ALICE_HTML.len() as u64);
}

#[test]
fn editing_a_profile_rerenders_it_and_the_pages_that_list_it() {
    let mut h = Harness::demo();
    let first = h.full();

    h.put(
        "profiles",
        "alice",
        json!({ "name": "Alicia", "bio": "Likes <b>bold</b> claims" }),
    );
    let p = h.apply();
    assert_eq!(p.pages_rendered, 2, "/alice and / (which lists profiles)");
    assert_eq!(p.manifest.delta.changed, ["/", "/alice"]);
    assert!(p.manifest.delta.added.is_empty() && p.manifest.delta.removed.is_empty());
    assert_eq!(
        p.manifest.previous.as_deref(),
        Some(first.manifest_id.as_str())
    );
    assert_eq!(p.new_blobs.len(), 2);
    assert!(h.page("/").contains(">Alicia</a>"));
    assert!(h.page("/alice").contains("<h1>Alicia</h1>"));
    assert_eq!(h.page("/bob"), h.file("/bob").unwrap(), "untouched");

    // The index reads the whole tuple, so it is rendered again, but its output is the same.
    h.put(
        "profiles",
        "alice",
        json!({ "name": "Alicia", "bio": "New bio" }),
    );
    let p = h.apply();
    assert_eq!(p.pages_rendered, 2);
    assert_eq!(p.manifest.delta.changed, ["/alice"]);

    // Writing a collection nobody reads renders nothing and publishes nothing.
    h.put("unrelated", "x", json!(1));
    let p = h.apply();
    assert_eq!(p.pages_rendered, 0);
    assert!(!p.changed);
    assert!(p.new_blobs.is_empty());
}

#[test]
fn a_change_past_a_cut_list_is_not_a_dependency() {
    let mut h = Harness::demo();
    h.template(
        "index",
        r#"{% for p in list("profiles", limit=2) %}{{ p.key }} {% endfor %}"#,
    );
    h.put("profiles", "carol", json!({ "name": "Carol" }));
    h.full();
    assert_eq!(
        h.page("/"),
        r#"<link rel="canonical" href="https://demo.example.com/">alice bob "#
    );

    h.put("profiles", "carol", json!({ "name": "Caroline" }));
    let p = h.apply();
    assert_eq!(
        p.pages_rendered, 1,
        "only /carol: the index saw alice and bob"
    );
    assert_eq!(p.manifest.delta.changed, ["/carol"]);

    // A new key before the last one returned shifts the window.
    h.put("profiles", "aaron", json!({ "name": "Aaron" }));
    let p = h.apply();
    assert_eq!(p.pages_rendered, 2);
    assert_eq!(p.manifest.delta.added, ["/aaron"]);
    assert_eq!(p.manifest.delta.changed, ["/", "/sitemap.xml"]);
    assert!(h.page("/").ends_with("aaron alice "));

    // So does deleting one inside it; the new window now ends at "alice".
    h.delete("profiles", "aaron");
    let p = h.apply();
    assert_eq!(p.pages_rendered, 1, "the index; /aaron is just removed");
    assert!(h.page("/").ends_with("alice bob "));
    h.put("profiles", "zed", json!({ "name": "Zed" }));
    assert_eq!(h.apply().pages_rendered, 1, "only /zed");
}

#[test]
fn adding_and_deleting_a_profile_adds_and_removes_its_page() {
    let mut h = Harness::demo();
    h.full();

    h.put("profiles", "dave", json!({ "name": "Dave", "bio": "" }));
    let p = h.apply();
    assert_eq!(p.pages_rendered, 2, "/dave and /");
    assert_eq!(p.manifest.delta.added, ["/dave"]);
    assert_eq!(p.manifest.delta.changed, ["/", "/sitemap.xml"]);
    assert!(h
        .page("/sitemap.xml")
        .contains("<loc>https://demo.example.com/dave</loc>"));
    assert!(h.page("/dave").contains("<h1>Dave</h1>"));

    h.delete("profiles", "dave");
    let p = h.apply();
    assert_eq!(p.pages_rendered, 1, "/ only");
    assert_eq!(p.manifest.delta.removed, ["/dave"]);
    assert_eq!(p.manifest.delta.changed, ["/", "/sitemap.xml"]);
    assert_eq!(h.page("/sitemap.xml"), SITEMAP_XML);
    assert_eq!(h.page("/"), INDEX_HTML);
}

#[test]
fn template_and_route_changes_rerender_the_pages_that_use_them() {
    let mut h = Harness::demo();
    h.full();

    h.template("profile", &PROFILE.replace("<h1>", "<h1 class=name>"));
    let p = h.apply();
    assert_eq!(p.pages_rendered, 2, "/alice and /bob");
    assert_eq!(p.manifest.delta.changed, ["/alice", "/bob"]);

    // base.html is loaded through `extends` by every page.
    h.template("base.html", &BASE_HTML.replace("<body>", "<body class=x>"));
    let p = h.apply();
    assert_eq!(p.pages_rendered, 3);
    assert_eq!(p.manifest.delta.changed, ["/", "/alice", "/bob"]);

    // A template nobody loads.
    h.template("unused", "hello");
    let p = h.apply();
    assert_eq!(p.pages_rendered, 0);
    assert!(!p.changed);

    // An include added to a layout makes the included template a dependency.
    h.template("nav.html", "<nav>v1</nav>");
    h.template(
        "base.html",
        &BASE_HTML.replace("<body>", "<body>{% include \"nav.html\" %}"),
    );
    assert_eq!(h.apply().pages_rendered, 3);
    h.template("nav.html", "<nav>v2</nav>");
    let p = h.apply();
    assert_eq!(p.pages_rendered, 3);
    assert!(h.page("/bob").contains("<nav>v2</nav>"));

    // A route pointing at another template.
    h.template("card", "{{ page.key }} card");
    h.put(
        "_routes",
        "/{key}",
        json!({ "template": "card", "each": "profiles" }),
    );
    let p = h.apply();
    assert_eq!(p.pages_rendered, 2);
    assert!(h.page("/alice").ends_with(">alice card"));

    // Moving pages: the old paths go, the new ones come.
    h.delete("_routes", "/{key}");
    h.put(
        "_routes",
        "/u/{key}",
        json!({ "template": "card", "each": "profiles" }),
    );
    let p = h.apply();
    assert_eq!(p.manifest.delta.added, ["/u/alice", "/u/bob"]);
    assert_eq!(p.manifest.delta.removed, ["/alice", "/bob"]);
    assert_eq!(p.manifest.delta.changed, ["/sitemap.xml"]);
}

#[test]
fn a_computed_include_depends_on_every_template() {
    let mut h = Harness::demo();
    h.template(
        "profile",
        "{% include page.tuple.value.layout ~ \".html\" %}",
    );
    h.put(
        "profiles",
        "alice",
        json!({ "name": "Alice", "layout": "plain" }),
    );
    h.put(
        "profiles",
        "bob",
        json!({ "name": "Bob", "layout": "fancy" }),
    );
    h.template("plain.html", "plain {{ page.tuple.value.name }}");
    h.template("fancy.html", "fancy {{ page.tuple.value.name }}");
    h.full();
    assert!(h.page("/bob").ends_with("fancy Bob"));

    // Any template may be the one a computed name loads.
    h.template("other.html", "x");
    let p = h.apply();
    assert_eq!(p.pages_rendered, 2, "both profile pages, not the index");
    assert!(!p.changed);
    h.template("fancy.html", "FANCY {{ page.tuple.value.name }}");
    assert_eq!(h.apply().manifest.delta.changed, ["/bob"]);
}

#[test]
fn get_records_present_and_absent_keys() {
    let mut h = Harness::demo();
    h.template(
        "profile",
        r#"{% set s = get("settings", "site") %}{{ s.value.greeting if s else "hi" }} {{ page.key }}"#,
    );
    h.full();
    assert!(h.page("/alice").ends_with("hi alice"));

    // Creating the key the pages asked for re-renders them.
    h.put("settings", "site", json!({ "greeting": "hello" }));
    let p = h.apply();
    assert_eq!(p.pages_rendered, 2);
    assert!(h.page("/alice").ends_with("hello alice"));
    h.put("settings", "other", json!({}));
    assert_eq!(h.apply().pages_rendered, 0);
    h.delete("settings", "site");
    assert_eq!(h.apply().manifest.delta.changed, ["/alice", "/bob"]);
}

fn only_error(errors: &[TemplateError]) -> &TemplateError {
    assert_eq!(errors.len(), 1, "{errors:#?}");
    &errors[0]
}

#[test]
fn a_failing_template_keeps_the_last_good_pages_and_a_fix_recovers_them() {
    let mut h = Harness::demo_with(Config {
        page_bytes_max: 1_000,
        ..Config::new(BASE_URL)
    });
    h.full();
    let good = h.page("/alice");

    let failures = [
        // (template source, line, message fragment)
        ("{% extends \"base.html\" %}\n{% block body %}\n{% if %}{% endblock %}", Some(3), "syntax error"),
        ("{% extends \"base.html\" %}\n{% block body %}\n\n{{ page.tuple.value.name.upper() }}{% endblock %}", Some(4), "unknown method"),
        ("line one\n{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", Some(2), "fuel"),
        ("{% for i in range(1000) %}0123456789{% endfor %}", None, "over the limit of 1000 bytes"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}\n{{ f(0) }}", Some(1), "recursion"),
        ("{{ get(\"bad name\", \"k\") }}", Some(1), "invalid collection name"),
        ("{{ list(\"profiles\", limit=100000) }}", Some(1), "over the maximum"),
    ];
    for (source, line, fragment) in failures {
        h.template("profile", source);
        let p = h.apply();
        assert_eq!(p.pages_rendered, 2, "{source}");
        assert!(!p.changed, "{source}: the last good pages stay");
        assert_eq!(h.page("/alice"), good);
        let e = only_error(&p.errors);
        assert_eq!(e.template, "profile", "{source}: {e}");
        if line.is_some() {
            assert_eq!(e.line, line, "{source}: {e}");
        }
        assert!(e.message.contains(fragment), "{source}: {e}");
        assert!(e.path.is_some());
        assert_eq!(
            h.projector.errors().len(),
            1,
            "the standing error, once for both pages"
        );
    }

    // Fixing the template recovers every page that uses it.
    h.template("profile", "fixed {{ page.key }}");
    let p = h.apply();
    assert!(p.errors.is_empty());
    assert_eq!(p.manifest.delta.changed, ["/alice", "/bob"]);
    assert!(h.page("/alice").ends_with("fixed alice"));
    assert!(h.projector.errors().is_empty());
}

#[test]
fn an_error_in_an_included_template_names_that_template() {
    let mut h = Harness::demo();
    h.full();
    h.template(
        "base.html",
        "<html>\n<head></head>\n{{ nope.nope.nope }}</html>",
    );
    let p = h.apply();
    assert_eq!(p.pages_rendered, 3);
    let e = only_error(&p.errors);
    assert_eq!((e.template.as_str(), e.line), ("base.html", Some(3)), "{e}");
    assert!(!p.changed);
}

#[test]
fn a_page_that_never_rendered_is_left_out_until_its_template_is_fixed() {
    let mut h = Harness::demo();
    h.full();
    h.template("profile", "{{ broken(");
    h.put("profiles", "carol", json!({ "name": "Carol" }));
    let p = h.apply();
    assert!(!h.paths().contains(&"/carol".to_string()));
    assert_eq!(
        p.manifest.delta.changed,
        ["/"],
        "the index lists carol; no /carol, no sitemap change"
    );
    assert!(!h.page("/sitemap.xml").contains("carol"));

    h.template("profile", "{{ page.key }}");
    let p = h.apply();
    assert_eq!(p.manifest.delta.added, ["/carol"]);
    assert!(h.page("/sitemap.xml").contains("/carol"));
}

#[test]
fn canonical_links_follow_the_base_url_and_respect_the_template() {
    let mut h = Harness::demo_with(Config::new("http://127.0.0.1:8080/demo/"));
    h.template("profile", r#"<html><head><link rel="canonical" href="https://elsewhere.example/{{ page.key }}"></head></html>"#);
    h.template("index", "<p>no head</p>");
    h.full();
    assert_eq!(
        h.page("/alice"),
        r#"<html><head><link rel="canonical" href="https://elsewhere.example/alice"></head></html>"#
    );
    assert_eq!(
        h.page("/"),
        r#"<link rel="canonical" href="http://127.0.0.1:8080/demo/"><p>no head</p>"#
    );
    assert!(h
        .page("/sitemap.xml")
        .contains("<loc>http://127.0.0.1:8080/demo/alice</loc>"));
    assert!(h
        .page("/robots.txt")
        .contains("Sitemap: http://127.0.0.1:8080/demo/sitemap.xml"));
}

#[test]
fn the_sitemap_splits_past_its_url_limit_and_joins_again() {
    let mut h = Harness::demo_with(Config {
        sitemap_urls_max: 2,
        ..Config::new(BASE_URL)
    });
    h.full();
    assert_eq!(
        h.paths(),
        [
            "/",
            "/alice",
            "/bob",
            "/robots.txt",
            "/sitemap-1.xml",
            "/sitemap-2.xml",
            "/sitemap.xml",
            "/style.css"
        ]
    );
    assert!(h.page("/sitemap.xml").contains("<sitemapindex"));
    assert!(h
        .page("/sitemap-2.xml")
        .contains("<loc>https://demo.example.com/bob</loc>"));

    h.put("profiles", "carol", json!({ "name": "Carol" }));
    h.put("profiles", "dave", json!({ "name": "Dave" }));
    let p = h.apply();
    assert_eq!(
        p.manifest.delta.added,
        ["/carol", "/dave", "/sitemap-3.xml"]
    );

    for key in ["alice", "bob", "carol", "dave"] {
        h.delete("profiles", key);
    }
    let p = h.apply();
    assert_eq!(
        p.manifest.delta.removed,
        [
            "/alice",
            "/bob",
            "/carol",
            "/dave",
            "/sitemap-1.xml",
            "/sitemap-2.xml",
            "/sitemap-3.xml"
        ]
    );
    assert!(h.page("/sitemap.xml").contains("<urlset"));
}

#[test]
fn a_404_template_becomes_the_404_page() {
    let mut h = Harness::demo();
    h.template("404.html", "<h1>Not found</h1>{{ page.path }}");
    h.full();
    // Served at every unknown URL, so it names no canonical URL and is not in the sitemap.
    assert_eq!(h.page("/404.html"), "<h1>Not found</h1>/404.html");
    assert!(!h.page("/sitemap.xml").contains("404"));

    h.delete("_templates", "404.html");
    let p = h.apply();
    assert_eq!(p.manifest.delta.removed, ["/404.html"]);
}

#[test]
fn keys_are_percent_encoded_and_unusable_keys_reported() {
    let mut h = Harness::demo();
    h.put("profiles", "ünï cødé/x", json!({ "name": "U" }));
    h.put("profiles", "..", json!({ "name": "Dots" }));
    let p = h.full();
    assert!(
        h.paths()
            .contains(&"/%C3%BCn%C3%AF%20c%C3%B8d%C3%A9%2Fx".to_string()),
        "{:?}",
        h.paths()
    );
    let e = only_error(&p.errors);
    assert_eq!(e.template, "_routes//{key}");
    assert!(e.message.contains("\"..\""), "{e}");

    h.delete("profiles", "..");
    h.apply();
    assert!(h.projector.errors().is_empty());
}

#[test]
fn bad_site_tuples_are_reported_not_fatal() {
    let mut h = Harness::demo();
    h.put("_routes", "/about", json!({ "tempalte": "about" }));
    h.put("_routes", "no-slash", json!({ "template": "x" }));
    h.put("_templates", "broken", json!("not a map"));
    h.put("_assets", "logo.svg", json!(42));
    h.put(
        "_routes",
        "/missing",
        json!({ "template": "does-not-exist" }),
    );
    let p = h.full();
    let mut templates: Vec<&str> = p.errors.iter().map(|e| e.template.as_str()).collect();
    templates.sort();
    assert_eq!(
        templates,
        [
            "_assets/logo.svg",
            "_routes//about",
            "_routes/no-slash",
            "broken",
            "does-not-exist"
        ],
        "{:#?}",
        p.errors
    );
    assert_eq!(h.page("/alice"), ALICE_HTML, "the rest of the site is fine");

    // Creating the missing template brings its page.
    h.template("does-not-exist", "now it does");
    let p = h.apply();
    assert_eq!(p.manifest.delta.added, ["/missing"]);
}

#[test]
fn conflicting_claims_follow_precedence() {
    let mut h = Harness::demo();
    h.put("_routes", "/bob", json!({ "template": "index" }));
    let p = h.full();
    assert!(
        h.page("/bob").contains("<h1>People</h1>"),
        "a route without {{key}} beats a profile"
    );
    let e = only_error(&p.errors);
    assert!(
        e.message.contains("/bob is also claimed by route /bob"),
        "{e}"
    );

    h.delete("_routes", "/bob");
    let p = h.apply();
    assert!(h.page("/bob").contains("<h1>Bob</h1>"));
    assert!(p.errors.is_empty());
    assert!(h.projector.errors().is_empty());

    // Assets beat pages named after a user's key.
    h.put("profiles", "style.css", json!({ "name": "Stylish" }));
    let p = h.apply();
    assert_eq!(h.page("/style.css"), STYLE);
    assert!(only_error(&p.errors).message.contains("asset style.css"));
}

#[test]
fn pages_get_the_content_type_and_escaping_of_their_template_kind() {
    let mut h = Harness::demo();
    h.put(
        "profiles",
        "mallory",
        json!({ "name": "<script>alert(1)</script>", "bio": "" }),
    );
    h.template("api.json", "{{ page.tuple.value|tojson }}");
    h.put(
        "_routes",
        "/api/{key}.json",
        json!({ "template": "api.json", "each": "profiles" }),
    );
    h.template(
        "feed.xml",
        "<feed>{% for p in list(\"profiles\") %}<e>{{ p.value.name }}</e>{% endfor %}</feed>",
    );
    h.put("_routes", "/feed.xml", json!({ "template": "feed.xml" }));
    // Text is not escaped, so it must never be served as HTML, whatever its URL says.
    h.template(
        "names.txt",
        "{% for p in list(\"profiles\") %}{{ p.value.name }}\n{% endfor %}",
    );
    h.put("_routes", "/names", json!({ "template": "names.txt" }));
    h.put("_routes", "/names.html", json!({ "template": "names.txt" }));
    // And an HTML template escapes, whatever its URL says.
    h.put("_routes", "/people.txt", json!({ "template": "index" }));
    let p = h.full();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let content_type = |path: &str| p.manifest.files[path].content_type.as_str();

    assert_eq!(content_type("/api/bob.json"), "application/json");
    assert_eq!(
        h.page("/api/bob.json"),
        r#"{"bio":"Builds things","name":"Bob"}"#
    );
    assert_eq!(content_type("/feed.xml"), "application/xml; charset=utf-8");
    assert!(h
        .page("/feed.xml")
        .contains("<e>&lt;script&gt;alert(1)&lt;/script&gt;</e>"));
    for text in ["/names", "/names.html"] {
        assert_eq!(content_type(text), "text/plain; charset=utf-8", "{text}");
        assert!(
            h.page(text).contains("<script>alert(1)</script>\n"),
            "{text}"
        );
        assert!(!h.page(text).contains("canonical"), "{text}");
    }
    assert_eq!(content_type("/people.txt"), "text/html; charset=utf-8");
    assert!(h
        .page("/people.txt")
        .contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(h.page("/people.txt").contains("rel=\"canonical\""));

    // Nothing unescaped is ever served as HTML, and only HTML pages are in the sitemap.
    for (path, file) in &p.manifest.files {
        let body = h.page(path);
        if file.content_type.starts_with("text/html") {
            assert!(!body.contains("<script>"), "{path}: {body}");
        }
    }
    let sitemap = h.page("/sitemap.xml");
    assert!(!sitemap.contains("feed") && !sitemap.contains("/names<"));
    assert!(sitemap.contains("/people.txt"));
}

#[test]
fn a_template_calling_debug_fails_with_unknown_function() {
    let mut h = Harness::demo();
    h.template("profile", "<pre>{{ debug() }}</pre>");
    let p = h.full();
    let e = p
        .errors
        .iter()
        .find(|e| e.path.as_deref() == Some("/alice"))
        .expect("the page fails");
    assert_eq!((e.template.as_str(), e.line), ("profile", Some(1)));
    assert!(e.message.contains("unknown function"), "{e}");
    assert!(!p.manifest.files.contains_key("/alice"));
}

#[test]
fn assets_in_all_shapes() {
    let mut h = Harness::demo();
    h.put("_assets", "img/dot.png", json!({ "$bytes": "iVBORw==" }));
    h.put(
        "_assets",
        "data",
        json!({ "content_type": "text/csv", "body": "a,b" }),
    );
    let p = h.full();
    assert_eq!(p.manifest.files["/img/dot.png"].content_type, "image/png");
    assert_eq!(p.manifest.files["/img/dot.png"].size, 4);
    assert_eq!(p.manifest.files["/data"].content_type, "text/csv");

    h.put("_assets", "style.css", json!("body { color: red; }"));
    let p = h.apply();
    assert_eq!(p.pages_rendered, 0);
    assert_eq!(p.manifest.delta.changed, ["/style.css"]);
    h.delete("_assets", "data");
    assert_eq!(h.apply().manifest.delta.removed, ["/data"]);
}

#[test]
fn manifests_are_content_addressed_and_adoptable() {
    let mut a = Harness::demo();
    let mut b = Harness::demo();
    let pa = a.full();
    let pb = b.full();
    assert_eq!(
        pa.manifest_id, pb.manifest_id,
        "same site at the same index, same id"
    );

    // A restarted projector adopts the published manifest: nothing to publish.
    let mut restarted = SiteProjector::new("demo", Config::new(BASE_URL));
    restarted.adopt(pa.manifest.as_ref().clone());
    let p = restarted.render_changes(&a.src, a.index, &[]).unwrap();
    assert!(!p.changed);
    assert!(p.new_blobs.is_empty());
    assert_eq!(p.manifest_id, pa.manifest_id);
    assert_eq!(
        p.pages_rendered, 3,
        "adopting means rendering everything once"
    );

    // After adopting, a change produces a manifest that follows the adopted one.
    a.put("profiles", "bob", json!({ "name": "Robert" }));
    let p = restarted
        .render_changes(&a.src, a.index, &[ChangedKey::new("profiles", "bob")])
        .unwrap();
    assert_eq!(
        p.manifest.previous.as_deref(),
        Some(pa.manifest_id.as_str())
    );
    assert_eq!(p.manifest.delta.changed, ["/", "/bob"]);
    assert_eq!(p.new_blobs.len(), 2);
}

/// A source whose reads fail once `fail` is set.
struct FlakySource<'a> {
    inner: &'a MemorySource,
    fail: bool,
}

impl Source for FlakySource<'_> {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Tuple>, SourceError> {
        if self.fail {
            return Err(SourceError::new("disk on fire"));
        }
        self.inner.get(collection, key)
    }

    fn list(
        &self,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Tuple>, SourceError> {
        if self.fail {
            return Err(SourceError::new("disk on fire"));
        }
        self.inner.list(collection, prefix, limit)
    }
}

#[test]
fn a_failing_source_stops_the_projection_and_the_next_one_starts_over() {
    let mut h = Harness::demo();
    h.full();
    h.put("profiles", "alice", json!({ "name": "A" }));
    let changes = [ChangedKey::new("profiles", "alice")];
    let flaky = FlakySource {
        inner: &h.src,
        fail: true,
    };
    let err = h
        .projector
        .render_changes(&flaky, h.index, &changes)
        .unwrap_err();
    assert!(matches!(err, ProjectError::Source(_)), "{err}");
    assert!(err.to_string().contains("disk on fire"));

    let healthy = FlakySource {
        inner: &h.src,
        fail: false,
    };
    let p = h.projector.render_changes(&healthy, h.index, &[]).unwrap();
    assert_eq!(p.pages_rendered, 3, "a full render after the failure");
    assert_eq!(p.manifest.delta.changed, ["/", "/alice"]);
}

/// A small deterministic generator (no dependency needed for one test).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// The oracle for dependency tracking: after every random batch of edits, the incremental
/// projection must publish exactly the files a from-scratch render publishes.
#[test]
fn incremental_projections_match_full_renders() {
    let seed = std::env::var("SESAME_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_24);
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    let mut h = Harness::demo_with(Config {
        sitemap_urls_max: 3,
        ..Config::new(BASE_URL)
    });
    h.template("index", r#"{% extends "base.html" %}{% block body %}{% for p in list("profiles", limit=3) %}{{ p.value.name }};{% endfor %}{% for p in list("posts", prefix="a/") %}{{ p.key }}{% endfor %}{% endblock %}"#);
    h.template("post", r#"{% set author = get("profiles", page.tuple.value.author) %}{{ author.value.name if author else "anon" }}: {{ page.tuple.value.text }}{% include "footer" ignore missing %}"#);
    h.put(
        "_routes",
        "/p/{key}",
        json!({ "template": "post", "each": "posts" }),
    );
    h.full();

    let keys = ["a", "b", "c", "d", "e"];
    for step in 0..150 {
        for _ in 0..=rng.next(3) {
            let key = keys[rng.next(keys.len() as u64) as usize];
            match rng.next(9) {
                0..=2 => h.put(
                    "profiles",
                    key,
                    json!({ "name": format!("{key}{}", rng.next(3)) }),
                ),
                3 => h.delete("profiles", key),
                4 | 5 => {
                    let author = keys[rng.next(keys.len() as u64) as usize];
                    let post = format!("{author}/{}", rng.next(2));
                    h.put(
                        "posts",
                        &post,
                        json!({ "author": author, "text": rng.next(3) }),
                    );
                }
                6 => h.delete("posts", &format!("{key}/0")),
                7 => match rng.next(3) {
                    0 => h.template("footer", &format!("<footer>{}</footer>", rng.next(3))),
                    1 => h.delete("_templates", "footer"),
                    _ => h.template(
                        "profile",
                        &format!("{{{{ page.tuple.value.name }}}} v{}", rng.next(3)),
                    ),
                },
                _ => match rng.next(2) {
                    0 => h.put(
                        "_assets",
                        &format!("{key}.txt"),
                        json!(format!("{}", rng.next(3))),
                    ),
                    _ => h.delete("_assets", &format!("{key}.txt")),
                },
            }
        }
        let incremental = h.apply();
        let mut fresh = SiteProjector::new(
            "demo",
            Config {
                sitemap_urls_max: 3,
                ..Config::new(BASE_URL)
            },
        );
        let full = fresh.render_all(&h.src, h.index).unwrap();
        assert_eq!(
            incremental.manifest.files, full.manifest.files,
            "seed {seed}, step {step}: incremental and full renders differ"
        );
        assert_eq!(
            incremental.errors.is_empty(),
            full.errors.is_empty(),
            "seed {seed}, step {step}"
        );
    }
}

/// The URL `asset_url()` writes for the file served at `path` now.
fn versioned(h: &Harness, path: &str) -> String {
    let hash = &h.projector.manifest().unwrap().files[path].hash;
    format!(
        "{BASE_URL}{path}?v={}",
        &hash[..sesame_projector::ASSET_VERSION_HEX_LEN]
    )
}

#[test]
fn asset_url_names_the_served_bytes_and_pages_follow_the_asset() {
    let mut h = Harness::demo();
    h.template(
        "base.html",
        &BASE_HTML.replace(
            "{{ site.base_url }}/style.css",
            "{{ asset_url('style.css') }}",
        ),
    );
    let p = h.full();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let first = versioned(&h, "/style.css");
    assert!(
        first.ends_with(&format!(
            "?v={}",
            &sesame_projector::content_hash(STYLE.as_bytes())[..16]
        )),
        "the hash of the bytes served: {first}"
    );
    for page in ["/", "/alice", "/bob"] {
        assert!(
            h.page(page).contains(&format!("href=\"{first}\"")),
            "{page}: {}",
            h.page(page)
        );
    }

    // Editing the asset re-renders the pages that use it, with the new URL.
    h.put("_assets", "style.css", json!("body { color: red; }"));
    let p = h.apply();
    assert_eq!(p.pages_rendered, 3);
    let second = versioned(&h, "/style.css");
    assert_ne!(first, second);
    assert!(h.page("/alice").contains(&second), "{}", h.page("/alice"));
    // A page that does not use it is not rendered again.
    h.put("_assets", "other.css", json!("p {}"));
    assert_eq!(h.apply().pages_rendered, 0);

    // A broken asset keeps its last good file, and the URL keeps naming those bytes.
    h.put("_assets", "style.css", json!(5));
    let p = h.apply();
    assert!(p.errors.iter().any(|e| e.template == "_assets/style.css"));
    assert_eq!(versioned(&h, "/style.css"), second);
    assert!(h.page("/alice").contains(&second));

    // With a leading slash, the same asset.
    h.put("_assets", "style.css", json!("b {}"));
    h.template(
        "base.html",
        &BASE_HTML.replace(
            "{{ site.base_url }}/style.css",
            "{{ asset_url('/style.css') }}",
        ),
    );
    let p = h.apply();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(h.page("/alice").contains(&versioned(&h, "/style.css")));

    // An asset whose key has the leading slash is found without it, too.
    h.put("_assets", "/lead.css", json!("i {}"));
    h.template(
        "base.html",
        &BASE_HTML.replace(
            "{{ site.base_url }}/style.css",
            "{{ asset_url('lead.css') }}",
        ),
    );
    let p = h.apply();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(h.page("/alice").contains(&versioned(&h, "/lead.css")));
}

#[test]
fn asset_url_of_an_unknown_asset_fails_the_page_until_the_asset_exists() {
    let mut h = Harness::demo();
    h.template(
        "base.html",
        &BASE_HTML.replace("{{ site.base_url }}/style.css", "{{ asset_url('app.js') }}"),
    );
    let p = h.full();
    let e = only_error(&p.errors);
    assert_eq!(e.template, "base.html", "{e}");
    assert!(
        e.message.contains("asset_url(\"app.js\")") && e.message.contains("no asset \"app.js\""),
        "{e}"
    );
    assert!(h.file("/alice").is_none());

    // Creating the asset renders the pages that asked for it.
    h.put("_assets", "app.js", json!("let x = 1;"));
    let p = h.apply();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(h.page("/alice").contains(&versioned(&h, "/app.js")));

    // A route at the asset's path takes precedence: the asset is no longer served there, so
    // the pages cannot name it (and keep their last good version).
    h.put("_routes", "/app.js", json!({ "template": "index" }));
    let p = h.apply();
    assert_eq!(
        p.pages_rendered, 4,
        "the route's page, and the three that named the asset"
    );
    assert!(
        p.errors
            .iter()
            .any(|e| e.template == "base.html" && e.message.contains("app.js")),
        "{:?}",
        p.errors
    );
    h.delete("_routes", "/app.js");
    let p = h.apply();
    assert_eq!(p.pages_rendered, 3);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(h.page("/alice").contains(&versioned(&h, "/app.js")));
}

/// A sink set with `stream_blobs` is handed every file a projection's version needs as the
/// file is made (so the node writes them while the render goes on), and nothing that is
/// already published.
#[test]
fn the_blob_sink_sees_every_new_file_as_it_is_made() {
    use std::sync::{Arc, Mutex};
    let mut h = Harness::demo();
    let seen: Arc<Mutex<Vec<(String, bytes::Bytes)>>> = Arc::default();
    let into = Arc::clone(&seen);
    h.projector
        .stream_blobs(Some(Box::new(move |hash: &str, body: &bytes::Bytes| {
            into.lock().unwrap().push((hash.to_string(), body.clone()));
        })));
    let sorted = |mut blobs: Vec<(String, bytes::Bytes)>| {
        blobs.sort();
        blobs
    };
    let p = h.full();
    assert!(p.new_blobs.len() >= 4, "pages, stylesheet, sitemap, robots");
    let streamed = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(sorted(streamed), sorted(p.new_blobs.clone()));

    h.put(
        "profiles",
        "bob",
        json!({ "name": "Bob", "bio": "Mends things" }),
    );
    let p = h.apply();
    let streamed = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(
        p.new_blobs.len(),
        1,
        "bob's page (the index shows names only)"
    );
    assert_eq!(sorted(streamed), sorted(p.new_blobs.clone()));

    h.projector.stream_blobs(None);
    h.put(
        "profiles",
        "bob",
        json!({ "name": "Bob", "bio": "Builds things" }),
    );
    assert!(!h.apply().new_blobs.is_empty());
    assert!(seen.lock().unwrap().is_empty(), "no sink, nothing streamed");
}
