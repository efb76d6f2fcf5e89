//! Rendering pages with minijinja: the template environment, the `get`/`list` functions that
//! record what a page read, the sandbox (fuel, recursion, output size), canonical links, and
//! running many renders in parallel.
//!
//! How reads reach the store. Template functions must be `'static + Send + Sync`, but the
//! node's [`Source`] is a borrowed SQLite view that is not even `Sync`. So renders run on
//! scoped worker threads and the calling thread stays the only one touching the `Source`: a
//! worker reads a collection from a [`Preloaded`] in-memory copy when it holds the whole
//! collection, and otherwise sends the read over a channel to the calling thread, which
//! answers it from the `Source`. Full renders preload the collections that matter, so they
//! rarely take the channel path; small incremental renders use it for every read.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{context, AutoEscape, Environment, ErrorKind};
use sesame_proto::{validate_collection, validate_key, Tuple};

use crate::deps::PageDeps;
use crate::error::{ProjectError, TemplateError};
use crate::manifest::content_hash;
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
/// Stack of each render thread, in bytes: minijinja recurses for nested templates and macros
/// (within the recursion limit), and a spawned thread's default stack is only 2 MiB.
const RENDER_STACK_BYTES: usize = 8 << 20;
/// How often the read-serving loop checks that workers are still running, in milliseconds.
/// Workers normally end the loop by dropping their channel ends; this is the safety net.
const SERVE_POLL_MS: u64 = 50;

/// A template environment over the site's templates, with the sandbox limits set. Templates
/// are parsed on first use and cached by minijinja for the life of the environment.
pub fn environment(
    templates: Arc<std::collections::BTreeMap<String, String>>,
    fuel_per_page: u64,
    recursion_depth_max: usize,
) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_loader(move |name| Ok(templates.get(name).cloned()));
    env.set_fuel(Some(fuel_per_page));
    env.set_recursion_limit(recursion_depth_max);
    env.set_auto_escape_callback(auto_escape);
    env.set_formatter(format_value);
    // `{{ key|segment }}`: a key as one URL path segment, spelled exactly as page paths,
    // sitemaps and canonical links spell it (`a/b` → `a%2Fb`; `urlencode` keeps the `/`).
    env.add_filter("segment", |s: &str| sesame_proto::encode_segment(s));
    env
}

/// Writes a value into the output. Strings in HTML are escaped for `& < > " '` only, which is
/// what text and quoted attributes need; minijinja's default also escapes `/`, which turns
/// every URL in a page into `http:&#x2f;&#x2f;…`. Everything else keeps the default.
fn format_value(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &JValue,
) -> Result<(), minijinja::Error> {
    let plain_string = value.kind() == minijinja::value::ValueKind::String && !value.is_safe();
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

/// Output is HTML-escaped (SPEC.md), which is also correct for XML feeds. Templates named
/// `*.json` escape for JSON and `*.txt` do not escape, so those outputs are not mangled.
fn auto_escape(name: &str) -> AutoEscape {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("json") => AutoEscape::Json,
        Some("txt") => AutoEscape::None,
        _ => AutoEscape::Html,
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
    fn is_complete(&self, collection: &str) -> bool {
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
}

/// A read a worker asks the calling thread to answer from the [`Source`].
enum ReadRequest {
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
    fn answer(self, src: &dyn Source) {
        // A send fails only if the worker is gone, which it reports itself.
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

/// A worker's way to the data: memory when it holds the collection, else the channel.
#[derive(Clone)]
struct Reader {
    preloaded: Arc<Preloaded>,
    remote: mpsc::Sender<ReadRequest>,
}

impl Reader {
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
        if self.preloaded.is_complete(collection) {
            return Ok(self
                .preloaded
                .data
                .list(collection, prefix, limit)
                .expect("reading memory cannot fail"));
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
}

fn not_serving() -> SourceError {
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
    reader: Reader,
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

    fn finish(&self) -> ReadLog {
        std::mem::take(&mut *self.log())
    }
}

fn invalid(message: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, message)
}

/// One page to render.
#[derive(Debug, Clone)]
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

/// What rendering one page produced.
pub struct PageOutcome {
    /// What the template read (not its templates or route: the caller knows those).
    pub deps: PageDeps,
    pub result: Result<Rendered, TemplateError>,
    source_error: Option<SourceError>,
}

/// Shared, read-only inputs of a batch of renders.
pub struct Batch<'a> {
    pub env: Environment<'static>,
    /// `site` in templates.
    pub site: JValue,
    pub base_url: &'a str,
    pub page_bytes_max: usize,
    pub fuel_per_page: u64,
    pub threads: usize,
}

impl Batch<'_> {
    pub fn site_value(name: &str, base_url: &str) -> JValue {
        context! { name => name, base_url => base_url }
    }
}

/// Renders `jobs` on up to `batch.threads` threads, answering reads that `preloaded` cannot
/// from `src` on this thread. Outcomes are in the order of `jobs`.
pub fn render_batch(
    src: &dyn Source,
    batch: &Batch<'_>,
    jobs: &[PageJob],
    preloaded: Arc<Preloaded>,
) -> Result<Vec<PageOutcome>, ProjectError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let workers = batch.threads.clamp(1, jobs.len());
    let next_job = AtomicUsize::new(0);
    let (requests, incoming) = mpsc::channel::<ReadRequest>();

    let (finished, spawn_error) = thread::scope(|scope| {
        let mut handles = Vec::with_capacity(workers);
        let mut spawn_error = None;
        for _ in 0..workers {
            let reader = Reader {
                preloaded: Arc::clone(&preloaded),
                remote: requests.clone(),
            };
            let next_job = &next_job;
            let worker = move || {
                let mut done = Vec::new();
                loop {
                    let i = next_job.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    done.push((i, render_page(batch, job, &reader)));
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

fn render_page(batch: &Batch<'_>, job: &PageJob, reader: &Reader) -> PageOutcome {
    let reads = Arc::new(PageReads {
        reader: reader.clone(),
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
    let page = context! {
        path => job.path.as_str(),
        key => job.key.as_deref(),
        tuple => job.tuple.clone().map(tuple_value),
    };
    let ctx = context! { site => batch.site.clone(), page, get, list };

    let mut out = LimitedWriter {
        buf: Vec::new(),
        max: batch.page_bytes_max,
        over: false,
    };
    let result = batch
        .env
        .get_template(&job.template)
        .and_then(|t| t.render_captured_to(ctx, &mut out).map(drop));
    let log = reads.finish();
    let result = match result {
        Ok(()) => {
            let body = finish_body(out.buf, job, batch.base_url);
            Ok(Rendered {
                hash: content_hash(&body),
                body: Bytes::from(body),
            })
        }
        Err(e) => Err(describe_error(&e, job, out.over, batch)),
    };
    PageOutcome {
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
    batch: &Batch<'_>,
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
            batch.page_bytes_max
        )
    } else if root.kind() == ErrorKind::OutOfFuel {
        format!(
            "the page used all of its fuel ({} units): a loop or recursion runs too long",
            batch.fuel_per_page
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
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    (from..=hay.len() - needle.len()).find(|&i| {
        hay[i].eq_ignore_ascii_case(&first) && hay[i..i + needle.len()].eq_ignore_ascii_case(needle)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn html_escaping_covers_markup_and_quotes_but_leaves_slashes() {
        let templates = Arc::new(std::collections::BTreeMap::from([(
            "t.html".to_string(),
            "<a title=\"{{ v }}\" href=\"{{ u }}\">{{ v }}</a>{{ s|safe }}".to_string(),
        )]));
        let env = super::environment(templates, 10_000, 10);
        let out = env
            .get_template("t.html")
            .unwrap()
            .render(minijinja::context! { v => "<b>\"A&B's\"</b>", u => "https://x.test/a/b", s => "<i>ok</i>" })
            .unwrap();
        assert_eq!(
            out,
            "<a title=\"&lt;b&gt;&quot;A&amp;B&#39;s&quot;&lt;/b&gt;\" href=\"https://x.test/a/b\">\
             &lt;b&gt;&quot;A&amp;B&#39;s&quot;&lt;/b&gt;</a><i>ok</i>"
        );
    }

    use super::*;

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
