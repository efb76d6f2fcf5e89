//! How the projector reads site data: the [`Source`] trait and an in-memory implementation.
//!
//! The node implements [`Source`] over its SQLite store, pinned to one commit index so that a
//! projection sees one consistent version of the site. A `Source` is scoped to one site.
//! [`MemorySource`] serves tests and full renders: a rusqlite connection is not `Sync`, so a
//! full projection first copies the collections it needs into a `MemorySource` and then
//! renders on every core (see `render.rs`).

use std::collections::BTreeMap;
use std::ops::Bound;

use sesame_proto::Tuple;
use thiserror::Error;

/// Reading site data failed (the store, not the site's content, is at fault). A projection
/// that hits one stops with [`crate::ProjectError::Source`]; nothing is half-published.
#[derive(Debug, Error)]
#[error("reading site data: {0}")]
pub struct SourceError(#[source] Box<dyn std::error::Error + Send + Sync>);

impl SourceError {
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        SourceError(error.into())
    }
}

/// A read view of one site's tuples at one consistent commit index.
pub trait Source {
    /// The tuple at `(collection, key)`, if there is one.
    fn get(&self, collection: &str, key: &str) -> Result<Option<Tuple>, SourceError>;
    /// Tuples whose key starts with `prefix`, in key order (bytewise, as SQLite's default
    /// `BINARY` collation and Rust's `str` ordering agree), at most `limit`.
    fn list(&self, collection: &str, prefix: &str, limit: usize)
        -> Result<Vec<Tuple>, SourceError>;
}

/// Tuples held in memory, by collection and key. `Sync`, so many render threads can share it.
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    collections: BTreeMap<String, BTreeMap<String, Tuple>>,
}

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a tuple under its own collection and key, returning the one it replaced.
    pub fn insert(&mut self, tuple: Tuple) -> Option<Tuple> {
        self.collections
            .entry(tuple.collection.clone())
            .or_default()
            .insert(tuple.key.clone(), tuple)
    }

    /// Removes and returns the tuple at `(collection, key)`.
    pub fn remove(&mut self, collection: &str, key: &str) -> Option<Tuple> {
        let tuples = self.collections.get_mut(collection)?;
        let removed = tuples.remove(key);
        if tuples.is_empty() {
            self.collections.remove(collection);
        }
        removed
    }

    /// How many tuples are held, over all collections.
    pub fn len(&self) -> usize {
        self.collections.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.collections.is_empty()
    }

    /// The tuples of `collection`, in key order.
    pub(crate) fn collection(&self, collection: &str) -> impl Iterator<Item = &Tuple> {
        self.collections
            .get(collection)
            .into_iter()
            .flat_map(BTreeMap::values)
    }

    /// Copies up to `limit` tuples of `collection` from `src`. Returns whether the copy is
    /// the whole collection (false when `src` held more than `limit`).
    pub fn load_collection(
        &mut self,
        src: &dyn Source,
        collection: &str,
        limit: usize,
    ) -> Result<bool, SourceError> {
        // One more than the limit tells "exactly `limit`" apart from "more than `limit`".
        let mut tuples = list_checked(src, collection, "", limit.saturating_add(1))?;
        let complete = tuples.len() <= limit;
        tuples.truncate(limit);
        for tuple in tuples {
            self.insert(tuple);
        }
        Ok(complete)
    }
}

impl Source for MemorySource {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Tuple>, SourceError> {
        Ok(self
            .collections
            .get(collection)
            .and_then(|tuples| tuples.get(key))
            .cloned())
    }

    fn list(
        &self,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Tuple>, SourceError> {
        let Some(tuples) = self.collections.get(collection) else {
            return Ok(Vec::new());
        };
        Ok(tuples
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit)
            .map(|(_, tuple)| tuple.clone())
            .collect())
    }
}

/// [`Source::get`], checking that the store answered with the tuple asked for.
pub(crate) fn get_checked(
    src: &dyn Source,
    collection: &str,
    key: &str,
) -> Result<Option<Tuple>, SourceError> {
    let tuple = src.get(collection, key)?;
    if let Some(t) = &tuple {
        if t.collection != collection || t.key != key {
            return Err(SourceError::new(format!(
                "asked for {collection}/{key}, the store returned {}/{}",
                t.collection, t.key
            )));
        }
    }
    Ok(tuple)
}

/// [`Source::list`], checking what the store returned: the right collection, keys under the
/// prefix in strictly increasing order, at most `limit`. Dependency tracking relies on all
/// three, so a store that breaks them fails the projection instead of corrupting pages.
pub(crate) fn list_checked(
    src: &dyn Source,
    collection: &str,
    prefix: &str,
    limit: usize,
) -> Result<Vec<Tuple>, SourceError> {
    let tuples = src.list(collection, prefix, limit)?;
    if tuples.len() > limit {
        return Err(SourceError::new(format!(
            "listing {collection}/{prefix}* with limit {limit} returned {} tuples",
            tuples.len()
        )));
    }
    for (i, t) in tuples.iter().enumerate() {
        let ordered = i == 0 || tuples[i - 1].key < t.key;
        if t.collection != collection || !t.key.starts_with(prefix) || !ordered {
            return Err(SourceError::new(format!(
                "listing {collection}/{prefix}* returned {}/{} out of range or out of order",
                t.collection, t.key
            )));
        }
    }
    Ok(tuples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sesame_proto::{Home, Value};

    fn tuple(collection: &str, key: &str) -> Tuple {
        Tuple {
            site: "demo".into(),
            collection: collection.into(),
            key: key.into(),
            value: Value::Null,
            version: 1,
            origin: None,
            home: Home::Site,
        }
    }

    #[test]
    fn list_is_prefix_bounded_and_ordered() {
        let mut src = MemorySource::new();
        for key in ["b/2", "a", "b/1", "c", "b"] {
            src.insert(tuple("p", key));
        }
        src.insert(tuple("q", "b/0"));
        let keys = |v: Vec<Tuple>| v.into_iter().map(|t| t.key).collect::<Vec<_>>();
        assert_eq!(keys(src.list("p", "b", 10).unwrap()), ["b", "b/1", "b/2"]);
        assert_eq!(keys(src.list("p", "b/", 1).unwrap()), ["b/1"]);
        assert_eq!(
            keys(src.list("p", "", 10).unwrap()),
            ["a", "b", "b/1", "b/2", "c"]
        );
        assert!(src.list("none", "", 10).unwrap().is_empty());
        assert_eq!(src.len(), 6);
        assert!(src.remove("q", "b/0").is_some());
        assert!(src.get("q", "b/0").unwrap().is_none());
    }

    #[test]
    fn load_collection_reports_completeness() {
        let mut src = MemorySource::new();
        for key in ["a", "b", "c"] {
            src.insert(tuple("p", key));
        }
        let mut copy = MemorySource::new();
        assert!(copy.load_collection(&src, "p", 3).unwrap());
        let mut partial = MemorySource::new();
        assert!(!partial.load_collection(&src, "p", 2).unwrap());
        assert_eq!(partial.len(), 2);
    }
}
