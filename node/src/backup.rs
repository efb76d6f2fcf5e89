//! Online backups and restore.
//!
//! `GET /v1/backup` (admin) streams a backup of the node while writes go on: a consistent
//! copy of the tuple store (tuples, sites, token hashes, roots, version history, previews,
//! and openraft's applied id and membership, all at one index) followed by every manifest,
//! tree chunk and blob a root, a retained version or a preview in that copy names (each
//! chunk and blob once, however many versions share it). Garbage collection
//! is held off while it streams ([`Publisher::pin`]), so every file the copy names is there.
//! `sesame backup --node URL FILE` writes it to a file, checking it as it arrives;
//! `sesame restore FILE --data DIR` makes a new single node from one.
//!
//! The format, in order (integers little-endian):
//!
//! ```text
//! magic  "SESAMEBK"                   8 bytes
//! format version                      u32 (FORMAT_VERSION)
//! records: kind u8, name length u16, name (UTF-8), data length u64, data
//!   kind 1  info      name "info.json": JSON (node, applied index, time, build)
//!   kind 2  store     name "state.db": the SQLite copy of the tuple store
//!   kind 3  object    name "sites/<site>/blobs/<hash>", "sites/<site>/chunks/<id>.json"
//!                     or "sites/<site>/manifests/<id>.json"; its bytes hash (blake3) to
//!                     <hash> / <id>
//! end:   kind 255, name length 0, data length 32, data: blake3 of every byte before it
//! ```
//!
//! A reader checks the magic, the version, every name, every length against its limit,
//! every object against its hash, and the final checksum, and rejects trailing bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sesame_projector::{content_hash, is_hash, Publisher};
use sesame_proto::validate_site;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

pub const MAGIC: &[u8; 8] = b"SESAMEBK";
/// Version 2 added tree chunks (`sites/<site>/chunks/<id>.json`) to the objects; a version-1
/// backup (manifests and blobs only) is still read.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest backup format this build reads.
pub const FORMAT_VERSION_MIN: u32 = 1;
const KIND_INFO: u8 = 1;
const KIND_STORE: u8 = 2;
const KIND_OBJECT: u8 = 3;
const KIND_END: u8 = 255;
/// Longest record name (object keys are far shorter).
const NAME_BYTES_MAX: usize = 1024;
/// Largest info record.
const INFO_BYTES_MAX: u64 = 1 << 20;
/// Largest object (a blob or a manifest): well above any file a site publishes.
const OBJECT_BYTES_MAX: u64 = 1 << 30;
/// Largest store copy.
const STORE_BYTES_MAX: u64 = 1 << 40;
/// Chunks of the stream in flight between the reader of the store and the HTTP body.
const STREAM_CHUNKS_MAX: usize = 8;
const CHUNK_BYTES: usize = 1 << 20;

/// What a backup says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupInfo {
    /// The node it was taken from.
    pub node_id: u64,
    /// The store's applied log index in the copy.
    pub applied_index: u64,
    pub created_at_ms: u64,
    /// The Sesame build that wrote it.
    pub sesame_version: String,
}

/// Running blake3 over everything written, and the writing.
struct Out {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    hasher: blake3::Hasher,
}

impl Out {
    async fn send(&mut self, bytes: Bytes) -> anyhow::Result<()> {
        self.hasher.update(&bytes);
        self.tx
            .send(Ok(bytes))
            .await
            .map_err(|_| anyhow::anyhow!("the backup's reader went away"))
    }

    async fn record_head(&mut self, kind: u8, name: &str, len: u64) -> anyhow::Result<()> {
        let mut head = Vec::with_capacity(11 + name.len());
        head.push(kind);
        head.extend_from_slice(&(name.len() as u16).to_le_bytes());
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(&len.to_le_bytes());
        self.send(Bytes::from(head)).await
    }

    async fn record(&mut self, kind: u8, name: &str, data: Bytes) -> anyhow::Result<()> {
        self.record_head(kind, name, data.len() as u64).await?;
        self.send(data).await
    }
}

/// Starts writing a backup of the node into the returned stream. The store is copied
/// before this returns (so a failure to copy it is an HTTP error, not a cut stream).
pub async fn stream(
    data_dir: &Path,
    node_id: u64,
    publisher: Arc<Publisher>,
) -> anyhow::Result<mpsc::Receiver<Result<Bytes, std::io::Error>>> {
    let pin = publisher.pin().await;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random bytes: {e}"))?;
    let copy = TempFile(data_dir.join(format!("backup-{}.db.tmp", u64::from_le_bytes(nonce))));
    let src = data_dir.join(crate::raft::state_machine::STATE_FILE_NAME);
    let (dest, manifests, applied) = {
        let dest = copy.0.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            sesame_sync::Store::copy_file(&src, &dest).context("copy the tuple store")?;
            let manifests = sesame_sync::Store::published_manifests(&dest)?;
            let applied = sesame_sync::Store::open(&dest)?.applied_index()?;
            Ok((dest, manifests, applied))
        })
        .await??
    };
    crate::private::make_file_private(&dest)?;
    let (tx, rx) = mpsc::channel(STREAM_CHUNKS_MAX);
    let info = BackupInfo {
        node_id,
        applied_index: applied,
        created_at_ms: crate::app::now_ms(),
        sesame_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    tokio::spawn(async move {
        let mut out = Out {
            tx: tx.clone(),
            hasher: blake3::Hasher::new(),
        };
        let result = write_all(&mut out, &info, &copy.0, &manifests, &publisher).await;
        drop(pin);
        drop(copy);
        if let Err(e) = result {
            tracing::error!("backup: {e:#}");
            // The body ends in an error: the client never mistakes it for a whole backup.
            let _ = tx
                .send(Err(std::io::Error::other(format!("backup failed: {e:#}"))))
                .await;
        }
    });
    Ok(rx)
}

async fn write_all(
    out: &mut Out,
    info: &BackupInfo,
    store: &Path,
    manifests: &[(String, String)],
    publisher: &Publisher,
) -> anyhow::Result<()> {
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.send(Bytes::from(head)).await?;
    out.record(
        KIND_INFO,
        "info.json",
        Bytes::from(serde_json::to_vec(info)?),
    )
    .await?;
    let mut file = tokio::fs::File::open(store).await?;
    let len = file.metadata().await?.len();
    out.record_head(KIND_STORE, "state.db", len).await?;
    let mut left = len;
    while left > 0 {
        let mut buf = vec![0u8; CHUNK_BYTES.min(left as usize)];
        file.read_exact(&mut buf).await?;
        left -= buf.len() as u64;
        out.send(Bytes::from(buf)).await?;
    }
    let mut chunks_sent = std::collections::HashSet::new();
    let mut blobs_sent = std::collections::HashSet::new();
    // The last manifest read of each site: the next one of that site is read on top of it,
    // so chunks the versions share are read once.
    let mut last: Option<sesame_projector::Manifest> = None;
    for (site, id) in manifests {
        let bytes = publisher
            .get_manifest_bytes(site, id)
            .await
            .with_context(|| format!("read manifest {id} of site {site}"))?;
        let base = last.as_ref().filter(|m| m.site == *site);
        let manifest = publisher
            .get_manifest(site, id, base)
            .await
            .with_context(|| format!("read manifest {id} of site {site} and its tree"))?;
        out.record(
            KIND_OBJECT,
            &format!("sites/{site}/manifests/{id}.json"),
            bytes,
        )
        .await?;
        // A format-1 manifest holds its files itself: its tree is built in memory only.
        let stored_tree = manifest.format != sesame_projector::MANIFEST_FORMAT_FLAT;
        let (mut chunks, mut blobs) = (Vec::new(), Vec::new());
        manifest.files.walk(
            &mut |chunk| {
                if !stored_tree {
                    return true;
                }
                let new = chunks_sent.insert((site.clone(), chunk.to_string()));
                if new {
                    chunks.push(chunk.to_string());
                }
                new
            },
            &mut |_, f| blobs.push(f.hash.clone()),
        );
        for chunk in chunks {
            let body = publisher
                .get_chunk_bytes(site, &chunk)
                .await
                .with_context(|| format!("read chunk {chunk} of site {site}"))?;
            out.record(
                KIND_OBJECT,
                &format!("sites/{site}/chunks/{chunk}.json"),
                body,
            )
            .await?;
        }
        for hash in blobs {
            if !blobs_sent.insert((site.clone(), hash.clone())) {
                continue;
            }
            let body = publisher
                .get_blob(site, &hash)
                .await
                .with_context(|| format!("read blob {hash} of site {site}"))?;
            out.record(KIND_OBJECT, &format!("sites/{site}/blobs/{hash}"), body)
                .await?;
        }
        last = Some(manifest);
    }
    let sum = out.hasher.finalize();
    out.record_head(KIND_END, "", 32).await?;
    out.tx
        .send(Ok(Bytes::copy_from_slice(sum.as_bytes())))
        .await
        .map_err(|_| anyhow::anyhow!("the backup's reader went away"))?;
    Ok(())
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One record of a backup, as [`Reader`] hands it out.
pub enum Record {
    Info(BackupInfo),
    /// The store copy: `len` bytes follow, read them with [`Reader::copy_data`].
    Store {
        len: u64,
    },
    /// An object, checked against its hash.
    Object {
        key: String,
        bytes: Bytes,
    },
}

/// Reads and checks a backup as it streams.
pub struct Reader<R> {
    src: R,
    hasher: blake3::Hasher,
    /// Bytes read.
    pub offset: u64,
    pending_data: u64,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Checks the magic and the version.
    pub async fn open(mut src: R) -> anyhow::Result<Reader<R>> {
        let mut head = [0u8; 12];
        src.read_exact(&mut head)
            .await
            .context("read the backup header")?;
        anyhow::ensure!(
            &head[..8] == MAGIC,
            "not a Sesame backup (magic {:?})",
            String::from_utf8_lossy(&head[..8])
        );
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        anyhow::ensure!(
            (FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version),
            "backup format version {version}; this build reads versions {FORMAT_VERSION_MIN} to {FORMAT_VERSION}"
        );
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        Ok(Reader {
            src,
            hasher,
            offset: 12,
            pending_data: 0,
        })
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        self.src.read_exact(buf).await.with_context(|| {
            format!(
                "the backup ends early (at byte {}): it is cut short",
                self.offset
            )
        })?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    async fn read_hashed(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        self.read_exact(buf).await?;
        self.hasher.update(buf);
        Ok(())
    }

    /// The next record; `None` after the end record, whose checksum it has verified.
    pub async fn next(&mut self) -> anyhow::Result<Option<Record>> {
        anyhow::ensure!(
            self.pending_data == 0,
            "the previous record's data was not read"
        );
        let at = self.offset;
        let mut head = [0u8; 3];
        self.read_exact(&mut head).await?;
        let kind = head[0];
        let name_len = u16::from_le_bytes([head[1], head[2]]) as usize;
        anyhow::ensure!(
            name_len <= NAME_BYTES_MAX,
            "record at byte {at}: name of {name_len} bytes"
        );
        let mut name = vec![0u8; name_len];
        self.read_exact(&mut name).await?;
        let mut len = [0u8; 8];
        self.read_exact(&mut len).await?;
        let len = u64::from_le_bytes(len);
        if kind == KIND_END {
            // The checksum covers everything before the end record.
            let sum = self.hasher.finalize();
            let mut found = [0u8; 32];
            anyhow::ensure!(
                len == 32,
                "end record at byte {at} holds {len} bytes, not 32"
            );
            self.read_exact(&mut found).await?;
            anyhow::ensure!(
                &found == sum.as_bytes(),
                "the backup's checksum does not match its content: it is corrupt"
            );
            let mut extra = [0u8; 1];
            let n = self.src.read(&mut extra).await?;
            anyhow::ensure!(n == 0, "bytes after the end of the backup");
            return Ok(None);
        }
        self.hasher.update(&head);
        self.hasher.update(&name);
        self.hasher.update(&len.to_le_bytes());
        let name = String::from_utf8(name)
            .with_context(|| format!("record at byte {at}: name is not UTF-8"))?;
        match kind {
            KIND_INFO => {
                anyhow::ensure!(len <= INFO_BYTES_MAX, "info record of {len} bytes");
                let mut data = vec![0u8; len as usize];
                self.read_hashed(&mut data).await?;
                Ok(Some(Record::Info(
                    serde_json::from_slice(&data).context("decode the backup's info")?,
                )))
            }
            KIND_STORE => {
                anyhow::ensure!(len <= STORE_BYTES_MAX, "store record of {len} bytes");
                self.pending_data = len;
                Ok(Some(Record::Store { len }))
            }
            KIND_OBJECT => {
                anyhow::ensure!(
                    len <= OBJECT_BYTES_MAX,
                    "object {name:?} of {len} bytes, more than {OBJECT_BYTES_MAX}"
                );
                let expected = object_hash(&name)
                    .with_context(|| format!("record at byte {at}: bad object name {name:?}"))?;
                let mut data = vec![0u8; len as usize];
                self.read_hashed(&mut data).await?;
                let actual = content_hash(&data);
                anyhow::ensure!(
                    actual == expected,
                    "object {name} is corrupt: its bytes hash to {actual}"
                );
                Ok(Some(Record::Object {
                    key: name,
                    bytes: Bytes::from(data),
                }))
            }
            other => anyhow::bail!("record at byte {at} has unknown kind {other}"),
        }
    }

    /// Copies the data of the store record into `dest`.
    pub async fn copy_data(
        &mut self,
        dest: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut left = self.pending_data;
        self.pending_data = 0;
        let mut buf = vec![0u8; CHUNK_BYTES];
        while left > 0 {
            let n = CHUNK_BYTES.min(left as usize);
            self.read_hashed(&mut buf[..n]).await?;
            dest.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        Ok(())
    }
}

/// The hash an object key must have: `sites/<site>/blobs/<hash>`,
/// `sites/<site>/chunks/<hash>.json` or `sites/<site>/manifests/<hash>.json`.
fn object_hash(key: &str) -> anyhow::Result<String> {
    let mut parts = key.split('/');
    let (Some("sites"), Some(site), Some(dir), Some(file), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        anyhow::bail!("not sites/<site>/<kind>/<name>");
    };
    validate_site(site).map_err(|e| anyhow::anyhow!("site: {e}"))?;
    let hash = match dir {
        "blobs" => file,
        "manifests" | "chunks" => file
            .strip_suffix(".json")
            .context("a manifest or chunk name ends in .json")?,
        _ => anyhow::bail!("unknown object kind {dir:?}"),
    };
    anyhow::ensure!(is_hash(hash), "{hash:?} is not a content hash");
    Ok(hash.to_string())
}

/// What a restore made.
#[derive(Debug)]
pub struct Restored {
    pub info: BackupInfo,
    pub objects: usize,
    pub store_bytes: u64,
}

/// Makes a new single node in `data_dir` (absent or empty) from the backup `src`: the
/// store as it was at the backup's index, its published files in `<data>/objects`, and a
/// Raft state of one voter, `node_id`, that continues the log after that index. Nothing is
/// left in `data_dir` if the backup turns out bad.
pub async fn restore(
    src: impl AsyncRead + Unpin,
    data_dir: &Path,
    node_id: u64,
) -> anyhow::Result<Restored> {
    if data_dir.exists() {
        let mut entries =
            std::fs::read_dir(data_dir).with_context(|| format!("read {}", data_dir.display()))?;
        anyhow::ensure!(
            entries.next().is_none(),
            "{} is not empty: restore makes a new node in an empty folder",
            data_dir.display()
        );
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let result = restore_into(src, data_dir, node_id).await;
    if result.is_err() {
        // Leave nothing half-restored behind.
        if let Ok(entries) = std::fs::read_dir(data_dir) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
    result
}

async fn restore_into(
    src: impl AsyncRead + Unpin,
    data_dir: &Path,
    node_id: u64,
) -> anyhow::Result<Restored> {
    let mut reader = Reader::open(src).await?;
    let mut info = None;
    let mut store_bytes = None;
    let mut objects = 0usize;
    let objects_dir = data_dir.join(crate::app::OBJECTS_DIR);
    let store_path = data_dir.join(crate::raft::state_machine::STATE_FILE_NAME);
    while let Some(record) = reader.next().await? {
        match record {
            Record::Info(i) => info = Some(i),
            Record::Store { len } => {
                anyhow::ensure!(store_bytes.is_none(), "two store records");
                let mut file = tokio::fs::File::create(&store_path).await?;
                reader.copy_data(&mut file).await?;
                file.sync_all().await?;
                store_bytes = Some(len);
            }
            Record::Object { key, bytes } => {
                let path = objects_dir.join(&key);
                let dir = path.parent().expect("object keys have folders");
                tokio::fs::create_dir_all(dir).await?;
                tokio::fs::write(&path, &bytes).await?;
                objects += 1;
            }
        }
    }
    let info = info.context("the backup has no info record")?;
    let store_bytes = store_bytes.context("the backup has no store record")?;
    let dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::raft::state_machine::reseat_single_voter(&dir, node_id)
    })
    .await??;
    let last = {
        let dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || crate::raft::state_machine::last_applied(&dir))
            .await??
    };
    crate::raft::log_store::start_after(data_dir, node_id, last).await?;
    crate::private::make_private(data_dir)?;
    Ok(Restored {
        info,
        objects,
        store_bytes,
    })
}

/// What a backup file holds, as [`verify`] found it.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub info: BackupInfo,
    pub objects: usize,
    pub store_bytes: u64,
    pub bytes: u64,
}

/// Reads a backup file whole and checks everything in it (see the module doc).
pub async fn verify(path: &Path) -> anyhow::Result<Summary> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("open {}", path.display()))?;
    let mut reader = Reader::open(tokio::io::BufReader::with_capacity(CHUNK_BYTES, file)).await?;
    let (mut info, mut objects, mut store_bytes) = (None, 0, None);
    while let Some(record) = reader.next().await? {
        match record {
            Record::Info(i) => info = Some(i),
            Record::Store { len } => {
                reader.copy_data(&mut tokio::io::sink()).await?;
                store_bytes = Some(len);
            }
            Record::Object { .. } => objects += 1,
        }
    }
    Ok(Summary {
        info: info.context("the backup has no info record")?,
        objects,
        store_bytes: store_bytes.context("the backup has no store record")?,
        bytes: reader.offset,
    })
}

/// `sesame backup`: streams a node's backup into `file` (through `file.part`, checked whole
/// before it is renamed into place).
pub async fn download(node_url: &str, token: Option<&str>, file: &Path) -> anyhow::Result<Summary> {
    use tokio::io::AsyncWriteExt;
    let url = format!("{}/v1/backup", node_url.trim_end_matches('/'));
    let mut request = reqwest::Client::new().get(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let mut response = request.send().await.with_context(|| format!("GET {url}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!("GET {url}: {status}: {}", body.trim());
    }
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut out = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("create {}", part.display()))?;
    let written = async {
        while let Some(chunk) = response.chunk().await.context("read the backup stream")? {
            out.write_all(&chunk).await?;
        }
        out.sync_all().await?;
        anyhow::Ok(())
    }
    .await;
    let checked = match written {
        Ok(()) => verify(&part).await,
        Err(e) => Err(e),
    };
    match checked {
        Ok(summary) => {
            tokio::fs::rename(&part, file)
                .await
                .with_context(|| format!("rename into {}", file.display()))?;
            Ok(summary)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            Err(e.context("the backup is incomplete or corrupt; nothing was written"))
        }
    }
}
