//! Site bundles: a folder that describes a site, loaded as tuples.
//!
//! ```text
//! DIR/templates/**           → _templates/<path>   { "source": "<minijinja>" }
//! DIR/routes.toml            → _routes/<pattern>   { "template": "...", "each"?: "..." }
//! DIR/assets/**              → _assets/<path>      the file (text as a string, else bytes)
//! DIR/data/<coll>/<key>.json → <coll>/<key>        the JSON value (optional seed data)
//! ```
//!
//! `sesame site deploy` writes a bundle in one transaction, deleting templates, routes and
//! assets the folder no longer has; `sesame dev` seeds its demo site from the bundle built
//! into the binary ([`demo`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context as _;
use sesame_proto::{Op, Value};

/// Most files one bundle may hold.
pub const BUNDLE_FILES_MAX: usize = 10_000;
const ROUTES_FILE: &str = "routes.toml";

/// One tuple of a bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub collection: String,
    pub key: String,
    pub value: Value,
}

/// The collections a bundle owns: deploying replaces them whole.
pub const PAGE_COLLECTIONS: [&str; 3] = ["_templates", "_routes", "_assets"];

fn template(key: &str, source: &str) -> Entry {
    let value = Value::Map(BTreeMap::from([(
        "source".to_string(),
        Value::String(source.to_string()),
    )]));
    Entry {
        collection: "_templates".into(),
        key: key.into(),
        value,
    }
}

fn asset(key: &str, bytes: Vec<u8>) -> Entry {
    let value = match String::from_utf8(bytes) {
        Ok(text) => Value::String(text),
        Err(e) => Value::Bytes(e.into_bytes()),
    };
    Entry {
        collection: "_assets".into(),
        key: key.into(),
        value,
    }
}

/// Parses `routes.toml`: one table per route pattern.
pub fn parse_routes(text: &str) -> anyhow::Result<Vec<Entry>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RouteFile {
        template: String,
        each: Option<String>,
    }
    let routes: BTreeMap<String, RouteFile> = toml::from_str(text).context("parse routes.toml")?;
    Ok(routes
        .into_iter()
        .map(|(pattern, r)| {
            let mut map = BTreeMap::from([("template".to_string(), Value::String(r.template))]);
            if let Some(each) = r.each {
                map.insert("each".into(), Value::String(each));
            }
            Entry {
                collection: "_routes".into(),
                key: pattern,
                value: Value::Map(map),
            }
        })
        .collect())
}

/// Every file under `dir`, as (path relative to `dir` with `/` separators, bytes), sorted.
fn files_under(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.file_type()?.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .expect("a walked path lies under its root");
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push((
                rel.join("/"),
                std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
            ));
            anyhow::ensure!(
                out.len() <= BUNDLE_FILES_MAX,
                "bundle has more than {BUNDLE_FILES_MAX} files"
            );
        }
    }
    out.sort();
    Ok(out)
}

/// Loads a bundle folder.
pub fn load_dir(dir: &Path) -> anyhow::Result<Vec<Entry>> {
    anyhow::ensure!(dir.is_dir(), "{} is not a folder", dir.display());
    let mut entries = Vec::new();
    let templates = dir.join("templates");
    if templates.is_dir() {
        for (name, bytes) in files_under(&templates)? {
            let source = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("template {name} is not UTF-8"))?;
            entries.push(template(&name, &source));
        }
    }
    let routes = dir.join(ROUTES_FILE);
    if routes.is_file() {
        entries.extend(parse_routes(&std::fs::read_to_string(&routes)?)?);
    }
    let assets = dir.join("assets");
    if assets.is_dir() {
        for (name, bytes) in files_under(&assets)? {
            entries.push(asset(&name, bytes));
        }
    }
    let data = dir.join("data");
    if data.is_dir() {
        for (name, bytes) in files_under(&data)? {
            let Some((collection, file)) = name.split_once('/') else {
                continue;
            };
            let Some(key) = file.strip_suffix(".json") else {
                continue;
            };
            let json: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("data/{name} is not valid JSON"))?;
            let value = Value::from_json(json).map_err(|m| anyhow::anyhow!("data/{name}: {m}"))?;
            entries.push(Entry {
                collection: collection.into(),
                key: key.into(),
                value,
            });
        }
    }
    anyhow::ensure!(
        !entries.is_empty(),
        "{} has no templates/, routes.toml, assets/ or data/",
        dir.display()
    );
    Ok(entries)
}

/// The ops that make a site match `bundle`: every entry put, and every existing template,
/// route or asset (`existing`: (collection, key)) that the bundle lacks deleted.
pub fn deploy_ops(bundle: &[Entry], existing: &[(String, String)]) -> Vec<Op> {
    let keep: BTreeSet<(&str, &str)> = bundle
        .iter()
        .map(|e| (e.collection.as_str(), e.key.as_str()))
        .collect();
    let mut ops: Vec<Op> = bundle
        .iter()
        .map(|e| Op::Put {
            collection: e.collection.clone(),
            key: e.key.clone(),
            value: e.value.clone(),
            if_version: None,
        })
        .collect();
    for (collection, key) in existing {
        if PAGE_COLLECTIONS.contains(&collection.as_str())
            && !keep.contains(&(collection.as_str(), key.as_str()))
        {
            ops.push(Op::Delete {
                collection: collection.clone(),
                key: key.clone(),
                if_version: None,
            });
        }
    }
    ops
}

/// The demo microsite `sesame dev` seeds: profiles, a page listing them and a page each.
pub fn demo() -> Vec<Entry> {
    let mut entries = vec![
        template(
            "layout.html",
            include_str!("../../demo/templates/layout.html"),
        ),
        template(
            "index.html",
            include_str!("../../demo/templates/index.html"),
        ),
        template(
            "profile.html",
            include_str!("../../demo/templates/profile.html"),
        ),
        template("404.html", include_str!("../../demo/templates/404.html")),
        asset(
            "style.css",
            include_bytes!("../../demo/assets/style.css").to_vec(),
        ),
        asset(
            "favicon.svg",
            include_bytes!("../../demo/assets/favicon.svg").to_vec(),
        ),
    ];
    entries.extend(
        parse_routes(include_str!("../../demo/routes.toml"))
            .expect("the built-in demo routes parse"),
    );
    for (collection, key, json) in [
        (
            "profiles",
            "alice",
            include_str!("../../demo/data/profiles/alice.json"),
        ),
        (
            "profiles",
            "bob",
            include_str!("../../demo/data/profiles/bob.json"),
        ),
        (
            "profiles",
            "carol",
            include_str!("../../demo/data/profiles/carol.json"),
        ),
        // What visitors may do live: read profiles and guestbooks, sign guestbooks.
        (
            "_live",
            "grants",
            include_str!("../../demo/data/_live/grants.json"),
        ),
    ] {
        let json = serde_json::from_str(json).expect("the built-in demo data is JSON");
        let value = Value::from_json(json).expect("the built-in demo data is valid values");
        entries.push(Entry {
            collection: collection.into(),
            key: key.into(),
            value,
        });
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_matches_its_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo");
        let mut from_dir = load_dir(&dir).unwrap();
        let mut built_in = demo();
        let order = |a: &Entry, b: &Entry| (&a.collection, &a.key).cmp(&(&b.collection, &b.key));
        from_dir.sort_by(order);
        built_in.sort_by(order);
        assert_eq!(from_dir, built_in);
    }

    #[test]
    fn routes_parse_and_refuse_typos() {
        let r = parse_routes("[\"/{key}\"]\ntemplate = \"p.html\"\neach = \"profiles\"\n").unwrap();
        assert_eq!(
            (r[0].collection.as_str(), r[0].key.as_str()),
            ("_routes", "/{key}")
        );
        assert!(parse_routes("[\"/\"]\ntemplat = \"x\"\n").is_err());
    }

    #[test]
    fn deploy_deletes_what_the_folder_lost() {
        let bundle = vec![template("a.html", "A")];
        let existing = vec![
            ("_templates".to_string(), "a.html".to_string()),
            ("_templates".to_string(), "old.html".to_string()),
            ("profiles".to_string(), "alice".to_string()),
        ];
        let ops = deploy_ops(&bundle, &existing);
        assert_eq!(ops.len(), 2);
        assert!(matches!(&ops[1], Op::Delete { key, .. } if key == "old.html"));
    }
}
