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

/// Version of the manifest JSON format.
pub const MANIFEST_FORMAT: u32 = 1;
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
}

impl Delta {
    /// The difference between two file maps, each list in path order.
    pub fn between(old: &BTreeMap<String, FileEntry>, new: &BTreeMap<String, FileEntry>) -> Delta {
        let mut delta = Delta::default();
        for (path, entry) in new {
            match old.get(path) {
                None => delta.added.push(path.clone()),
                Some(previous) if previous != entry => delta.changed.push(path.clone()),
                Some(_) => {}
            }
        }
        delta.removed = old
            .keys()
            .filter(|p| !new.contains_key(*p))
            .cloned()
            .collect();
        delta
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
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

/// One version of one site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    pub site: String,
    /// The commit index this version reflects: every commit up to it is projected.
    pub index: u64,
    /// Id of the manifest this one follows, if any.
    pub previous: Option<String>,
    /// URL path (`/`, `/alice`, `/style.css`) → file.
    pub files: BTreeMap<String, FileEntry>,
    /// What changed since `previous`.
    pub delta: Delta,
}

/// Why manifest or root bytes were refused.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("decoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown format {found}, this build reads format {expected}")]
    Format { found: u32, expected: u32 },
    #[error("invalid content: {0}")]
    Invalid(String),
}

impl Manifest {
    /// The canonical JSON bytes: what is stored and what the id hashes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest has string keys only and always serializes")
    }

    /// The manifest id: blake3 hex of [`Manifest::to_json`].
    pub fn id(&self) -> String {
        content_hash(&self.to_json())
    }

    /// Decodes and checks a stored manifest.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = serde_json::from_slice(bytes)?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format {
                found: manifest.format,
                expected: MANIFEST_FORMAT,
            });
        }
        for (path, entry) in &manifest.files {
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
        }
        if let Some(previous) = &manifest.previous {
            if !is_hash(previous) {
                return Err(ManifestError::Invalid(format!(
                    "previous {previous:?} is not a manifest id"
                )));
            }
        }
        Ok(manifest)
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

    #[test]
    fn json_round_trip_and_checks() {
        let m = manifest(&[("/", "home")]);
        let back = Manifest::from_json(&m.to_json()).unwrap();
        assert_eq!(back, m);
        let text = String::from_utf8(m.to_json()).unwrap();
        assert!(
            text.starts_with(
                r#"{"format":1,"site":"demo","index":7,"previous":null,"files":{"/":{"hash":""#
            ),
            "{text}"
        );

        let mut future = m.clone();
        future.format = 2;
        assert!(matches!(
            Manifest::from_json(&future.to_json()),
            Err(ManifestError::Format { found: 2, .. })
        ));
        let mut bad = m.clone();
        bad.files.get_mut("/").unwrap().hash = "../../etc".into();
        assert!(matches!(
            Manifest::from_json(&bad.to_json()),
            Err(ManifestError::Invalid(_))
        ));
        assert!(Manifest::from_json(b"{").is_err());
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
