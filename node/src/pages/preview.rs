//! Preview builds: a site rendered at a proposed change, served under a private URL.
//!
//! `POST /v1/sites/{site}/preview` (editor) takes the ops of a transaction that is not
//! committed. The node renders the whole site, in its render pool like any projection, from
//! one snapshot of the store with the ops laid over it ([`Overlay`]), with links pointing
//! into the preview, and publishes the files and manifest like a version. The log then
//! records the preview (`Command::PutPreview`: the manifest, the hash of a random 128-bit
//! id, an expiry), never as the root. `GET /_preview/<site>/<id>/<path>` serves it on any
//! node until it expires (`Cache-Control: private, no-store`, `noindex`, no referrer, so the
//! id does not leak); garbage collection keeps its files until then.
//!
//! Guards (`if_version`) are not checked: a preview shows what the change would render,
//! not whether it would commit. Mailbox sends are refused (they are not site data).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use sesame_projector::{
    Config as RenderConfig, Renderer, SiteProjector, Source, SourceError, TemplateError,
};
use sesame_proto::{Command, CommandResult, LogIndex, Op, PreviewRecord, Tuple, Value};

use crate::app::{now_ms, Node};
use crate::pages::projection::Projections;

/// How long a preview lives unless asked otherwise.
pub const PREVIEW_TTL_S_DEFAULT: u64 = 3_600;
/// The longest a preview may live.
pub const PREVIEW_TTL_S_MAX: u64 = 7 * 24 * 3_600;
/// Previews rendering at once on one node (each renders its whole site).
pub const PREVIEWS_RENDERING_MAX: usize = 2;
/// Bytes of randomness in a preview id.
const PREVIEW_ID_BYTES: usize = 16;

/// `POST /v1/sites/{site}/preview`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    pub ops: Vec<Op>,
    /// Seconds until the preview expires ([`PREVIEW_TTL_S_DEFAULT`] if absent).
    pub ttl_s: Option<u64>,
}

/// What a preview build made.
#[derive(Debug, Serialize)]
pub struct PreviewBuilt {
    /// Where the preview is served: keep it private, it is the key.
    pub url: String,
    pub id: String,
    /// The commit the change was rendered on top of.
    pub index: LogIndex,
    pub expires_at_ms: u64,
    /// HTML pages in the preview.
    pub pages: u64,
    /// Template problems the change has (or keeps): what publishing it would report.
    pub errors: Vec<TemplateError>,
}

/// A site's tuples with uncommitted ops laid over them.
pub struct Overlay<'a> {
    pub base: &'a dyn Source,
    pub site: &'a str,
    /// The version the overlaid tuples get: one past the snapshot's index.
    pub version: LogIndex,
    /// `(collection, key) → Some(value)` for a put, `None` for a delete; the last op wins.
    pub changes: BTreeMap<(String, String), Option<Value>>,
}

impl<'a> Overlay<'a> {
    pub fn new(base: &'a dyn Source, site: &'a str, version: LogIndex, ops: &[Op]) -> Overlay<'a> {
        let mut changes = BTreeMap::new();
        for op in ops {
            match op {
                Op::Put {
                    collection,
                    key,
                    value,
                    ..
                } => {
                    changes.insert((collection.clone(), key.clone()), Some(value.clone()));
                }
                Op::Delete {
                    collection, key, ..
                } => {
                    changes.insert((collection.clone(), key.clone()), None);
                }
                Op::Send { .. } => {}
            }
        }
        Overlay {
            base,
            site,
            version,
            changes,
        }
    }

    fn tuple(&self, collection: &str, key: &str, value: &Value) -> Tuple {
        Tuple {
            site: self.site.to_string(),
            collection: collection.to_string(),
            key: key.to_string(),
            value: value.clone(),
            version: self.version,
            origin: None,
            home: Default::default(),
        }
    }
}

impl Source for Overlay<'_> {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Tuple>, SourceError> {
        match self.changes.get(&(collection.to_string(), key.to_string())) {
            Some(Some(value)) => Ok(Some(self.tuple(collection, key, value))),
            Some(None) => Ok(None),
            None => self.base.get(collection, key),
        }
    }

    fn list(
        &self,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Tuple>, SourceError> {
        let mine: Vec<(&String, &Option<Value>)> = self
            .changes
            .range((collection.to_string(), prefix.to_string())..)
            .take_while(|((c, k), _)| c == collection && k.starts_with(prefix))
            .map(|((_, k), v)| (k, v))
            .collect();
        // Enough base tuples that deletes cannot leave fewer than `limit` before the cut.
        let base = self
            .base
            .list(collection, prefix, limit.saturating_add(mine.len()))?;
        let mut merged: BTreeMap<String, Tuple> =
            base.into_iter().map(|t| (t.key.clone(), t)).collect();
        for (key, value) in mine {
            match value {
                Some(v) => {
                    merged.insert(key.clone(), self.tuple(collection, key, v));
                }
                None => {
                    merged.remove(key);
                }
            }
        }
        Ok(merged.into_values().take(limit).collect())
    }
}

/// A new preview id: random, hex.
fn new_id() -> String {
    let mut bytes = [0u8; PREVIEW_ID_BYTES];
    getrandom::fill(&mut bytes).expect("read the operating system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash under which the log records a preview id.
pub fn id_hash(id: &str) -> String {
    blake3::hash(id.as_bytes()).to_hex().to_string()
}

fn is_id(id: &str) -> bool {
    id.len() == PREVIEW_ID_BYTES * 2 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Projections {
    /// Renders `site` with `ops` laid over its current data, publishes the files, and
    /// records the preview through the log.
    pub async fn preview(
        &self,
        site: &str,
        ops: Vec<Op>,
        ttl: Duration,
    ) -> anyhow::Result<PreviewBuilt> {
        let _slot = self
            .previews_rendering
            .try_acquire()
            .map_err(|_| PreviewBusy)?;
        let id = new_id();
        let base_url = format!(
            "{}/_preview/{site}/{id}",
            self.config.public_url.trim_end_matches('/')
        );
        let mut render = RenderConfig::new(base_url.clone());
        render.renderer = Renderer::Pool(Arc::clone(&self.config.render_pool));
        render.pages_max = self.config.site_pages_max;
        let mut projector = SiteProjector::new(site, render);
        let name = site.to_string();
        let (index, projection, projector) = self
            .reads
            .read(move |view| {
                let index = view.applied_index()?;
                let src = super::projection::SiteSource { view, site: &name };
                let overlay = Overlay::new(&src, &name, index + 1, &ops);
                let projection = projector.render_all(&overlay, index);
                Ok((index, projection, projector))
            })
            .await?;
        let projection = projection.context("render the preview")?;
        let pages = projection.manifest.files.pages() as u64;
        // Garbage collection waits until the preview is recorded (gc.rs).
        let _pin = self.publisher.pin().await;
        let manifest = self
            .publisher
            .publish(&projection)
            .await
            .context("write the preview's files")?;
        let created = now_ms();
        let expires_at_ms = created.saturating_add(ttl.as_millis() as u64);
        let (_, result) = self
            .writer
            .propose(Command::PutPreview(PreviewRecord {
                site: site.to_string(),
                id_hash: id_hash(&id),
                manifest,
                index,
                created_at_ms: created,
                expires_at_ms,
            }))
            .await
            .context("record the preview")?;
        match result {
            CommandResult::PreviewStored => {}
            CommandResult::UnknownSite { site } => anyhow::bail!(UnknownSite(site)),
            other => anyhow::bail!("record the preview: unexpected result {other:?}"),
        }
        Ok(PreviewBuilt {
            url: format!("{base_url}/"),
            id,
            index,
            expires_at_ms,
            pages,
            errors: projector.errors(),
        })
    }
}

/// [`PREVIEWS_RENDERING_MAX`] previews are rendering on this node.
#[derive(Debug, thiserror::Error)]
#[error("{PREVIEWS_RENDERING_MAX} previews are rendering on this node; retry shortly")]
pub struct PreviewBusy;

/// The site was deleted while its preview rendered.
#[derive(Debug, thiserror::Error)]
#[error("unknown site {0:?}")]
pub struct UnknownSite(pub String);

fn plain(status: StatusCode, message: &'static str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        message,
    )
        .into_response()
}

/// `GET /_preview/{site}/{id}/{*path}`: a file of a live preview.
pub async fn serve(
    State(node): State<Arc<Node>>,
    Path((site, id, rest)): Path<(String, String, String)>,
) -> Response {
    serve_path(&node, &site, &id, &format!("/{rest}")).await
}

/// `GET /_preview/{site}/{id}`: the preview's home page.
pub async fn serve_root(
    State(node): State<Arc<Node>>,
    Path((site, id)): Path<(String, String)>,
) -> Response {
    serve_path(&node, &site, &id, "/").await
}

async fn serve_path(node: &Node, site: &str, id: &str, path: &str) -> Response {
    if sesame_proto::validate_site(site).is_err() || !is_id(id) {
        return plain(StatusCode::NOT_FOUND, "no such preview, or it expired");
    }
    let Ok(path) = crate::pages::serve::normalize_path(path) else {
        return plain(StatusCode::BAD_REQUEST, "bad path");
    };
    let (name, hash) = (site.to_string(), id_hash(id));
    let record = match node
        .reads
        .read(move |v| v.preview(&name, &hash, now_ms()))
        .await
    {
        Ok(Some(r)) => r,
        Ok(None) => return plain(StatusCode::NOT_FOUND, "no such preview, or it expired"),
        Err(e) => {
            tracing::error!("read a preview of {site}: {e:#}");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "retry shortly");
        }
    };
    let manifest = match node.follower().ensure_version(site, &record.manifest).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("preview of {site}: {e:#}");
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "this preview cannot be read right now; retry shortly",
            );
        }
    };
    let (file, status) = match manifest
        .files
        .get(&path)
        .or_else(|| path.strip_suffix('/').and_then(|p| manifest.files.get(p)))
    {
        Some(f) => (f, StatusCode::OK),
        None => match manifest.files.get(sesame_projector::NOT_FOUND_PATH) {
            Some(f) => (f, StatusCode::NOT_FOUND),
            None => return plain(StatusCode::NOT_FOUND, "not found"),
        },
    };
    let body = match node.pages.body(site, &file.hash).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("preview of {site}: read blob {}: {e:#}", file.hash);
            return plain(StatusCode::SERVICE_UNAVAILABLE, "retry shortly");
        }
    };
    let Ok(content_type) = HeaderValue::from_str(&file.content_type) else {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "this file cannot be served",
        );
    };
    (
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-store"),
            ),
            (
                header::HeaderName::from_static("x-robots-tag"),
                HeaderValue::from_static("noindex, nofollow"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body,
    )
        .into_response()
}
