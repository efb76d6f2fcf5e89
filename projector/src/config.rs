//! Projector configuration and the default limits of the rendering sandbox.

use std::sync::Arc;

use crate::sandbox::RenderPool;
use crate::sitemap::SITEMAP_URLS_MAX;

/// Fuel a page render may burn (about one unit per template instruction). Bounds the time a
/// template can take: a loop over 10,000 tuples costs a few hundred thousand.
pub const FUEL_PER_PAGE_DEFAULT: u64 = 5_000_000;
/// minijinja recursion budget per render (macros and includes cost several units each).
pub const RECURSION_DEPTH_MAX_DEFAULT: usize = 100;
/// Largest page a template may produce, in bytes.
pub const PAGE_BYTES_MAX_DEFAULT: usize = 4 << 20;
/// Most pages (routes, pages per tuple, 404) one site may have.
pub const SITE_PAGES_MAX_DEFAULT: usize = 100_000;

/// Where pages are rendered.
#[derive(Debug, Clone)]
pub enum Renderer {
    /// On this many threads of the calling process (0: one per available core). Bounds fuel,
    /// recursion and output size but not memory or wall-clock time, so a hostile template can
    /// exhaust the process: for library users, tests and examples with trusted templates.
    Threads(usize),
    /// In the worker processes of a [`RenderPool`], which bound every page's memory and time
    /// too and may be shared by many sites. What the node uses.
    Pool(Arc<RenderPool>),
}

impl PartialEq for Renderer {
    fn eq(&self, other: &Renderer) -> bool {
        match (self, other) {
            (Renderer::Threads(a), Renderer::Threads(b)) => a == b,
            (Renderer::Pool(a), Renderer::Pool(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Renderer {}

/// How one site is projected. Build with [`Config::new`] and adjust fields as needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Public URL of the site root, e.g. `https://demo.example.com` (subdomain mode) or
    /// `http://127.0.0.1:8080/demo` (path mode). Canonical links, the sitemap and robots.txt
    /// are built from it. A trailing `/` is ignored.
    pub base_url: String,
    /// Fuel per page render (see [`FUEL_PER_PAGE_DEFAULT`]).
    pub fuel_per_page: u64,
    /// Recursion budget per page render; minijinja caps it at 500.
    pub recursion_depth_max: usize,
    /// Largest page output, in bytes.
    pub page_bytes_max: usize,
    /// Most pages per site; pages past it are left out and an error is reported.
    pub pages_max: usize,
    /// URLs per sitemap file before the sitemap is split (50,000 by the sitemaps protocol).
    pub sitemap_urls_max: usize,
    /// Where pages are rendered: threads of this process by default.
    pub renderer: Renderer,
}

impl Config {
    pub fn new(base_url: impl Into<String>) -> Config {
        Config {
            base_url: base_url.into(),
            fuel_per_page: FUEL_PER_PAGE_DEFAULT,
            recursion_depth_max: RECURSION_DEPTH_MAX_DEFAULT,
            page_bytes_max: PAGE_BYTES_MAX_DEFAULT,
            pages_max: SITE_PAGES_MAX_DEFAULT,
            sitemap_urls_max: SITEMAP_URLS_MAX,
            renderer: Renderer::Threads(0),
        }
    }

    /// `base_url` without its trailing slashes: paths start with `/`.
    pub(crate) fn base_url(&self) -> &str {
        self.base_url.trim_end_matches('/')
    }
}

/// `threads`, or one per available core when 0.
pub(crate) fn threads_or_cores(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}
