//! Sesame's projector: site data (tuples) → static pages in object storage.
//!
//! The node follows the commit log and, per site, hands a [`SiteProjector`] a consistent read
//! view ([`Source`]) and the keys that changed. The projector works out which pages those keys
//! touched, renders them with minijinja in a sandbox, content-addresses every file with
//! blake3 and returns a [`Projection`]: a new [`Manifest`] (a version over a [`FileTree`] of
//! content-addressed chunks) plus the blobs and chunks it introduced. The
//! node publishes them with a [`Publisher`], commits the new [`Root`] through Raft itself and
//! mirrors it to the store.
//!
//! This crate does no Raft and no HTTP. Rendering is blocking, CPU-bound work: call it from
//! `spawn_blocking` (or a dedicated thread), not on the async runtime. Pages render in the
//! worker processes of a shared [`sandbox::RenderPool`] (what the node does: memory and time
//! are bounded per page) or on threads of the calling process ([`Renderer::Threads`]).
//!
//! Map of the modules, in the order a projection uses them:
//! - `source`: the read interface, and an in-memory implementation;
//! - `site`: templates, routes and assets parsed from their tuples; `paths`: URL paths and
//!   content types; `includes`: what a template loads, read from its source;
//! - `projector`: the engine (claims on paths, dirty paths, manifests); `deps`: the reverse
//!   dependency index; `render`: minijinja, its limits and the page renderer; `sandbox`: the
//!   worker processes that run it with memory and time bounded; `sitemap`; `view`: tuples
//!   as templates see them;
//! - `manifest`: manifests (versions) and roots; `tree`: the chunked file tree of a version;
//!   `publish`: the object store.

mod config;
mod deps;
mod error;
mod includes;
mod manifest;
mod paths;
mod projector;
mod publish;
mod render;
pub mod sandbox;
mod site;
mod sitemap;
mod source;
mod tree;
mod view;

pub use config::{
    Config, Renderer, FUEL_PER_PAGE_DEFAULT, PAGE_BYTES_MAX_DEFAULT, RECURSION_DEPTH_MAX_DEFAULT,
    SITE_PAGES_MAX_DEFAULT,
};
pub use error::{ProjectError, TemplateError};
pub use manifest::{
    content_hash, is_hash, Delta, FileEntry, Manifest, ManifestError, ManifestHead, Root,
    StoredManifest, MANIFEST_BYTES_MAX, MANIFEST_FORMAT, MANIFEST_FORMAT_FLAT, ROOT_FORMAT,
};
pub use paths::{
    content_type_for, encode_segment, template_kind, Escape, PageKind, NOT_FOUND_PATH, ROBOTS_PATH,
    SITEMAP_PATH,
};
pub use projector::{
    BlobSink, ChangedKey, Projection, SiteProjector, ASSETS_MAX, ERRORS_REPORTED_MAX, ROUTES_MAX,
    TEMPLATES_MAX,
};
pub use publish::{
    ObjectKind, PublishError, Publisher, StoredObject, BLOB_BYTES_MAX, BLOB_PUTS_CONCURRENT_MAX,
};
pub use render::{
    safe_url, ASSET_VERSION_HEX_LEN, ASSET_VERSION_PARAM, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX,
    READS_PER_PAGE_MAX, TUPLES_READ_PER_PAGE_MAX,
};
pub use site::{ASSETS, ROUTES, TEMPLATES};
pub use sitemap::{sitemaps, SITEMAP_URLS_MAX};
pub use source::{MemorySource, Source, SourceError};
pub use tree::{
    entry_weight, is_page, ChunkSource, FileTree, TreeUpdate, CHUNK_BYTES_MAX, CHUNK_FORMAT,
    CHUNK_GETS_CONCURRENT_MAX, LEAF_BYTES_MAX, LEAF_ENTRIES_MAX, TREE_DEPTH_MAX, TREE_FANOUT,
};
