//! A 10,000-profile site: the full projection renders every page, and afterwards an edit
//! renders only what it touched. Prints timings (debug builds are much slower; see
//! `examples/full_projection.rs` for the release-mode measurement).

mod common;

use std::time::Instant;

use common::*;
use serde_json::json;

const PROFILES: usize = 10_000;

#[test]
fn ten_thousand_profiles() {
    let mut h = Harness::demo();
    for i in 0..PROFILES {
        h.put(
            "profiles",
            &format!("user{i:05}"),
            json!({ "name": format!("User {i}"), "bio": "Hello <world>" }),
        );
    }
    h.template(
        "index",
        r#"{% extends "base.html" %}{% block body %}<ul>{% for p in list("profiles", limit=10000) %}<li><a href="/{{ p.key }}">{{ p.value.name }}</a></li>{% endfor %}</ul>{% endblock %}"#,
    );

    let started = Instant::now();
    let p = h.full();
    let full = started.elapsed();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    // 10,000 profiles (+ alice and bob), the index, the stylesheet, robots.txt, sitemap.xml.
    assert_eq!(p.manifest.files.len(), PROFILES + 2 + 4);
    assert_eq!(p.pages_rendered, PROFILES as u64 + 3);
    assert!(h.page("/user09999").contains("<h1>User 9999</h1>"));

    let started = Instant::now();
    h.put(
        "profiles",
        "user05000",
        json!({ "name": "Renamed", "bio": "" }),
    );
    let p = h.apply();
    let one_edit = started.elapsed();
    assert_eq!(p.pages_rendered, 2);
    assert_eq!(p.manifest.delta.changed, ["/", "/user05000"]);

    let started = Instant::now();
    h.template("profile", &PROFILE.replace("<h1>", "<h1 class=n>"));
    let p = h.apply();
    let template_edit = started.elapsed();
    assert_eq!(p.pages_rendered, PROFILES as u64 + 2);

    println!(
        "{PROFILES} profiles: full projection {full:?}, one profile edit {one_edit:?}, profile template edit {template_edit:?}"
    );
}
