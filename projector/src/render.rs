//! Rendering pages with minijinja: the template environment, the `get`/`list` functions that
//! record what a page read, `asset_url` (an asset's URL named by its content), the sandbox
//! limits minijinja enforces (fuel, recursion, output size), canonical links, and a renderer
//! on threads of this process.
//!
//! [`render_page`] is the one page renderer. Two runners call it:
//! - [`crate::sandbox::RenderPool`], worker processes that bound each page's memory and
//!   time as well (fuel does not bound what a filter allocates, nor the time one takes). The
//!   node always renders there.
//! - [`render_batch`] here, on scoped threads of the calling process: for library users,
//!   tests and examples, where templates are trusted.
//!
//! How reads reach the store. Template functions must be `'static + Send + Sync`, but the
//! node's [`Source`] is a borrowed SQLite view that is not even `Sync`. So the calling thread
//! stays the only one touching the `Source`: a render reads a collection from a [`Preloaded`]
//! in-memory copy when the batch holds the whole collection, and otherwise asks the calling
//! thread, which answers from the `Source`. Full renders preload the collections that
//! matter, so they rarely take that path; small incremental renders take it for every read.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{context, AutoEscape, Environment, ErrorKind};
use sesame_proto::{validate_collection, validate_key, Tuple};

use crate::deps::PageDeps;
use crate::error::{ProjectError, TemplateError};
use crate::manifest::content_hash;
use crate::paths::{template_kind, Escape};
use crate::site::{asset_path, ASSETS};
use crate::sitemap::xml_escape;
use crate::source::{get_checked, list_checked, MemorySource, Source, SourceError};
use crate::view::tuple_value;

/// `list()` returns this many tuples when the template gives no `limit`.
pub const LIST_LIMIT_DEFAULT: usize = 100;
/// Largest `limit` a template may pass to `list()`.
pub const LIST_LIMIT_MAX: usize = 10_000;
/// Most `get`/`list` calls one page render may make.
pub const READS_PER_PAGE_MAX: usize = 10_000;
/// Most tuples one page render may read, over all its calls. Fuel does not count the
/// tuples a single `list()` returns, so this bounds memory and time per page separately.
pub const TUPLES_READ_PER_PAGE_MAX: usize = 100_000;
/// Hex digits of an asset's blake3 hash in the URLs `asset_url()` makes (`?v=<these>`): 64
/// bits, so two versions of one asset never share a URL by chance.
pub const ASSET_VERSION_HEX_LEN: usize = 16;
/// The query parameter `asset_url()` puts an asset's content hash in.
pub const ASSET_VERSION_PARAM: &str = "v";
/// Stack of each render thread, in bytes: minijinja recurses for nested templates and macros
/// (within the recursion limit), and a spawned thread's default stack is only 2 MiB.
pub(crate) const RENDER_STACK_BYTES: usize = 8 << 20;
/// How often the read-serving loop checks that workers are still running, in milliseconds.
/// Workers normally end the loop by dropping their channel ends; this is the safety net.
const SERVE_POLL_MS: u64 = 50;

/// One site's templates at one moment, with the limits they render under. The id names
/// exactly that content (worker processes cache compiled environments by it).
#[derive(Debug)]
pub struct TemplateSet {
    pub id: [u8; 32],
    pub sources: BTreeMap<String, String>,
    pub fuel_per_page: u64,
    pub recursion_depth_max: usize,
}

impl TemplateSet {
    pub fn new(
        sources: BTreeMap<String, String>,
        fuel_per_page: u64,
        recursion_depth_max: usize,
    ) -> TemplateSet {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&fuel_per_page.to_le_bytes());
        hasher.update(&(recursion_depth_max as u64).to_le_bytes());
        for (name, source) in &sources {
            // Lengths first, so no two different sets hash the same bytes.
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(&(source.len() as u64).to_le_bytes());
            hasher.update(source.as_bytes());
        }
        TemplateSet {
            id: *hasher.finalize().as_bytes(),
            sources,
            fuel_per_page,
            recursion_depth_max,
        }
    }
}

/// Finds a template's source by name, for minijinja's loader.
pub(crate) type TemplateLoader =
    dyn Fn(&str) -> Result<Option<String>, minijinja::Error> + Send + Sync + 'static;

/// A template environment with the sandbox limits set, escaping every template it renders
/// as `escape` says: the page's kind decides, not the name of each template it includes (an
/// HTML page that includes `part.txt` still escapes for HTML). Templates are loaded through
/// `loader` on first use and cached by minijinja for the life of the environment.
///
/// The globals are minijinja's defaults less `debug()`, which would print the render's
/// state into a public page; the `safe_url` filter is added.
pub(crate) fn environment(
    loader: Box<TemplateLoader>,
    fuel_per_page: u64,
    recursion_depth_max: usize,
    escape: Escape,
) -> Environment<'static> {
    let mut env = Environment::new();
    env.remove_global("debug");
    env.set_loader(loader);
    env.set_fuel(Some(fuel_per_page));
    env.set_recursion_limit(recursion_depth_max);
    let auto_escape = match escape {
        Escape::Html => AutoEscape::Html,
        Escape::Json => AutoEscape::Json,
        Escape::None => AutoEscape::None,
    };
    env.set_auto_escape_callback(move |_| auto_escape);
    env.set_formatter(format_value);
    // `{{ key|segment }}`: a key as one URL path segment, spelled exactly as page paths,
    // sitemaps and canonical links spell it (`a/b` → `a%2Fb`; `urlencode` keeps the `/`).
    env.add_filter("segment", |s: &str| sesame_proto::encode_segment(s));
    env.add_filter("safe_url", safe_url);
    env
}

/// An environment over an in-memory template set.
pub(crate) fn set_environment(
    templates: &Arc<TemplateSet>,
    escape: Escape,
) -> Environment<'static> {
    let set = Arc::clone(templates);
    environment(
        Box::new(move |name| Ok(set.sources.get(name).cloned())),
        templates.fuel_per_page,
        templates.recursion_depth_max,
        escape,
    )
}

/// The `safe_url` filter: the URL itself when it is relative or its scheme is `http`,
/// `https` or `mailto`; `#` for anything else (`javascript:`, `data:`, `vbscript:`, …) and
/// for values that are not strings. It decides on the URL as a browser would read it, with
/// tabs, newlines, spaces and control characters removed and ASCII case folded, and refuses
/// a character reference (`&…;`) or backslash before the first `/`, `?` or `#`, where one
/// could spell a scheme (`javascript&colon;`). The result is a plain string: autoescape
/// still applies to it.
pub fn safe_url(value: &JValue) -> String {
    const UNSAFE: &str = "#";
    let Some(url) = value.as_str() else {
        return UNSAFE.to_string();
    };
    let folded: String = url
        .chars()
        .filter(|c| !c.is_whitespace() && !c.is_control())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let head_end = folded.find(['/', '?', '#']).unwrap_or(folded.len());
    let head = &folded[..head_end];
    if head.contains(['&', '\\']) {
        return UNSAFE.to_string();
    }
    match head.split_once(':') {
        None => url.trim().to_string(),
        Some(("http" | "https" | "mailto", _)) => url.trim().to_string(),
        Some(_) => UNSAFE.to_string(),
    }
}

/// Writes a value into the output. Strings in HTML are escaped for `& < > " '` only, which is
/// what text and quoted attributes need; minijinja's default also escapes `/`, which turns
/// every URL in a page into `http:&#x2f;&#x2f;…`. Everything else keeps the default.
fn format_value(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &JValue,
) -> Result<(), minijinja::Error> {
    let plain_string = value.kind() == ValueKind::String && !value.is_safe();
    match value.as_str() {
        Some(text) if plain_string && state.auto_escape() == AutoEscape::Html => {
            let mut last = 0;
            for (i, b) in text.bytes().enumerate() {
                let entity = match b {
                    b'&' => "&amp;",
                    b'<' => "&lt;",
                    b'>' => "&gt;",
                    b'"' => "&quot;",
                    b'\'' => "&#39;",
                    _ => continue,
                };
                out.write_str(&text[last..i])
                    .map_err(minijinja::Error::from)?;
                out.write_str(entity).map_err(minijinja::Error::from)?;
                last = i + 1;
            }
            out.write_str(&text[last..]).map_err(minijinja::Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Collections copied into memory for a batch of renders.
#[derive(Debug, Default)]
pub struct Preloaded {
    data: MemorySource,
    /// Loaded collections, and whether each one was loaded whole.
    loaded: HashMap<String, bool>,
}

impl Preloaded {
    /// Copies up to `limit` tuples of `collection` (once; later calls do nothing).
    pub fn load(
        &mut self,
        src: &dyn Source,
        collection: &str,
        limit: usize,
    ) -> Result<(), SourceError> {
        if self.loaded.contains_key(collection) {
            return Ok(());
        }
        let complete = self.data.load_collection(src, collection, limit)?;
        self.loaded.insert(collection.to_string(), complete);
        Ok(())
    }

    /// Whether reads of `collection` can be answered from memory.
    pub(crate) fn is_complete(&self, collection: &str) -> bool {
        self.loaded.get(collection) == Some(&true)
    }

    /// The tuples loaded for `collection`, in key order.
    pub fn tuples(&self, collection: &str) -> Vec<Tuple> {
        self.data
            .list(collection, "", usize::MAX)
            .expect("reading memory cannot fail")
    }

    /// `Some(answer)` when the collection is held whole, `None` when the store must answer.
    pub fn get(&self, collection: &str, key: &str) -> Option<Option<Tuple>> {
        self.is_complete(collection).then(|| {
            self.data
                .get(collection, key)
                .expect("reading memory cannot fail")
        })
    }

    /// Every tuple of `collection`, in key order, when it is held whole.
    pub(crate) fn whole(&self, collection: &str) -> Option<Vec<&Tuple>> {
        self.is_complete(collection)
            .then(|| self.data.collection(collection).collect())
    }

    /// `Some(answer)` when the collection is held whole, `None` when the store must answer.
    pub fn list(&self, collection: &str, prefix: &str, limit: usize) -> Option<Vec<Tuple>> {
        self.is_complete(collection).then(|| {
            self.data
                .list(collection, prefix, limit)
                .expect("reading memory cannot fail")
        })
    }
}

/// A read a renderer asks the thread holding the [`Source`] to answer.
pub(crate) enum ReadRequest {
    Get {
        collection: String,
        key: String,
        reply: mpsc::SyncSender<Result<Option<Tuple>, SourceError>>,
    },
    List {
        collection: String,
        prefix: String,
        limit: usize,
        reply: mpsc::SyncSender<Result<Vec<Tuple>, SourceError>>,
    },
}

impl ReadRequest {
    pub(crate) fn answer(self, src: &dyn Source) {
        // A send fails only if the renderer is gone, which it reports itself.
        match self {
            ReadRequest::Get {
                collection,
                key,
                reply,
            } => {
                let _ = reply.send(get_checked(src, &collection, &key));
            }
            ReadRequest::List {
                collection,
                prefix,
                limit,
                reply,
            } => {
                let _ = reply.send(list_checked(src, &collection, &prefix, limit));
            }
        }
    }
}

/// Where a render's `get`, `list` and `asset_url` calls are answered.
pub(crate) trait PageReader: Send + Sync + 'static {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Tuple>, SourceError>;
    fn list(&self, collection: &str, prefix: &str, limit: usize)
        -> Result<Vec<Tuple>, SourceError>;
    /// The asset `asset_url()` means by `key`, as the site version being made serves it
    /// (see [`AssetIndex::find`]).
    fn asset(&self, key: &str) -> Result<Option<ServedAsset>, SourceError>;
}

/// An asset as the site version being made serves it: where, and the blake3 hash of the
/// bytes served there (the asset's last good file, should its tuple now be broken).
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct ServedAsset {
    pub path: String,
    pub hash: String,
}

/// The assets a site version serves, by key: what `asset_url()` looks up. Only assets that
/// own their path (no route claims it first) and have a file are in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssetIndex {
    by_key: HashMap<String, ServedAsset>,
}

impl AssetIndex {
    /// The asset `asset_url()` means by `key` (its argument without a leading `/`): the
    /// one at `_assets/<key>`, or else at `_assets//<key>`. Both are served at `/<key>`,
    /// and only the one that owns the path is in the index.
    pub fn find(&self, key: &str) -> Option<&ServedAsset> {
        self.by_key
            .get(key)
            .or_else(|| self.by_key.get(&format!("/{key}")))
    }
}

impl FromIterator<(String, ServedAsset)> for AssetIndex {
    fn from_iter<I: IntoIterator<Item = (String, ServedAsset)>>(iter: I) -> AssetIndex {
        AssetIndex {
            by_key: iter.into_iter().collect(),
        }
    }
}

/// A way to the data: memory when the batch holds the collection, else a channel to the
/// thread holding the [`Source`]. Renders on threads read through it directly; the pool reads
/// through it on behalf of its worker processes.
#[derive(Clone)]
pub(crate) struct Reader {
    pub(crate) preloaded: Arc<Preloaded>,
    pub(crate) remote: mpsc::Sender<ReadRequest>,
    pub(crate) assets: Arc<AssetIndex>,
}

impl PageReader for Reader {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Tuple>, SourceError> {
        if let Some(answer) = self.preloaded.get(collection, key) {
            return Ok(answer);
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let request = ReadRequest::Get {
            collection: collection.to_string(),
            key: key.to_string(),
            reply,
        };
        self.remote.send(request).map_err(|_| not_serving())?;
        answer.recv().map_err(|_| not_serving())?
    }

    fn list(
        &self,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Tuple>, SourceError> {
        if let Some(answer) = self.preloaded.list(collection, prefix, limit) {
            return Ok(answer);
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let request = ReadRequest::List {
            collection: collection.to_string(),
            prefix: prefix.to_string(),
            limit,
            reply,
        };
        self.remote.send(request).map_err(|_| not_serving())?;
        answer.recv().map_err(|_| not_serving())?
    }

    fn asset(&self, key: &str) -> Result<Option<ServedAsset>, SourceError> {
        Ok(self.assets.find(key).cloned())
    }
}

pub(crate) fn not_serving() -> SourceError {
    SourceError::new("the projection stopped answering reads")
}

/// What one render read, and how much.
#[derive(Default)]
struct ReadLog {
    deps: PageDeps,
    calls: usize,
    tuples: usize,
    /// The store failed; the projection must stop rather than publish a wrong page.
    source_error: Option<SourceError>,
}

/// Backs the `get` and `list` template functions of one render.
struct PageReads {
    reader: Arc<dyn PageReader>,
    log: Mutex<ReadLog>,
}

impl PageReads {
    fn log(&self) -> std::sync::MutexGuard<'_, ReadLog> {
        // Nothing panics while holding the lock; if something did, the log is still usable.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a call against the per-page budget.
    fn begin(&self, collection: &str) -> Result<(), minijinja::Error> {
        validate_collection(collection).map_err(|e| invalid(e.to_string()))?;
        let mut log = self.log();
        log.calls += 1;
        if log.calls > READS_PER_PAGE_MAX {
            return Err(invalid(format!(
                "a page may call get() and list() at most {READS_PER_PAGE_MAX} times"
            )));
        }
        Ok(())
    }

    fn count_tuples(&self, n: usize) -> Result<(), minijinja::Error> {
        let mut log = self.log();
        log.tuples += n;
        if log.tuples > TUPLES_READ_PER_PAGE_MAX {
            return Err(invalid(format!(
                "a page may read at most {TUPLES_READ_PER_PAGE_MAX} tuples"
            )));
        }
        Ok(())
    }

    fn source_failed(&self, e: SourceError) -> minijinja::Error {
        let message = e.to_string();
        self.log().source_error.get_or_insert(e);
        invalid(message)
    }

    /// `get(coll, key)`: the tuple or none.
    fn get(&self, collection: &str, key: &str) -> Result<JValue, minijinja::Error> {
        self.begin(collection)?;
        validate_key(key).map_err(|e| invalid(e.to_string()))?;
        // Recorded before reading: an absent key is a dependency too (creating it changes
        // the page), and so is a key whose read failed.
        self.log().deps.add_key(collection, key);
        match self.reader.get(collection, key) {
            Ok(Some(tuple)) => {
                self.count_tuples(1)?;
                Ok(tuple_value(tuple))
            }
            Ok(None) => Ok(JValue::from(())),
            Err(e) => Err(self.source_failed(e)),
        }
    }

    /// `list(coll, prefix="", limit=100)`: tuples in key order.
    fn list(&self, collection: &str, kwargs: &Kwargs) -> Result<JValue, minijinja::Error> {
        let prefix: Option<String> = kwargs.get("prefix")?;
        let limit: Option<usize> = kwargs.get("limit")?;
        kwargs.assert_all_used()?;
        let prefix = prefix.unwrap_or_default();
        let limit = limit.unwrap_or(LIST_LIMIT_DEFAULT);
        if limit > LIST_LIMIT_MAX {
            return Err(invalid(format!(
                "list() limit {limit} is over the maximum of {LIST_LIMIT_MAX}"
            )));
        }
        self.begin(collection)?;
        if limit == 0 {
            return Ok(JValue::from(Vec::<JValue>::new()));
        }
        let tuples = match self.reader.list(collection, &prefix, limit) {
            Ok(tuples) => tuples,
            Err(e) => {
                self.log().deps.add_prefix(collection, &prefix, None);
                return Err(self.source_failed(e));
            }
        };
        // A full result may have been cut by the limit: then keys after the last one
        // returned cannot change what this page saw.
        let upto = (tuples.len() == limit)
            .then(|| tuples.last().map(|t| t.key.as_str()))
            .flatten();
        self.log().deps.add_prefix(collection, &prefix, upto);
        self.count_tuples(tuples.len())?;
        Ok(tuples.into_iter().map(tuple_value).collect())
    }

    /// `asset_url(name)`: the URL of the asset `_assets/<name>` (a leading `/` optional) with
    /// the start of its content hash in the query, `<base_url>/style.css?v=<16 hex>`, so the
    /// URL changes whenever the bytes do and can be cached for good (see the node's
    /// `pages/serve.rs`). The page depends on the asset: editing it renders the page again.
    fn asset_url(&self, name: &str, base_url: &str) -> Result<String, minijinja::Error> {
        self.begin(ASSETS)?;
        let key = name.strip_prefix('/').unwrap_or(name);
        let path = asset_path(key).map_err(|e| invalid(format!("asset_url({name:?}): {e}")))?;
        // Recorded before looking: creating a missing asset must render the page again.
        self.log().deps.add_asset_url(key, &path);
        match self.reader.asset(key) {
            Ok(Some(asset)) => {
                let version = asset
                    .hash
                    .get(..ASSET_VERSION_HEX_LEN)
                    .unwrap_or(&asset.hash);
                Ok(format!(
                    "{base_url}{}?{ASSET_VERSION_PARAM}={version}",
                    asset.path
                ))
            }
            Ok(None) => Err(invalid(format!(
                "asset_url({name:?}): the site serves no asset {key:?} (there is no tuple \
                 {ASSETS}/{key}, it has never decoded, or a route takes its path {path})"
            ))),
            Err(e) => Err(self.source_failed(e)),
        }
    }

    fn finish(&self) -> ReadLog {
        std::mem::take(&mut *self.log())
    }
}

fn invalid(message: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, message)
}

/// One page to render.
#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub struct PageJob {
    pub path: String,
    pub template: String,
    /// `page.key`: the tuple key for pages of a route with `each`.
    pub key: Option<String>,
    /// `page.tuple`.
    pub tuple: Option<Tuple>,
    /// Whether to add `<link rel="canonical">` (HTML pages, except the 404 page: it is served
    /// at every unknown URL, so it has no URL of its own to name).
    pub canonical: bool,
}

/// A successful render.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub body: Bytes,
    pub hash: String,
}

impl Rendered {
    /// A rendered body with its hash, computed here.
    pub(crate) fn hashing(body: Vec<u8>) -> Rendered {
        Rendered {
            hash: content_hash(&body),
            body: Bytes::from(body),
        }
    }
}

/// What rendering one page produced.
pub struct PageOutcome {
    /// What the template read (not its templates or route: the caller knows those).
    pub deps: PageDeps,
    pub result: Result<Rendered, TemplateError>,
    pub(crate) source_error: Option<SourceError>,
}

/// Shared, read-only inputs of a batch of renders, whichever runner renders it.
#[derive(Debug, Clone)]
pub struct BatchInputs {
    /// `site.name` in templates.
    pub site: String,
    /// `site.base_url` in templates, and the base of canonical links.
    pub base_url: String,
    pub templates: Arc<TemplateSet>,
    pub page_bytes_max: usize,
    /// What `asset_url()` finds: the assets as the version being made serves them.
    pub assets: Arc<AssetIndex>,
}

/// What [`render_page`] needs besides the job: the environment for the page's kind and the
/// batch's inputs.
pub(crate) struct PageContext<'a> {
    pub env: &'a Environment<'static>,
    /// `site` in templates.
    pub site: &'a JValue,
    pub base_url: &'a str,
    pub page_bytes_max: usize,
    pub fuel_per_page: u64,
}

/// `site` in templates.
pub(crate) fn site_value(name: &str, base_url: &str) -> JValue {
    context! { name => name, base_url => base_url }
}

/// Renders `jobs` on up to `threads` threads of this process, answering reads that
/// `preloaded` cannot from `src` on this thread. Outcomes are in the order of `jobs`. Bounds
/// fuel, recursion and output, not memory or wall-clock time: see the module docs.
pub fn render_batch(
    src: &dyn Source,
    inputs: &BatchInputs,
    jobs: &[PageJob],
    preloaded: Arc<Preloaded>,
    threads: usize,
) -> Result<Vec<PageOutcome>, ProjectError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let workers = threads.clamp(1, jobs.len());
    let next_job = AtomicUsize::new(0);
    let (requests, incoming) = mpsc::channel::<ReadRequest>();
    let envs: [OnceLock<Environment<'static>>; 3] = Default::default();
    let env_for = |escape: Escape| {
        let slot = match escape {
            Escape::Html => &envs[0],
            Escape::Json => &envs[1],
            Escape::None => &envs[2],
        };
        slot.get_or_init(|| set_environment(&inputs.templates, escape))
    };
    let site = site_value(&inputs.site, &inputs.base_url);

    let (finished, spawn_error) = thread::scope(|scope| {
        let mut handles = Vec::with_capacity(workers);
        let mut spawn_error = None;
        for _ in 0..workers {
            let reader: Arc<dyn PageReader> = Arc::new(Reader {
                preloaded: Arc::clone(&preloaded),
                remote: requests.clone(),
                assets: Arc::clone(&inputs.assets),
            });
            let next_job = &next_job;
            let env_for = &env_for;
            let site = &site;
            let worker = move || {
                let mut done = Vec::new();
                loop {
                    let i = next_job.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let cx = PageContext {
                        env: env_for(template_kind(&job.template).escape),
                        site,
                        base_url: &inputs.base_url,
                        page_bytes_max: inputs.page_bytes_max,
                        fuel_per_page: inputs.templates.fuel_per_page,
                    };
                    done.push((i, render_page(&cx, job, Arc::clone(&reader)).hashed()));
                }
                done
            };
            match thread::Builder::new()
                .name("sesame-render".into())
                .stack_size(RENDER_STACK_BYTES)
                .spawn_scoped(scope, worker)
            {
                Ok(handle) => handles.push(handle),
                // Fewer threads still finish the batch; none at all cannot.
                Err(e) => spawn_error = Some(e),
            }
        }
        // Only workers hold senders now: the loop ends when the last one finishes.
        drop(requests);
        loop {
            match incoming.recv_timeout(Duration::from_millis(SERVE_POLL_MS)) {
                Ok(request) => request.answer(src),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if handles.iter().all(|h| h.is_finished()) {
                        break;
                    }
                }
            }
        }
        let mut finished = Vec::with_capacity(jobs.len());
        for handle in handles {
            // A panic in a renderer is a bug; let it surface rather than publish around it.
            finished.extend(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        (finished, spawn_error)
    });

    if finished.len() != jobs.len() {
        let e = spawn_error
            .unwrap_or_else(|| io::Error::other("render threads did not finish the batch"));
        return Err(ProjectError::Threads(e));
    }
    let mut outcomes: Vec<Option<PageOutcome>> = (0..jobs.len()).map(|_| None).collect();
    for (i, mut outcome) in finished {
        if let Some(e) = outcome.source_error.take() {
            return Err(ProjectError::Source(e));
        }
        outcomes[i] = Some(outcome);
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every job index is taken by exactly one worker"))
        .collect())
}

/// What rendering one page produced, before its body is hashed: by the side that will
/// trust the hash (a worker's page is hashed by the pool, never by the worker).
pub(crate) struct BodyOutcome {
    pub deps: PageDeps,
    pub result: Result<Vec<u8>, TemplateError>,
    pub source_error: Option<SourceError>,
}

impl BodyOutcome {
    /// The outcome with its body hashed.
    pub(crate) fn hashed(self) -> PageOutcome {
        PageOutcome {
            deps: self.deps,
            result: self.result.map(Rendered::hashing),
            source_error: self.source_error,
        }
    }
}

/// Renders one page: the one page renderer, for threads and worker processes alike.
pub(crate) fn render_page(
    cx: &PageContext<'_>,
    job: &PageJob,
    reader: Arc<dyn PageReader>,
) -> BodyOutcome {
    let reads = Arc::new(PageReads {
        reader,
        log: Mutex::default(),
    });
    let get = {
        let reads = Arc::clone(&reads);
        JValue::from_function(move |collection: &str, key: &str| reads.get(collection, key))
    };
    let list = {
        let reads = Arc::clone(&reads);
        JValue::from_function(move |collection: &str, kwargs: Kwargs| {
            reads.list(collection, &kwargs)
        })
    };
    let asset_url = {
        let reads = Arc::clone(&reads);
        let base_url = cx.base_url.to_string();
        JValue::from_function(move |name: &str| reads.asset_url(name, &base_url))
    };
    let page = context! {
        path => job.path.as_str(),
        key => job.key.as_deref(),
        tuple => job.tuple.clone().map(tuple_value),
    };
    let ctx = context! { site => cx.site.clone(), page, get, list, asset_url };

    let mut out = LimitedWriter {
        buf: Vec::new(),
        max: cx.page_bytes_max,
        over: false,
    };
    let result = cx
        .env
        .get_template(&job.template)
        .and_then(|t| t.render_captured_to(ctx, &mut out).map(drop));
    let log = reads.finish();
    let result = match result {
        Ok(()) => Ok(finish_body(out.buf, job, cx.base_url)),
        Err(e) => Err(describe_error(&e, job, out.over, cx)),
    };
    BodyOutcome {
        deps: log.deps,
        result,
        source_error: log.source_error,
    }
}

/// Turns a minijinja error into `{ template, line, message }`, naming the innermost template
/// (an error inside an include is reported where it happened, not at the include).
fn describe_error(
    err: &minijinja::Error,
    job: &PageJob,
    over_limit: bool,
    cx: &PageContext<'_>,
) -> TemplateError {
    let mut named = err;
    let mut root = err;
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(m) = e.downcast_ref::<minijinja::Error>() {
            root = m;
            if m.name().is_some() {
                named = m;
            }
        }
        current = e.source();
    }
    let message = if over_limit {
        format!(
            "page output is over the limit of {} bytes",
            cx.page_bytes_max
        )
    } else if root.kind() == ErrorKind::OutOfFuel {
        format!(
            "the page used all of its fuel ({} units): a loop or recursion runs too long",
            cx.fuel_per_page
        )
    } else {
        match root.detail() {
            Some(detail) => format!("{}: {detail}", root.kind()),
            None => root.kind().to_string(),
        }
    };
    TemplateError {
        template: named.name().unwrap_or(&job.template).to_string(),
        line: named.line(),
        message,
        path: Some(job.path.clone()),
    }
}

/// Collects output and fails the render once it passes `max` bytes.
struct LimitedWriter {
    buf: Vec<u8>,
    max: usize,
    over: bool,
}

impl io::Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            self.over = true;
            return Err(io::Error::other("page output limit reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn finish_body(buf: Vec<u8>, job: &PageJob, base_url: &str) -> Vec<u8> {
    if !job.canonical {
        return buf;
    }
    // minijinja writes whole `str`s and the writer keeps or refuses whole writes, so the
    // buffer is UTF-8; should that ever break, publish the bytes untouched.
    match String::from_utf8(buf) {
        Ok(html) => with_canonical(html, &format!("{base_url}{}", job.path)).into_bytes(),
        Err(e) => e.into_bytes(),
    }
}

/// Adds `<link rel="canonical" href="…">` unless the page has a canonical link already:
/// right after `<head …>`, else after `<html …>`, else after `<!doctype …>`, else first.
pub fn with_canonical(mut html: String, href: &str) -> String {
    if has_canonical(&html) {
        return html;
    }
    let link = format!("<link rel=\"canonical\" href=\"{}\">", xml_escape(href));
    let at = ["<head", "<html", "<!doctype"]
        .iter()
        .find_map(|tag| tag_end(&html, tag))
        .unwrap_or(0);
    html.insert_str(at, &link);
    html
}

fn has_canonical(html: &str) -> bool {
    // Only a link in the head counts (browsers and crawlers ignore one in the body), which
    // also keeps a long page from being scanned to its end.
    let head_end = find_ascii_ci(html, "</head", 0)
        .or_else(|| find_ascii_ci(html, "<body", 0))
        .unwrap_or(html.len());
    let html = &html[..head_end];
    let mut from = 0;
    while let Some(at) = find_ascii_ci(html, "canonical", from) {
        let before = html[..at].trim_end_matches(['"', '\'']).trim_end();
        let before = before.strip_suffix('=').map(str::trim_end);
        if before.is_some_and(|b| b.len() >= 3 && b[b.len() - 3..].eq_ignore_ascii_case("rel")) {
            return true;
        }
        from = at + "canonical".len();
    }
    false
}

/// The index just past the `>` of the first `tag` (`<head`, not `<header`).
fn tag_end(html: &str, tag: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = find_ascii_ci(html, tag, from) {
        let after = at + tag.len();
        let next = html.as_bytes().get(after).copied();
        if next == Some(b'>') || next.is_some_and(|b| b.is_ascii_whitespace()) {
            return html[after..].find('>').map(|i| after + i + 1);
        }
        from = after;
    }
    None
}

/// Finds an ASCII `needle` in `hay` ignoring ASCII case, starting at byte `from`.
fn find_ascii_ci(hay: &str, needle: &str, from: usize) -> Option<usize> {
    let hay = hay.as_bytes();
    let needle = needle.as_bytes();
    let first = *needle.first()?;
    let mut at = from;
    while at + needle.len() <= hay.len() {
        // Candidates are the places of the first byte in either case.
        let found = at
            + memchr::memchr2(
                first.to_ascii_lowercase(),
                first.to_ascii_uppercase(),
                &hay[at..=hay.len() - needle.len()],
            )?;
        if hay[found..found + needle.len()].eq_ignore_ascii_case(needle) {
            return Some(found);
        }
        at = found + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RECURSION_DEPTH_MAX_DEFAULT;

    fn env_with(name: &str, source: &str) -> Environment<'static> {
        let templates = Arc::new(TemplateSet::new(
            BTreeMap::from([(name.to_string(), source.to_string())]),
            10_000,
            RECURSION_DEPTH_MAX_DEFAULT,
        ));
        set_environment(&templates, template_kind(name).escape)
    }

    #[test]
    fn html_escaping_covers_markup_and_quotes_but_leaves_slashes() {
        let env = env_with(
            "t.html",
            "<a title=\"{{ v }}\" href=\"{{ u }}\">{{ v }}</a>{{ s|safe }}",
        );
        let out = env
            .get_template("t.html")
            .unwrap()
            .render(
                context! { v => "<b>\"A&B's\"</b>", u => "https://x.test/a/b", s => "<i>ok</i>" },
            )
            .unwrap();
        assert_eq!(
            out,
            "<a title=\"&lt;b&gt;&quot;A&amp;B&#39;s&quot;&lt;/b&gt;\" href=\"https://x.test/a/b\">\
             &lt;b&gt;&quot;A&amp;B&#39;s&quot;&lt;/b&gt;</a><i>ok</i>"
        );
    }

    #[test]
    fn the_page_kind_decides_escaping_for_every_template_it_includes() {
        let templates = Arc::new(TemplateSet::new(
            BTreeMap::from([
                (
                    "page.html".to_string(),
                    "{% include 'part.txt' %}".to_string(),
                ),
                ("part.txt".to_string(), "{{ v }}".to_string()),
                ("p.txt".to_string(), "{% include 'page.html' %}".to_string()),
                ("d.json".to_string(), "{{ v }}".to_string()),
            ]),
            10_000,
            RECURSION_DEPTH_MAX_DEFAULT,
        ));
        let render = |name: &str| {
            set_environment(&templates, template_kind(name).escape)
                .get_template(name)
                .unwrap()
                .render(context! { v => "<script>\"" })
                .unwrap()
        };
        assert_eq!(render("page.html"), "&lt;script&gt;&quot;");
        assert_eq!(render("p.txt"), "<script>\"");
        assert_eq!(render("d.json"), r#""<script>\"""#);
    }

    #[test]
    fn debug_is_not_a_function() {
        let env = env_with("p.html", "{{ debug() }}");
        let e = env
            .get_template("p.html")
            .unwrap()
            .render(context! {})
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnknownFunction, "{e}");
    }

    #[test]
    fn safe_url_passes_web_links_and_refuses_scripts() {
        let check = |url: &str| safe_url(&JValue::from(url));
        for ok in [
            "https://example.com/a?b=1&c=2#d",
            "http://x",
            "HTTPS://X.test",
            "mailto:a@b.test?subject=hi&body=x",
            "/alice",
            "alice",
            "./a:b",
            "../up",
            "?q=1",
            "#top",
            "//cdn.test/x.js",
            "",
        ] {
            assert_eq!(check(ok), ok, "{ok:?}");
        }
        assert_eq!(check("  https://x.test  "), "https://x.test");
        for bad in [
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            " javascript:alert(1)",
            "java\tscript:alert(1)",
            "java\nscript:alert(1)",
            "\u{1}javascript:alert(1)",
            "javascript&colon;alert(1)",
            "&#106;avascript:alert(1)",
            "jav&#x61;script:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "vbscript:msgbox(1)",
            "VBScript:x",
            "file:///etc/passwd",
            "\\\\evil.test\\x",
            "a:b",
        ] {
            assert_eq!(check(bad), "#", "{bad:?}");
        }
        assert_eq!(safe_url(&JValue::from(5)), "#");
        assert_eq!(safe_url(&JValue::UNDEFINED), "#");
        let env = env_with("p.html", "<a href=\"{{ u|safe_url }}\">");
        let out = env
            .get_template("p.html")
            .unwrap()
            .render(context! { u => "https://x.test/?a=1&b=\"2\"" })
            .unwrap();
        assert_eq!(out, "<a href=\"https://x.test/?a=1&amp;b=&quot;2&quot;\">");
    }

    #[test]
    fn canonical_goes_into_head() {
        let href = "https://d.example.com/alice";
        assert_eq!(
            with_canonical("<!DOCTYPE html><html><HEAD lang=x><title>t</title></head><body></body></html>".into(), href),
            "<!DOCTYPE html><html><HEAD lang=x><link rel=\"canonical\" href=\"https://d.example.com/alice\"><title>t</title></head><body></body></html>"
        );
        assert_eq!(
            with_canonical("<html><header>x</header></html>".into(), href),
            "<html><link rel=\"canonical\" href=\"https://d.example.com/alice\"><header>x</header></html>"
        );
        assert_eq!(
            with_canonical("<p>bare</p>".into(), "https://x/a&b"),
            "<link rel=\"canonical\" href=\"https://x/a&amp;b\"><p>bare</p>"
        );
    }

    #[test]
    fn ascii_search_ignores_case_and_respects_bounds() {
        assert_eq!(find_ascii_ci("<HeAd>", "<head", 0), Some(0));
        assert_eq!(find_ascii_ci("xx<h <HEAD", "<head", 0), Some(5));
        assert_eq!(find_ascii_ci("<head><head", "<head", 1), Some(6));
        assert_eq!(find_ascii_ci("<hea", "<head", 0), None);
        assert_eq!(find_ascii_ci("<head", "<head", 1), None);
        assert_eq!(find_ascii_ci("<head", "<head", 9), None);
        assert_eq!(find_ascii_ci("abc", "", 0), None);
        assert_eq!(find_ascii_ci("é<HEAD", "<head", 0), Some(2));
    }

    #[test]
    fn existing_canonical_is_kept() {
        for html in [
            r#"<head><link rel="canonical" href="/x"></head>"#,
            r#"<head><link href="/x" REL='Canonical'></head>"#,
            r#"<head><link rel = canonical href=/x></head>"#,
        ] {
            assert_eq!(with_canonical(html.into(), "https://y/"), html);
        }
        // The word alone is not a canonical link, and one in the body does not count.
        let text = "<head></head><p>canonical URLs</p>";
        assert!(with_canonical(text.into(), "https://y/").contains("rel=\"canonical\""));
        let in_body = r#"<head></head><body><link rel="canonical" href="/x"></body>"#;
        assert!(with_canonical(in_body.into(), "https://y/")
            .starts_with(r#"<head><link rel="canonical" href="https://y/">"#));
    }
}
