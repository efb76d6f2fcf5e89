//! What a template's source says it loads, found by scanning the text, not by watching renders.
//!
//! Why static: minijinja caches every template it loads in its `Environment`, so watching
//! loads during one render misses templates another render (or thread) loaded first. Instead
//! we read the source: every `include`, `extends`, `import` and `from` statement in the
//! default syntax starts with `{%` (optionally `{%-` or `{%+`), whitespace, and the keyword.
//! We visit *every* `{%` in the raw text — also inside comments, `raw` blocks and strings —
//! so nothing is missed; the cost of looking there is only an extra dependency now and then.
//! A name that is one string literal (or a list of them, `include ["a", "b"]`) is recorded;
//! any other expression means the name is decided at render time, and the template is marked
//! `dynamic`: pages using it then depend on every template of the site.
//!
//! The same scan finds collection names passed as literals to `get("…"` and `list("…"`, which
//! tells a full render what to load into memory up front (a hint only: anything else is
//! still read correctly, just through the slower path).

use std::collections::BTreeSet;

/// The templates one template loads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateRefs {
    /// Names given as string literals.
    pub names: BTreeSet<String>,
    /// True when some loaded name is computed at render time.
    pub dynamic: bool,
}

/// Statements that load another template.
const LOADING_KEYWORDS: [&str; 4] = ["include", "extends", "import", "from"];

/// Words that may follow a literal template name and keep it literal.
const NAME_FOLLOWERS: [&str; 5] = ["ignore", "with", "without", "as", "import"];

/// Scans a template's source for the templates it loads.
pub fn template_refs(source: &str) -> TemplateRefs {
    let mut refs = TemplateRefs::default();
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        rest = &rest[at + 2..];
        let statement = rest.strip_prefix(['-', '+']).unwrap_or(rest).trim_start();
        let (word, after) = split_word(statement);
        if !LOADING_KEYWORDS.contains(&word) {
            continue;
        }
        match literal_names(after.trim_start()) {
            Some(names) => refs.names.extend(names),
            None => refs.dynamic = true,
        }
    }
    refs
}

/// Collection names passed as string literals to `get(` or `list(`.
pub fn literal_collections(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for call in ["get(", "list("] {
        let mut rest = source;
        while let Some(at) = rest.find(call) {
            rest = &rest[at + call.len()..];
            if let Some((name, _)) = string_literal(rest.trim_start()) {
                found.insert(name);
            }
        }
    }
    found
}

/// The names of a template-loading expression if it is a literal or a list of literals, and
/// the statement continues with something that cannot change the name.
fn literal_names(expr: &str) -> Option<Vec<String>> {
    let (names, after) = if let Some(list) = expr.strip_prefix('[') {
        let mut names = Vec::new();
        let mut rest = list.trim_start();
        loop {
            if let Some(after) = rest.strip_prefix(']') {
                break (names, after);
            }
            let (name, after) = string_literal(rest)?;
            names.push(name);
            rest = after.trim_start();
            if let Some(after) = rest.strip_prefix(',') {
                rest = after.trim_start();
            } else if !rest.starts_with(']') {
                return None;
            }
        }
    } else {
        let (name, after) = string_literal(expr)?;
        (vec![name], after)
    };
    let after = after.trim_start();
    let ends_statement = ["%}", "-%}", "+%}"]
        .iter()
        .any(|end| after.starts_with(end));
    let (word, _) = split_word(after);
    (ends_statement || NAME_FOLLOWERS.contains(&word)).then_some(names)
}

/// A leading `"…"` or `'…'` literal without escapes, and what follows it. Literals with
/// escapes are treated as not literal, which is always safe (the name becomes dynamic).
fn string_literal(s: &str) -> Option<(String, &str)> {
    let quote = s.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let body = &s[1..];
    let end = body.find([quote, '\\'])?;
    if body[end..].starts_with('\\') {
        return None;
    }
    Some((body[..end].to_string(), &body[end + 1..]))
}

/// The identifier at the start of `s` (possibly empty) and the rest.
fn split_word(s: &str) -> (&str, &str) {
    let len = s
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    s.split_at(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(source: &str) -> (Vec<String>, bool) {
        let refs = template_refs(source);
        (refs.names.into_iter().collect(), refs.dynamic)
    }

    #[test]
    fn literal_loads_are_found() {
        let src = r#"{% extends "base.html" %}
            {%- include 'nav.html' ignore missing -%}
            {% import "macros.html" as m %}
            {%+ from "forms.html" import field, button %}
            {% include ["a.html", 'b.html',] %}
            {%include"tight.html"%}
            {% include "ctx.html" with context %}"#;
        let (found, dynamic) = names(src);
        assert_eq!(
            found,
            [
                "a.html",
                "b.html",
                "base.html",
                "ctx.html",
                "forms.html",
                "macros.html",
                "nav.html",
                "tight.html"
            ]
        );
        assert!(!dynamic);
    }

    #[test]
    fn computed_names_are_dynamic() {
        for src in [
            "{% include page.tuple.value.layout %}",
            r#"{% include "a" ~ x %}"#,
            r#"{% extends "a" if x else "b" %}"#,
            r#"{% include ["a", b] %}"#,
            r#"{% include "a\"b" %}"#,
            "{% import x as y %}",
        ] {
            assert!(names(src).1, "{src}");
        }
    }

    #[test]
    fn other_statements_are_ignored() {
        let (found, dynamic) =
            names("{% if x %}{% for i in items %}{{ i }}{% endfor %}{% endif %}{% included %}");
        assert!(found.is_empty());
        assert!(!dynamic);
    }

    #[test]
    fn commented_loads_count_too() {
        // Over-approximation is the safe direction: an extra dependency, never a missed one.
        let (found, _) =
            names(r#"{# {% include "old.html" %} #}{% raw %}{% include "raw.html" %}{% endraw %}"#);
        assert_eq!(found, ["old.html", "raw.html"]);
    }

    #[test]
    fn collections_named_in_calls() {
        let found = literal_collections(
            r#"{{ get("settings", "site") }}{% for p in list( 'profiles', limit=5) %}{% endfor %}{{ get(c, "k") }}"#,
        );
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["profiles", "settings"]
        );
    }
}
