//! Snapshot files under `<dir>/snapshots/`: the current snapshot survives restarts.
//!
//! A snapshot is a whole copy of the tuple store (a SQLite file made by
//! `sesame_sync::Store::export`), named `snapshot-<unique>.db`. Which file is current, and its
//! openraft metadata, is recorded in `current.json`, written atomically (write, fsync, rename,
//! fsync the directory) after the snapshot file itself is fsynced. A file that `current.json`
//! does not name is a leftover (a build or a transfer cut short) and is removed at open.
//!
//! File names are always ours: a snapshot id comes from the leader, so it never becomes a path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::{LogId, SnapshotMeta};

/// The snapshot directory's name inside the node's data directory.
pub const SNAPSHOT_DIR_NAME: &str = "snapshots";
/// Names the current snapshot and holds its metadata.
const CURRENT_FILE_NAME: &str = "current.json";
const CURRENT_TMP_FILE_NAME: &str = "current.json.tmp";
/// Marks `current.json` as ours.
const CURRENT_MAGIC: &str = "sesame-snapshot";
/// Version of the `current.json` layout; bumped on any incompatible change.
const CURRENT_FORMAT_VERSION: u32 = 1;
/// `current.json` is a few hundred bytes; anything far larger is not ours.
const CURRENT_FILE_BYTES_MAX: u64 = 1 << 20;
const SNAPSHOT_FILE_PREFIX: &str = "snapshot-";
const SNAPSHOT_FILE_SUFFIX: &str = ".db";

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{path} is {bytes} bytes, more than the {CURRENT_FILE_BYTES_MAX} a snapshot record may be"
    )]
    RecordTooLarge { path: PathBuf, bytes: u64 },
    #[error("cannot decode {path}: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not a Sesame snapshot record (magic {found:?})")]
    Magic { path: PathBuf, found: String },
    #[error("{path} has snapshot record version {found}, this build reads version {CURRENT_FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} names snapshot file {file:?}, which is not a snapshot file name")]
    BadFileName { path: PathBuf, file: String },
}

fn io_error<'p>(
    action: &'static str,
    path: &'p Path,
) -> impl FnOnce(io::Error) -> SnapshotError + 'p {
    move |source| SnapshotError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The snapshot data openraft moves around: an open snapshot file.
///
/// Read it to send a snapshot; write into one from
/// [`begin_receiving_snapshot`](openraft::storage::RaftStateMachine::begin_receiving_snapshot)
/// to receive one. It reads, writes and seeks like the file it wraps, so openraft's chunked
/// transport can use it too.
#[derive(Debug)]
pub struct SnapshotFile {
    path: PathBuf,
    file: tokio::fs::File,
}

impl SnapshotFile {
    pub(crate) fn new(path: PathBuf, file: File) -> SnapshotFile {
        SnapshotFile {
            path,
            file: tokio::fs::File::from_std(file),
        }
    }

    /// Where the snapshot's bytes are.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

/// What `current.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CurrentRecord {
    magic: String,
    version: u32,
    /// The snapshot file's name inside the snapshot directory.
    file: String,
    meta: SnapshotMeta,
}

/// Makes a name no other snapshot file in this directory has had: the clock in nanoseconds,
/// plus a counter for two names made in the same nanosecond.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:x}-{count}")
}

fn is_snapshot_file_name(name: &str) -> bool {
    name.strip_prefix(SNAPSHOT_FILE_PREFIX)
        .and_then(|rest| rest.strip_suffix(SNAPSHOT_FILE_SUFFIX))
        .is_some_and(|middle| {
            !middle.is_empty() && middle.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        })
}

/// A fresh, unused path for a snapshot file in `dir`.
pub(crate) fn new_file_path(dir: &Path) -> PathBuf {
    dir.join(format!(
        "{SNAPSHOT_FILE_PREFIX}{}{SNAPSHOT_FILE_SUFFIX}",
        unique_suffix()
    ))
}

/// A snapshot id: the last log id it includes, then something unique, since two snapshots of
/// the same log id may differ in bytes.
pub(crate) fn new_snapshot_id(last_log_id: Option<&LogId>) -> String {
    match last_log_id {
        Some(id) => format!(
            "{}-{}-{}-{}",
            id.leader_id.term,
            id.leader_id.node_id,
            id.index,
            unique_suffix()
        ),
        None => format!("empty-{}", unique_suffix()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}

/// The snapshot directory and which snapshot in it is current.
#[derive(Debug)]
pub(crate) struct SnapshotDir {
    dir: PathBuf,
    current: Option<CurrentRecord>,
}

impl SnapshotDir {
    /// Opens (creating if absent) `dir`, reads which snapshot is current, and removes any other
    /// snapshot file. Call it before anything else uses the directory.
    pub(crate) fn open(dir: &Path) -> Result<SnapshotDir, SnapshotError> {
        fs::create_dir_all(dir).map_err(io_error("create", dir))?;
        let current = read_current(dir)?;
        let keep = current.as_ref().map(|c| c.file.as_str());
        for item in fs::read_dir(dir).map_err(io_error("list", dir))? {
            let item = item.map_err(io_error("list", dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            let stray_snapshot = is_snapshot_file_name(name) && Some(name) != keep;
            if stray_snapshot || name == CURRENT_TMP_FILE_NAME {
                let path = item.path();
                fs::remove_file(&path).map_err(io_error("remove leftover", &path))?;
            }
        }
        Ok(SnapshotDir {
            dir: dir.to_path_buf(),
            current,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    /// The current snapshot's metadata and file.
    pub(crate) fn current(&self) -> Option<(&SnapshotMeta, PathBuf)> {
        self.current
            .as_ref()
            .map(|c| (&c.meta, self.dir.join(&c.file)))
    }

    /// Opens the current snapshot for reading. The caller holds `self`, so no switch can remove
    /// the file between finding and opening it; once open, a later switch cannot take it away.
    pub(crate) fn open_current(
        &self,
    ) -> Result<Option<(SnapshotMeta, SnapshotFile)>, SnapshotError> {
        let Some((meta, path)) = self.current() else {
            return Ok(None);
        };
        let file = File::open(&path).map_err(io_error("open snapshot", &path))?;
        Ok(Some((meta.clone(), SnapshotFile::new(path, file))))
    }

    /// Creates an empty snapshot file to receive a snapshot into.
    pub(crate) fn create_incoming(&self) -> Result<SnapshotFile, SnapshotError> {
        let path = new_file_path(&self.dir);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error("create snapshot", &path))?;
        Ok(SnapshotFile::new(path, file))
    }

    /// Makes the snapshot at `src` with `meta` the current one, unless the current one is newer
    /// (a build that raced an install). Returns whether it switched.
    ///
    /// A file outside the directory (another node's, in tests) is copied in; one inside is
    /// used in place. Either way it is fsynced before `current.json` names it, and the previous
    /// current file is removed only after.
    pub(crate) fn set_current(
        &mut self,
        meta: &SnapshotMeta,
        src: &Path,
    ) -> Result<bool, SnapshotError> {
        if let Some(current) = &self.current {
            if current.meta.last_log_id > meta.last_log_id {
                return Ok(false);
            }
        }
        let in_dir = src.parent() == Some(self.dir.as_path())
            && src
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_snapshot_file_name);
        let path = if in_dir {
            src.to_path_buf()
        } else {
            let dest = new_file_path(&self.dir);
            fs::copy(src, &dest).map_err(io_error("copy snapshot into", &dest))?;
            dest
        };
        crate::private::make_file_private(&path)
            .map_err(io_error("restrict the mode of", &path))?;
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_error("fsync snapshot", &path))?;

        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("snapshot paths are made by new_file_path and end in a UTF-8 name")
            .to_string();
        let record = CurrentRecord {
            magic: CURRENT_MAGIC.to_string(),
            version: CURRENT_FORMAT_VERSION,
            file,
            meta: meta.clone(),
        };
        self.write_current(&record)?;

        let previous = self.current.replace(record);
        if let Some(previous) = previous {
            if self.current.as_ref().map(|c| &c.file) != Some(&previous.file) {
                let old = self.dir.join(&previous.file);
                fs::remove_file(&old).map_err(io_error("remove old snapshot", &old))?;
            }
        }
        Ok(true)
    }

    /// Removes a snapshot file that never became current.
    pub(crate) fn discard(&self, path: &Path) -> Result<(), SnapshotError> {
        let is_current = self.current().is_some_and(|(_, current)| current == path);
        assert!(
            !is_current,
            "discarding the current snapshot {}",
            path.display()
        );
        fs::remove_file(path).map_err(io_error("remove snapshot", path))
    }

    fn write_current(&self, record: &CurrentRecord) -> Result<(), SnapshotError> {
        let bytes =
            serde_json::to_vec_pretty(record).expect("a snapshot record always encodes as JSON");
        let tmp = self.dir.join(CURRENT_TMP_FILE_NAME);
        let mut file = File::create(&tmp).map_err(io_error("create", &tmp))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_error("write", &tmp))?;
        drop(file);
        let dest = self.dir.join(CURRENT_FILE_NAME);
        fs::rename(&tmp, &dest).map_err(io_error("rename into place", &dest))?;
        sync_dir(&self.dir)
    }
}

/// Reads and checks `current.json`, if there is one.
fn read_current(dir: &Path) -> Result<Option<CurrentRecord>, SnapshotError> {
    let path = dir.join(CURRENT_FILE_NAME);
    let bytes = match fs::metadata(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("stat", &path)(e)),
        Ok(m) if m.len() > CURRENT_FILE_BYTES_MAX => {
            return Err(SnapshotError::RecordTooLarge {
                path,
                bytes: m.len(),
            });
        }
        Ok(_) => fs::read(&path).map_err(io_error("read", &path))?,
    };
    let record: CurrentRecord =
        serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Decode {
            path: path.clone(),
            source,
        })?;
    if record.magic != CURRENT_MAGIC {
        return Err(SnapshotError::Magic {
            path,
            found: record.magic,
        });
    }
    if record.version != CURRENT_FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: record.version,
        });
    }
    if !is_snapshot_file_name(&record.file) {
        return Err(SnapshotError::BadFileName {
            path,
            file: record.file,
        });
    }
    Ok(Some(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_names_are_snapshot_file_names() {
        let made = new_file_path(Path::new("/x"));
        let name = made
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name");
        assert!(is_snapshot_file_name(name));
        assert!(!is_snapshot_file_name("snapshot-.db"));
        assert!(!is_snapshot_file_name("snapshot-../../etc/passwd.db"));
        assert!(!is_snapshot_file_name("current.json"));
    }

    #[test]
    fn new_names_differ() {
        assert_ne!(
            new_file_path(Path::new("/x")),
            new_file_path(Path::new("/x"))
        );
        assert_ne!(new_snapshot_id(None), new_snapshot_id(None));
    }
}
