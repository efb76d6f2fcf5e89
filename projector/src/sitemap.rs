//! The generated `sitemap.xml` (split into an index and numbered parts past the URL limit)
//! and `robots.txt`, following <https://www.sitemaps.org/protocol.html>.

use crate::paths::{sitemap_part_path, SITEMAP_PATH};

/// Most URLs one sitemap file may list (sitemaps.org protocol).
pub const SITEMAP_URLS_MAX: usize = 50_000;

const XML_HEADER: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
const XMLNS: &str = "http://www.sitemaps.org/schemas/sitemap/0.9";

/// The sitemap files for pages at `paths` (in the order given): one `/sitemap.xml` listing
/// them all, or, past `urls_max`, a sitemap index at `/sitemap.xml` pointing at
/// `/sitemap-1.xml`, `/sitemap-2.xml`, … with at most `urls_max` URLs each.
pub fn sitemaps(base_url: &str, paths: &[&str], urls_max: usize) -> Vec<(String, String)> {
    assert!(urls_max > 0, "a sitemap must be allowed at least one URL");
    if paths.len() <= urls_max {
        return vec![(SITEMAP_PATH.to_string(), urlset(base_url, paths))];
    }
    let mut files = Vec::new();
    let mut index = format!("{XML_HEADER}<sitemapindex xmlns=\"{XMLNS}\">\n");
    for (i, chunk) in paths.chunks(urls_max).enumerate() {
        let path = sitemap_part_path(i + 1);
        index.push_str(&format!(
            "<sitemap><loc>{}</loc></sitemap>\n",
            xml_escape(&format!("{base_url}{path}"))
        ));
        files.push((path, urlset(base_url, chunk)));
    }
    index.push_str("</sitemapindex>\n");
    files.insert(0, (SITEMAP_PATH.to_string(), index));
    files
}

fn urlset(base_url: &str, paths: &[&str]) -> String {
    let mut out = format!("{XML_HEADER}<urlset xmlns=\"{XMLNS}\">\n");
    for path in paths {
        out.push_str("<url><loc>");
        out.push_str(&xml_escape(&format!("{base_url}{path}")));
        out.push_str("</loc></url>\n");
    }
    out.push_str("</urlset>\n");
    out
}

/// `robots.txt` allowing everything and naming the sitemap (whose URL must be absolute).
pub fn robots(base_url: &str) -> String {
    format!("User-agent: *\nAllow: /\n\nSitemap: {base_url}{SITEMAP_PATH}\n")
}

/// Escapes text for XML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_up_to_the_limit() {
        let files = sitemaps("https://d.example.com", &["/", "/a&b"], 2);
        assert_eq!(files.len(), 1);
        assert_eq!(
            files[0].1,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n\
             <url><loc>https://d.example.com/</loc></url>\n\
             <url><loc>https://d.example.com/a&amp;b</loc></url>\n\
             </urlset>\n"
        );
    }

    #[test]
    fn split_past_the_limit() {
        let paths = ["/1", "/2", "/3", "/4", "/5"];
        let files = sitemaps("http://h/demo", &paths, 2);
        let names: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "/sitemap.xml",
                "/sitemap-1.xml",
                "/sitemap-2.xml",
                "/sitemap-3.xml"
            ]
        );
        assert_eq!(
            files[0].1,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <sitemapindex xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n\
             <sitemap><loc>http://h/demo/sitemap-1.xml</loc></sitemap>\n\
             <sitemap><loc>http://h/demo/sitemap-2.xml</loc></sitemap>\n\
             <sitemap><loc>http://h/demo/sitemap-3.xml</loc></sitemap>\n\
             </sitemapindex>\n"
        );
        assert!(files[3].1.contains("<loc>http://h/demo/5</loc>"));
        assert_eq!(files[1].1.matches("<url>").count(), 2);
    }

    #[test]
    fn full_size_split() {
        let owned: Vec<String> = (0..SITEMAP_URLS_MAX + 1)
            .map(|i| format!("/p{i}"))
            .collect();
        let paths: Vec<&str> = owned.iter().map(String::as_str).collect();
        let files = sitemaps("https://x", &paths, SITEMAP_URLS_MAX);
        assert_eq!(files.len(), 3, "index + 50,000 + 1");
        assert_eq!(files[2].1.matches("<url>").count(), 1);
    }

    #[test]
    fn robots_names_the_sitemap() {
        assert!(robots("https://d.example.com")
            .ends_with("Sitemap: https://d.example.com/sitemap.xml\n"));
    }
}
