//! Tree manifests: the files of one site version as a deterministic hash trie of
//! content-addressed chunks, so an edit rewrites only the chunks on its path.
//!
//! A path's place in the trie is the hex digits of `blake3(path)`: the top node splits the
//! paths on the first digit, its children on the second, and so on. A node is either a
//! *leaf* (path → [`FileEntry`]) or an *inner* node (hex digit → child id). The shape is a
//! function of the set of files alone: a set that fits one leaf (at most
//! [`LEAF_ENTRIES_MAX`] entries and [`LEAF_BYTES_MAX`] bytes, by [`entry_weight`]) is one,
//! any other set is an inner node over its digit groups. So the same files always give the
//! same chunks and the same ids, whatever order they were added in, and a leaf that grows
//! past the bound splits while an inner node whose subtree shrinks back under it merges.
//!
//! Each chunk is stored as JSON under the blake3 hash of its bytes
//! (`sites/<site>/chunks/<id>.json`). Why fan-out 16: a one-page edit rewrites the leaf of
//! its path and every inner node above it. A leaf holds up to 64 entries of about 140 bytes
//! (a few KB), an inner node of fan-out 16 about 1.2 KB, one of fan-out 256 about 18 KB.
//! With 16, an edit rewrites 3 chunks and about 8 KB at 10k pages and 4 chunks and about
//! 7 KB at 100k (measured by `one_page_edit_is_flat_in_the_size_of_the_site`); at 1M pages
//! the path is one level deeper (estimated: 5 chunks, about 8 KB). With 256 it would be 2
//! chunks and about 24 KB at 10k, 3 chunks and about 38 KB at 1M. Fan-out 256 saves a chunk
//! write or two per edit, but chunks are written in parallel, while bytes (hashing, upload,
//! a follower's or an edge's fetch) grow with the fan-out.
//!
//! Nodes are immutable and shared through `Arc` between versions: applying changes makes new
//! nodes along the changed paths only, and a reader loading a version reuses every node of a
//! version it holds whose id is unchanged at the same place ([`load`]). Everything read is
//! checked: each chunk's size and hash (by the [`ChunkSource`]), its structure, that every
//! path in a leaf belongs where the leaf sits, and the depth ([`TREE_DEPTH_MAX`]).

use std::collections::{btree_map, BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::manifest::{content_hash, is_hash, Delta, FileEntry};
use crate::paths::NOT_FOUND_PATH;
use crate::publish::PublishError;

/// Version of the chunk JSON format (the same number as the tree manifest's format).
pub const CHUNK_FORMAT: u32 = 2;
/// Children of an inner node: one per hex digit of a path's hash.
pub const TREE_FANOUT: usize = 16;
/// Most entries in one leaf; a larger set splits.
pub const LEAF_ENTRIES_MAX: usize = 64;
/// Most bytes (by [`entry_weight`]) of the entries in one leaf; a larger set splits.
pub const LEAF_BYTES_MAX: usize = 16 * 1024;
/// Largest chunk a reader accepts. Far above what a writer makes (a full leaf is about
/// [`LEAF_BYTES_MAX`]; a single entry, whose path is a few KB at most, is always a leaf), so
/// only a damaged or hostile store reaches it.
pub const CHUNK_BYTES_MAX: usize = 1 << 20;
/// Deepest level of the trie: a blake3 hash has 64 hex digits. Sets that cannot split any
/// further (a blake3 collision) stay one leaf there.
pub const TREE_DEPTH_MAX: usize = 64;
/// Chunks read at once while loading a tree.
pub const CHUNK_GETS_CONCURRENT_MAX: usize = 32;
/// JSON bytes of one leaf entry besides its path, hash and content type (keys, quotes,
/// punctuation, the size).
const ENTRY_JSON_BYTES: usize = 64;

const DIGITS: [&str; TREE_FANOUT] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "a", "b", "c", "d", "e", "f",
];

type Digest = [u8; 32];

fn digest(path: &str) -> Digest {
    *blake3::hash(path.as_bytes()).as_bytes()
}

/// The hex digit of `d` at `depth` (0: the first).
fn digit(d: &Digest, depth: usize) -> usize {
    debug_assert!(depth < TREE_DEPTH_MAX);
    let byte = d[depth / 2];
    usize::from(if depth.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0xf
    })
}

/// What one entry counts against [`LEAF_BYTES_MAX`]: about its JSON size in a leaf.
pub fn entry_weight(path: &str, entry: &FileEntry) -> usize {
    path.len() + entry.hash.len() + entry.content_type.len() + ENTRY_JSON_BYTES
}

/// Whether a file is an HTML page a visitor can reach (the 404 page is not one).
pub fn is_page(path: &str, entry: &FileEntry) -> bool {
    entry.content_type.starts_with("text/html") && path != NOT_FOUND_PATH
}

/// Whether a set of `len` entries weighing `weight` is one leaf at `depth`.
fn fits_leaf(len: usize, weight: usize, depth: usize) -> bool {
    len <= 1 || depth >= TREE_DEPTH_MAX || (len <= LEAF_ENTRIES_MAX && weight <= LEAF_BYTES_MAX)
}

/// One node of the trie, immutable once made.
pub(crate) struct Node {
    /// blake3 of the chunk JSON.
    id: String,
    /// Entries in the subtree.
    len: usize,
    /// Sum of [`entry_weight`] over the subtree.
    weight: usize,
    /// HTML pages in the subtree ([`is_page`]), so a version's page count costs nothing.
    pages: usize,
    body: Body,
}

enum Body {
    Leaf(BTreeMap<String, FileEntry>),
    Inner(Box<[Option<Arc<Node>>; TREE_FANOUT]>),
}

#[derive(Serialize)]
struct LeafOut<'a> {
    format: u32,
    leaf: &'a BTreeMap<String, FileEntry>,
}

#[derive(Serialize)]
struct InnerOut<'a> {
    format: u32,
    inner: BTreeMap<&'static str, &'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkIn {
    format: u32,
    #[serde(default)]
    leaf: Option<BTreeMap<String, FileEntry>>,
    #[serde(default)]
    inner: Option<BTreeMap<String, String>>,
}

impl Node {
    fn leaf(entries: BTreeMap<String, FileEntry>) -> (Arc<Node>, Bytes) {
        assert!(!entries.is_empty(), "an empty set is no node");
        let json = serde_json::to_vec(&LeafOut {
            format: CHUNK_FORMAT,
            leaf: &entries,
        })
        .expect("a leaf has string keys only and always serializes");
        assert!(
            json.len() <= CHUNK_BYTES_MAX,
            "a leaf of {} entries is {} bytes, over what readers accept",
            entries.len(),
            json.len()
        );
        let node = Node::leaf_from(content_hash(&json), entries);
        (Arc::new(node), Bytes::from(json))
    }

    fn inner(children: Box<[Option<Arc<Node>>; TREE_FANOUT]>) -> (Arc<Node>, Bytes) {
        let inner: BTreeMap<&'static str, &str> = children
            .iter()
            .enumerate()
            .filter_map(|(d, c)| c.as_ref().map(|c| (DIGITS[d], c.id.as_str())))
            .collect();
        assert!(!inner.is_empty(), "an inner node has a child");
        let json = serde_json::to_vec(&InnerOut {
            format: CHUNK_FORMAT,
            inner,
        })
        .expect("an inner node always serializes");
        let node = Node::inner_from(content_hash(&json), children);
        (Arc::new(node), Bytes::from(json))
    }

    /// A leaf named `id` (its sums made from its entries).
    fn leaf_from(id: String, entries: BTreeMap<String, FileEntry>) -> Node {
        Node {
            id,
            len: entries.len(),
            weight: entries.iter().map(|(p, e)| entry_weight(p, e)).sum(),
            pages: entries.iter().filter(|(p, e)| is_page(p, e)).count(),
            body: Body::Leaf(entries),
        }
    }

    /// An inner node named `id` (its sums made from its children's).
    fn inner_from(id: String, children: Box<[Option<Arc<Node>>; TREE_FANOUT]>) -> Node {
        let (mut len, mut weight, mut pages) = (0, 0, 0);
        for c in children.iter().flatten() {
            len += c.len;
            weight += c.weight;
            pages += c.pages;
        }
        Node {
            id,
            len,
            weight,
            pages,
            body: Body::Inner(children),
        }
    }

    /// Every entry of the subtree, into `out`.
    fn collect_into(&self, out: &mut BTreeMap<String, FileEntry>) {
        match &self.body {
            Body::Leaf(entries) => out.extend(entries.iter().map(|(p, e)| (p.clone(), e.clone()))),
            Body::Inner(children) => children.iter().flatten().for_each(|c| c.collect_into(out)),
        }
    }

    fn collect_refs<'a>(&'a self, out: &mut BTreeMap<&'a str, &'a FileEntry>) {
        match &self.body {
            Body::Leaf(entries) => out.extend(entries.iter().map(|(p, e)| (p.as_str(), e))),
            Body::Inner(children) => children.iter().flatten().for_each(|c| c.collect_refs(out)),
        }
    }

    fn child(&self, d: usize) -> Option<&Arc<Node>> {
        match &self.body {
            Body::Leaf(_) => None,
            Body::Inner(children) => children[d].as_ref(),
        }
    }

    /// The JSON this node is stored as.
    fn to_json(&self) -> Bytes {
        let json = match &self.body {
            Body::Leaf(entries) => serde_json::to_vec(&LeafOut {
                format: CHUNK_FORMAT,
                leaf: entries,
            }),
            Body::Inner(children) => serde_json::to_vec(&InnerOut {
                format: CHUNK_FORMAT,
                inner: children
                    .iter()
                    .enumerate()
                    .filter_map(|(d, c)| c.as_ref().map(|c| (DIGITS[d], c.id.as_str())))
                    .collect(),
            }),
        };
        Bytes::from(json.expect("a node always serializes"))
    }
}

/// The chunks made while building or changing a tree, by id (not all end up in the tree: a
/// subtree made and then merged into a leaf is dropped).
#[derive(Default)]
struct Made(HashMap<String, Bytes>);

impl Made {
    fn keep(&mut self, (node, json): (Arc<Node>, Bytes)) -> Arc<Node> {
        self.0.insert(node.id.clone(), json);
        node
    }
}

/// `items` sorted by digest → the canonical subtree at `depth`.
fn build(
    depth: usize,
    items: &[(Digest, String, FileEntry)],
    made: &mut Made,
) -> Option<Arc<Node>> {
    if items.is_empty() {
        return None;
    }
    let weight = items.iter().map(|(_, p, e)| entry_weight(p, e)).sum();
    if fits_leaf(items.len(), weight, depth) {
        let entries = items
            .iter()
            .map(|(_, p, e)| (p.clone(), e.clone()))
            .collect();
        return Some(made.keep(Node::leaf(entries)));
    }
    let mut children: Box<[Option<Arc<Node>>; TREE_FANOUT]> = Box::default();
    let mut start = 0;
    while start < items.len() {
        let d = digit(&items[start].0, depth);
        let end = start + items[start..].partition_point(|(k, _, _)| digit(k, depth) == d);
        children[d] = build(depth + 1, &items[start..end], made);
        start = end;
    }
    Some(made.keep(Node::inner(children)))
}

fn sorted_items(entries: BTreeMap<String, FileEntry>) -> Vec<(Digest, String, FileEntry)> {
    let mut items: Vec<_> = entries
        .into_iter()
        .map(|(p, e)| (digest(&p), p, e))
        .collect();
    items.sort_unstable_by_key(|a| a.0);
    items
}

/// A change: the path's new entry, or `None` to remove it.
type Change<'a> = (Digest, &'a str, Option<&'a FileEntry>);

/// `node` (at `depth`) with `changes` (sorted by digest, all under this node's prefix).
fn update(
    node: Option<&Arc<Node>>,
    depth: usize,
    changes: &[Change<'_>],
    made: &mut Made,
) -> Option<Arc<Node>> {
    if changes.is_empty() {
        return node.cloned();
    }
    let rebuilt = match node.map(|n| (n, &n.body)) {
        Some((n, Body::Inner(children))) => {
            let mut next = children.clone();
            let mut start = 0;
            while start < changes.len() {
                let d = digit(&changes[start].0, depth);
                let end = start + changes[start..].partition_point(|c| digit(&c.0, depth) == d);
                next[d] = update(children[d].as_ref(), depth + 1, &changes[start..end], made);
                start = end;
            }
            let (len, weight) = next
                .iter()
                .flatten()
                .fold((0, 0), |(l, w), c| (l + c.len, w + c.weight));
            if len == 0 {
                return None;
            }
            if fits_leaf(len, weight, depth) {
                // Shrunk back under the bound: the subtree merges into one leaf.
                let mut entries = BTreeMap::new();
                next.iter()
                    .flatten()
                    .for_each(|c| c.collect_into(&mut entries));
                made.keep(Node::leaf(entries))
            } else if next
                .iter()
                .zip(children.iter())
                .all(|(a, b)| a.as_ref().map(|n| &n.id) == b.as_ref().map(|n| &n.id))
            {
                return Some(Arc::clone(n));
            } else {
                made.keep(Node::inner(next))
            }
        }
        leaf => {
            let mut entries = match leaf {
                Some((_, Body::Leaf(entries))) => entries.clone(),
                _ => BTreeMap::new(),
            };
            for (_, path, entry) in changes {
                match entry {
                    Some(e) => entries.insert(path.to_string(), (*e).clone()),
                    None => entries.remove(*path),
                };
            }
            build(depth, &sorted_items(entries), made)?
        }
    };
    match node {
        Some(old) if old.id == rebuilt.id => Some(Arc::clone(old)),
        _ => Some(rebuilt),
    }
}

/// The nodes of `new` not in `old` at the same place, with their JSON from `made`.
fn new_chunks(
    new: Option<&Arc<Node>>,
    old: Option<&Arc<Node>>,
    made: &mut Made,
    out: &mut Vec<(String, Bytes)>,
) {
    let Some(new) = new else { return };
    if old.is_some_and(|o| o.id == new.id) {
        return;
    }
    let json = made.0.remove(&new.id).unwrap_or_else(|| new.to_json());
    out.push((new.id.clone(), json));
    if let Body::Inner(children) = &new.body {
        for (d, child) in children.iter().enumerate() {
            new_chunks(child.as_ref(), old.and_then(|o| o.child(d)), made, out);
        }
    }
}

/// The files of one site version: a persistent hash trie of shared, immutable nodes.
/// Cloning is cheap (one `Arc`).
#[derive(Clone, Default)]
pub struct FileTree {
    root: Option<Arc<Node>>,
}

/// A changed tree and the chunks it needs that the tree it came from did not have.
pub struct TreeUpdate {
    pub tree: FileTree,
    /// `(id, JSON)`, top node first.
    pub new_chunks: Vec<(String, Bytes)>,
}

impl FileTree {
    /// The id of the top node (`None` for a version with no files).
    pub fn root_id(&self) -> Option<&str> {
        self.root.as_ref().map(|n| n.id.as_str())
    }

    pub fn len(&self) -> usize {
        self.root.as_ref().map_or(0, |n| n.len)
    }

    pub fn is_empty(&self) -> bool {
        self.root.is_none()
    }

    /// How many files are HTML pages ([`is_page`]), without a walk.
    pub fn pages(&self) -> usize {
        self.root.as_ref().map_or(0, |n| n.pages)
    }

    /// The entry at `path`.
    pub fn get(&self, path: &str) -> Option<&FileEntry> {
        let d = digest(path);
        let mut node = self.root.as_ref()?;
        let mut depth = 0;
        loop {
            match &node.body {
                Body::Leaf(entries) => return entries.get(path),
                Body::Inner(children) => {
                    node = children[digit(&d, depth)].as_ref()?;
                    depth += 1;
                }
            }
        }
    }

    pub fn contains_key(&self, path: &str) -> bool {
        self.get(path).is_some()
    }

    /// Every `(path, entry)`, in hash order (not path order).
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            stack: self.root.iter().map(Arc::as_ref).collect(),
            leaf: None,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.iter().map(|(p, _)| p)
    }

    pub fn values(&self) -> impl Iterator<Item = &FileEntry> {
        self.iter().map(|(_, e)| e)
    }

    /// The ids of every node, each once (a node never sits at two places of one tree).
    pub fn chunk_ids(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut stack: Vec<&Node> = self.root.iter().map(Arc::as_ref).collect();
        while let Some(node) = stack.pop() {
            out.push(node.id.as_str());
            if let Body::Inner(children) = &node.body {
                stack.extend(children.iter().flatten().map(Arc::as_ref));
            }
        }
        out
    }

    /// Calls `f` for every node id, and for the entries of every leaf, skipping the subtree
    /// of a node for which `enter` returns false (one already seen, when walking several
    /// versions that share nodes).
    pub fn walk<'a>(
        &'a self,
        enter: &mut dyn FnMut(&'a str) -> bool,
        entry: &mut dyn FnMut(&'a str, &'a FileEntry),
    ) {
        let mut stack: Vec<&Node> = self.root.iter().map(Arc::as_ref).collect();
        while let Some(node) = stack.pop() {
            if !enter(&node.id) {
                continue;
            }
            match &node.body {
                Body::Leaf(entries) => entries.iter().for_each(|(p, e)| entry(p, e)),
                Body::Inner(children) => stack.extend(children.iter().flatten().map(Arc::as_ref)),
            }
        }
    }

    /// Every chunk of the tree with its JSON (to store a tree built in memory whole).
    pub fn all_chunks(&self) -> Vec<(String, Bytes)> {
        let mut out = Vec::new();
        new_chunks(self.root.as_ref(), None, &mut Made::default(), &mut out);
        out
    }

    /// This tree with `changes` applied (a path's new entry, or `None` to remove it; a
    /// later change of a path wins), and the chunks made for it. Costs as much as the
    /// changes and the depth, not as much as the tree.
    pub fn apply<I>(&self, changes: I) -> TreeUpdate
    where
        I: IntoIterator<Item = (String, Option<FileEntry>)>,
    {
        let changes: BTreeMap<String, Option<FileEntry>> = changes.into_iter().collect();
        let mut sorted: Vec<Change<'_>> = changes
            .iter()
            .map(|(p, e)| (digest(p), p.as_str(), e.as_ref()))
            .collect();
        sorted.sort_unstable_by_key(|a| a.0);
        let mut made = Made::default();
        let root = update(self.root.as_ref(), 0, &sorted, &mut made);
        let mut new_chunks_out = Vec::new();
        new_chunks(
            root.as_ref(),
            self.root.as_ref(),
            &mut made,
            &mut new_chunks_out,
        );
        TreeUpdate {
            tree: FileTree { root },
            new_chunks: new_chunks_out,
        }
    }

    /// What changed from `old` to `new`, each list in path order. Walks only the subtrees
    /// whose ids differ.
    pub fn diff(old: &FileTree, new: &FileTree) -> Delta {
        let mut sets = DeltaSets::default();
        diff_nodes(old.root.as_ref(), new.root.as_ref(), &mut sets);
        Delta {
            added: sets.added.into_iter().collect(),
            changed: sets.changed.into_iter().collect(),
            removed: sets.removed.into_iter().collect(),
            omitted: 0,
        }
    }
}

#[derive(Default)]
struct DeltaSets {
    added: BTreeSet<String>,
    changed: BTreeSet<String>,
    removed: BTreeSet<String>,
}

fn diff_nodes(old: Option<&Arc<Node>>, new: Option<&Arc<Node>>, out: &mut DeltaSets) {
    if old.map(|n| &n.id) == new.map(|n| &n.id) {
        return;
    }
    if let (Some(a), Some(b)) = (old, new) {
        if let (Body::Inner(ca), Body::Inner(cb)) = (&a.body, &b.body) {
            for (a, b) in ca.iter().zip(cb.iter()) {
                diff_nodes(a.as_ref(), b.as_ref(), out);
            }
            return;
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    if let Some(n) = old {
        n.collect_refs(&mut a);
    }
    if let Some(n) = new {
        n.collect_refs(&mut b);
    }
    for (path, entry) in &b {
        match a.get(path) {
            None => out.added.insert(path.to_string()),
            Some(was) if was != entry => out.changed.insert(path.to_string()),
            Some(_) => false,
        };
    }
    for path in a.keys().filter(|p| !b.contains_key(*p)) {
        out.removed.insert(path.to_string());
    }
}

impl FromIterator<(String, FileEntry)> for FileTree {
    /// The canonical tree of a set of files (a later entry for a path wins).
    fn from_iter<I: IntoIterator<Item = (String, FileEntry)>>(iter: I) -> Self {
        let entries: BTreeMap<String, FileEntry> = iter.into_iter().collect();
        let root = build(0, &sorted_items(entries), &mut Made::default());
        FileTree { root }
    }
}

impl PartialEq for FileTree {
    /// Content-addressed: the same files make the same top node.
    fn eq(&self, other: &Self) -> bool {
        self.root_id() == other.root_id()
    }
}

impl Eq for FileTree {}

impl fmt::Debug for FileTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileTree")
            .field("root", &self.root_id())
            .field("len", &self.len())
            .finish()
    }
}

impl std::ops::Index<&str> for FileTree {
    type Output = FileEntry;

    /// The entry at `path`; panics when there is none, like a map's index.
    fn index(&self, path: &str) -> &FileEntry {
        self.get(path)
            .unwrap_or_else(|| panic!("no file at {path:?}"))
    }
}

impl<'a> IntoIterator for &'a FileTree {
    type Item = (&'a String, &'a FileEntry);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The entries of a [`FileTree`], leaf by leaf.
pub struct Iter<'a> {
    stack: Vec<&'a Node>,
    leaf: Option<btree_map::Iter<'a, String, FileEntry>>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a String, &'a FileEntry);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.leaf.as_mut().and_then(Iterator::next) {
                return Some(item);
            }
            let node = self.stack.pop()?;
            match &node.body {
                Body::Leaf(entries) => self.leaf = Some(entries.iter()),
                Body::Inner(children) => {
                    // Reversed, so digit 0 comes off the stack first.
                    self.stack
                        .extend(children.iter().rev().flatten().map(Arc::as_ref));
                }
            }
        }
    }
}

/// Where a tree's chunks are read from: this node's object store, or a peer's.
pub trait ChunkSource: Sync {
    /// The bytes of chunk `id` of `site`, at most [`CHUNK_BYTES_MAX`] and hashing to `id`.
    fn chunk<'a>(
        &'a self,
        site: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Bytes, PublishError>>;
}

/// Loads the tree whose top node is `root` from `source`, reusing every node of `base`
/// that has the same id at the same place (read once and checked already), so loading a
/// version one edit away from `base` reads only the chunks of that edit.
pub async fn load(
    source: &dyn ChunkSource,
    site: &str,
    root: Option<&str>,
    base: Option<&FileTree>,
) -> Result<FileTree, PublishError> {
    let Some(root) = root else {
        return Ok(FileTree::default());
    };
    let gets = tokio::sync::Semaphore::new(CHUNK_GETS_CONCURRENT_MAX);
    let base = base.and_then(|b| b.root.clone());
    let ctx = LoadContext {
        source,
        site,
        gets: &gets,
        seen: std::sync::Mutex::default(),
    };
    let node = ctx.node(root.to_string(), Vec::new(), base).await?;
    Ok(FileTree { root: Some(node) })
}

struct LoadContext<'a> {
    source: &'a dyn ChunkSource,
    site: &'a str,
    gets: &'a tokio::sync::Semaphore,
    /// Ids read so far. A node sits at one place only (its leaves' paths fix where), so an
    /// id met twice is damage, and refusing it keeps a hostile store from making a few
    /// chunks that name each other over and over into an exponential number of reads.
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl<'a> LoadContext<'a> {
    /// The node `id` at the place whose digits are `prefix`.
    fn node(
        &'a self,
        id: String,
        prefix: Vec<u8>,
        base: Option<Arc<Node>>,
    ) -> BoxFuture<'a, Result<Arc<Node>, PublishError>> {
        Box::pin(async move {
            if let Some(base) = base.as_ref().filter(|b| b.id == id) {
                return Ok(Arc::clone(base));
            }
            let corrupt = |reason: String| PublishError::Corrupt {
                path: format!("sites/{}/chunks/{id}.json", self.site),
                reason,
            };
            let depth = prefix.len();
            if depth > TREE_DEPTH_MAX {
                return Err(corrupt(format!("the tree is deeper than {TREE_DEPTH_MAX}")));
            }
            let first = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id.clone());
            if !first {
                return Err(corrupt(
                    "the chunk appears at two places in the tree".into(),
                ));
            }
            let bytes = {
                let _slot = self
                    .gets
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                self.source.chunk(self.site, &id).await?
            };
            // The source checks these; a chunk is used only if they hold.
            if bytes.len() > CHUNK_BYTES_MAX {
                return Err(corrupt(format!(
                    "{} bytes, over {CHUNK_BYTES_MAX}",
                    bytes.len()
                )));
            }
            let actual = content_hash(&bytes);
            if actual != id {
                return Err(corrupt(format!("bytes hash to {actual}")));
            }
            match parse_chunk(&bytes, &prefix).map_err(corrupt)? {
                Parsed::Leaf(entries) => Ok(Arc::new(Node::leaf_from(id, entries))),
                Parsed::Inner(ids) => {
                    let loads = ids.into_iter().enumerate().filter_map(|(d, child)| {
                        let child = child?;
                        let mut at = prefix.clone();
                        at.push(d as u8);
                        let base_child = base.as_ref().and_then(|b| b.child(d)).cloned();
                        Some(async move {
                            Ok::<_, PublishError>((d, self.node(child, at, base_child).await?))
                        })
                    });
                    let loaded = futures::future::try_join_all(loads).await?;
                    let mut children: Box<[Option<Arc<Node>>; TREE_FANOUT]> = Box::default();
                    for (d, child) in loaded {
                        children[d] = Some(child);
                    }
                    Ok(Arc::new(Node::inner_from(id, children)))
                }
            }
        })
    }
}

enum Parsed {
    Leaf(BTreeMap<String, FileEntry>),
    Inner(Vec<Option<String>>),
}

/// Decodes a chunk found at the place whose digits are `prefix`, and checks it: the
/// format, one kind of body, ids and hashes that are blake3 hex, a bounded leaf whose
/// paths all hash to `prefix`, an inner node with children and digits left to split on.
fn parse_chunk(bytes: &[u8], prefix: &[u8]) -> Result<Parsed, String> {
    let chunk: ChunkIn =
        serde_json::from_slice(bytes).map_err(|e| format!("decoding JSON: {e}"))?;
    if chunk.format != CHUNK_FORMAT {
        return Err(format!(
            "unknown chunk format {}, this build reads format {CHUNK_FORMAT}",
            chunk.format
        ));
    }
    match (chunk.leaf, chunk.inner) {
        (Some(entries), None) => {
            if entries.is_empty() || entries.len() > LEAF_ENTRIES_MAX {
                return Err(format!(
                    "a leaf of {} entries (1 to {LEAF_ENTRIES_MAX})",
                    entries.len()
                ));
            }
            for (path, entry) in &entries {
                if !path.starts_with('/') {
                    return Err(format!("path {path:?} does not start with '/'"));
                }
                if !is_hash(&entry.hash) {
                    return Err(format!("{path}: hash {:?} is not blake3 hex", entry.hash));
                }
                let d = digest(path);
                if prefix
                    .iter()
                    .enumerate()
                    .any(|(depth, want)| digit(&d, depth) != usize::from(*want))
                {
                    return Err(format!("path {path:?} does not belong at this place"));
                }
            }
            Ok(Parsed::Leaf(entries))
        }
        (None, Some(children)) => {
            if prefix.len() >= TREE_DEPTH_MAX {
                return Err(format!("an inner node below depth {TREE_DEPTH_MAX}"));
            }
            if children.is_empty() {
                return Err("an inner node without children".into());
            }
            let mut ids = vec![None; TREE_FANOUT];
            for (key, id) in children {
                let Some(d) = DIGITS.iter().position(|digit| *digit == key) else {
                    return Err(format!("child key {key:?} is not a hex digit"));
                };
                if !is_hash(&id) {
                    return Err(format!("child {key}: {id:?} is not a chunk id"));
                }
                ids[d] = Some(id);
            }
            Ok(Parsed::Inner(ids))
        }
        _ => Err("a chunk is either a leaf or an inner node".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn entry(content: &str) -> FileEntry {
        FileEntry {
            hash: content_hash(content.as_bytes()),
            content_type: "text/html; charset=utf-8".into(),
            size: content.len() as u64,
        }
    }

    fn site(pages: usize) -> Vec<(String, FileEntry)> {
        (0..pages)
            .map(|i| (format!("/profiles/user-{i}"), entry(&format!("page {i}"))))
            .collect()
    }

    /// Chunks in memory, counting reads.
    #[derive(Default)]
    struct Memory {
        chunks: std::sync::Mutex<HashMap<String, Bytes>>,
        reads: AtomicUsize,
    }

    impl Memory {
        fn put(&self, chunks: Vec<(String, Bytes)>) {
            self.chunks.lock().unwrap().extend(chunks);
        }
    }

    impl ChunkSource for Memory {
        fn chunk<'a>(
            &'a self,
            site: &'a str,
            id: &'a str,
        ) -> BoxFuture<'a, Result<Bytes, PublishError>> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let found = self.chunks.lock().unwrap().get(id).cloned();
            Box::pin(async move {
                // As a store would: other reads go on meanwhile.
                tokio::task::yield_now().await;
                found.ok_or_else(|| PublishError::NotFound {
                    path: format!("sites/{site}/chunks/{id}.json"),
                })
            })
        }
    }

    /// Whether every path of a leaf's JSON hashes to first digit 0 (then it belongs under 0).
    fn leaf_under_0(leaf: &[u8]) -> bool {
        let chunk: ChunkIn = serde_json::from_slice(leaf).unwrap();
        chunk
            .leaf
            .unwrap()
            .keys()
            .all(|p| digit(&digest(p), 0) == 0)
    }

    fn depth(tree: &FileTree) -> usize {
        fn node_depth(n: &Node) -> usize {
            match &n.body {
                Body::Leaf(_) => 1,
                Body::Inner(c) => 1 + c.iter().flatten().map(|c| node_depth(c)).max().unwrap_or(0),
            }
        }
        tree.root.as_deref().map_or(0, node_depth)
    }

    #[test]
    fn same_files_same_ids_whatever_the_order() {
        let files = site(2_000);
        let forward: FileTree = files.iter().cloned().collect();
        let backward: FileTree = files.iter().rev().cloned().collect();
        assert_eq!(forward.root_id(), backward.root_id());
        let mut a = forward.chunk_ids();
        let mut b = backward.chunk_ids();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        assert!(a.len() > 16, "2,000 files make a tree, not one leaf");

        // Built by edits in another order, with detours (added, changed, removed again),
        // the tree ends up the same.
        let mut edited = FileTree::default();
        for (i, (path, e)) in files.iter().enumerate().rev() {
            edited = edited
                .apply([
                    (path.clone(), Some(entry("draft"))),
                    (format!("/tmp/{i}"), Some(entry("tmp"))),
                ])
                .tree;
            edited = edited.apply([(path.clone(), Some(e.clone()))]).tree;
        }
        assert_ne!(edited.root_id(), forward.root_id());
        edited = edited
            .apply((0..files.len()).map(|i| (format!("/tmp/{i}"), None)))
            .tree;
        assert_eq!(edited.root_id(), forward.root_id());
        assert_eq!(edited.len(), 2_000);
        assert_eq!(edited.get("/profiles/user-7"), Some(&files[7].1));
        assert_eq!(edited.get("/profiles/user-2000"), None);
        assert_eq!(edited.iter().count(), 2_000);
        assert_eq!(edited.pages(), 2_000);
        let with_404 = edited.apply([
            (NOT_FOUND_PATH.to_string(), Some(entry("404"))),
            (
                "/style.css".to_string(),
                Some(FileEntry {
                    content_type: "text/css".into(),
                    ..entry("css")
                }),
            ),
            ("/profiles/user-1".to_string(), None),
        ]);
        assert_eq!((with_404.tree.len(), with_404.tree.pages()), (2_001, 1_999));
    }

    /// One page edited on a site of `pages` pages: how many chunks and bytes are written.
    fn one_edit(pages: usize) -> (usize, usize, usize) {
        let tree: FileTree = site(pages).into_iter().collect();
        let update = tree.apply([("/profiles/user-42".to_string(), Some(entry("edited")))]);
        assert_eq!(update.tree.len(), pages);
        assert_eq!(update.tree.get("/profiles/user-42"), Some(&entry("edited")));
        assert_eq!(
            FileTree::diff(&tree, &update.tree).changed,
            ["/profiles/user-42"]
        );
        let bytes = update.new_chunks.iter().map(|(_, b)| b.len()).sum();
        (update.new_chunks.len(), bytes, depth(&update.tree))
    }

    #[test]
    fn one_page_edit_is_flat_in_the_size_of_the_site() {
        for pages in [10_000, 100_000] {
            let (chunks, bytes, depth) = one_edit(pages);
            eprintln!(
                "{pages} pages: one edit writes {chunks} chunks, {bytes} bytes (depth {depth})"
            );
            // The leaf and each inner node above it, nothing else.
            assert!(
                (2..=depth).contains(&chunks),
                "{pages} pages: {chunks} chunks"
            );
            assert!(depth <= 5, "{pages} pages: depth {depth}");
            // A leaf is at most about LEAF_BYTES_MAX, an inner node about 1.2 KB.
            assert!(
                bytes <= LEAF_BYTES_MAX + 4 * 1_300,
                "{pages} pages: {bytes} bytes"
            );
        }
        // The whole tree of 10k pages is about 1.4 MB: one edit writes under 2 % of it.
        let whole: usize = site(10_000)
            .into_iter()
            .collect::<FileTree>()
            .all_chunks()
            .iter()
            .map(|(_, b)| b.len())
            .sum();
        let (_, bytes, _) = one_edit(10_000);
        assert!(bytes * 50 < whole, "{bytes} of {whole}");
    }

    #[test]
    fn leaves_split_when_they_grow_and_merge_when_they_shrink() {
        let files = site(LEAF_ENTRIES_MAX);
        let full: FileTree = files.iter().cloned().collect();
        assert_eq!(depth(&full), 1, "{LEAF_ENTRIES_MAX} entries fit one leaf");
        assert_eq!(full.chunk_ids().len(), 1);

        let grown = full.apply([("/one-more".to_string(), Some(entry("x")))]);
        assert_eq!(depth(&grown.tree), 2, "one more splits the leaf");
        assert_eq!(grown.tree.len(), LEAF_ENTRIES_MAX + 1);
        assert_eq!(
            grown.new_chunks.len(),
            grown.tree.chunk_ids().len(),
            "every node of the split tree is new"
        );
        assert!(grown.tree.get("/one-more").is_some());
        assert_eq!(grown.tree.get(&files[3].0), Some(&files[3].1));

        let shrunk = grown.tree.apply([("/one-more".to_string(), None)]);
        assert_eq!(depth(&shrunk.tree), 1, "back under the bound, merged");
        assert_eq!(shrunk.tree.root_id(), full.root_id());
        assert_eq!(shrunk.new_chunks.len(), 1);

        // The byte bound splits too: a few entries with long paths.
        let long: FileTree = (0..8)
            .map(|i| (format!("/{}{i}", "x".repeat(3_000)), entry("x")))
            .collect();
        assert!(
            depth(&long) > 1,
            "8 entries of 3 KB do not fit {LEAF_BYTES_MAX} bytes"
        );

        let empty = full.apply(files.iter().map(|(p, _)| (p.clone(), None)));
        assert!(empty.tree.is_empty());
        assert!(empty.new_chunks.is_empty());
    }

    #[test]
    fn diff_matches_a_diff_of_the_whole_maps() {
        let old: FileTree = site(3_000).into_iter().collect();
        let new = old
            .apply(
                (0..3_000)
                    .step_by(7)
                    .map(|i| (format!("/profiles/user-{i}"), None))
                    .chain((0..3_000).step_by(11).map(|i| {
                        (
                            format!("/profiles/user-{i}"),
                            Some(entry(&format!("v2 {i}"))),
                        )
                    }))
                    .chain((0..50).map(|i| (format!("/new/{i}"), Some(entry("n"))))),
            )
            .tree;
        let a: BTreeMap<&String, &FileEntry> = old.iter().collect();
        let b: BTreeMap<&String, &FileEntry> = new.iter().collect();
        let delta = FileTree::diff(&old, &new);
        let added: Vec<&String> = b.keys().filter(|p| !a.contains_key(*p)).copied().collect();
        let removed: Vec<&String> = a.keys().filter(|p| !b.contains_key(*p)).copied().collect();
        let changed: Vec<&String> = b
            .iter()
            .filter(|(p, e)| a.get(*p).is_some_and(|o| o != *e))
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(delta.added.iter().collect::<Vec<_>>(), added);
        assert_eq!(delta.removed.iter().collect::<Vec<_>>(), removed);
        assert_eq!(delta.changed.iter().collect::<Vec<_>>(), changed);
        assert!(!added.is_empty() && !removed.is_empty() && !changed.is_empty());
        assert!(FileTree::diff(&new, &new).is_empty());
    }

    #[tokio::test]
    async fn loading_reads_only_what_the_base_lacks() {
        let memory = Memory::default();
        let v1: FileTree = site(10_000).into_iter().collect();
        memory.put(v1.all_chunks());
        let loaded = load(&memory, "demo", v1.root_id(), None).await.unwrap();
        assert_eq!(loaded, v1);
        assert_eq!(loaded.len(), 10_000);
        assert_eq!(
            memory.reads.swap(0, Ordering::Relaxed),
            v1.chunk_ids().len()
        );

        let v2 = v1.apply([("/profiles/user-9".to_string(), Some(entry("v2")))]);
        let written = v2.new_chunks.len();
        memory.put(v2.new_chunks);
        let loaded2 = load(&memory, "demo", v2.tree.root_id(), Some(&loaded))
            .await
            .unwrap();
        assert_eq!(loaded2, v2.tree);
        assert_eq!(loaded2.get("/profiles/user-9"), Some(&entry("v2")));
        assert_eq!(
            memory.reads.load(Ordering::Relaxed),
            written,
            "only the new chunks are read"
        );
        assert_eq!(load(&memory, "demo", None, None).await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn damaged_chunks_are_refused() {
        let tree: FileTree = site(500).into_iter().collect();
        let chunks = tree.all_chunks();
        let (leaf_id, leaf) = chunks
            .iter()
            .find(|(_, b)| b.starts_with(br#"{"format":2,"leaf""#))
            .cloned()
            .unwrap();

        // Bytes that do not hash to their id.
        let memory = Memory::default();
        memory.put(chunks.clone());
        let mut bad = leaf.to_vec();
        bad[20] ^= 1;
        memory.put(vec![(leaf_id.clone(), Bytes::from(bad))]);
        let e = load(&memory, "demo", tree.root_id(), None)
            .await
            .unwrap_err();
        assert!(matches!(e, PublishError::Corrupt { .. }), "{e}");

        // A missing chunk.
        let memory = Memory::default();
        memory.put(
            chunks
                .iter()
                .filter(|(id, _)| *id != leaf_id)
                .cloned()
                .collect(),
        );
        let e = load(&memory, "demo", tree.root_id(), None)
            .await
            .unwrap_err();
        assert!(matches!(e, PublishError::NotFound { .. }), "{e}");

        // A well-hashed leaf whose paths belong elsewhere in the tree, put at the top.
        let memory = Memory::default();
        memory.put(chunks.clone());
        let e = load(&memory, "demo", Some(&leaf_id), None).await;
        assert!(e.is_ok(), "a leaf alone at the top is a valid (small) tree");
        let inner = format!(r#"{{"format":2,"inner":{{"0":"{leaf_id}","1":"{leaf_id}"}}}}"#);
        let inner_id = content_hash(inner.as_bytes());
        memory.put(vec![(inner_id.clone(), Bytes::from(inner))]);
        let e = load(&memory, "demo", Some(&inner_id), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not belong") || e.contains("two places"),
            "{e}"
        );
        // The first leaf in order is under digit 0; under f it does not belong.
        assert!(leaf_under_0(&leaf));
        let misplaced = format!(r#"{{"format":2,"inner":{{"f":"{leaf_id}"}}}}"#);
        let misplaced_id = content_hash(misplaced.as_bytes());
        memory.put(vec![(misplaced_id.clone(), Bytes::from(misplaced))]);
        let e = load(&memory, "demo", Some(&misplaced_id), None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");

        // Chunks naming one another 16 times over at every level (16^64 places from 64
        // objects) are refused at once, not walked.
        let bomb = Memory::default();
        bomb.put(vec![(leaf_id.clone(), leaf.clone())]);
        let mut id = leaf_id.clone();
        for _ in 0..TREE_DEPTH_MAX {
            let children: Vec<String> = DIGITS.iter().map(|d| format!(r#""{d}":"{id}""#)).collect();
            let json = format!(r#"{{"format":2,"inner":{{{}}}}}"#, children.join(","));
            id = content_hash(json.as_bytes());
            bomb.put(vec![(id.clone(), Bytes::from(json))]);
        }
        let e = load(&bomb, "demo", Some(&id), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("two places") || e.contains("does not belong"),
            "{e}"
        );
        let reads = bomb.reads.load(Ordering::Relaxed);
        assert!(reads <= TREE_DEPTH_MAX * TREE_FANOUT, "{reads} reads");

        // Too large, and a chain deeper than a hash has digits.
        let huge = Bytes::from(vec![b' '; CHUNK_BYTES_MAX + 1]);
        let huge_id = content_hash(&huge);
        memory.put(vec![(huge_id.clone(), huge)]);
        let e = load(&memory, "demo", Some(&huge_id), None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("over"), "{e}");
        let mut id = leaf_id.clone();
        for _ in 0..=TREE_DEPTH_MAX {
            let json = format!(r#"{{"format":2,"inner":{{"0":"{id}"}}}}"#);
            id = content_hash(json.as_bytes());
            memory.put(vec![(id.clone(), Bytes::from(json))]);
        }
        let e = load(&memory, "demo", Some(&id), None).await.unwrap_err();
        assert!(e.to_string().contains("below depth"), "{e}");
        // Neither a leaf nor an inner node, and an unknown format.
        for json in [
            r#"{"format":2}"#.to_string(),
            format!(r#"{{"format":3,"inner":{{"0":"{leaf_id}"}}}}"#),
            format!(r#"{{"format":2,"inner":{{"g":"{leaf_id}"}}}}"#),
        ] {
            let id = content_hash(json.as_bytes());
            memory.put(vec![(id.clone(), Bytes::from(json.clone()))]);
            assert!(
                load(&memory, "demo", Some(&id), None).await.is_err(),
                "{json}"
            );
        }
    }
}
