//! Dependencies of pages on tuples, and the reverse index from a changed key to the pages
//! that must be rendered again.
//!
//! Everything a page depends on is a tuple key or a key range, so one index serves data,
//! templates (`_templates/<name>`) and routes (`_routes/<pattern>`) alike:
//! - `get(coll, key)`, the page's own tuple, its route and its templates → an exact key;
//! - `list(coll, prefix=p, limit=n)` → every key starting with `p`; when the result was cut by
//!   the limit, only keys up to the last one returned (a change past it cannot alter the
//!   first `n`);
//! - a template that loads a computed name → every key of `_templates`;
//! - `asset_url(key)` → the asset's keys and a route at its path.

use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashSet};

use crate::site::{ASSETS, ROUTES};

/// Everything one render read, normalised so that each key range appears once.
#[derive(Debug, Clone, Default, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct PageDeps {
    /// `(collection, key)`.
    keys: BTreeSet<(String, String)>,
    /// `(collection, prefix)` → the last key that matters, or `None` for the whole range.
    prefixes: BTreeMap<(String, String), Option<String>>,
}

impl PageDeps {
    pub fn add_key(&mut self, collection: &str, key: &str) {
        self.keys.insert((collection.to_string(), key.to_string()));
    }

    /// Records a key range; `upto` is the last key that matters (`None`: all of them). Two
    /// reads of one range keep the wider bound.
    pub fn add_prefix(&mut self, collection: &str, prefix: &str, upto: Option<&str>) {
        let entry = self
            .prefixes
            .entry((collection.to_string(), prefix.to_string()))
            .or_insert_with(|| upto.map(str::to_string));
        *entry = match (entry.take(), upto) {
            (None, _) | (_, None) => None,
            (Some(old), Some(new)) => Some(old.max(new.to_string())),
        };
    }

    /// What `asset_url()` of the asset with `key` (no leading `/`), served at `path`,
    /// depends on: the keys `key` and `/<key>` of `_assets` (both are served at `path`, see
    /// `AssetIndex::find`), and a route at `path`, which takes precedence over an asset.
    pub fn add_asset_url(&mut self, key: &str, path: &str) {
        for key in [key.to_string(), format!("/{key}")] {
            if sesame_proto::validate_key(&key).is_ok() {
                self.add_key(ASSETS, &key);
            }
        }
        self.add_key(ROUTES, path);
    }

    pub fn merge(&mut self, other: PageDeps) {
        self.keys.extend(other.keys);
        for ((collection, prefix), upto) in other.prefixes {
            self.add_prefix(&collection, &prefix, upto.as_deref());
        }
    }

    /// Whether a change to `(collection, key)` can change what this page read.
    #[cfg(test)]
    pub fn touches(&self, collection: &str, key: &str) -> bool {
        self.keys
            .contains(&(collection.to_string(), key.to_string()))
            || self.prefixes.iter().any(|((c, prefix), upto)| {
                c == collection
                    && key.starts_with(prefix.as_str())
                    && upto.as_deref().is_none_or(|u| key <= u)
            })
    }
}

/// Reverse index: from a tuple key to the paths of the pages that depend on it.
#[derive(Debug, Default)]
pub struct DepIndex {
    collections: HashMap<String, CollectionDeps>,
}

#[derive(Debug, Default)]
struct CollectionDeps {
    /// key → pages that read exactly this key.
    keys: HashMap<String, HashSet<String>>,
    /// prefix → (page → last key that matters, `None` for all).
    prefixes: HashMap<String, HashMap<String, Option<String>>>,
}

impl DepIndex {
    /// Adds the dependencies of the page at `path`.
    pub fn insert(&mut self, path: &str, deps: &PageDeps) {
        for (collection, key) in &deps.keys {
            self.collection(collection)
                .keys
                .entry(key.clone())
                .or_default()
                .insert(path.to_string());
        }
        for ((collection, prefix), upto) in &deps.prefixes {
            self.collection(collection)
                .prefixes
                .entry(prefix.clone())
                .or_default()
                .insert(path.to_string(), upto.clone());
        }
    }

    /// Removes the dependencies of the page at `path`; `deps` must be what was inserted.
    pub fn remove(&mut self, path: &str, deps: &PageDeps) {
        for (collection, key) in &deps.keys {
            let Some(c) = self.collections.get_mut(collection) else {
                continue;
            };
            if let Some(pages) = c.keys.get_mut(key) {
                pages.remove(path);
                if pages.is_empty() {
                    c.keys.remove(key);
                }
            }
        }
        for (collection, prefix) in deps.prefixes.keys() {
            let Some(c) = self.collections.get_mut(collection) else {
                continue;
            };
            if let Some(pages) = c.prefixes.get_mut(prefix) {
                pages.remove(path);
                if pages.is_empty() {
                    c.prefixes.remove(prefix);
                }
            }
        }
        self.collections
            .retain(|_, c| !c.keys.is_empty() || !c.prefixes.is_empty());
    }

    /// Adds to `out` the pages that depend on `(collection, key)`. Looks up every prefix of
    /// the key (at most one per byte, keys are at most 512 bytes) instead of scanning all
    /// ranges, so the cost does not grow with the number of pages.
    pub fn affected(&self, collection: &str, key: &str, out: &mut BTreeSet<String>) {
        let Some(c) = self.collections.get(collection) else {
            return;
        };
        if let Some(pages) = c.keys.get(key) {
            out.extend(pages.iter().cloned());
        }
        if c.prefixes.is_empty() {
            return;
        }
        let prefix_ends = key.char_indices().map(|(i, _)| i).chain([key.len()]);
        for end in prefix_ends {
            let Some(pages) = c.prefixes.get(&key[..end]) else {
                continue;
            };
            for (path, upto) in pages {
                if upto.as_deref().is_none_or(|u| key <= u) {
                    out.insert(path.clone());
                }
            }
        }
    }

    fn collection(&mut self, collection: &str) -> &mut CollectionDeps {
        self.collections.entry(collection.to_string()).or_default()
    }

    /// Whether nothing is indexed (tests check that removal is complete).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.collections.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affected(index: &DepIndex, collection: &str, key: &str) -> Vec<String> {
        let mut out = BTreeSet::new();
        index.affected(collection, key, &mut out);
        out.into_iter().collect()
    }

    #[test]
    fn keys_and_ranges() {
        let mut a = PageDeps::default();
        a.add_key("profiles", "alice");
        let mut index_page = PageDeps::default();
        index_page.add_prefix("profiles", "", Some("bob"));
        let mut posts = PageDeps::default();
        posts.add_prefix("posts", "alice/", None);

        let mut index = DepIndex::default();
        index.insert("/alice", &a);
        index.insert("/", &index_page);
        index.insert("/alice/posts", &posts);

        assert_eq!(affected(&index, "profiles", "alice"), ["/", "/alice"]);
        assert_eq!(affected(&index, "profiles", "bob"), ["/"]);
        assert!(
            affected(&index, "profiles", "carol").is_empty(),
            "past the limit"
        );
        assert_eq!(affected(&index, "posts", "alice/1"), ["/alice/posts"]);
        assert!(affected(&index, "posts", "alicia/1").is_empty());
        assert!(affected(&index, "other", "alice").is_empty());

        assert!(a.touches("profiles", "alice"));
        assert!(index_page.touches("profiles", "bob"));
        assert!(!index_page.touches("profiles", "carol"));
        for (path, deps) in [("/alice", &a), ("/", &index_page), ("/alice/posts", &posts)] {
            index.remove(path, deps);
        }
        assert!(index.is_empty());
    }

    #[test]
    fn wider_bound_wins() {
        let mut d = PageDeps::default();
        d.add_prefix("p", "", Some("b"));
        d.add_prefix("p", "", Some("d"));
        assert!(d.touches("p", "c"));
        assert!(!d.touches("p", "e"));
        d.add_prefix("p", "", None);
        assert!(d.touches("p", "z"));
        d.add_prefix("p", "", Some("a"));
        assert!(d.touches("p", "z"), "an unbounded read stays unbounded");
    }

    #[test]
    fn multibyte_keys() {
        let mut d = PageDeps::default();
        d.add_prefix("p", "ü", None);
        let mut index = DepIndex::default();
        index.insert("/x", &d);
        assert_eq!(affected(&index, "p", "üx"), ["/x"]);
        assert!(affected(&index, "p", "u").is_empty());
    }
}
