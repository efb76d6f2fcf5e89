//! The per-site projection engine: which pages exist, which must be rendered again after a
//! change, and the manifest of the resulting site version.
//!
//! The node calls [`SiteProjector::render_all`] once (first run, restart, rebuild) and then
//! [`SiteProjector::render_changes`] with the keys each batch of commits wrote. A projection:
//!
//! 1. reloads the changed parts of the site description (templates, routes, assets) and
//!    updates the *claims*: which page or asset wants which URL path;
//! 2. marks *dirty* every path whose claims changed and every page whose recorded reads
//!    (see `deps.rs`) include a changed key;
//! 3. re-renders the dirty pages (in parallel), reloads the dirty assets, and regenerates the
//!    sitemap if the set of HTML pages changed;
//! 4. applies the files it changed to the previous version's file tree (`tree.rs`): only the
//!    chunks on the changed paths are new, and the delta is what it changed.
//!
//! A page or asset that fails keeps its last good file; the error is reported. Pages that never
//! rendered are left out. When two claims want one path, a fixed precedence decides (a route
//! without `{key}`, then an asset, then a page per tuple, then the 404 page) and the conflict is
//! reported.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use sesame_proto::Tuple;

use crate::config::{threads_or_cores, Config, Renderer};
use crate::deps::{DepIndex, PageDeps};
use crate::error::{ProjectError, TemplateError};
use crate::includes::{literal_collections, template_refs, TemplateRefs};
use crate::manifest::{content_hash, Delta, FileEntry, Manifest, MANIFEST_FORMAT};
use crate::paths::{
    self, is_sitemap_path, template_kind, NOT_FOUND_PATH, NOT_FOUND_TEMPLATE, ROBOTS_PATH,
};
use crate::render::{
    self, AssetIndex, BatchInputs, PageJob, PageOutcome, Preloaded, ServedAsset, TemplateSet,
};
use crate::site::{self, Route, ASSETS, ROUTES, TEMPLATES};
use crate::sitemap;
use crate::source::{get_checked, list_checked, Source, SourceError};
use crate::tree::FileTree;

/// Most templates one site may have.
pub const TEMPLATES_MAX: usize = 10_000;
/// Most routes one site may have.
pub const ROUTES_MAX: usize = 1_000;
/// Most assets one site may have. A full render holds them all in memory at once (the
/// `Source` lists whole tuples), so this also bounds that memory: at most 1 MiB each.
pub const ASSETS_MAX: usize = 10_000;
/// Most distinct errors one projection reports (a broken layout fails every page the same way).
pub const ERRORS_REPORTED_MAX: usize = 100;
/// A batch of at least this many pages first loads the collections templates name into memory.
pub const PRELOAD_PAGES_MIN: usize = 64;
/// Most tuples preloaded from one collection named in templates; larger ones are read on demand.
pub const PRELOAD_TUPLES_MAX: usize = 100_000;
/// Most collections named in templates that are preloaded.
pub const PRELOAD_COLLECTIONS_MAX: usize = 32;

/// A key written since the last projection (put or delete; the projector reads the outcome).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangedKey {
    pub collection: String,
    pub key: String,
}

impl ChangedKey {
    pub fn new(collection: impl Into<String>, key: impl Into<String>) -> Self {
        ChangedKey {
            collection: collection.into(),
            key: key.into(),
        }
    }
}

/// The result of one projection.
#[derive(Debug, Clone)]
pub struct Projection {
    /// The site version. When `changed` is false this is the current manifest, unchanged
    /// (its `index` is the one it was made at). Shared with the projector, which keeps it.
    pub manifest: Arc<Manifest>,
    /// `manifest.id()`.
    pub manifest_id: String,
    /// `manifest.to_json()`, made once: what the id hashes and what is stored. Empty when
    /// `changed` is false (nothing to publish).
    pub manifest_json: Bytes,
    /// Blobs this version references that the previous one did not have at the same path:
    /// `(hash, bytes)`. Publish them before the manifest.
    pub new_blobs: Vec<(String, Bytes)>,
    /// Chunks of this version's file tree that the previous one did not have: `(id, JSON)`,
    /// only those on the paths that changed. Publish them after the blobs, before the
    /// manifest.
    pub new_chunks: Vec<(String, Bytes)>,
    /// Page renders attempted (successful or not).
    pub pages_rendered: u64,
    /// Problems found in this projection, deduplicated, at most [`ERRORS_REPORTED_MAX`].
    pub errors: Vec<TemplateError>,
    /// Whether any file differs from the previous manifest (false: nothing to publish).
    pub changed: bool,
}

/// Who wants a path. The derived order is the precedence: the first claim wins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Claim {
    /// A route without `{key}`: the site author named this exact path.
    Route { pattern: String },
    /// An asset: a user's key must not take over the site's files.
    Asset { key: String },
    /// One page of a route with `{key}`, for one tuple.
    Each { pattern: String, key: String },
    /// `/404.html`, rendered from `_templates/404.html`.
    NotFound,
}

impl Claim {
    fn is_page(&self) -> bool {
        !matches!(self, Claim::Asset { .. })
    }

    /// The tuple (or template) behind the claim, for error reports.
    fn source(&self) -> String {
        match self {
            Claim::Route { pattern } | Claim::Each { pattern, .. } => format!("{ROUTES}/{pattern}"),
            Claim::Asset { key } => format!("{ASSETS}/{key}"),
            Claim::NotFound => NOT_FOUND_TEMPLATE.to_string(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Claim::Route { pattern } => format!("route {pattern}"),
            Claim::Asset { key } => format!("asset {key}"),
            Claim::Each { pattern, key } => format!("route {pattern} for key {key:?}"),
            Claim::NotFound => format!("template {NOT_FOUND_TEMPLATE}"),
        }
    }
}

/// Every path's claims, with counts for the site limits.
#[derive(Debug, Default)]
struct Claims {
    by_path: BTreeMap<String, BTreeSet<Claim>>,
    /// Every asset claim, key → path: where `asset_url()` looks (see [`Claims::served_assets`]).
    asset_paths: BTreeMap<String, String>,
    pages: usize,
    assets: usize,
}

impl Claims {
    fn owner(&self, path: &str) -> Option<&Claim> {
        self.by_path.get(path).and_then(|claims| claims.first())
    }

    fn add(&mut self, path: &str, claim: Claim) {
        let is_page = claim.is_page();
        if let Claim::Asset { key } = &claim {
            self.asset_paths.insert(key.clone(), path.to_string());
        }
        if self
            .by_path
            .entry(path.to_string())
            .or_default()
            .insert(claim)
        {
            if is_page {
                self.pages += 1;
            } else {
                self.assets += 1;
            }
        }
    }

    fn remove(&mut self, path: &str, claim: &Claim) {
        let Some(claims) = self.by_path.get_mut(path) else {
            return;
        };
        if let Claim::Asset { key } = claim {
            self.asset_paths.remove(key);
        }
        if claims.remove(claim) {
            if claim.is_page() {
                self.pages -= 1;
            } else {
                self.assets -= 1;
            }
        }
        if claims.is_empty() {
            self.by_path.remove(path);
        }
    }

    /// The assets `files` serves: those that own their path and have a file there, with
    /// the hash of that file (what a request for the path gets).
    fn served_assets(&self, files: &BTreeMap<String, FileEntry>) -> AssetIndex {
        self.asset_paths
            .iter()
            .filter(|(key, path)| {
                matches!(self.owner(path), Some(Claim::Asset { key: owner }) if owner == *key)
            })
            .filter_map(|(key, path)| {
                let file = files.get(path)?;
                let served = ServedAsset {
                    path: path.clone(),
                    hash: file.hash.clone(),
                };
                Some((key.clone(), served))
            })
            .collect()
    }
}

/// What a reported problem is about; a later projection clears it when it is resolved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Subject {
    /// A page failed to render.
    Page(String),
    /// Two claims want one path.
    Conflict(String),
    Template(String),
    Route(String),
    /// One key of a route with `each` gives no usable path.
    RouteKey(String, String),
    Asset(String),
    /// A site limit was hit (the collection or "pages").
    Limit(String),
}

/// Problems currently standing, and those raised during the running projection.
#[derive(Debug, Default)]
struct Problems {
    standing: BTreeMap<Subject, TemplateError>,
    raised: Vec<TemplateError>,
}

impl Problems {
    fn report(&mut self, subject: Subject, error: TemplateError) {
        tracing::debug!(%error, "site problem");
        self.raised.push(error.clone());
        self.standing.insert(subject, error);
    }

    fn clear(&mut self, subject: &Subject) {
        self.standing.remove(subject);
    }
}

/// Deduplicates errors by `(template, line, message)` (keeping the first page named) and caps
/// the list at [`ERRORS_REPORTED_MAX`].
fn distinct(errors: impl IntoIterator<Item = TemplateError>) -> Vec<TemplateError> {
    let mut seen = HashSet::new();
    errors
        .into_iter()
        .filter(|e| seen.insert((e.template.clone(), e.line, e.message.clone())))
        .take(ERRORS_REPORTED_MAX)
        .collect()
}

#[derive(Debug, Clone)]
struct Template {
    source: String,
    refs: TemplateRefs,
}

#[derive(Debug, Clone)]
struct RouteState {
    route: Route,
    /// Keys of `each` that currently have a claim.
    keys: BTreeSet<String>,
}

/// What the current file at a path was made from, and what it read.
#[derive(Debug)]
struct PathState {
    owner: Claim,
    deps: PageDeps,
}

/// Scratch state of one projection.
#[derive(Default)]
struct Run {
    /// Paths to resolve: claims changed, or a dependency changed.
    dirty: BTreeSet<String>,
    /// Asset tuples already read (by a full render's listing), by key.
    assets: HashMap<String, Tuple>,
    blobs: Vec<(String, Bytes)>,
    blob_hashes: HashSet<String>,
    pages_rendered: u64,
    /// An HTML page appeared or disappeared: the sitemap must be regenerated.
    html_set_changed: bool,
}

/// Projects one site: its pages, their dependencies and its current manifest.
pub struct SiteProjector {
    site: String,
    config: Config,
    templates: BTreeMap<String, Template>,
    /// `templates` as the renderers take them; `None` after a template changed.
    template_set: Option<Arc<TemplateSet>>,
    routes: BTreeMap<String, RouteState>,
    claims: Claims,
    /// For every path with a file made by this projector (not adopted).
    states: HashMap<String, PathState>,
    deps: DepIndex,
    /// The files of the site version being built; the last good version of each path.
    /// Between projections they equal the files of `current`.
    files: BTreeMap<String, FileEntry>,
    /// The entries `files` had before the running projection touched them: the delta is
    /// computed from it, and a failed projection is rolled back with it.
    undo: BTreeMap<String, Option<FileEntry>>,
    problems: Problems,
    /// The latest manifest and its id.
    current: Option<(String, Arc<Manifest>)>,
    /// Whether the state above matches the site at the last projection. False after `new`,
    /// `adopt` or an error: the next projection then renders everything.
    ready: bool,
    /// Told each new file's hash and bytes as a projection makes it (see [`BlobSink`]).
    blob_sink: Option<BlobSink>,
}

/// Receives each new file (hash, bytes) the moment a projection makes it, so that writing
/// files to the store overlaps the rest of the projection instead of following it. The
/// projection's [`Projection::new_blobs`] still lists every file the version needs: a sink
/// only lets them be written early (a file made and then replaced within one projection
/// may reach the sink and not the version; garbage collection removes it later).
pub type BlobSink = Box<dyn FnMut(&str, &Bytes) + Send>;

impl SiteProjector {
    pub fn new(site: &str, mut config: Config) -> Self {
        config.sitemap_urls_max = config.sitemap_urls_max.max(1);
        SiteProjector {
            site: site.to_string(),
            config,
            templates: BTreeMap::new(),
            template_set: None,
            routes: BTreeMap::new(),
            claims: Claims::default(),
            states: HashMap::new(),
            deps: DepIndex::default(),
            files: BTreeMap::new(),
            undo: BTreeMap::new(),
            problems: Problems::default(),
            current: None,
            ready: false,
            blob_sink: None,
        }
    }

    /// Sets (or with `None`, removes) the sink new files go to as they are made.
    pub fn stream_blobs(&mut self, sink: Option<BlobSink>) {
        self.blob_sink = sink;
    }

    /// Starts from a manifest published earlier (after a restart or a rollback): its files
    /// become the last good versions, so unchanged files keep their hashes and the next
    /// manifest's delta holds only real differences. The next projection renders everything.
    pub fn adopt(&mut self, manifest: Manifest) {
        self.files = manifest
            .files
            .iter()
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        self.undo.clear();
        self.current = Some((manifest.id(), Arc::new(manifest)));
        self.states.clear();
        self.ready = false;
    }

    /// The id of the latest manifest (what a root names), if any.
    pub fn manifest_id(&self) -> Option<&str> {
        self.current.as_ref().map(|(id, _)| id.as_str())
    }

    /// The latest manifest, if any projection ran or one was adopted.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.current.as_ref().map(|(_, m)| m.as_ref())
    }

    /// Problems standing now (failing pages, bad routes, conflicts), deduplicated: what site
    /// status shows as `last_error`. Empty when the site is healthy.
    pub fn errors(&self) -> Vec<TemplateError> {
        distinct(self.problems.standing.values().cloned())
    }

    /// Everything, from scratch. Files of the previous (or adopted) version stay as the last
    /// good version of pages that fail now.
    pub fn render_all(&mut self, src: &dyn Source, index: u64) -> Result<Projection, ProjectError> {
        let result = self.render_all_inner(src, index);
        self.settle(result)
    }

    /// Only what `changes` touched: `changes` are the keys written since the last projection,
    /// up to `index`, and `src` reads the site at `index`. Renders everything instead if the
    /// projector has no current state (after `new`, `adopt` or an error).
    pub fn render_changes(
        &mut self,
        src: &dyn Source,
        index: u64,
        changes: &[ChangedKey],
    ) -> Result<Projection, ProjectError> {
        let result = if self.ready {
            self.render_changes_inner(src, index, changes)
        } else {
            self.render_all_inner(src, index)
        };
        self.settle(result)
    }

    /// After a projection: on failure, puts the files back as they were (so they match the
    /// current manifest again) and forgets the rest, so the next projection starts over.
    fn settle(
        &mut self,
        result: Result<Projection, ProjectError>,
    ) -> Result<Projection, ProjectError> {
        let undo = std::mem::take(&mut self.undo);
        self.ready = result.is_ok();
        if result.is_err() {
            for (path, entry) in undo {
                match entry {
                    Some(entry) => self.files.insert(path, entry),
                    None => self.files.remove(&path),
                };
            }
            self.problems.raised.clear();
        }
        result
    }

    fn render_all_inner(
        &mut self,
        src: &dyn Source,
        index: u64,
    ) -> Result<Projection, ProjectError> {
        self.templates.clear();
        self.template_set = None;
        self.routes.clear();
        self.claims = Claims::default();
        self.states.clear();
        self.deps = DepIndex::default();
        self.problems = Problems::default();
        let mut run = Run::default();
        let mut preloaded = Preloaded::default();

        for tuple in self.list_site_collection(src, TEMPLATES, TEMPLATES_MAX)? {
            self.load_template(&tuple.key, Some(&tuple), &mut run);
        }
        for tuple in self.list_site_collection(src, ROUTES, ROUTES_MAX)? {
            self.load_route(src, &tuple.key, Some(&tuple), &mut preloaded, &mut run)?;
        }
        for tuple in self.list_site_collection(src, ASSETS, ASSETS_MAX)? {
            self.load_asset(&tuple.key, true, &mut run);
            run.assets.insert(tuple.key.clone(), tuple);
        }
        // Everything claimed, everything published before (so stale files go), and the
        // generated robots.txt.
        run.dirty.extend(self.claims.by_path.keys().cloned());
        run.dirty
            .extend(self.files.keys().filter(|p| !is_sitemap_path(p)).cloned());
        run.dirty.insert(ROBOTS_PATH.to_string());
        self.resolve(src, &mut run, preloaded)?;
        self.refresh_sitemaps(&mut run, true);
        Ok(self.finish(index, run))
    }

    fn render_changes_inner(
        &mut self,
        src: &dyn Source,
        index: u64,
        changes: &[ChangedKey],
    ) -> Result<Projection, ProjectError> {
        let mut run = Run::default();
        let mut preloaded = Preloaded::default();
        let changes: BTreeSet<(&str, &str)> = changes
            .iter()
            .map(|c| (c.collection.as_str(), c.key.as_str()))
            .collect();
        // Pages whose last render read a changed key. Looked up before anything is reloaded:
        // the index describes the renders that produced the current files.
        for (collection, key) in &changes {
            self.deps.affected(collection, key, &mut run.dirty);
        }
        for &(collection, key) in &changes {
            match collection {
                TEMPLATES => {
                    let tuple = get_checked(src, collection, key)?;
                    self.load_template(key, tuple.as_ref(), &mut run);
                }
                ROUTES => {
                    let tuple = get_checked(src, collection, key)?;
                    self.load_route(src, key, tuple.as_ref(), &mut preloaded, &mut run)?;
                }
                ASSETS => {
                    let exists = get_checked(src, collection, key)?.is_some();
                    self.load_asset(key, exists, &mut run);
                }
                _ => self.data_changed(src, collection, key, &mut run)?,
            }
        }
        self.resolve(src, &mut run, preloaded)?;
        self.refresh_sitemaps(&mut run, false);
        Ok(self.finish(index, run))
    }

    /// Lists a `_` collection whole, reporting (not failing) when it is over its limit.
    fn list_site_collection(
        &mut self,
        src: &dyn Source,
        collection: &str,
        max: usize,
    ) -> Result<Vec<Tuple>, SourceError> {
        let mut tuples = list_checked(src, collection, "", max + 1)?;
        if tuples.len() > max {
            tuples.truncate(max);
            self.problems.report(
                Subject::Limit(collection.to_string()),
                TemplateError::new(
                    collection,
                    format!(
                        "the site has more than {max} tuples in {collection}; the rest are ignored"
                    ),
                ),
            );
        }
        Ok(tuples)
    }

    /// Loads (or, with `tuple` absent, drops) one template. Pages using it are already dirty
    /// through their dependency on `_templates/<name>`.
    fn load_template(&mut self, name: &str, tuple: Option<&Tuple>, run: &mut Run) {
        self.problems.clear(&Subject::Template(name.to_string()));
        self.templates.remove(name);
        self.template_set = None;
        if let Some(tuple) = tuple {
            match site::template_source(name, &tuple.value) {
                Ok(_) if self.templates.len() >= TEMPLATES_MAX => self.problems.report(
                    Subject::Template(name.to_string()),
                    TemplateError::new(
                        name,
                        format!("the site has {TEMPLATES_MAX} templates already, the limit"),
                    ),
                ),
                Ok(source) => {
                    let refs = template_refs(&source);
                    self.templates
                        .insert(name.to_string(), Template { source, refs });
                }
                Err(message) => self.problems.report(
                    Subject::Template(name.to_string()),
                    TemplateError::new(name, message),
                ),
            }
        }
        if name == NOT_FOUND_TEMPLATE {
            if self.templates.contains_key(name) {
                self.add_claim(NOT_FOUND_PATH, Claim::NotFound, run);
            } else {
                self.remove_claim(NOT_FOUND_PATH, &Claim::NotFound, run);
            }
        }
    }

    /// Loads (or drops) one route and its claims. A route with `each` lists its collection
    /// into `preloaded`, where the page renders then find their tuples.
    fn load_route(
        &mut self,
        src: &dyn Source,
        pattern: &str,
        tuple: Option<&Tuple>,
        preloaded: &mut Preloaded,
        run: &mut Run,
    ) -> Result<(), SourceError> {
        if let Some(old) = self.routes.remove(pattern) {
            match &old.route.each {
                None => {
                    if let Ok(path) = old.route.path_for(None) {
                        self.remove_claim(
                            &path,
                            &Claim::Route {
                                pattern: pattern.to_string(),
                            },
                            run,
                        );
                    }
                }
                Some(_) => {
                    for key in &old.keys {
                        let path = old
                            .route
                            .path_for(Some(key))
                            .expect("claimed keys have valid paths");
                        let claim = Claim::Each {
                            pattern: pattern.to_string(),
                            key: key.clone(),
                        };
                        self.remove_claim(&path, &claim, run);
                    }
                }
            }
        }
        self.problems.standing.retain(|subject, _| match subject {
            Subject::Route(p) | Subject::RouteKey(p, _) => p != pattern,
            _ => true,
        });
        let Some(tuple) = tuple else { return Ok(()) };
        let source = format!("{ROUTES}/{pattern}");
        if self.routes.len() >= ROUTES_MAX {
            let error = TemplateError::new(
                source,
                format!("the site has {ROUTES_MAX} routes already, the limit"),
            );
            self.problems
                .report(Subject::Route(pattern.to_string()), error);
            return Ok(());
        }
        let route = match Route::parse(pattern, &tuple.value) {
            Ok(route) => route,
            Err(message) => {
                self.problems.report(
                    Subject::Route(pattern.to_string()),
                    TemplateError::new(source, message),
                );
                return Ok(());
            }
        };
        let mut state = RouteState {
            route,
            keys: BTreeSet::new(),
        };
        match state.route.each.clone() {
            None => match state.route.path_for(None) {
                Ok(path) => self.add_claim(
                    &path,
                    Claim::Route {
                        pattern: pattern.to_string(),
                    },
                    run,
                ),
                Err(message) => self.problems.report(
                    Subject::Route(pattern.to_string()),
                    TemplateError::new(source, message),
                ),
            },
            Some(collection) => {
                preloaded.load(src, &collection, self.config.pages_max)?;
                for t in preloaded.tuples(&collection) {
                    self.add_each_page(&mut state, &t.key, run);
                }
            }
        }
        self.routes.insert(pattern.to_string(), state);
        Ok(())
    }

    /// A data tuple changed: pages of routes over its collection may appear or disappear.
    fn data_changed(
        &mut self,
        src: &dyn Source,
        collection: &str,
        key: &str,
        run: &mut Run,
    ) -> Result<(), SourceError> {
        let patterns: Vec<String> = self
            .routes
            .iter()
            .filter(|(_, r)| r.route.each.as_deref() == Some(collection))
            .map(|(p, _)| p.clone())
            .collect();
        if patterns.is_empty() {
            return Ok(());
        }
        let exists = get_checked(src, collection, key)?.is_some();
        for pattern in patterns {
            let mut state = self
                .routes
                .remove(&pattern)
                .expect("pattern was just listed");
            let has_page = state.keys.contains(key);
            if exists && !has_page {
                self.add_each_page(&mut state, key, run);
            } else if !exists {
                self.problems
                    .clear(&Subject::RouteKey(pattern.clone(), key.to_string()));
                if has_page {
                    let path = state
                        .route
                        .path_for(Some(key))
                        .expect("claimed keys have valid paths");
                    let claim = Claim::Each {
                        pattern: pattern.clone(),
                        key: key.to_string(),
                    };
                    self.remove_claim(&path, &claim, run);
                    state.keys.remove(key);
                }
            }
            self.routes.insert(pattern, state);
        }
        Ok(())
    }

    fn add_each_page(&mut self, state: &mut RouteState, key: &str, run: &mut Run) {
        let pattern = state.route.pattern.clone();
        let subject = Subject::RouteKey(pattern.clone(), key.to_string());
        let path = match state.route.path_for(Some(key)) {
            Ok(path) => path,
            Err(message) => {
                let error = TemplateError::new(
                    format!("{ROUTES}/{pattern}"),
                    format!("key {key:?}: {message}"),
                );
                self.problems.report(subject, error);
                return;
            }
        };
        if self.claims.pages >= self.config.pages_max {
            let error = TemplateError::new(
                format!("{ROUTES}/{pattern}"),
                format!(
                    "the site has {} pages, the limit; no page for key {key:?}",
                    self.config.pages_max
                ),
            );
            self.problems.report(subject, error);
            return;
        }
        self.add_claim(
            &path,
            Claim::Each {
                pattern,
                key: key.to_string(),
            },
            run,
        );
        state.keys.insert(key.to_string());
    }

    /// An asset was written or deleted: its path must be resolved again.
    fn load_asset(&mut self, key: &str, exists: bool, run: &mut Run) {
        let subject = Subject::Asset(key.to_string());
        self.problems.clear(&subject);
        let path = match site::asset_path(key) {
            Ok(path) => path,
            Err(message) => {
                if exists {
                    self.problems.report(
                        subject,
                        TemplateError::new(format!("{ASSETS}/{key}"), message),
                    );
                }
                return;
            }
        };
        let claim = Claim::Asset {
            key: key.to_string(),
        };
        let claimed = self
            .claims
            .by_path
            .get(&path)
            .is_some_and(|c| c.contains(&claim));
        if exists && !claimed && self.claims.assets >= ASSETS_MAX {
            let error = TemplateError::new(
                format!("{ASSETS}/{key}"),
                format!("the site has {ASSETS_MAX} assets already, the limit"),
            );
            self.problems.report(subject, error);
        } else if exists {
            self.add_claim(&path, claim, run);
        } else {
            self.remove_claim(&path, &claim, run);
        }
        run.dirty.insert(path);
    }

    fn add_claim(&mut self, path: &str, claim: Claim, run: &mut Run) {
        self.claims.add(path, claim);
        run.dirty.insert(path.to_string());
    }

    fn remove_claim(&mut self, path: &str, claim: &Claim, run: &mut Run) {
        self.claims.remove(path, claim);
        run.dirty.insert(path.to_string());
    }

    /// Brings every dirty path up to date: removes it, reloads its asset, or renders its page.
    fn resolve(
        &mut self,
        src: &dyn Source,
        run: &mut Run,
        mut preloaded: Preloaded,
    ) -> Result<(), ProjectError> {
        let dirty = std::mem::take(&mut run.dirty);
        if dirty.len() >= PRELOAD_PAGES_MIN {
            self.preload(src, &mut preloaded)?;
        }
        let mut jobs = Vec::new();
        let mut owners = Vec::new();
        for path in dirty {
            self.update_conflict(&path);
            let owner = self.claims.owner(&path).cloned();
            // A file made for another owner is no fallback for this one.
            if let Some(state) = self.states.get(&path) {
                if Some(&state.owner) != owner.as_ref() {
                    self.forget(&path, run);
                }
            }
            match owner {
                None if path == ROBOTS_PATH => {
                    let body = sitemap::robots(self.config.base_url());
                    self.set_file(&path, paths::TEXT, Bytes::from(body), run);
                }
                None => self.forget(&path, run),
                Some(Claim::Asset { key }) => self.resolve_asset(src, &path, &key, run)?,
                Some(owner) => {
                    if let Some(job) = self.page_job(src, &path, &owner, &preloaded, run)? {
                        jobs.push(job);
                        owners.push(owner);
                    }
                }
            }
        }
        if jobs.is_empty() {
            return Ok(());
        }
        // Every dirty asset was resolved above, so this is what the new version serves.
        let inputs = BatchInputs {
            site: self.site.clone(),
            base_url: self.config.base_url().to_string(),
            templates: self.template_set(),
            page_bytes_max: self.config.page_bytes_max,
            assets: Arc::new(self.claims.served_assets(&self.files)),
        };
        let preloaded = Arc::new(preloaded);
        let jobs: Arc<[PageJob]> = jobs.into();
        let renderer = self.config.renderer.clone();
        let mut template_deps: HashMap<String, PageDeps> = HashMap::new();
        let mut owners = owners.into_iter();
        let mut done = 0;
        // Pages are taken in as they finish (in job order), while later ones still render.
        let mut take = |outcome: PageOutcome| {
            let job = &jobs[done];
            done += 1;
            let owner = owners.next().expect("an owner for every job");
            self.take_page(job, owner, outcome, &mut template_deps, run);
        };
        match &renderer {
            Renderer::Threads(threads) => {
                let outcomes = render::render_batch(
                    src,
                    &inputs,
                    &jobs,
                    preloaded,
                    threads_or_cores(*threads),
                )?;
                outcomes.into_iter().for_each(&mut take);
            }
            Renderer::Pool(pool) => {
                pool.render_each(src, &inputs, Arc::clone(&jobs), preloaded, &mut take)?
            }
        }
        Ok(())
    }

    /// Takes in one rendered page: its dependencies, its state and its file.
    fn take_page(
        &mut self,
        job: &PageJob,
        owner: Claim,
        outcome: PageOutcome,
        template_deps: &mut HashMap<String, PageDeps>,
        run: &mut Run,
    ) {
        run.pages_rendered += 1;
        let mut deps = outcome.deps;
        deps.merge(
            template_deps
                .entry(job.template.clone())
                .or_insert_with(|| self.template_closure(&job.template))
                .clone(),
        );
        match &owner {
            Claim::Route { pattern } => deps.add_key(ROUTES, pattern),
            Claim::Each { pattern, key } => {
                deps.add_key(ROUTES, pattern);
                let each = self.routes[pattern]
                    .route
                    .each
                    .as_deref()
                    .expect("an Each claim has a route with each");
                deps.add_key(each, key);
            }
            Claim::NotFound | Claim::Asset { .. } => {}
        }
        match self.states.get_mut(&job.path) {
            // A page read what it read last time (a layout edit re-renders every page with
            // the same reads): the index already says so.
            Some(state) if state.deps == deps => state.owner = owner,
            _ => {
                if let Some(old) = self.states.remove(&job.path) {
                    self.deps.remove(&job.path, &old.deps);
                }
                self.deps.insert(&job.path, &deps);
                self.states
                    .insert(job.path.clone(), PathState { owner, deps });
            }
        }
        let subject = Subject::Page(job.path.clone());
        match outcome.result {
            Ok(rendered) => {
                self.problems.clear(&subject);
                let content_type = template_kind(&job.template).content_type;
                self.set_file_hashed(&job.path, content_type, rendered.body, rendered.hash, run);
            }
            // The last good file stays.
            Err(error) => self.problems.report(subject, error),
        }
    }

    /// Loads the collections templates name, so a large batch reads memory, not the store.
    fn preload(&self, src: &dyn Source, preloaded: &mut Preloaded) -> Result<(), SourceError> {
        for state in self.routes.values() {
            if let Some(collection) = &state.route.each {
                preloaded.load(src, collection, self.config.pages_max)?;
            }
        }
        let named: BTreeSet<String> = self
            .templates
            .values()
            .flat_map(|t| literal_collections(&t.source))
            .filter(|c| sesame_proto::validate_collection(c).is_ok())
            .collect();
        for collection in named.iter().take(PRELOAD_COLLECTIONS_MAX) {
            preloaded.load(src, collection, PRELOAD_TUPLES_MAX)?;
        }
        Ok(())
    }

    /// Records or clears the conflict report for a path.
    fn update_conflict(&mut self, path: &str) {
        let subject = Subject::Conflict(path.to_string());
        match self.claims.by_path.get(path) {
            Some(claims) if claims.len() > 1 => {
                let mut claims = claims.iter();
                let winner = claims.next().expect("more than one claim");
                for loser in claims {
                    let error = TemplateError::new(
                        loser.source(),
                        format!(
                            "{path} is also claimed by {}, which takes precedence over {}",
                            winner.describe(),
                            loser.describe()
                        ),
                    );
                    self.problems.report(subject.clone(), error);
                }
            }
            _ => self.problems.clear(&subject),
        }
    }

    fn resolve_asset(
        &mut self,
        src: &dyn Source,
        path: &str,
        key: &str,
        run: &mut Run,
    ) -> Result<(), SourceError> {
        let tuple = match run.assets.remove(key) {
            Some(tuple) => Some(tuple),
            None => get_checked(src, ASSETS, key)?,
        };
        let Some(tuple) = tuple else {
            // Claims come from the same view of the store, so this means the `Source` is not
            // one consistent snapshot. Drop the file rather than publish a guess.
            debug_assert!(false, "asset {key} is claimed but absent");
            self.drop_vanished(
                path,
                &Claim::Asset {
                    key: key.to_string(),
                },
                run,
            );
            return Ok(());
        };
        self.states.insert(
            path.to_string(),
            PathState {
                owner: Claim::Asset {
                    key: key.to_string(),
                },
                deps: PageDeps::default(),
            },
        );
        let subject = Subject::Asset(key.to_string());
        match site::asset(key, path, &tuple.value) {
            Ok(asset) => {
                self.problems.clear(&subject);
                self.set_file(path, &asset.content_type, asset.body, run);
            }
            Err(message) => self.problems.report(
                subject,
                TemplateError::new(format!("{ASSETS}/{key}"), message),
            ),
        }
        Ok(())
    }

    /// The render job for a page claim, or `None` if its tuple is gone.
    fn page_job(
        &mut self,
        src: &dyn Source,
        path: &str,
        owner: &Claim,
        preloaded: &Preloaded,
        run: &mut Run,
    ) -> Result<Option<PageJob>, SourceError> {
        let job = match owner {
            Claim::Route { pattern } => {
                let route = &self.routes[pattern].route;
                PageJob {
                    path: path.to_string(),
                    template: route.template.clone(),
                    key: None,
                    tuple: None,
                    canonical: template_kind(&route.template).content_type == paths::HTML,
                }
            }
            Claim::Each { pattern, key } => {
                let route = &self.routes[pattern].route;
                let each = route
                    .each
                    .as_deref()
                    .expect("an Each claim has a route with each");
                let tuple = match preloaded.get(each, key) {
                    Some(answer) => answer,
                    None => get_checked(src, each, key)?,
                };
                let Some(tuple) = tuple else {
                    // As for assets: only a `Source` that is not one snapshot gets here.
                    debug_assert!(false, "page {path} is claimed but {each}/{key} is absent");
                    self.drop_vanished(path, owner, run);
                    return Ok(None);
                };
                PageJob {
                    path: path.to_string(),
                    template: route.template.clone(),
                    key: Some(key.clone()),
                    tuple: Some(tuple),
                    canonical: template_kind(&route.template).content_type == paths::HTML,
                }
            }
            Claim::NotFound => PageJob {
                path: path.to_string(),
                template: NOT_FOUND_TEMPLATE.to_string(),
                key: None,
                tuple: None,
                canonical: false,
            },
            Claim::Asset { .. } => unreachable!("assets are not rendered"),
        };
        Ok(Some(job))
    }

    /// The site's templates as one set, made once per change of templates.
    fn template_set(&mut self) -> Arc<TemplateSet> {
        let templates = &self.templates;
        let config = &self.config;
        Arc::clone(self.template_set.get_or_insert_with(|| {
            let sources = templates
                .iter()
                .map(|(name, t)| (name.clone(), t.source.clone()))
                .collect();
            Arc::new(TemplateSet::new(
                sources,
                config.fuel_per_page,
                config.recursion_depth_max,
            ))
        }))
    }

    /// Dependencies on the page's template and everything it loads, found in the template
    /// sources (see `includes.rs`). A template that is missing is still a dependency:
    /// creating it changes the page.
    fn template_closure(&self, root: &str) -> PageDeps {
        let mut deps = PageDeps::default();
        let mut seen = BTreeSet::new();
        let mut pending = vec![root.to_string()];
        while let Some(name) = pending.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            deps.add_key(TEMPLATES, &name);
            let Some(template) = self.templates.get(&name) else {
                continue;
            };
            if template.refs.dynamic {
                // A computed name can load any template, now or after a later change.
                deps.add_prefix(TEMPLATES, "", None);
            }
            pending.extend(template.refs.names.iter().cloned());
        }
        deps
    }

    /// Drops a claim whose tuple turned out to be absent, and the path's file.
    fn drop_vanished(&mut self, path: &str, claim: &Claim, run: &mut Run) {
        if let Claim::Each { pattern, key } = claim {
            if let Some(state) = self.routes.get_mut(pattern) {
                state.keys.remove(key);
            }
        }
        self.claims.remove(path, claim);
        self.forget(path, run);
    }

    /// Removes a path's file, state and page problem.
    fn forget(&mut self, path: &str, run: &mut Run) {
        if let Some(state) = self.states.remove(path) {
            self.deps.remove(path, &state.deps);
        }
        self.problems.clear(&Subject::Page(path.to_string()));
        self.remove_file(path, run);
    }

    fn remove_file(&mut self, path: &str, run: &mut Run) {
        if let Some(old) = self.files.remove(path) {
            if old.content_type == paths::HTML {
                run.html_set_changed = true;
            }
            self.undo.entry(path.to_string()).or_insert(Some(old));
        }
    }

    fn set_file(&mut self, path: &str, content_type: &str, body: Bytes, run: &mut Run) {
        let hash = content_hash(&body);
        self.set_file_hashed(path, content_type, body, hash, run);
    }

    fn set_file_hashed(
        &mut self,
        path: &str,
        content_type: &str,
        body: Bytes,
        hash: String,
        run: &mut Run,
    ) {
        let entry = FileEntry {
            hash,
            content_type: content_type.to_string(),
            size: body.len() as u64,
        };
        let old = self.files.get(path);
        if old == Some(&entry) {
            return;
        }
        let was_html = old.is_some_and(|e| e.content_type == paths::HTML);
        if was_html != (content_type == paths::HTML) {
            run.html_set_changed = true;
        }
        if old.is_none_or(|e| e.hash != entry.hash) && run.blob_hashes.insert(entry.hash.clone()) {
            if let Some(sink) = &mut self.blob_sink {
                sink(&entry.hash, &body);
            }
            run.blobs.push((entry.hash.clone(), body));
        }
        if let Some(old) = self.files.insert(path.to_string(), entry) {
            self.undo.entry(path.to_string()).or_insert(Some(old));
        } else {
            self.undo.entry(path.to_string()).or_insert(None);
        }
    }

    /// Regenerates the sitemap files when HTML pages appeared or disappeared (or `force`).
    fn refresh_sitemaps(&mut self, run: &mut Run, force: bool) {
        if !force && !run.html_set_changed {
            return;
        }
        let pages: Vec<&str> = self
            .files
            .iter()
            .filter(|(path, entry)| entry.content_type == paths::HTML && *path != NOT_FOUND_PATH)
            .map(|(path, _)| path.as_str())
            .collect();
        let generated =
            sitemap::sitemaps(self.config.base_url(), &pages, self.config.sitemap_urls_max);
        let keep: BTreeSet<&str> = generated.iter().map(|(p, _)| p.as_str()).collect();
        let stale: Vec<String> = self
            .files
            .keys()
            .filter(|p| is_sitemap_path(p) && !keep.contains(p.as_str()))
            .cloned()
            .collect();
        for path in stale {
            self.remove_file(&path, run);
        }
        for (path, body) in generated {
            self.set_file(&path, paths::XML, Bytes::from(body), run);
        }
    }

    /// Makes the new manifest from the files this projection touched.
    fn finish(&mut self, index: u64, run: Run) -> Projection {
        let errors = distinct(std::mem::take(&mut self.problems.raised));
        // Every path whose entry changed is in `undo` with its entry from before, so the
        // delta costs as much as the change, not as much as the site.
        let mut delta = Delta::default();
        for (path, old) in std::mem::take(&mut self.undo) {
            match (old, self.files.get(&path)) {
                (None, Some(_)) => delta.added.push(path),
                (Some(old), Some(new)) if old != *new => delta.changed.push(path),
                (Some(_), None) => delta.removed.push(path),
                _ => {}
            }
        }
        if let Some((id, manifest)) = self.current.as_ref().filter(|_| delta.is_empty()) {
            return Projection {
                manifest: Arc::clone(manifest),
                manifest_id: id.clone(),
                manifest_json: Bytes::new(),
                new_blobs: Vec::new(),
                new_chunks: Vec::new(),
                pages_rendered: run.pages_rendered,
                errors,
                changed: false,
            };
        }
        // A blob made and then replaced within this projection is not needed.
        let referenced: HashSet<&str> = delta
            .added
            .iter()
            .chain(&delta.changed)
            .map(|path| self.files[path].hash.as_str())
            .collect();
        let new_blobs = run
            .blobs
            .into_iter()
            .filter(|(hash, _)| referenced.contains(hash.as_str()))
            .collect();
        let previous = self
            .current
            .as_ref()
            .map_or_else(FileTree::default, |(_, m)| m.files.clone());
        let update = previous.apply(
            delta
                .added
                .iter()
                .chain(&delta.changed)
                .map(|path| (path.clone(), Some(self.files[path].clone())))
                .chain(delta.removed.iter().map(|path| (path.clone(), None))),
        );
        debug_assert_eq!(
            delta,
            FileTree::diff(&previous, &update.tree),
            "the undo log must account for every change"
        );
        debug_assert_eq!(update.tree.len(), self.files.len());
        let manifest = Arc::new(Manifest {
            format: MANIFEST_FORMAT,
            site: self.site.clone(),
            index,
            previous: self.current.as_ref().map(|(id, _)| id.clone()),
            files: update.tree,
            delta: delta.bounded(),
        });
        let manifest_json = Bytes::from(manifest.to_json());
        let id = content_hash(&manifest_json);
        self.current = Some((id.clone(), Arc::clone(&manifest)));
        Projection {
            manifest,
            manifest_id: id,
            manifest_json,
            new_blobs,
            new_chunks: update.new_chunks,
            pages_rendered: run.pages_rendered,
            errors,
            changed: true,
        }
    }
}
