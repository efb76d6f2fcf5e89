//! The worker process: renders the pages the pool sends it (in runs), one at a time, with
//! `render::render_page`, asking the pool over the pipe for every template and
//! tuple it needs, except reads of a collection the pool has sent whole for the batch.
//!
//! It limits itself before it renders anything: its address space (`RLIMIT_AS`), so a
//! template that builds a huge string makes an allocation fail and the process abort, not
//! the machine swap; no core dumps (`RLIMIT_CORE` 0); and, on Linux, death with its parent.
//! Time is the pool's business: it kills a worker whose page runs too long.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufReader};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use minijinja::{Environment, ErrorKind};
use sesame_proto::Tuple;

use super::wire::{self, FromWorker, RenderRun, RenderedBody, ToWorker, WireError};
use super::{ENVIRONMENTS_CACHED_MAX, TEMPLATE_BYTES_CACHED_MAX};
use crate::deps::PageDeps;
use crate::error::TemplateError;
use crate::paths::{template_kind, Escape};
use crate::render::{
    environment, render_page, site_value, PageContext, PageJob, PageReader, ServedAsset,
    RENDER_STACK_BYTES,
};
use crate::source::{MemorySource, Source as _, SourceError};

/// Runs a worker keeps that the pool sent ahead (it sends one run ahead, or, to a fresh
/// worker, what a dead one left: at most three runs); past it, a run is taken for an answer,
/// which fails the render as a protocol error.
const RUNS_QUEUED_MAX: usize = 4;

/// Runs a render worker on this process's stdin and stdout until the pool closes stdin.
/// What `sesame render-worker` calls; not for people to run.
pub fn worker_main() -> ExitCode {
    // minijinja recurses for nested templates and macros: render on a thread with a stack
    // of known size, as the thread renderer does.
    let serving = thread::Builder::new()
        .name("sesame-render-worker".into())
        .stack_size(RENDER_STACK_BYTES)
        .spawn(serve);
    match serving.map(|handle| handle.join()) {
        Ok(Ok(Ok(()))) => ExitCode::SUCCESS,
        Ok(Ok(Err(e))) => {
            eprintln!("render worker: {e}");
            ExitCode::FAILURE
        }
        // The panic hook has printed the panic already.
        Ok(Err(_)) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("render worker: starting the render thread: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the pool sent {0} where a page was expected")]
    Unexpected(&'static str),
    #[error("setting resource limits: {0}")]
    Limits(#[source] io::Error),
    #[error("opening stdin or stdout: {0}")]
    Stdio(#[source] io::Error),
}

fn serve() -> Result<(), WorkerError> {
    let link = Arc::new(Link::stdio()?);
    match link.receive()? {
        ToWorker::Start { memory_bytes_max } => {
            limit_self(memory_bytes_max).map_err(WorkerError::Limits)?
        }
        other => return Err(WorkerError::Unexpected(what(&other))),
    }
    link.send(&FromWorker::Started)?;
    let mut environments = Environments::default();
    let memory = Arc::new(Mutex::new(BatchMemory::default()));
    loop {
        let mut run = match link.next_run() {
            Ok(ToWorker::Render(run)) => run,
            Ok(other) => return Err(WorkerError::Unexpected(what(&other))),
            // The pool is done with this worker.
            Err(WireError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for job in std::mem::take(&mut run.jobs) {
            let done = render(&link, &mut environments, &memory, &run, &job);
            send_done(&link, done)?;
        }
    }
}

/// Sends a page's outcome; one too large for a frame becomes an error saying so.
fn send_done(link: &Link, done: FromWorker) -> Result<(), WorkerError> {
    let bytes = match link.send(&done) {
        Err(WireError::TooLarge { bytes }) => bytes,
        other => return Ok(other?),
    };
    let FromWorker::Done { result, .. } = done else {
        unreachable!("render returns Done")
    };
    let (template, path) = match result {
        Ok(_) => (String::new(), None),
        Err(e) => (e.template, e.path),
    };
    let error = TemplateError {
        template,
        line: None,
        message: format!(
            "the page and what it read are {bytes} bytes, more than the {} a render may return",
            wire::FRAME_BYTES_MAX
        ),
        path,
    };
    link.send(&FromWorker::Done {
        deps: PageDeps::default(),
        result: Err(error),
    })?;
    Ok(())
}

fn what(message: &ToWorker) -> &'static str {
    match message {
        ToWorker::Start { .. } => "start",
        ToWorker::Render(_) => "pages",
        ToWorker::Template(_) => "a template",
        ToWorker::Got(_) => "a tuple",
        ToWorker::Listed(_) => "tuples",
        ToWorker::AssetIs(_) => "an asset",
        ToWorker::Collection { .. } => "a collection",
    }
}

fn render(
    link: &Arc<Link>,
    environments: &mut Environments,
    memory: &Arc<Mutex<BatchMemory>>,
    run: &RenderRun,
    job: &PageJob,
) -> FromWorker {
    memory
        .lock()
        .expect("batch memory lock poisoned")
        .start_batch(run.batch);
    let escape = template_kind(&job.template).escape;
    let env = environments.get(link, run, escape);
    let site = site_value(&run.site, &run.base_url);
    let cx = PageContext {
        env,
        site: &site,
        base_url: &run.base_url,
        page_bytes_max: usize::try_from(run.page_bytes_max).unwrap_or(usize::MAX),
        fuel_per_page: run.fuel_per_page,
    };
    let reader: Arc<dyn PageReader> = Arc::new(PipeReader {
        link: Arc::clone(link),
        memory: Arc::clone(memory),
    });
    let outcome = render_page(&cx, job, reader);
    FromWorker::Done {
        deps: outcome.deps,
        result: outcome.result.map(|body| RenderedBody { body }),
    }
}

/// The worker's end of the pipe. Only the render thread uses it; the lock makes it shareable
/// with the template functions and loaders minijinja requires to be `Sync`.
struct Link {
    io: Mutex<LinkIo>,
}

struct LinkIo {
    input: BufReader<File>,
    output: File,
    /// Reused for every frame written and read.
    buf: Vec<u8>,
    /// Runs the pool sent ahead while this worker was asking about a page before them.
    queued: VecDeque<ToWorker>,
}

impl Link {
    #[cfg(unix)]
    fn stdio() -> Result<Link, WorkerError> {
        use std::os::fd::AsFd as _;
        // Unbuffered handles of fds 0 and 1: std's stdout is line-buffered, which would split
        // binary frames at every newline byte.
        let input = File::from(
            io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map_err(WorkerError::Stdio)?,
        );
        let output = File::from(
            io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(WorkerError::Stdio)?,
        );
        Ok(Link {
            io: Mutex::new(LinkIo {
                input: BufReader::with_capacity(64 << 10, input),
                output,
                buf: Vec::new(),
                queued: VecDeque::new(),
            }),
        })
    }

    #[cfg(not(unix))]
    fn stdio() -> Result<Link, WorkerError> {
        Err(WorkerError::Stdio(io::Error::other(
            "render workers run on Unix only",
        )))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkIo> {
        self.io.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, message: &FromWorker) -> Result<(), WireError> {
        let io = &mut *self.lock();
        wire::send(&mut io.output, message, &mut io.buf)
    }

    fn receive(&self) -> Result<ToWorker, WireError> {
        let io = &mut *self.lock();
        wire::receive(&mut io.input, &mut io.buf)
    }

    /// The next run: one sent ahead, else the next message.
    fn next_run(&self) -> Result<ToWorker, WireError> {
        let io = &mut *self.lock();
        match io.queued.pop_front() {
            Some(page) => Ok(page),
            None => wire::receive(&mut io.input, &mut io.buf),
        }
    }

    /// Sends a question and reads its answer, keeping runs sent ahead of it for later.
    fn ask(&self, question: &FromWorker) -> Result<ToWorker, WireError> {
        let io = &mut *self.lock();
        wire::send(&mut io.output, question, &mut io.buf)?;
        loop {
            match wire::receive(&mut io.input, &mut io.buf)? {
                run @ ToWorker::Render(_) if io.queued.len() < RUNS_QUEUED_MAX => {
                    io.queued.push_back(run)
                }
                answer => return Ok(answer),
            }
        }
    }
}

/// `get`, `list` and `asset_url` of a render in a worker: answered by the pool, or from
/// what it sent for the whole batch.
struct PipeReader {
    link: Arc<Link>,
    memory: Arc<Mutex<BatchMemory>>,
}

/// Most asset answers a worker keeps per batch (a layout names a few assets; a template
/// naming more asks the pool for the rest each time).
const ASSET_ANSWERS_MAX: usize = 256;

/// What the pool told this worker that holds for every page of the current batch (the
/// batch makes one site version from one snapshot): its answers about assets, so a layout's
/// `asset_url()` calls cost one round trip per asset and batch, not per page, and the
/// collections it sent whole. Each page still records every read as a dependency itself
/// (`render::PageReads` does, before it asks here); this only decides who answers. How much
/// the pool sends is its business (it bounds the bytes per worker and batch).
#[derive(Default)]
struct BatchMemory {
    batch: Option<u64>,
    answers: HashMap<String, Option<ServedAsset>>,
    /// Collections held whole in `tuples` (an empty one has no tuples, but is held).
    held: HashSet<String>,
    tuples: MemorySource,
}

impl BatchMemory {
    fn start_batch(&mut self, batch: u64) {
        if self.batch != Some(batch) {
            *self = BatchMemory {
                batch: Some(batch),
                ..BatchMemory::default()
            };
        }
    }

    fn hold(&mut self, collection: String, tuples: Vec<Tuple>) {
        for tuple in tuples {
            debug_assert_eq!(tuple.collection, collection);
            self.tuples.insert(tuple);
        }
        self.held.insert(collection);
    }
}

fn lost(e: impl std::fmt::Display) -> SourceError {
    SourceError::new(format!("asking the render pool: {e}"))
}

impl PipeReader {
    fn memory(&self) -> std::sync::MutexGuard<'_, BatchMemory> {
        self.memory.lock().expect("batch memory lock poisoned")
    }

    /// Keeps a collection the pool sent whole in answer to a read.
    fn hold(&self, collection: String, tuples: Vec<Tuple>) {
        self.memory().hold(collection, tuples);
    }
}

impl PageReader for PipeReader {
    fn get(&self, collection: &str, key: &str) -> Result<Option<Tuple>, SourceError> {
        let held = |memory: &BatchMemory| {
            memory
                .held
                .contains(collection)
                .then(|| memory.tuples.get(collection, key))
        };
        if let Some(answer) = held(&self.memory()) {
            return answer;
        }
        let question = FromWorker::Get {
            collection: collection.to_string(),
            key: key.to_string(),
        };
        match self.link.ask(&question).map_err(lost)? {
            ToWorker::Got(answer) => answer.map_err(SourceError::new),
            ToWorker::Collection {
                collection: sent,
                tuples,
            } if sent == collection => {
                self.hold(sent, tuples);
                held(&self.memory()).expect("held just now")
            }
            other => Err(lost(format!("it answered with {}", what(&other)))),
        }
    }

    fn list(
        &self,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Tuple>, SourceError> {
        let held = |memory: &BatchMemory| {
            memory
                .held
                .contains(collection)
                .then(|| memory.tuples.list(collection, prefix, limit))
        };
        if let Some(answer) = held(&self.memory()) {
            return answer;
        }
        let question = FromWorker::List {
            collection: collection.to_string(),
            prefix: prefix.to_string(),
            limit: limit as u64,
        };
        match self.link.ask(&question).map_err(lost)? {
            ToWorker::Listed(answer) => answer.map_err(SourceError::new),
            ToWorker::Collection {
                collection: sent,
                tuples,
            } if sent == collection => {
                self.hold(sent, tuples);
                held(&self.memory()).expect("held just now")
            }
            other => Err(lost(format!("it answered with {}", what(&other)))),
        }
    }

    fn asset(&self, key: &str) -> Result<Option<ServedAsset>, SourceError> {
        let known = self.memory();
        if let Some(answer) = known.answers.get(key) {
            return Ok(answer.clone());
        }
        drop(known);
        let question = FromWorker::Asset {
            key: key.to_string(),
        };
        match self.link.ask(&question).map_err(lost)? {
            ToWorker::AssetIs(answer) => {
                let mut known = self.memory();
                if known.answers.len() < ASSET_ANSWERS_MAX {
                    known.answers.insert(key.to_string(), answer.clone());
                }
                Ok(answer)
            }
            other => Err(lost(format!("it answered with {}", what(&other)))),
        }
    }
}

/// Compiled environments by template set and escaping, least recently used evicted first:
/// at most [`ENVIRONMENTS_CACHED_MAX`] of them, holding at most about
/// [`TEMPLATE_BYTES_CACHED_MAX`] of template source between them.
#[derive(Default)]
struct Environments {
    cached: HashMap<([u8; 32], Escape), Cached>,
    clock: u64,
}

struct Cached {
    env: Environment<'static>,
    /// Bytes of template source this environment has loaded.
    bytes: Arc<AtomicUsize>,
    used: u64,
}

impl Environments {
    fn get(&mut self, link: &Arc<Link>, job: &RenderRun, escape: Escape) -> &Environment<'static> {
        self.clock += 1;
        let key = (job.templates, escape);
        if !self.cached.contains_key(&key) {
            self.evict_for_one_more();
            let bytes = Arc::new(AtomicUsize::new(0));
            let loader = {
                let link = Arc::clone(link);
                let bytes = Arc::clone(&bytes);
                move |name: &str| load_template(&link, &bytes, name)
            };
            let env = environment(
                Box::new(loader),
                job.fuel_per_page,
                usize::try_from(job.recursion_depth_max).unwrap_or(usize::MAX),
                escape,
            );
            self.cached.insert(
                key,
                Cached {
                    env,
                    bytes,
                    used: 0,
                },
            );
        }
        let cached = self.cached.get_mut(&key).expect("inserted above");
        cached.used = self.clock;
        &cached.env
    }

    fn evict_for_one_more(&mut self) {
        loop {
            let bytes: usize = self
                .cached
                .values()
                .map(|c| c.bytes.load(Ordering::Relaxed))
                .sum();
            if self.cached.len() < ENVIRONMENTS_CACHED_MAX && bytes <= TEMPLATE_BYTES_CACHED_MAX {
                return;
            }
            let Some(oldest) = self
                .cached
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(k, _)| *k)
            else {
                return;
            };
            self.cached.remove(&oldest);
        }
    }
}

fn load_template(
    link: &Link,
    bytes: &AtomicUsize,
    name: &str,
) -> Result<Option<String>, minijinja::Error> {
    let failed = |e: String| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("loading template {name:?}: {e}"),
        )
    };
    match link.ask(&FromWorker::LoadTemplate(name.to_string())) {
        Ok(ToWorker::Template(source)) => {
            if let Some(source) = &source {
                bytes.fetch_add(source.len(), Ordering::Relaxed);
            }
            Ok(source)
        }
        Ok(other) => Err(failed(format!("the pool answered with {}", what(&other)))),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// Sets this process's limits: address space, no core dumps, death with the parent.
#[cfg(unix)]
fn limit_self(memory_bytes_max: u64) -> io::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let set = |resource, value| {
        setrlimit(
            resource,
            Rlimit {
                current: Some(value),
                maximum: Some(value),
            },
        )
        .map_err(io::Error::from)
    };
    set(Resource::Core, 0)?;
    set(Resource::As, memory_bytes_max)?;
    #[cfg(target_os = "linux")]
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(io::Error::from)?;
    Ok(())
}

#[cfg(not(unix))]
fn limit_self(_memory_bytes_max: u64) -> io::Result<()> {
    Err(io::Error::other(
        "render workers need setrlimit, which this platform lacks",
    ))
}
