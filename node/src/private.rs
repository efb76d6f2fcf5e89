//! The data directory is private to the user that runs the node: it holds the admin token,
//! token hashes and every site's data. At start-up the node makes it so (mode 0700 on the
//! directory and its folders, 0600 on the files in it and in `snapshots/`) and says which
//! modes it had to fix; the snapshot files it writes later get 0600 as they are made.
//!
//! The contents of `objects/` (published pages, public anyway) are not walked: there can be
//! millions, and the folder's own mode keeps others out.

use std::io;
use std::path::{Path, PathBuf};

/// Mode of the data directory and the folders in it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files in the data directory and in `snapshots/`.
pub const FILE_MODE: u32 = 0o600;

/// Folders whose files are walked too (beside the data directory itself).
const WALKED_DIRS: [&str; 1] = [crate::raft::snapshot::SNAPSHOT_DIR_NAME];

/// Creates `dir` if absent and makes it and what it holds private. Returns the paths whose
/// modes were changed. Symbolic links are left alone.
pub fn make_private(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut fixed = Vec::new();
    set_mode(dir, DIR_MODE, &mut fixed)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = match entry.file_type() {
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if kind.is_dir() {
            set_mode(&path, DIR_MODE, &mut fixed)?;
            let walked = entry
                .file_name()
                .to_str()
                .is_some_and(|n| WALKED_DIRS.contains(&n));
            if walked {
                for inner in std::fs::read_dir(&path)? {
                    let inner = inner?;
                    if inner.file_type()?.is_file() {
                        set_mode(&inner.path(), FILE_MODE, &mut fixed)?;
                    }
                }
            }
        } else if kind.is_file() {
            set_mode(&path, FILE_MODE, &mut fixed)?;
        }
    }
    Ok(fixed)
}

/// Gives one file the [`FILE_MODE`].
pub fn make_file_private(path: &Path) -> io::Result<()> {
    set_mode(path, FILE_MODE, &mut Vec::new())
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32, fixed: &mut Vec<PathBuf>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    // A file removed while the folder is walked (SQLite's -wal and -shm files of a store a
    // previous run is still closing) has nothing left to protect.
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let current = match std::fs::symlink_metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    if current != mode {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            Ok(()) => fixed.push(path.to_path_buf()),
            Err(e) if gone(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32, _fixed: &mut Vec<PathBuf>) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn modes_are_fixed_and_reported_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("state.db"), b"x").unwrap();
        std::fs::set_permissions(dir.join("state.db"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        std::fs::create_dir(dir.join("snapshots")).unwrap();
        std::fs::write(dir.join("snapshots/snap-1"), b"x").unwrap();
        std::fs::set_permissions(
            dir.join("snapshots/snap-1"),
            std::fs::Permissions::from_mode(0o664),
        )
        .unwrap();
        std::fs::create_dir(dir.join("objects")).unwrap();

        let fixed = make_private(&dir).unwrap();
        assert_eq!(fixed.len(), 5, "{fixed:?}");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("state.db")), 0o600);
        assert_eq!(mode(&dir.join("snapshots")), 0o700);
        assert_eq!(mode(&dir.join("snapshots/snap-1")), 0o600);
        assert_eq!(mode(&dir.join("objects")), 0o700);
        assert!(make_private(&dir).unwrap().is_empty());
    }
}
