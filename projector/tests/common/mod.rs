//! A test harness: a site held in a `MemorySource`, a projector over it, and every blob the
//! projections handed out, so tests can read pages back the way a server would.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::json;
use sesame_projector::{ChangedKey, Config, MemorySource, Projection, SiteProjector};
use sesame_proto::{Home, Tuple, Value};

pub const BASE_URL: &str = "https://demo.example.com";

pub const BASE_HTML: &str = r#"<!doctype html>
<html>
<head><title>{% block title %}{{ site.name }}{% endblock %}</title><link rel="stylesheet" href="{{ site.base_url }}/style.css"></head>
<body>{% block body %}{% endblock %}</body>
</html>"#;

pub const INDEX: &str = r#"{% extends "base.html" %}
{% block body %}<h1>People</h1>
<ul>
{% for p in list("profiles", limit=100) %}<li><a href="{{ site.base_url }}/{{ p.key|segment }}">{{ p.value.name }}</a></li>
{% endfor %}</ul>{% endblock %}"#;

pub const PROFILE: &str = r#"{% extends "base.html" %}
{% block title %}{{ page.tuple.value.name }}{% endblock %}
{% block body %}<h1>{{ page.tuple.value.name }}</h1>
<p>{{ page.tuple.value.bio }}</p>{% endblock %}"#;

pub const STYLE: &str = "body { font-family: sans-serif; }";

/// Builds a tuple the way the store would hold it.
pub fn tuple(collection: &str, key: &str, value: serde_json::Value, version: u64) -> Tuple {
    Tuple {
        site: "demo".into(),
        collection: collection.into(),
        key: key.into(),
        value: Value::from_json(value).expect("test values are valid"),
        version,
        origin: None,
        home: Home::Site,
    }
}

pub struct Harness {
    pub src: MemorySource,
    pub projector: SiteProjector,
    /// Every blob handed out so far, by hash.
    pub blobs: HashMap<String, Bytes>,
    /// The commit index of the last write.
    pub index: u64,
    pending: Vec<ChangedKey>,
}

impl Harness {
    pub fn new(config: Config) -> Self {
        Harness {
            src: MemorySource::new(),
            projector: SiteProjector::new("demo", config),
            blobs: HashMap::new(),
            index: 0,
            pending: Vec::new(),
        }
    }

    /// The demo microsite: `/` lists profiles, `/{key}` shows one, and a stylesheet.
    pub fn demo() -> Self {
        Self::demo_with(Config::new(BASE_URL))
    }

    pub fn demo_with(config: Config) -> Self {
        let mut h = Harness::new(config);
        h.put("_templates", "base.html", json!({ "source": BASE_HTML }));
        h.put("_templates", "index", json!({ "source": INDEX }));
        h.put("_templates", "profile", json!({ "source": PROFILE }));
        h.put("_routes", "/", json!({ "template": "index" }));
        h.put(
            "_routes",
            "/{key}",
            json!({ "template": "profile", "each": "profiles" }),
        );
        h.put("_assets", "style.css", json!(STYLE));
        h.put(
            "profiles",
            "alice",
            json!({ "name": "Alice", "bio": "Likes <b>bold</b> claims" }),
        );
        h.put(
            "profiles",
            "bob",
            json!({ "name": "Bob", "bio": "Builds things" }),
        );
        h
    }

    /// Writes a tuple at the next index and remembers the key as changed.
    pub fn put(&mut self, collection: &str, key: &str, value: serde_json::Value) {
        self.index += 1;
        self.src.insert(tuple(collection, key, value, self.index));
        self.pending.push(ChangedKey::new(collection, key));
    }

    pub fn delete(&mut self, collection: &str, key: &str) {
        self.index += 1;
        self.src.remove(collection, key);
        self.pending.push(ChangedKey::new(collection, key));
    }

    pub fn template(&mut self, name: &str, source: &str) {
        self.put("_templates", name, json!({ "source": source }));
    }

    /// Renders everything.
    pub fn full(&mut self) -> Projection {
        self.pending.clear();
        let p = self
            .projector
            .render_all(&self.src, self.index)
            .expect("render_all");
        self.absorb(p)
    }

    /// Renders what the writes since the last projection touched.
    pub fn apply(&mut self) -> Projection {
        let changes = std::mem::take(&mut self.pending);
        let p = self
            .projector
            .render_changes(&self.src, self.index, &changes)
            .expect("render_changes");
        self.absorb(p)
    }

    fn absorb(&mut self, p: Projection) -> Projection {
        for (hash, body) in &p.new_blobs {
            assert_eq!(*hash, sesame_projector::content_hash(body));
            self.blobs.insert(hash.clone(), body.clone());
        }
        // Publishing only the new blobs must be enough to serve every file.
        for (path, entry) in &p.manifest.files {
            let blob = self
                .blobs
                .get(&entry.hash)
                .unwrap_or_else(|| panic!("{path}: blob {} was never handed out", entry.hash));
            assert_eq!(blob.len() as u64, entry.size, "{path}");
        }
        assert_eq!(p.manifest_id, p.manifest.id());
        p
    }

    /// The body of the file at `path` in the current manifest, if any.
    pub fn file(&self, path: &str) -> Option<String> {
        let manifest = self.projector.manifest()?;
        let entry = manifest.files.get(path)?;
        let body = &self.blobs[&entry.hash];
        Some(String::from_utf8(body.to_vec()).expect("test files are text"))
    }

    pub fn page(&self, path: &str) -> String {
        self.file(path)
            .unwrap_or_else(|| panic!("no file at {path}"))
    }

    pub fn paths(&self) -> Vec<String> {
        self.projector
            .manifest()
            .map(|m| m.files.keys().cloned().collect())
            .unwrap_or_default()
    }
}
