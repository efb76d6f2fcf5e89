//! Where the bench's data lives: one folder for every section (Sesame's node folders and the
//! peers' files: Hugo's source and output, nginx's root, etcd's data), on the disk under
//! `--dir` or, with `--tmpfs`, on a tmpfs mounted for the run (or `/dev/shm` when mounting
//! is not allowed). Both sides of a comparison share that filesystem, and the table says
//! which one it was.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Size limit of the tmpfs mounted for a run (memory is only used as files are written).
const TMPFS_SIZE: &str = "75%";

/// The bench folder, and the tmpfs mounted on it if there is one. Dropping it unmounts the
/// tmpfs (everything in it goes) and removes the folder.
pub struct BenchDir {
    /// Declared first: unmounted before the folder below is removed.
    _mount: Option<Mount>,
    dir: tempfile::TempDir,
    /// How the table names the filesystem: `tmpfs (mounted for this run)`, `ext4`, ….
    pub describe: String,
}

impl BenchDir {
    /// A new folder under `base`; with `tmpfs`, a tmpfs mounted on it when this process may
    /// mount, else a folder under `/dev/shm`.
    pub fn new(base: &Path, tmpfs: bool) -> anyhow::Result<BenchDir> {
        let make = |under: &Path| {
            tempfile::Builder::new()
                .prefix("sesame-bench-")
                .tempdir_in(under)
                .with_context(|| format!("make a bench folder under {}", under.display()))
        };
        let dir = make(base)?;
        let (mount, dir, how) = if !tmpfs {
            (None, dir, String::new())
        } else {
            match Mount::tmpfs(dir.path()) {
                Ok(m) => (Some(m), dir, " (mounted for this run)".to_string()),
                Err(e) => {
                    eprintln!("   cannot mount a tmpfs ({e:#}); using /dev/shm");
                    drop(dir);
                    (
                        None,
                        make(Path::new("/dev/shm"))?,
                        " (/dev/shm)".to_string(),
                    )
                }
            }
        };
        // nginx's workers may run as another user: they must reach the files.
        set_mode(dir.path(), 0o755)?;
        let fs = fs_type(dir.path())?;
        if tmpfs {
            anyhow::ensure!(
                fs == "tmpfs",
                "asked for a tmpfs but {} is on {fs}",
                dir.path().display()
            );
        }
        Ok(BenchDir {
            _mount: mount,
            dir,
            describe: format!("{fs}{how}"),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A tmpfs mounted here and unmounted on drop.
struct Mount {
    at: PathBuf,
}

impl Mount {
    fn tmpfs(at: &Path) -> anyhow::Result<Mount> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE},mode=0755")])
            .arg("sesame-bench")
            .arg(at)
            .output()
            .context("run mount")?;
        anyhow::ensure!(
            out.status.success(),
            "mount -t tmpfs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Mount {
            at: at.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        match std::process::Command::new("umount").arg(&self.at).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "umount {}: {}",
                self.at.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("umount {}: {e}", self.at.display()),
        }
    }
}

/// The type of the filesystem `path` is on (`ext4`, `tmpfs`, …): that of the longest mount
/// point in `/proc/mounts` that holds it.
pub fn fs_type(path: &Path) -> anyhow::Result<String> {
    let path = path
        .canonicalize()
        .with_context(|| format!("resolve {}", path.display()))?;
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_device), Some(point), Some(kind)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // /proc/mounts escapes spaces and the like as octal (`\040`).
        let point = point.replace("\\040", " ");
        if path.starts_with(&point) && best.as_ref().is_none_or(|(len, _)| point.len() >= *len) {
            best = Some((point.len(), kind.to_string()));
        }
    }
    best.map(|(_, kind)| kind)
        .with_context(|| format!("no mount in /proc/mounts holds {}", path.display()))
}

pub fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_has_a_filesystem() {
        assert!(!super::fs_type(std::path::Path::new("/"))
            .unwrap()
            .is_empty());
    }
}
