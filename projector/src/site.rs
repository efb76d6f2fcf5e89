//! The site description read from tuples (SPEC.md "Pages"): templates, routes and assets.
//!
//! - `_templates/<name>` = `{ "source": "<minijinja>" }`
//! - `_routes/<pattern>` = `{ "template": "<name>", "each": "<collection>"? }`
//! - `_assets/<path>` = a string, bytes, or `{ "content_type"?, "body" }`
//!
//! Every parser here returns a message for people on bad input; none of them panics.

use std::collections::BTreeMap;

use bytes::Bytes;
use sesame_proto::{validate_collection, Value};

use crate::paths::{self, check_path, content_type_for, encode_segment, is_sitemap_path};

/// The collection holding templates.
pub const TEMPLATES: &str = "_templates";
/// The collection holding routes.
pub const ROUTES: &str = "_routes";
/// The collection holding assets.
pub const ASSETS: &str = "_assets";

/// The placeholder in a route pattern replaced by each tuple's (encoded) key.
pub const KEY_PLACEHOLDER: &str = "{key}";

/// Longest content type an asset may declare, in bytes.
pub const CONTENT_TYPE_BYTES_MAX: usize = 255;

/// A parsed `_routes/<pattern>` tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub pattern: String,
    pub template: String,
    /// With `each`, one page per tuple of this collection; the pattern holds `{key}`.
    /// (A page's content type comes from its template's kind, never from the pattern: see
    /// [`crate::paths::template_kind`].)
    pub each: Option<String>,
}

impl Route {
    /// Parses a route tuple: `pattern` is its key, `value` its value.
    pub fn parse(pattern: &str, value: &Value) -> Result<Route, String> {
        let fields = map_fields(value, &["template", "each"])
            .map_err(|e| format!("route {pattern:?}: {e}; expected {{ \"template\": \"<name>\", \"each\": \"<collection>\"? }}"))?;
        let template = match fields.get("template") {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            _ => {
                return Err(format!(
                    "route {pattern:?}: \"template\" must be a non-empty string"
                ))
            }
        };
        let each = match fields.get("each") {
            None | Some(Value::Null) => None,
            Some(Value::String(collection)) => {
                validate_collection(collection)
                    .map_err(|e| format!("route {pattern:?}: \"each\": {e}"))?;
                if collection.starts_with('_') {
                    return Err(format!(
                        "route {pattern:?}: \"each\" cannot name the reserved collection {collection:?}"
                    ));
                }
                Some(collection.clone())
            }
            Some(_) => {
                return Err(format!(
                    "route {pattern:?}: \"each\" must be a collection name"
                ))
            }
        };
        let placeholders = pattern.matches(KEY_PLACEHOLDER).count();
        match (&each, placeholders) {
            (Some(_), 0) => {
                return Err(format!(
                    "route {pattern:?} has \"each\" but no {KEY_PLACEHOLDER} in its pattern"
                ))
            }
            (None, n) if n > 0 => {
                return Err(format!(
                    "route {pattern:?} has {KEY_PLACEHOLDER} but no \"each\" collection"
                ))
            }
            _ => {}
        }
        // Any key stands in for the placeholder to check the literal parts of the pattern.
        let sample = pattern.replace(KEY_PLACEHOLDER, "k");
        if sample.contains(['{', '}']) {
            return Err(format!(
                "route {pattern:?}: the only placeholder a pattern may hold is {KEY_PLACEHOLDER}"
            ));
        }
        check_path(&sample).map_err(|e| format!("route {pattern:?}: {e}"))?;
        if each.is_none() && is_sitemap_path(pattern) {
            return Err(format!(
                "route {pattern:?}: the path is reserved for the generated sitemap"
            ));
        }
        Ok(Route {
            pattern: pattern.to_string(),
            template,
            each,
        })
    }

    /// The page path for one key (`None` for a route without `each`).
    pub fn path_for(&self, key: Option<&str>) -> Result<String, String> {
        let path = match key {
            Some(key) => self.pattern.replace(KEY_PLACEHOLDER, &encode_segment(key)),
            None => self.pattern.clone(),
        };
        check_path(&path)?;
        if is_sitemap_path(&path) {
            return Err(format!("path {path} is reserved for the generated sitemap"));
        }
        Ok(path)
    }
}

/// Reads a template tuple's source.
pub fn template_source(name: &str, value: &Value) -> Result<String, String> {
    let fields = map_fields(value, &["source"]).map_err(|e| {
        format!("template {name:?}: {e}; expected {{ \"source\": \"<minijinja>\" }}")
    })?;
    match fields.get("source") {
        Some(Value::String(source)) => Ok(source.clone()),
        _ => Err(format!("template {name:?}: \"source\" must be a string")),
    }
}

/// The path an asset key is published at: `css/site.css` → `/css/site.css`, each segment
/// percent-encoded like keys in routes.
pub fn asset_path(key: &str) -> Result<String, String> {
    let trimmed = key.strip_prefix('/').unwrap_or(key);
    let encoded: Vec<String> = trimmed.split('/').map(encode_segment).collect();
    let path = format!("/{}", encoded.join("/"));
    check_path(&path).map_err(|e| format!("asset {key:?}: {e}"))?;
    if is_sitemap_path(&path) {
        return Err(format!(
            "asset {key:?}: {path} is reserved for the generated sitemap"
        ));
    }
    Ok(path)
}

/// A decoded asset: what to publish and as which content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    pub content_type: String,
    pub body: Bytes,
}

/// Decodes an asset tuple's value: a string (text), bytes, or `{ "content_type"?, "body" }`.
pub fn asset(key: &str, path: &str, value: &Value) -> Result<Asset, String> {
    let by_extension = || {
        content_type_for(path)
            .unwrap_or(paths::OCTET_STREAM)
            .to_string()
    };
    match value {
        Value::String(text) => Ok(Asset {
            content_type: by_extension(),
            body: Bytes::copy_from_slice(text.as_bytes()),
        }),
        Value::Bytes(bytes) => Ok(Asset {
            content_type: by_extension(),
            body: Bytes::copy_from_slice(bytes),
        }),
        Value::Map(_) => {
            let expected = "expected a string, bytes, or { \"content_type\"?: \"…\", \"body\": string or bytes }";
            let fields = map_fields(value, &["content_type", "body"])
                .map_err(|e| format!("asset {key:?}: {e}; {expected}"))?;
            let body = match fields.get("body") {
                Some(Value::String(text)) => Bytes::copy_from_slice(text.as_bytes()),
                Some(Value::Bytes(bytes)) => Bytes::copy_from_slice(bytes),
                _ => {
                    return Err(format!(
                        "asset {key:?}: \"body\" must be a string or bytes; {expected}"
                    ))
                }
            };
            let content_type = match fields.get("content_type") {
                None | Some(Value::Null) => by_extension(),
                Some(Value::String(ct)) => {
                    check_content_type(ct).map_err(|e| format!("asset {key:?}: {e}"))?;
                    ct.clone()
                }
                Some(_) => return Err(format!("asset {key:?}: \"content_type\" must be a string")),
            };
            Ok(Asset { content_type, body })
        }
        _ => Err(format!(
            "asset {key:?}: expected a string, bytes, or {{ \"content_type\"?, \"body\" }}"
        )),
    }
}

/// A content type goes into an HTTP header verbatim: printable ASCII, bounded, `type/subtype`.
fn check_content_type(ct: &str) -> Result<(), String> {
    if ct.len() > CONTENT_TYPE_BYTES_MAX {
        return Err(format!(
            "content type is {} bytes, the limit is {CONTENT_TYPE_BYTES_MAX} bytes",
            ct.len()
        ));
    }
    let printable = ct.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !printable || !ct.contains('/') || ct.starts_with(' ') {
        return Err(format!(
            "content type {ct:?} is not of the form type/subtype"
        ));
    }
    Ok(())
}

/// The fields of a map value, refusing fields not in `allowed` (a typo like "tempalte" must
/// not silently fall back to a default).
fn map_fields<'v>(
    value: &'v Value,
    allowed: &[&str],
) -> Result<&'v BTreeMap<String, Value>, String> {
    let Value::Map(fields) = value else {
        return Err("value is not a map".to_string());
    };
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field {unknown:?}"));
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn value(j: serde_json::Value) -> Value {
        Value::from_json(j).unwrap()
    }

    #[test]
    fn routes_parse() {
        let r = Route::parse(
            "/{key}",
            &value(json!({"template": "profile", "each": "profiles"})),
        )
        .unwrap();
        assert_eq!(r.each.as_deref(), Some("profiles"));
        assert_eq!(r.path_for(Some("alice")).unwrap(), "/alice");
        assert_eq!(r.path_for(Some("a b/c")).unwrap(), "/a%20b%2Fc");
        assert!(r.path_for(Some("..")).is_err());
        assert!(r.path_for(Some("sitemap.xml")).is_err());

        let feed = Route::parse("/feed.xml", &value(json!({"template": "feed"}))).unwrap();
        assert_eq!(feed.path_for(None).unwrap(), "/feed.xml");

        let dotted = Route::parse(
            "/u/{key}",
            &value(json!({"template": "u", "each": "users"})),
        )
        .unwrap();
        assert_eq!(dotted.path_for(Some("a.png")).unwrap(), "/u/a.png");
    }

    #[test]
    fn bad_routes_are_refused() {
        let cases = [
            ("/{key}", json!({"template": "p"}), "no \"each\""),
            (
                "/x",
                json!({"template": "p", "each": "profiles"}),
                "no {key}",
            ),
            ("/x", json!({"tempalte": "p"}), "unknown field"),
            ("/x", json!("p"), "not a map"),
            ("/x", json!({"template": ""}), "non-empty"),
            ("x", json!({"template": "p"}), "start with '/'"),
            ("/{id}", json!({"template": "p"}), "only placeholder"),
            ("/sitemap.xml", json!({"template": "p"}), "reserved"),
            (
                "/{key}",
                json!({"template": "p", "each": "_templates"}),
                "reserved",
            ),
            (
                "/{key}",
                json!({"template": "p", "each": "a b"}),
                "invalid collection",
            ),
        ];
        for (pattern, v, expected) in cases {
            let err = Route::parse(pattern, &value(v)).unwrap_err();
            assert!(err.contains(expected), "{pattern}: {err}");
        }
    }

    #[test]
    fn assets_decode() {
        let css = asset("site.css", "/site.css", &value(json!("body{}"))).unwrap();
        assert_eq!(css.content_type, "text/css; charset=utf-8");
        assert_eq!(&css.body[..], b"body{}");
        let raw = asset("blob", "/blob", &value(json!({"$bytes": "AAEC"}))).unwrap();
        assert_eq!(raw.content_type, paths::OCTET_STREAM);
        assert_eq!(&raw.body[..], [0, 1, 2]);
        let typed = asset(
            "x",
            "/x",
            &value(json!({"content_type": "image/svg+xml", "body": "<svg/>"})),
        )
        .unwrap();
        assert_eq!(typed.content_type, "image/svg+xml");
        assert!(asset("x", "/x", &value(json!(5))).is_err());
        assert!(asset(
            "x",
            "/x",
            &value(json!({"content_type": "a\r\nb", "body": ""}))
        )
        .is_err());
        assert!(asset("x", "/x", &value(json!({"body": 1}))).is_err());
        assert_eq!(asset_path("css/site.css").unwrap(), "/css/site.css");
        assert_eq!(asset_path("/img/a b.png").unwrap(), "/img/a%20b.png");
        assert!(asset_path("a//b").is_err());
        assert!(asset_path("sitemap.xml").is_err());
    }

    #[test]
    fn templates_need_a_source() {
        assert_eq!(
            template_source("t", &value(json!({"source": "hi"}))).unwrap(),
            "hi"
        );
        assert!(template_source("t", &value(json!("hi"))).is_err());
        assert!(template_source("t", &value(json!({"source": 1}))).is_err());
    }
}
