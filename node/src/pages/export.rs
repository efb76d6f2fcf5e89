//! A site's current version as a ZIP that any static host can serve: each page at
//! `path/index.html` (clean URLs), other files at their path, and links to the node's own
//! base URL made root-relative (`/alice`), so the copy does not point back at the node.

use std::io::Write as _;

use anyhow::Context as _;

use sesame_projector::{Manifest, NOT_FOUND_PATH};

use crate::pages::serve::Pages;

/// Largest ZIP made, in bytes: past it the export fails (a copy of a very large site is
/// better made from the object store).
pub const EXPORT_BYTES_MAX: usize = 512 << 20;

/// Where a manifest path goes in the ZIP.
pub fn zip_path(path: &str, content_type: &str) -> String {
    let p = path.trim_start_matches('/');
    let html = content_type.starts_with("text/html");
    if p.is_empty() {
        "index.html".into()
    } else if html && path != NOT_FOUND_PATH && !p.ends_with(".html") {
        format!("{p}/index.html")
    } else {
        p.to_string()
    }
}

/// Builds the ZIP of `manifest`, reading each file through `pages`; links to `base_url` in
/// text files become root-relative.
pub async fn site_zip(
    pages: &Pages,
    manifest: &Manifest,
    base_url: &str,
) -> anyhow::Result<Vec<u8>> {
    let base = format!("{}/", base_url.trim_end_matches('/'));
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut total = 0usize;
    // In path order, as a reader of the archive expects (the tree keeps hash order).
    let files: std::collections::BTreeMap<&String, &sesame_projector::FileEntry> =
        manifest.files.iter().collect();
    for (path, file) in files {
        let body = pages
            .body(&manifest.site, &file.hash)
            .await
            .with_context(|| format!("file {path} ({}) cannot be read", file.hash))?;
        let text_like = file.content_type.starts_with("text/")
            || file.content_type.contains("xml")
            || file.content_type.contains("javascript");
        let bytes: Vec<u8> = match (text_like, std::str::from_utf8(&body)) {
            (true, Ok(text)) => text.replace(&base, "/").into_bytes(),
            _ => body.to_vec(),
        };
        total += bytes.len();
        anyhow::ensure!(
            total <= EXPORT_BYTES_MAX,
            "the site is over {EXPORT_BYTES_MAX} bytes; copy it from the object store instead"
        );
        zip.start_file(zip_path(path, &file.content_type), options)?;
        zip.write_all(&bytes)?;
    }
    zip.finish()?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::zip_path;

    #[test]
    fn clean_urls_become_index_files() {
        assert_eq!(zip_path("/", "text/html; charset=utf-8"), "index.html");
        assert_eq!(
            zip_path("/alice", "text/html; charset=utf-8"),
            "alice/index.html"
        );
        assert_eq!(zip_path("/style.css", "text/css"), "style.css");
        assert_eq!(zip_path("/404.html", "text/html"), "404.html");
        assert_eq!(zip_path("/sitemap.xml", "application/xml"), "sitemap.xml");
        assert_eq!(zip_path("/notes.txt", "text/plain"), "notes.txt");
    }
}
