//! Publishing site versions to object storage (S3, R2, a local folder) through `object_store`.
//!
//! Layout, per site:
//! - `sites/<site>/blobs/<hash>`: every file, once, under the blake3 hash of its bytes;
//! - `sites/<site>/manifests/<id>.json`: every site version, under the hash of its JSON
//!   (format 2: a small version object naming the top chunk of its file tree);
//! - `sites/<site>/chunks/<id>.json`: the nodes of the file trees (`tree.rs`), each under
//!   the hash of its JSON and shared by every version that has it;
//! - `sites/<site>/root`: a mirror of the site's current root (the Raft log holds the real
//!   one), for edge readers.
//!
//! Order makes a version visible only when complete: blobs, then the chunks, then the
//! manifest, then (after the node commits the root through Raft) the root mirror. Blobs,
//! chunks and manifests are immutable and content-addressed, so writing one twice is
//! harmless and retries are always safe. Every read is bounded in size
//! ([`CHUNK_BYTES_MAX`], [`MANIFEST_BYTES_MAX`]) and checked against its hash.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutPayload, UpdateVersion};
use sesame_proto::validate_site;
use thiserror::Error;

use crate::manifest::{content_hash, is_hash, Manifest, Root, StoredManifest, MANIFEST_BYTES_MAX};
use crate::projector::Projection;
use crate::tree::{self, ChunkSource, CHUNK_BYTES_MAX};

/// Blob uploads in flight at once for one publish.
pub const BLOB_PUTS_CONCURRENT_MAX: usize = 32;
/// Blocking tasks that write one publish's blobs into a local folder, each a share of them
/// in turn: a task per file cost more in thread hand-offs than the write itself.
const LOCAL_BLOB_WRITERS: usize = 2;
/// Blob paths remembered as written (to skip re-uploads); the memory is cleared past this.
pub const BLOBS_KNOWN_MAX: usize = 1_000_000;
/// Largest blob a reader takes from the store; a larger one is refused before it is read.
/// No file a site publishes comes near it: a page is bounded by the render frame (32 MiB),
/// an asset by the tuple value limit (1 MiB).
pub const BLOB_BYTES_MAX: usize = 64 << 20;
/// Largest root object a reader takes (a root is a few hundred bytes of JSON).
const ROOT_BYTES_MAX: usize = 64 << 10;

/// Why publishing or reading back failed.
#[derive(Debug, Error)]
pub enum PublishError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("invalid object store URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path}: {source}")]
    CreateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what} {value:?}")]
    InvalidName { what: &'static str, value: String },
    #[error("{path} not found")]
    NotFound { path: String },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("the root of site {site} changed while it was being mirrored; mirror the committed root again")]
    RootConflict { site: String },
    #[error("fetching {what}: {reason}")]
    Fetch { what: String, reason: String },
}

/// Writes and reads site versions in one object store.
#[derive(Debug)]
pub struct Publisher {
    store: Arc<dyn ObjectStore>,
    /// Path inside the store under which `sites/` lives (from a URL like `s3://bucket/pages`).
    prefix: Option<Path>,
    /// The folder of a local store: blobs are then written straight into it by a few
    /// blocking tasks, in the store's layout (its own `put` costs a blocking task, a
    /// temporary file and a rename per file).
    local_dir: Option<std::path::PathBuf>,
    /// Blob paths known to exist.
    known: Mutex<HashSet<String>>,
    /// Held shared by every step that finds a file present and then relies on it (a
    /// publish from its blob writes until its root or preview is committed, a follower from
    /// its checks until it installs, a backup while it copies), and exclusively by garbage
    /// collection while it decides and deletes. So collection never deletes a file that a
    /// version about to be committed names without having written it.
    pins: Arc<tokio::sync::RwLock<()>>,
}

/// A site's collectable object: a blob, a chunk or a manifest, and when it was last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub kind: ObjectKind,
    /// The blob's hash, or the chunk's or manifest's id.
    pub name: String,
    pub last_modified_ms: u64,
    pub size: u64,
}

/// What a [`StoredObject`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Blob,
    Manifest,
    Chunk,
}

impl ObjectKind {
    /// Where an object of this kind named `name` lives under `sites/<site>/`.
    fn relative(self, site: &str, name: &str) -> String {
        match self {
            ObjectKind::Blob => format!("sites/{site}/blobs/{name}"),
            ObjectKind::Manifest => format!("sites/{site}/manifests/{name}.json"),
            ObjectKind::Chunk => format!("sites/{site}/chunks/{name}.json"),
        }
    }
}

impl Publisher {
    /// Publishes into any object store.
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Publisher {
            store,
            prefix: None,
            local_dir: None,
            known: Mutex::default(),
            pins: Arc::default(),
        }
    }

    /// Publishes into `store` under `prefix` (a folder of a bucket; empty: the whole store),
    /// for callers that build the store themselves (an edge bounds its S3 client).
    pub fn with_prefix(store: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        let mut publisher = Self::new(store);
        publisher.prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
        publisher
    }

    /// Keeps garbage collection out until the guard drops (see `pins`).
    pub async fn pin(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.pins.clone().read_owned().await
    }

    /// Waits until nothing is pinned and keeps new pins out until the guard drops; for
    /// garbage collection only.
    pub async fn exclusive(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.pins.clone().write_owned().await
    }

    /// The sites that have anything stored (`sites/<site>/`), for edge readers: a site is
    /// listed once its first blob is written, whether or not its root mirror exists yet.
    /// Names that are not valid site names are skipped.
    pub async fn list_sites(&self) -> Result<Vec<String>, PublishError> {
        let prefix = self.path("sites");
        let listing = self.store.list_with_delimiter(Some(&prefix)).await?;
        let mut sites: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename())
            .filter(|name| validate_site(name).is_ok())
            .map(str::to_string)
            .collect();
        sites.sort();
        Ok(sites)
    }

    /// The blobs, chunks and manifests stored for `site`.
    pub async fn list_objects(&self, site: &str) -> Result<Vec<StoredObject>, PublishError> {
        check_site(site)?;
        let mut out = Vec::new();
        for (kind, dir) in [
            (ObjectKind::Blob, "blobs"),
            (ObjectKind::Manifest, "manifests"),
            (ObjectKind::Chunk, "chunks"),
        ] {
            let prefix = self.path(&format!("sites/{site}/{dir}"));
            let mut listing = self.store.list(Some(&prefix));
            while let Some(meta) = listing.try_next().await? {
                let Some(file) = meta.location.filename() else {
                    continue;
                };
                let name = match kind {
                    ObjectKind::Blob => file,
                    ObjectKind::Manifest | ObjectKind::Chunk => match file.strip_suffix(".json") {
                        Some(id) => id,
                        None => continue,
                    },
                };
                // Only names this publisher writes; anything else is not ours to delete.
                if !is_hash(name) {
                    continue;
                }
                out.push(StoredObject {
                    kind,
                    name: name.to_string(),
                    last_modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
                    size: meta.size,
                });
            }
        }
        Ok(out)
    }

    /// Deletes blobs, chunks and manifests of `site` (absent ones are fine); returns how many were
    /// asked for. For garbage collection, under [`Publisher::exclusive`].
    pub async fn delete_objects(
        &self,
        site: &str,
        objects: &[(ObjectKind, String)],
    ) -> Result<usize, PublishError> {
        check_site(site)?;
        let mut paths = Vec::with_capacity(objects.len());
        for (kind, name) in objects {
            check_hash("object name", name)?;
            paths.push(self.path(&kind.relative(site, name)));
        }
        {
            let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            for p in &paths {
                known.remove(p.as_ref());
            }
        }
        let n = paths.len();
        let mut results = self
            .store
            .delete_stream(futures::stream::iter(paths.into_iter().map(Ok)).boxed());
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }

    /// Publishes into a local folder, creating it. A new blob is created in place before any
    /// version names it; every other write goes to a temporary file renamed into place, so
    /// readers never see a partial file.
    pub fn local(dir: impl AsRef<std::path::Path>) -> Result<Self, PublishError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| PublishError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut publisher = Self::new(Arc::new(LocalFileSystem::new_with_prefix(dir)?));
        publisher.local_dir = Some(dir.to_path_buf());
        Ok(publisher)
    }

    /// Publishes into the store a URL names (`s3://bucket/prefix`, `file:///dir`,
    /// `memory:///`), with options such as `aws_endpoint`, `aws_access_key_id`, `aws_region`
    /// (see `object_store::aws::AmazonS3ConfigKey`). For R2 use its S3 endpoint.
    pub fn from_url<I, K, V>(url: &str, options: I) -> Result<Self, PublishError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let parsed = url::Url::parse(url).map_err(|e| PublishError::Url {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        if parsed.scheme() == "file" {
            let dir = parsed.to_file_path().map_err(|()| PublishError::Url {
                url: url.to_string(),
                reason: "not a local folder".into(),
            })?;
            return Self::local(dir);
        }
        let (store, prefix) = object_store::parse_url_opts(&parsed, options)?;
        let mut publisher = Self::new(Arc::from(store));
        publisher.prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
        Ok(publisher)
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Writes a projection's new blobs, then its new chunks, then its manifest. Returns the
    /// manifest id. The node then commits the root through Raft and calls
    /// [`Publisher::mirror_root`].
    pub async fn publish(&self, projection: &Projection) -> Result<String, PublishError> {
        let site = &projection.manifest.site;
        check_site(site)?;
        self.put_blobs(site, &projection.new_blobs).await?;
        self.put_chunks(site, &projection.new_chunks).await?;
        // The projector serialised the manifest once for its id; store those very bytes.
        let json = &projection.manifest_json;
        let id = content_hash(json);
        if id != projection.manifest_id {
            return Err(PublishError::Corrupt {
                path: format!("sites/{site}/manifests/{}.json", projection.manifest_id),
                reason: format!("manifest bytes hash to {id}"),
            });
        }
        let path = self.path(&format!("sites/{site}/manifests/{id}.json"));
        self.store
            .put(&path, PutPayload::from(json.clone()))
            .await?;
        Ok(id)
    }

    /// Writes blobs, [`BLOB_PUTS_CONCURRENT_MAX`] at a time, skipping ones known to exist.
    /// Each blob's hash is checked before it is written. Returns how many were written.
    pub async fn put_blobs(
        &self,
        site: &str,
        blobs: &[(String, Bytes)],
    ) -> Result<usize, PublishError> {
        check_site(site)?;
        let mut todo = Vec::new();
        for (hash, body) in blobs {
            check_hash("blob hash", hash)?;
            let path = self.path(&format!("sites/{site}/blobs/{hash}"));
            if !self.is_known(&path) {
                // Owned: a borrowed hash in the stream below makes the future not `Send`
                // (rustc cannot prove the closure general over the borrow's lifetime).
                todo.push((path, hash.clone(), body.clone()));
            }
        }
        let written = todo.len();
        if let Some(dir) = &self.local_dir {
            return self.put_local_blobs(dir, todo).await.map(|()| written);
        }
        futures::stream::iter(todo)
            .map(|(path, hash, body)| async move {
                check_content(&path, &hash, &body)?;
                self.store.put(&path, PutPayload::from(body)).await?;
                Ok::<_, PublishError>(path)
            })
            .buffer_unordered(BLOB_PUTS_CONCURRENT_MAX)
            .try_for_each(|path| {
                self.remember(&path);
                futures::future::ready(Ok(()))
            })
            .await?;
        Ok(written)
    }

    /// Writes blobs into the local folder `dir`, shared among [`LOCAL_BLOB_WRITERS`]
    /// blocking tasks (see [`write_file`]).
    async fn put_local_blobs(
        &self,
        dir: &std::path::Path,
        blobs: Vec<(Path, String, Bytes)>,
    ) -> Result<(), PublishError> {
        let mut shares: Vec<Vec<(Path, String, Bytes)>> =
            (0..LOCAL_BLOB_WRITERS).map(|_| Vec::new()).collect();
        for (i, blob) in blobs.into_iter().enumerate() {
            shares[i % LOCAL_BLOB_WRITERS].push(blob);
        }
        let tasks = shares
            .into_iter()
            .filter(|share| !share.is_empty())
            .map(|share| {
                let dir = dir.to_path_buf();
                tokio::task::spawn_blocking(move || -> Result<Vec<Path>, PublishError> {
                    let mut written = Vec::with_capacity(share.len());
                    for (path, hash, body) in share {
                        check_content(&path, &hash, &body)?;
                        write_file(&dir.join(path.as_ref()), &body)?;
                        written.push(path);
                    }
                    Ok(written)
                })
            });
        for written in futures::future::join_all(tasks).await {
            let written = written.map_err(|e| PublishError::Write {
                path: dir.to_path_buf(),
                source: std::io::Error::other(e),
            })??;
            for path in &written {
                self.remember(path);
            }
        }
        Ok(())
    }

    /// Writes tree chunks, [`BLOB_PUTS_CONCURRENT_MAX`] at a time, each checked against its
    /// id and size first. Returns how many were written.
    pub async fn put_chunks(
        &self,
        site: &str,
        chunks: &[(String, Bytes)],
    ) -> Result<usize, PublishError> {
        check_site(site)?;
        let mut todo = Vec::with_capacity(chunks.len());
        for (id, bytes) in chunks {
            check_hash("chunk id", id)?;
            todo.push((id.clone(), bytes.clone()));
        }
        futures::stream::iter(todo)
            .map(|(id, bytes)| async move { self.put_chunk_bytes(site, &id, bytes).await })
            .buffer_unordered(BLOB_PUTS_CONCURRENT_MAX)
            .try_for_each(|()| futures::future::ready(Ok(())))
            .await?;
        Ok(chunks.len())
    }

    /// Stores a chunk received as bytes (from a projection or a peer) under `id`, after
    /// checking its size and that the bytes hash to `id`.
    pub async fn put_chunk_bytes(
        &self,
        site: &str,
        id: &str,
        bytes: Bytes,
    ) -> Result<(), PublishError> {
        check_site(site)?;
        check_hash("chunk id", id)?;
        let path = self.path(&ObjectKind::Chunk.relative(site, id));
        check_bytes(&path, id, &bytes, CHUNK_BYTES_MAX)?;
        self.store.put(&path, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// A stored chunk's bytes, checked against its id and [`CHUNK_BYTES_MAX`].
    pub async fn get_chunk_bytes(&self, site: &str, id: &str) -> Result<Bytes, PublishError> {
        check_site(site)?;
        check_hash("chunk id", id)?;
        let path = self.path(&ObjectKind::Chunk.relative(site, id));
        let bytes = self.read_bounded(&path, CHUNK_BYTES_MAX).await?;
        check_bytes(&path, id, &bytes, CHUNK_BYTES_MAX)?;
        Ok(bytes)
    }

    /// Writes a manifest built in memory under its id, with every chunk of its tree first,
    /// and returns the id (a projection writes only its new chunks: [`Publisher::publish`]).
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<String, PublishError> {
        check_site(&manifest.site)?;
        if manifest.format != crate::manifest::MANIFEST_FORMAT_FLAT {
            self.put_chunks(&manifest.site, &manifest.files.all_chunks())
                .await?;
        }
        let json = manifest.to_json();
        let id = content_hash(&json);
        let path = self.path(&format!("sites/{}/manifests/{id}.json", manifest.site));
        self.store.put(&path, PutPayload::from(json)).await?;
        Ok(id)
    }

    /// Stores a manifest received as bytes (from a peer) under `id`, after checking that the
    /// bytes hash to `id` and parse as a manifest of `site`.
    pub async fn put_manifest_bytes(
        &self,
        site: &str,
        id: &str,
        bytes: Bytes,
    ) -> Result<(), PublishError> {
        check_site(site)?;
        check_hash("manifest id", id)?;
        let path = self.path(&format!("sites/{site}/manifests/{id}.json"));
        let corrupt = |reason: String| PublishError::Corrupt {
            path: path.to_string(),
            reason,
        };
        check_bytes(&path, id, &bytes, MANIFEST_BYTES_MAX)?;
        let stored = Manifest::decode(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let manifest_site = match &stored {
            StoredManifest::Flat(m) => &m.site,
            StoredManifest::Tree(head) => &head.site,
        };
        if manifest_site != site {
            return Err(corrupt(format!("manifest is for site {manifest_site:?}")));
        }
        self.store.put(&path, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// A stored manifest's bytes, checked against its id (what a peer is sent).
    pub async fn get_manifest_bytes(&self, site: &str, id: &str) -> Result<Bytes, PublishError> {
        check_site(site)?;
        check_hash("manifest id", id)?;
        let path = self.path(&format!("sites/{site}/manifests/{id}.json"));
        let bytes = self.read_bounded(&path, MANIFEST_BYTES_MAX).await?;
        check_bytes(&path, id, &bytes, MANIFEST_BYTES_MAX)?;
        Ok(bytes)
    }

    /// Removes every object of `site` (blobs, manifests, the root mirror); returns how many.
    /// Only for a site that is gone: its versions can never be served again.
    pub async fn remove_site(&self, site: &str) -> Result<usize, PublishError> {
        check_site(site)?;
        let prefix = self.path(&format!("sites/{site}"));
        let locations = self
            .store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        let removed = self
            .store
            .delete_stream(locations)
            .try_fold(0usize, |n, _| futures::future::ready(Ok(n + 1)))
            .await?;
        // Blobs of the site known to exist are gone now.
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(removed)
    }

    /// Whether the store holds the blob `hash` of `site`.
    pub async fn has_blob(&self, site: &str, hash: &str) -> Result<bool, PublishError> {
        check_site(site)?;
        check_hash("blob hash", hash)?;
        let path = self.path(&format!("sites/{site}/blobs/{hash}"));
        if self.is_known(&path) {
            return Ok(true);
        }
        match self.store.head(&path).await {
            Ok(_) => {
                self.remember(&path);
                Ok(true)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Mirrors a committed root to `sites/<site>/root`. Where the store supports it the write
    /// is conditional on the root read just before (If-Match on S3 and R2; create-if-absent
    /// on a local folder), so a concurrent writer is detected: then this returns
    /// [`PublishError::RootConflict`] and the caller mirrors the root the log holds again.
    /// Stores without conditional updates (a local folder) are overwritten.
    pub async fn mirror_root(&self, site: &str, root: &Root) -> Result<(), PublishError> {
        check_site(site)?;
        check_hash("manifest id", &root.manifest)?;
        let path = self.path(&format!("sites/{site}/root"));
        let payload = PutPayload::from(root.to_json());
        let mode = match self.store.head(&path).await {
            Ok(meta) if meta.e_tag.is_some() || meta.version.is_some() => {
                PutMode::Update(UpdateVersion {
                    e_tag: meta.e_tag,
                    version: meta.version,
                })
            }
            // Nothing to condition on.
            Ok(_) => PutMode::Overwrite,
            Err(object_store::Error::NotFound { .. }) => PutMode::Create,
            Err(e) => return Err(e.into()),
        };
        match self
            .store
            .put_opts(&path, payload.clone(), mode.into())
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotImplemented) => {
                // LocalFileSystem cannot update conditionally; its writes are atomic renames.
                self.store.put(&path, payload).await?;
                Ok(())
            }
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Err(PublishError::RootConflict {
                site: site.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the mirrored root of a deleted site, so edge readers stop serving it. Its
    /// blobs and manifests stay (they are content-addressed and may be shared with a site
    /// created later under the same name). Absent already is fine.
    pub async fn remove_root(&self, site: &str) -> Result<(), PublishError> {
        check_site(site)?;
        let path = self.path(&format!("sites/{site}/root"));
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The mirrored root of a site, if one was written.
    pub async fn get_root(&self, site: &str) -> Result<Option<Root>, PublishError> {
        check_site(site)?;
        let path = self.path(&format!("sites/{site}/root"));
        let bytes = match self.read_bounded(&path, ROOT_BYTES_MAX).await {
            Ok(bytes) => bytes,
            Err(PublishError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        Root::from_json(&bytes)
            .map(Some)
            .map_err(|e| PublishError::Corrupt {
                path: path.to_string(),
                reason: e.to_string(),
            })
    }

    /// A stored manifest and its whole file tree, every object checked against its id.
    /// Nodes of `base` (a version held already) with the same id at the same place are
    /// reused instead of read, so reading a version a few edits from `base` reads a few
    /// chunks.
    pub async fn get_manifest(
        &self,
        site: &str,
        id: &str,
        base: Option<&Manifest>,
    ) -> Result<Manifest, PublishError> {
        self.get_manifest_with(site, id, base, self).await
    }

    /// [`Publisher::get_manifest`] with the chunks read from `chunks` (a follower's source
    /// fetches the ones this store lacks from a peer). The manifest itself is read here.
    pub async fn get_manifest_with(
        &self,
        site: &str,
        id: &str,
        base: Option<&Manifest>,
        chunks: &dyn ChunkSource,
    ) -> Result<Manifest, PublishError> {
        let bytes = self.get_manifest_bytes(site, id).await?;
        let path = self.path(&format!("sites/{site}/manifests/{id}.json"));
        let corrupt = |reason: String| PublishError::Corrupt {
            path: path.to_string(),
            reason,
        };
        let head = match Manifest::decode(&bytes).map_err(|e| corrupt(e.to_string()))? {
            StoredManifest::Flat(manifest) => {
                if manifest.site != site {
                    return Err(corrupt(format!("manifest is for site {:?}", manifest.site)));
                }
                return Ok(manifest);
            }
            StoredManifest::Tree(head) => head,
        };
        if head.site != site {
            return Err(corrupt(format!("manifest is for site {:?}", head.site)));
        }
        let files = tree::load(chunks, site, head.tree.as_deref(), base.map(|b| &b.files)).await?;
        head.with_tree(files).map_err(|e| corrupt(e.to_string()))
    }

    /// A stored blob, checked against its hash.
    pub async fn get_blob(&self, site: &str, hash: &str) -> Result<Bytes, PublishError> {
        check_site(site)?;
        check_hash("blob hash", hash)?;
        let path = self.path(&format!("sites/{site}/blobs/{hash}"));
        let bytes = self.read_bounded(&path, BLOB_BYTES_MAX).await?;
        check_content(&path, hash, &bytes)?;
        self.remember(&path);
        Ok(bytes)
    }

    /// Reads an object of at most `max` bytes; a larger one is refused before it is read.
    async fn read_bounded(&self, path: &Path, max: usize) -> Result<Bytes, PublishError> {
        let result = match self.store.get(path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(PublishError::NotFound {
                    path: path.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        if result.meta.size as u64 > max as u64 {
            return Err(PublishError::Corrupt {
                path: path.to_string(),
                reason: format!("{} bytes, over {max}", result.meta.size),
            });
        }
        Ok(result.bytes().await?)
    }

    fn path(&self, relative: &str) -> Path {
        match &self.prefix {
            Some(prefix) => Path::from(format!("{prefix}/{relative}")),
            None => Path::from(relative),
        }
    }

    fn is_known(&self, path: &Path) -> bool {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(path.as_ref())
    }

    fn remember(&self, path: &Path) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= BLOBS_KNOWN_MAX {
            known.clear();
        }
        known.insert(path.to_string());
    }
}

impl ChunkSource for Publisher {
    fn chunk<'a>(
        &'a self,
        site: &'a str,
        id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Bytes, PublishError>> {
        Box::pin(self.get_chunk_bytes(site, id))
    }
}

/// Checks bytes read or about to be written against the hash that names them.
fn check_content(path: &Path, hash: &str, body: &[u8]) -> Result<(), PublishError> {
    let actual = content_hash(body);
    if actual != hash {
        return Err(PublishError::Corrupt {
            path: path.to_string(),
            reason: format!("bytes hash to {actual}"),
        });
    }
    Ok(())
}

/// Writes the blob `bytes` to `path`, creating the folder when missing.
///
/// A blob that is not there yet is created in place: no version names it until this write
/// and the rest of its publish are done, so no reader can come upon it half written. A
/// failed write leaves the partial file; the next write of that blob finds it and replaces
/// it, and garbage collection deletes it if nothing does. A blob that is there already
/// (written before a restart, left partial, or being written by a preview right now) is
/// replaced whole through [`replace_file`].
fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), PublishError> {
    use std::io::ErrorKind;
    let failed = |source: std::io::Error| PublishError::Write {
        path: path.to_path_buf(),
        source,
    };
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
    };
    let created = match create() {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let parent = path.parent().unwrap_or(path);
            std::fs::create_dir_all(parent).map_err(|source| PublishError::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
            create()
        }
        other => other,
    };
    match created {
        Ok(mut file) => std::io::Write::write_all(&mut file, bytes).map_err(failed),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => replace_file(path, bytes),
        Err(e) => Err(failed(e)),
    }
}

/// Replaces the file at `path` with `bytes` at once: writes a temporary file beside it
/// (`<name>#<n>`, the names `object_store`'s own local writes use and its listings skip)
/// and renames it into place, so a reader sees the old file or the new one, whole.
fn replace_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), PublishError> {
    let failed = |source: std::io::Error| PublishError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut n = 1u32;
    let (mut file, staging) = loop {
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!("#{n}"));
        let staging = std::path::PathBuf::from(staging);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(file) => break (file, staging),
            // Another writer of the same file is under way: take the next name.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1_000 => n += 1,
            Err(e) => return Err(failed(e)),
        }
    };
    let written = std::io::Write::write_all(&mut file, bytes);
    drop(file);
    if let Err(e) = written.and_then(|()| std::fs::rename(&staging, path)) {
        let _ = std::fs::remove_file(&staging);
        return Err(failed(e));
    }
    Ok(())
}

/// Checks bytes read or about to be written against their name and size bound.
fn check_bytes(path: &Path, id: &str, bytes: &[u8], max: usize) -> Result<(), PublishError> {
    if bytes.len() > max {
        return Err(PublishError::Corrupt {
            path: path.to_string(),
            reason: format!("{} bytes, over {max}", bytes.len()),
        });
    }
    check_content(path, id, bytes)
}

/// Refuses a blob hash, chunk id or manifest id that is not a [`content_hash`]: object
/// paths are built from them.
fn check_hash(what: &'static str, name: &str) -> Result<(), PublishError> {
    if is_hash(name) {
        return Ok(());
    }
    Err(PublishError::InvalidName {
        what,
        value: name.to_string(),
    })
}

fn check_site(site: &str) -> Result<(), PublishError> {
    validate_site(site).map_err(|_| PublishError::InvalidName {
        what: "site name",
        value: site.to_string(),
    })
}
