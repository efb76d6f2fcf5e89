//! URL paths of published files: encoding keys into path segments, checking paths,
//! choosing an asset's content type from its path's extension, and the one rule that decides
//! a rendered page's content type and escaping: its template's kind ([`template_kind`]).
//!
//! Paths in a manifest are exactly what a browser sends: they start with `/` and carry
//! percent-encoded bytes where a key had characters that are not safe in a path segment. The
//! server looks a request's raw (still encoded) path up in the manifest.

/// Content type of HTML pages: every page whose template is HTML (see [`template_kind`]).
pub const HTML: &str = "text/html; charset=utf-8";
/// Content type of generated sitemaps.
pub const XML: &str = "application/xml; charset=utf-8";
/// Content type of the generated `robots.txt`.
pub const TEXT: &str = "text/plain; charset=utf-8";
/// Content type of assets whose extension says nothing.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// The generated robots file.
pub const ROBOTS_PATH: &str = "/robots.txt";
/// The generated sitemap (or sitemap index, past the URL limit).
pub const SITEMAP_PATH: &str = "/sitemap.xml";
/// Where the rendered `_templates/404.html` is published.
pub const NOT_FOUND_PATH: &str = "/404.html";
/// The template that, when present, is rendered to [`NOT_FOUND_PATH`].
pub const NOT_FOUND_TEMPLATE: &str = "404.html";

/// Percent-encodes a key for use as (part of) one path segment (defined in `proto`, which
/// API clients use too).
pub use sesame_proto::encode_segment;

/// Checks a path before it is published: starts with `/`, has no empty, `.` or `..`
/// segments (browsers and caches collapse those, so the file could never be reached), and
/// only characters that need no encoding. Returns why not.
pub fn check_path(path: &str) -> Result<(), String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("path {path:?} must start with '/'"));
    };
    if let Some(bad) = path.chars().find(|c| !is_path_char(*c)) {
        return Err(format!(
            "path {path:?} contains {bad:?}; use letters, digits and -._~!$&'()*+,;=:@%/"
        ));
    }
    if rest.is_empty() {
        return Ok(()); // the root
    }
    // A trailing "/" names a directory-style page ("/blog/").
    let inner = rest.strip_suffix('/').unwrap_or(rest);
    for segment in inner.split('/') {
        if segment.is_empty() {
            return Err(format!("path {path:?} has an empty segment ('//')"));
        }
        if is_dot_segment(segment) {
            return Err(format!("path {path:?} has a '.' or '..' segment"));
        }
    }
    Ok(())
}

/// True for the paths of generated sitemaps (`/sitemap.xml`, `/sitemap-<n>.xml`). No route or
/// asset may claim them: the sitemap index points at them by name.
pub fn is_sitemap_path(path: &str) -> bool {
    if path == SITEMAP_PATH {
        return true;
    }
    path.strip_prefix("/sitemap-")
        .and_then(|rest| rest.strip_suffix(".xml"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The path of a numbered sitemap file, counted from 1.
pub fn sitemap_part_path(n: usize) -> String {
    format!("/sitemap-{n}.xml")
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@%/".contains(c)
}

/// `.` and `..`, also when percent-encoded: URL parsers decode `%2e` before collapsing.
fn is_dot_segment(segment: &str) -> bool {
    let decoded = segment.replace("%2e", ".").replace("%2E", ".");
    decoded == "." || decoded == ".."
}

/// How a rendered page's output is escaped: a template kind's half of [`PageKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub enum Escape {
    /// `& < > " '` become entities: right for HTML and XML, text and attributes.
    Html,
    /// Values are written as JSON (strings quoted and escaped).
    Json,
    /// Values are written as they are: only for kinds that no browser runs as markup.
    None,
}

/// What a page is, decided by its template's name alone: the content type it is published
/// with, and how values are escaped into it. Escaping and content type come from the same
/// rule, so no unescaped output is ever served as HTML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageKind {
    pub content_type: &'static str,
    pub escape: Escape,
}

/// The kind of the pages a template renders, by the extension of the template's name (its
/// last `/` segment, ASCII case ignored):
///
/// | extension | content type | escaping |
/// | --- | --- | --- |
/// | none, `.html`, `.htm`, and any extension not listed here | `text/html; charset=utf-8` | HTML |
/// | `.xml` | `application/xml; charset=utf-8` | HTML |
/// | `.rss`, `.atom` | `application/rss+xml`, `application/atom+xml` | HTML |
/// | `.svg` | `image/svg+xml` | HTML |
/// | `.json` | `application/json` | JSON |
/// | `.js`, `.mjs` | `text/javascript; charset=utf-8` | JSON |
/// | `.txt` | `text/plain; charset=utf-8` | none |
/// | `.css` | `text/css; charset=utf-8` | none |
/// | `.csv` | `text/csv; charset=utf-8` | none |
/// | `.md` | `text/markdown; charset=utf-8` | none |
///
/// A route's URL pattern plays no part: `/feed.xml` rendered by `feed.html` is HTML.
pub fn template_kind(name: &str) -> PageKind {
    let last = name.rsplit('/').next().unwrap_or(name);
    let ext = last
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase());
    let (content_type, escape) = match ext.as_deref() {
        Some("xml") => (XML, Escape::Html),
        Some("rss") => ("application/rss+xml", Escape::Html),
        Some("atom") => ("application/atom+xml", Escape::Html),
        Some("svg") => ("image/svg+xml", Escape::Html),
        Some("json") => ("application/json", Escape::Json),
        Some("js" | "mjs") => ("text/javascript; charset=utf-8", Escape::Json),
        Some("txt") => (TEXT, Escape::None),
        Some("css") => ("text/css; charset=utf-8", Escape::None),
        Some("csv") => ("text/csv; charset=utf-8", Escape::None),
        Some("md") => ("text/markdown; charset=utf-8", Escape::None),
        // HTML is the safe default: everything is escaped.
        _ => (HTML, Escape::Html),
    };
    PageKind {
        content_type,
        escape,
    }
}

/// The content type for a path, by the extension of its last segment (assets).
pub fn content_type_for(path: &str) -> Option<&'static str> {
    let last = path.rsplit('/').next().unwrap_or(path);
    let (_, ext) = last.rsplit_once('.')?;
    let ext = ext.to_ascii_lowercase();
    Some(match ext.as_str() {
        "html" | "htm" => HTML,
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "xml" => XML,
        "rss" => "application/rss+xml",
        "atom" => "application/atom+xml",
        "txt" => TEXT,
        "csv" => "text/csv; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "zip" => "application/zip",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("alice"), "alice");
        assert_eq!(encode_segment("a.b-c_d~"), "a.b-c_d~");
        assert_eq!(encode_segment("a b/c?d#e"), "a%20b%2Fc%3Fd%23e");
        assert_eq!(encode_segment("ü"), "%C3%BC");
        assert_eq!(encode_segment("50%"), "50%25");
    }

    #[test]
    fn paths_are_checked() {
        for ok in ["/", "/alice", "/blog/", "/u/a%20b", "/feed.xml", "/a/b/c"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "alice", "//", "/a//b", "/.", "/a/..", "/%2e%2E", "/a b", "/a?b", "/é",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sitemap_paths_are_recognised() {
        assert!(is_sitemap_path("/sitemap.xml"));
        assert!(is_sitemap_path("/sitemap-12.xml"));
        assert!(is_sitemap_path(&sitemap_part_path(3)));
        assert!(!is_sitemap_path("/sitemap-.xml"));
        assert!(!is_sitemap_path("/sitemap-a.xml"));
        assert!(!is_sitemap_path("/blog/sitemap.xml"));
    }

    #[test]
    fn template_kinds_decide_content_type_and_escaping() {
        let kind = |name: &str| {
            let k = template_kind(name);
            (k.content_type, k.escape)
        };
        for html in [
            "profile",
            "p.html",
            "p.HTM",
            "a/b.html",
            "v1.0/page.tmpl",
            "x.",
        ] {
            assert_eq!(kind(html), (HTML, Escape::Html), "{html}");
        }
        assert_eq!(kind("feed.xml"), (XML, Escape::Html));
        assert_eq!(kind("feed.RSS"), ("application/rss+xml", Escape::Html));
        assert_eq!(kind("icon.svg"), ("image/svg+xml", Escape::Html));
        assert_eq!(kind("api/u.json"), ("application/json", Escape::Json));
        assert_eq!(
            kind("app.js"),
            ("text/javascript; charset=utf-8", Escape::Json)
        );
        assert_eq!(kind("p.txt"), (TEXT, Escape::None));
        assert_eq!(kind("s.css"), ("text/css; charset=utf-8", Escape::None));
        assert_eq!(kind("d.csv"), ("text/csv; charset=utf-8", Escape::None));
        assert_eq!(kind("r.md"), ("text/markdown; charset=utf-8", Escape::None));
        // Only the last segment counts: a folder named like a file changes nothing.
        assert_eq!(kind("x.txt/page"), (HTML, Escape::Html));
        // Nothing unescaped is ever HTML.
        for name in ["a.txt", "a.css", "a.csv", "a.md", "a.json", "a.js", "a"] {
            let k = template_kind(name);
            assert!(k.content_type != HTML || k.escape == Escape::Html, "{name}");
        }
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type_for("/feed.xml"), Some(XML));
        assert_eq!(
            content_type_for("/css/site.CSS"),
            Some("text/css; charset=utf-8")
        );
        assert_eq!(content_type_for("/alice"), None);
        assert_eq!(content_type_for("/v1.0/x"), None);
        assert_eq!(content_type_for("/a.unknown"), None);
    }
}
