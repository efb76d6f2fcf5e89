//! Manifests: one site version as a map from URL path to content-addressed file, and the
//! root that names a site's current manifest.
//!
//! A file is stored once under the blake3 hash of its bytes (lowercase hex). A manifest is
//! stored under the blake3 hash of its own JSON bytes, so its id names its content exactly:
//! the same site version at the same index, after the same previous version, always has the
//! same id. Both formats carry a `format` number so readers can refuse what they do not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::tree::FileTree;

/// Version of the manifest JSON format this build writes: a version object over a tree of
/// chunks (`tree.rs`).
pub const MANIFEST_FORMAT: u32 = 2;
/// The format before tree manifests: every file in the manifest itself. Still read.
pub const MANIFEST_FORMAT_FLAT: u32 = 1;
/// Largest manifest (version object) a reader accepts. A format-2 manifest is small (its
/// delta lists at most [`DELTA_PATHS_MAX`] paths); a format-1 manifest lists every file
/// (about 140 bytes each).
pub const MANIFEST_BYTES_MAX: usize = 256 << 20;
/// Most paths a version object's delta lists. A version that changed more (a first publish
/// or a full rebuild of a large site) says only how many: its version object stays small
/// enough to fetch in one peer frame whatever the size of the site, and a reader that needs
/// the paths diffs the trees of this version and `previous` (which costs as much as the
/// change).
pub const DELTA_PATHS_MAX: usize = 10_000;
/// Version of the root JSON format.
pub const ROOT_FORMAT: u32 = 1;
/// Length of a blake3 hash in hex.
pub const HASH_HEX_LEN: usize = 64;

/// The blake3 hash of `bytes`, as lowercase hex: the name of a blob or a manifest.
pub fn content_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Whether `s` looks like a [`content_hash`] (the object store path is built from it).
pub fn is_hash(s: &str) -> bool {
    s.len() == HASH_HEX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One published file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// blake3 of the bytes, hex; the blob is at `sites/<site>/blobs/<hash>`.
    pub hash: String,
    pub content_type: String,
    /// In bytes.
    pub size: u64,
}

/// The paths that differ from the previous manifest; feeds CDN purges and browser caches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// How many changed paths are not listed (the three lists are then empty): past
    /// [`DELTA_PATHS_MAX`], see [`Delta::bounded`]. Absent from the JSON when zero, so a
    /// listed delta is stored as before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Delta {
    /// The difference between two versions' files, each list in path order; costs as much
    /// as the difference (see [`FileTree::diff`]).
    pub fn between(old: &FileTree, new: &FileTree) -> Delta {
        FileTree::diff(old, new)
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.omitted == 0
    }

    /// The delta as a version object stores it: listed within [`DELTA_PATHS_MAX`] paths,
    /// else only counted.
    pub fn bounded(self) -> Delta {
        let paths = self.added.len() + self.changed.len() + self.removed.len();
        if paths <= DELTA_PATHS_MAX {
            return self;
        }
        Delta {
            omitted: paths as u64,
            ..Delta::default()
        }
    }

    /// Whether every changed path is listed.
    pub fn is_listed(&self) -> bool {
        self.omitted == 0
    }

    /// Every path in the delta, for purging.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.added
            .iter()
            .chain(&self.changed)
            .chain(&self.removed)
            .map(String::as_str)
    }
}

/// One version of one site, in memory. Format 2 (what this build writes) is stored as a
/// small version object naming the top chunk of its [`FileTree`]; format 1 (written before
/// tree manifests) held every file in the manifest itself, and is still read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`], or [`MANIFEST_FORMAT_FLAT`] for a version read from an old
    /// manifest: the format its JSON (and so its id) has.
    pub format: u32,
    pub site: String,
    /// The commit index this version reflects: every commit up to it is projected.
    pub index: u64,
    /// Id of the manifest this one follows, if any.
    pub previous: Option<String>,
    /// URL path (`/`, `/alice`, `/style.css`) → file.
    pub files: FileTree,
    /// What changed since `previous` (only counted past [`DELTA_PATHS_MAX`] paths).
    pub delta: Delta,
}

/// Why manifest or root bytes were refused.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("decoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "unknown format {found}, this build reads formats {MANIFEST_FORMAT_FLAT} and {expected}"
    )]
    Format { found: u32, expected: u32 },
    #[error("invalid content: {0}")]
    Invalid(String),
}

/// A format-1 manifest as stored.
#[derive(Serialize)]
struct FlatOut<'a> {
    format: u32,
    site: &'a str,
    index: u64,
    previous: &'a Option<String>,
    files: BTreeMap<&'a str, &'a FileEntry>,
    delta: &'a Delta,
}

#[derive(Deserialize)]
struct FlatIn {
    format: u32,
    site: String,
    index: u64,
    previous: Option<String>,
    files: BTreeMap<String, FileEntry>,
    delta: Delta,
}

/// A format-2 manifest (the version object) as stored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionFile {
    format: u32,
    site: String,
    index: u64,
    previous: Option<String>,
    /// The top chunk of the file tree; `None` for a version with no files.
    tree: Option<String>,
    /// How many files the tree holds (checked once it is loaded).
    files: u64,
    delta: Delta,
}

#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

/// A stored manifest, decoded: whole (format 1), or the head of a tree whose chunks are
/// still to be read (format 2).
#[derive(Debug)]
pub enum StoredManifest {
    Flat(Manifest),
    Tree(ManifestHead),
}

/// A format-2 manifest before its tree is loaded.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub site: String,
    pub index: u64,
    pub previous: Option<String>,
    /// The id of the top chunk.
    pub tree: Option<String>,
    /// Files in the tree.
    pub files: u64,
    pub delta: Delta,
}

impl ManifestHead {
    /// The manifest, with its loaded tree; refused when the tree does not hold as many
    /// files as the head says.
    pub fn with_tree(self, files: FileTree) -> Result<Manifest, ManifestError> {
        if files.root_id() != self.tree.as_deref() {
            return Err(ManifestError::Invalid(format!(
                "the tree loaded is {:?}, the manifest names {:?}",
                files.root_id(),
                self.tree
            )));
        }
        if files.len() as u64 != self.files {
            return Err(ManifestError::Invalid(format!(
                "the tree holds {} files, the manifest says {}",
                files.len(),
                self.files
            )));
        }
        Ok(Manifest {
            format: MANIFEST_FORMAT,
            site: self.site,
            index: self.index,
            previous: self.previous,
            files,
            delta: self.delta,
        })
    }
}

impl Manifest {
    /// The canonical JSON bytes: what is stored and what the id hashes. For format 2 the
    /// version object only; its chunks are stored on their own.
    pub fn to_json(&self) -> Vec<u8> {
        let json = if self.format == MANIFEST_FORMAT_FLAT {
            serde_json::to_vec(&FlatOut {
                format: self.format,
                site: &self.site,
                index: self.index,
                previous: &self.previous,
                files: self.files.iter().map(|(p, e)| (p.as_str(), e)).collect(),
                delta: &self.delta,
            })
        } else {
            assert_eq!(self.format, MANIFEST_FORMAT, "a manifest of a known format");
            serde_json::to_vec(&VersionFile {
                format: self.format,
                site: self.site.clone(),
                index: self.index,
                previous: self.previous.clone(),
                tree: self.files.root_id().map(str::to_string),
                files: self.files.len() as u64,
                delta: self.delta.clone(),
            })
        };
        json.expect("a manifest has string keys only and always serializes")
    }

    /// The manifest id: blake3 hex of [`Manifest::to_json`].
    pub fn id(&self) -> String {
        content_hash(&self.to_json())
    }

    /// Decodes and checks stored manifest bytes (either format).
    pub fn decode(bytes: &[u8]) -> Result<StoredManifest, ManifestError> {
        let format = serde_json::from_slice::<FormatOnly>(bytes)?.format;
        match format {
            MANIFEST_FORMAT_FLAT => {
                let flat: FlatIn = serde_json::from_slice(bytes)?;
                for (path, entry) in &flat.files {
                    check_entry(path, entry)?;
                }
                check_previous(&flat.previous)?;
                Ok(StoredManifest::Flat(Manifest {
                    format: flat.format,
                    site: flat.site,
                    index: flat.index,
                    previous: flat.previous,
                    files: flat.files.into_iter().collect(),
                    delta: flat.delta,
                }))
            }
            MANIFEST_FORMAT => {
                let file: VersionFile = serde_json::from_slice(bytes)?;
                check_previous(&file.previous)?;
                if let Some(tree) = file.tree.as_ref().filter(|t| !is_hash(t)) {
                    return Err(ManifestError::Invalid(format!(
                        "tree {tree:?} is not a chunk id"
                    )));
                }
                if file.tree.is_none() != (file.files == 0) {
                    return Err(ManifestError::Invalid(format!(
                        "{} files with tree {:?}",
                        file.files, file.tree
                    )));
                }
                Ok(StoredManifest::Tree(ManifestHead {
                    site: file.site,
                    index: file.index,
                    previous: file.previous,
                    tree: file.tree,
                    files: file.files,
                    delta: file.delta,
                }))
            }
            found => Err(ManifestError::Format {
                found,
                expected: MANIFEST_FORMAT,
            }),
        }
    }
}

fn check_entry(path: &str, entry: &FileEntry) -> Result<(), ManifestError> {
    if !path.starts_with('/') {
        return Err(ManifestError::Invalid(format!(
            "path {path:?} does not start with '/'"
        )));
    }
    if !is_hash(&entry.hash) {
        return Err(ManifestError::Invalid(format!(
            "{path}: hash {:?} is not blake3 hex",
            entry.hash
        )));
    }
    Ok(())
}

fn check_previous(previous: &Option<String>) -> Result<(), ManifestError> {
    match previous {
        Some(previous) if !is_hash(previous) => Err(ManifestError::Invalid(format!(
            "previous {previous:?} is not a manifest id"
        ))),
        _ => Ok(()),
    }
}

/// A site's current version: which manifest, reflecting which commit index. Committed
/// through Raft by the node and mirrored to `sites/<site>/root` for edge readers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// The manifest id.
    pub manifest: String,
    pub index: u64,
}

#[derive(Serialize, Deserialize)]
struct RootFile {
    format: u32,
    manifest: String,
    index: u64,
}

impl Root {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&RootFile {
            format: ROOT_FORMAT,
            manifest: self.manifest.clone(),
            index: self.index,
        })
        .expect("a root always serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Root, ManifestError> {
        let file: RootFile = serde_json::from_slice(bytes)?;
        if file.format != ROOT_FORMAT {
            return Err(ManifestError::Format {
                found: file.format,
                expected: ROOT_FORMAT,
            });
        }
        if !is_hash(&file.manifest) {
            return Err(ManifestError::Invalid(format!(
                "manifest {:?} is not a manifest id",
                file.manifest
            )));
        }
        Ok(Root {
            manifest: file.manifest,
            index: file.index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(content: &str) -> FileEntry {
        FileEntry {
            hash: content_hash(content.as_bytes()),
            content_type: "text/plain".into(),
            size: content.len() as u64,
        }
    }

    fn manifest(files: &[(&str, &str)]) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            site: "demo".into(),
            index: 7,
            previous: None,
            files: files
                .iter()
                .map(|(p, c)| (p.to_string(), entry(c)))
                .collect(),
            delta: Delta::default(),
        }
    }

    #[test]
    fn id_is_content_addressed() {
        let a = manifest(&[("/", "home"), ("/a", "a")]);
        let b = manifest(&[("/a", "a"), ("/", "home")]);
        assert_eq!(
            a.id(),
            b.id(),
            "same content, same id, whatever the insertion order"
        );
        assert!(is_hash(&a.id()));
        let c = manifest(&[("/", "home"), ("/a", "A")]);
        assert_ne!(a.id(), c.id());
        let mut d = a.clone();
        d.index = 8;
        assert_ne!(a.id(), d.id(), "the index is part of the content");
    }

    fn head(bytes: &[u8]) -> ManifestHead {
        match Manifest::decode(bytes).unwrap() {
            StoredManifest::Tree(head) => head,
            StoredManifest::Flat(m) => panic!("format 2 decoded as flat: {m:?}"),
        }
    }

    #[test]
    fn json_round_trip_and_checks() {
        let m = manifest(&[("/", "home")]);
        let back = head(&m.to_json()).with_tree(m.files.clone()).unwrap();
        assert_eq!(back, m);
        let text = String::from_utf8(m.to_json()).unwrap();
        assert!(
            text.starts_with(r#"{"format":2,"site":"demo","index":7,"previous":null,"tree":""#),
            "{text}"
        );
        assert!(text.contains(r#","files":1,"delta":"#), "{text}");
        // A tree that does not match the head is refused.
        let other = manifest(&[("/", "other")]).files;
        assert!(matches!(
            head(&m.to_json()).with_tree(other),
            Err(ManifestError::Invalid(_))
        ));

        let future = text.replace(r#""format":2"#, r#""format":3"#);
        assert!(matches!(
            Manifest::decode(future.as_bytes()),
            Err(ManifestError::Format { found: 3, .. })
        ));
        let bad = text.replace(m.files.root_id().unwrap(), "../../etc");
        assert!(matches!(
            Manifest::decode(bad.as_bytes()),
            Err(ManifestError::Invalid(_))
        ));
        let counted = text.replace(r#""files":1"#, r#""files":0"#);
        assert!(matches!(
            Manifest::decode(counted.as_bytes()),
            Err(ManifestError::Invalid(_))
        ));
        assert!(Manifest::decode(b"{").is_err());
    }

    /// A manifest written before tree manifests (format 1, every file inline) still decodes,
    /// and keeps its id.
    #[test]
    fn flat_format_still_read() {
        let home = entry("home");
        let stored = format!(
            r#"{{"format":1,"site":"demo","index":7,"previous":null,"files":{{"/":{{"hash":"{}","content_type":"text/plain","size":4}}}},"delta":{{"added":["/"],"changed":[],"removed":[]}}}}"#,
            home.hash
        );
        let StoredManifest::Flat(m) = Manifest::decode(stored.as_bytes()).unwrap() else {
            panic!("format 1 decodes whole");
        };
        assert_eq!(m.format, MANIFEST_FORMAT_FLAT);
        assert_eq!(m.files.get("/"), Some(&home));
        assert_eq!(m.delta.added, ["/"]);
        assert_eq!(
            m.to_json(),
            stored.as_bytes(),
            "re-encodes to the same bytes"
        );
        assert_eq!(m.id(), content_hash(stored.as_bytes()));
        let bad = stored.replace(&home.hash, "../../etc");
        assert!(matches!(
            Manifest::decode(bad.as_bytes()),
            Err(ManifestError::Invalid(_))
        ));
    }

    /// A delta past the bound is stored as a count: the version object of a full rebuild of
    /// a large site stays small, and reads back as "this many paths, not listed".
    #[test]
    fn a_long_delta_is_counted_not_listed() {
        let listed = Delta {
            added: (0..DELTA_PATHS_MAX).map(|i| format!("/p{i}")).collect(),
            ..Delta::default()
        };
        assert_eq!(listed.clone().bounded(), listed);
        let mut long = listed.clone();
        long.removed.push("/gone".into());
        let counted = long.bounded();
        assert!(!counted.is_listed() && !counted.is_empty());
        assert_eq!(counted.paths().count(), 0);
        let version = Manifest {
            format: MANIFEST_FORMAT,
            site: "demo".into(),
            index: 3,
            previous: None,
            files: FileTree::default(),
            delta: counted.clone(),
        };
        let json = version.to_json();
        assert!(json.len() < 400, "{} bytes", json.len());
        let StoredManifest::Tree(head) = Manifest::decode(&json).unwrap() else {
            panic!("a format-2 manifest reads back as a tree head");
        };
        assert_eq!(head.delta, counted);
        assert_eq!(head.delta.omitted, DELTA_PATHS_MAX as u64 + 1);
        // A listed delta is stored exactly as before the count existed: ids do not move.
        let text = String::from_utf8(
            Manifest {
                delta: listed,
                ..version
            }
            .to_json(),
        )
        .unwrap();
        assert!(!text.contains("omitted"));
    }

    #[test]
    fn delta_between_versions() {
        let old = manifest(&[("/", "home"), ("/a", "a"), ("/gone", "x")]).files;
        let new = manifest(&[("/", "home"), ("/a", "A"), ("/b", "b")]).files;
        let delta = Delta::between(&old, &new);
        assert_eq!(delta.added, ["/b"]);
        assert_eq!(delta.changed, ["/a"]);
        assert_eq!(delta.removed, ["/gone"]);
        assert_eq!(delta.paths().count(), 3);
        assert!(Delta::between(&new, &new).is_empty());
    }

    #[test]
    fn root_round_trip() {
        let root = Root {
            manifest: content_hash(b"m"),
            index: 42,
        };
        assert_eq!(Root::from_json(&root.to_json()).unwrap(), root);
        assert!(Root::from_json(br#"{"format":1,"manifest":"x","index":1}"#).is_err());
        assert!(Root::from_json(br#"{"format":9,"manifest":"x","index":1}"#).is_err());
    }
}
