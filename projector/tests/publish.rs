//! Publishing to object storage and reading back: a local folder (as `sesame dev` uses) and
//! an in-memory store with conditional puts (as S3 and R2 have).

mod common;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use serde_json::json;
use sesame_projector::{content_hash, PublishError, Publisher, Root};

#[tokio::test]
async fn publish_to_a_local_folder_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let root_dir = dir.path().join("pages");
    let publisher = Publisher::local(&root_dir).unwrap();
    assert!(root_dir.is_dir(), "the folder is created");

    let mut h = Harness::demo();
    let p = h.full();
    let id = publisher.publish(&p).await.unwrap();
    assert_eq!(id, p.manifest_id);
    let site_dir = root_dir.join("sites/demo");
    for entry in p.manifest.files.values() {
        assert!(site_dir.join("blobs").join(&entry.hash).is_file());
    }
    assert!(site_dir.join(format!("manifests/{id}.json")).is_file());
    assert!(!p.new_chunks.is_empty());
    for chunk in p.manifest.files.chunk_ids() {
        assert!(site_dir.join(format!("chunks/{chunk}.json")).is_file());
    }

    // Not mirrored yet.
    assert_eq!(publisher.get_root("demo").await.unwrap(), None);
    let root = Root {
        manifest: id.clone(),
        index: p.manifest.index,
    };
    publisher.mirror_root("demo", &root).await.unwrap();
    assert_eq!(
        publisher.get_root("demo").await.unwrap(),
        Some(root.clone())
    );

    // Read the site back as an edge reader would: root → manifest → blob.
    let manifest = publisher.get_manifest("demo", &id, None).await.unwrap();
    assert_eq!(manifest, *p.manifest);
    let alice = publisher
        .get_blob("demo", &manifest.files["/alice"].hash)
        .await
        .unwrap();
    assert_eq!(std::str::from_utf8(&alice).unwrap(), h.page("/alice"));

    // The next version: only the new blobs are written, and the root moves on (overwriting,
    // since a local folder has no conditional update).
    h.put("profiles", "bob", json!({ "name": "Robert" }));
    let p2 = h.apply();
    assert_eq!(publisher.put_blobs("demo", &p2.new_blobs).await.unwrap(), 2);
    let id2 = publisher.put_manifest(&p2.manifest).await.unwrap();
    let root2 = Root {
        manifest: id2.clone(),
        index: p2.manifest.index,
    };
    publisher.mirror_root("demo", &root2).await.unwrap();
    assert_eq!(publisher.get_root("demo").await.unwrap(), Some(root2));
    let m2 = publisher
        .get_manifest("demo", &id2, Some(&manifest))
        .await
        .unwrap();
    assert_eq!(m2.previous.as_deref(), Some(id.as_str()));
    assert_eq!(m2.delta.changed, ["/", "/bob"]);
    // Earlier versions stay addressable (rollback re-points the root at one).
    assert_eq!(
        publisher.get_manifest("demo", &id, None).await.unwrap(),
        manifest
    );

    // Blobs already written are skipped.
    assert_eq!(publisher.put_blobs("demo", &p2.new_blobs).await.unwrap(), 0);
}

#[tokio::test]
async fn corrupt_or_missing_objects_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let publisher = Publisher::local(dir.path()).unwrap();
    let mut h = Harness::demo();
    let p = h.full();
    let id = publisher.publish(&p).await.unwrap();

    let hash = &p.manifest.files["/alice"].hash;
    std::fs::write(dir.path().join("sites/demo/blobs").join(hash), b"tampered").unwrap();
    let err = publisher.get_blob("demo", hash).await.unwrap_err();
    assert!(matches!(err, PublishError::Corrupt { .. }), "{err}");
    // A blob past the bound is refused by its size, before it is read (a hostile store
    // cannot make a reader hold gigabytes); a sparse file costs the test no disk.
    let huge = std::fs::File::create(dir.path().join("sites/demo/blobs").join(hash)).unwrap();
    huge.set_len(sesame_projector::BLOB_BYTES_MAX as u64 + 1)
        .unwrap();
    let err = publisher.get_blob("demo", hash).await.unwrap_err();
    assert!(err.to_string().contains("over"), "{err}");

    // A damaged chunk of the tree fails the whole version.
    let chunk = p.manifest.files.root_id().unwrap();
    let chunk_file = dir.path().join(format!("sites/demo/chunks/{chunk}.json"));
    let good = std::fs::read(&chunk_file).unwrap();
    std::fs::write(&chunk_file, b"{\"format\":2,\"leaf\":{}}").unwrap();
    let err = publisher.get_manifest("demo", &id, None).await.unwrap_err();
    assert!(matches!(err, PublishError::Corrupt { .. }), "{err}");
    std::fs::write(&chunk_file, &good).unwrap();
    assert_eq!(
        publisher.get_manifest("demo", &id, None).await.unwrap(),
        *p.manifest
    );

    let manifest_file = dir.path().join(format!("sites/demo/manifests/{id}.json"));
    let text = std::fs::read_to_string(&manifest_file).unwrap();
    std::fs::write(&manifest_file, text.replace("demo", "dem0")).unwrap();
    let err = publisher.get_manifest("demo", &id, None).await.unwrap_err();
    assert!(matches!(err, PublishError::Corrupt { .. }), "{err}");

    let missing = content_hash(b"never written");
    let err = publisher
        .get_manifest("demo", &missing, None)
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::NotFound { .. }), "{err}");
    let err = publisher.get_blob("Bad Site", &missing).await.unwrap_err();
    assert!(matches!(err, PublishError::InvalidName { .. }), "{err}");
    let err = publisher
        .get_blob("demo", "../../etc/passwd")
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::InvalidName { .. }), "{err}");

    // A blob whose bytes do not match its name is refused before it is written.
    let err = publisher
        .put_blobs(
            "demo",
            &[(missing.clone(), bytes::Bytes::from_static(b"other"))],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Corrupt { .. }), "{err}");
}

/// A version stored before tree manifests (format 1: every file in the manifest) is read
/// whole, and the next version, built on it, is a tree that names it as `previous`.
#[tokio::test]
async fn a_flat_manifest_is_read_and_built_on() {
    let dir = tempfile::tempdir().unwrap();
    let publisher = Publisher::local(dir.path()).unwrap();
    let mut h = Harness::demo();
    let p = h.full();
    publisher.put_blobs("demo", &p.new_blobs).await.unwrap();
    let mut flat = (*p.manifest).clone();
    flat.format = sesame_projector::MANIFEST_FORMAT_FLAT;
    let flat_id = publisher.put_manifest(&flat).await.unwrap();
    let text = std::fs::read_to_string(
        dir.path()
            .join(format!("sites/demo/manifests/{flat_id}.json")),
    )
    .unwrap();
    assert!(text.starts_with(r#"{"format":1,"site":"demo""#), "{text}");
    assert!(text.contains(r#""/alice":{"hash""#), "{text}");

    let read = publisher
        .get_manifest("demo", &flat_id, None)
        .await
        .unwrap();
    assert_eq!(read, flat);
    assert_eq!(read.id(), flat_id, "a flat manifest keeps its id");
    assert_eq!(read.files["/alice"], p.manifest.files["/alice"]);

    h.projector.adopt(read);
    h.put("profiles", "bob", json!({ "name": "Robert" }));
    let next = h.apply();
    assert_eq!(next.manifest.format, sesame_projector::MANIFEST_FORMAT);
    assert_eq!(next.manifest.previous.as_deref(), Some(flat_id.as_str()));
    assert_eq!(next.manifest.delta.changed, ["/", "/bob"]);
    let next_id = publisher.publish(&next).await.unwrap();
    let back = publisher
        .get_manifest("demo", &next_id, None)
        .await
        .unwrap();
    assert_eq!(back, *next.manifest);
}

#[tokio::test]
async fn publishing_through_a_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/through-url", dir.path().display());
    std::fs::create_dir_all(dir.path().join("through-url")).unwrap();
    let publisher = Publisher::from_url(&url, Vec::<(String, String)>::new()).unwrap();
    let mut h = Harness::demo();
    let p = h.full();
    let id = publisher.publish(&p).await.unwrap();
    assert!(dir
        .path()
        .join(format!("through-url/sites/demo/manifests/{id}.json"))
        .is_file());

    let err = Publisher::from_url("not a url", Vec::<(String, String)>::new()).unwrap_err();
    assert!(matches!(err, PublishError::Url { .. }), "{err}");
}

#[tokio::test]
async fn publishing_many_blobs_runs_concurrently() {
    // 2,000 distinct blobs through the bounded concurrent path.
    let publisher = Publisher::new(Arc::new(InMemory::new()));
    let blobs: Vec<_> = (0..2_000)
        .map(|i| {
            let body = bytes::Bytes::from(format!("page {i}"));
            (content_hash(&body), body)
        })
        .collect();
    assert_eq!(publisher.put_blobs("demo", &blobs).await.unwrap(), 2_000);
    let (hash, body) = &blobs[1234];
    assert_eq!(publisher.get_blob("demo", hash).await.unwrap(), *body);
}

/// An in-memory store where another writer replaces the root just before a conditional
/// update lands, as a deposed leader might.
#[derive(Debug, Default)]
struct RacingStore {
    inner: InMemory,
    race: AtomicBool,
}

impl fmt::Display for RacingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RacingStore")
    }
}

#[async_trait]
impl ObjectStore for RacingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if matches!(opts.mode, PutMode::Update(_)) && self.race.swap(false, Ordering::SeqCst) {
            self.inner
                .put(location, PutPayload::from_static(b"another writer"))
                .await?;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[tokio::test]
async fn the_root_mirror_is_a_conditional_put_where_the_store_has_one() {
    let store = Arc::new(RacingStore::default());
    let publisher = Publisher::new(store.clone());
    let first = Root {
        manifest: content_hash(b"m1"),
        index: 1,
    };
    let second = Root {
        manifest: content_hash(b"m2"),
        index: 2,
    };

    publisher.mirror_root("demo", &first).await.unwrap(); // create
    publisher.mirror_root("demo", &second).await.unwrap(); // update, If-Match
    assert_eq!(
        publisher.get_root("demo").await.unwrap(),
        Some(second.clone())
    );

    store.race.store(true, Ordering::SeqCst);
    let err = publisher.mirror_root("demo", &first).await.unwrap_err();
    assert!(matches!(err, PublishError::RootConflict { .. }), "{err}");
    // The other writer's root is left alone; mirroring again (as the caller should) wins.
    assert!(matches!(
        publisher.get_root("demo").await,
        Err(PublishError::Corrupt { .. })
    ));
    publisher.mirror_root("demo", &second).await.unwrap();
    assert_eq!(publisher.get_root("demo").await.unwrap(), Some(second));
}

/// A local folder takes a publish's blobs from a few blocking tasks: every blob lands whole
/// where the store reads it, a partial blob left by a failed write is replaced whole, a
/// leftover temporary file is stepped over, none is left behind, and a blob whose bytes do
/// not match its name fails the write.
#[tokio::test]
async fn local_blobs_land_whole_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let publisher = Publisher::local(dir.path()).unwrap();
    let blobs: Vec<_> = (0..500)
        .map(|i| {
            let body = bytes::Bytes::from(format!("page {i}").repeat(i % 7 + 1));
            (content_hash(&body), body)
        })
        .collect();
    // A writer that died between its write and its rename left this behind.
    let folder = dir.path().join("sites/demo/blobs");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join(format!("{}#1", blobs[7].0)), b"partial").unwrap();
    std::fs::write(folder.join(&blobs[7].0), b"part").unwrap();

    assert_eq!(publisher.put_blobs("demo", &blobs).await.unwrap(), 500);
    for (hash, body) in &blobs {
        assert_eq!(publisher.get_blob("demo", hash).await.unwrap(), *body);
    }
    let names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let staged: Vec<&String> = names.iter().filter(|n| n.contains('#')).collect();
    assert_eq!(
        staged,
        [&format!("{}#1", blobs[7].0)],
        "only the old leftover"
    );
    let listed = publisher.list_objects("demo").await.unwrap();
    assert_eq!(
        listed.len(),
        500,
        "the store's listing skips temporary files"
    );

    let body = bytes::Bytes::from_static(b"not what the name says");
    let wrong = [
        (content_hash(b"one"), bytes::Bytes::from_static(b"one")),
        (content_hash(b"two"), body),
    ];
    let err = publisher.put_blobs("demo", &wrong).await.unwrap_err();
    assert!(matches!(err, PublishError::Corrupt { .. }), "{err}");
    assert!(!folder.join(&wrong[1].0).exists());
}
