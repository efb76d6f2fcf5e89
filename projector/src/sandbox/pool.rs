//! The pool: long-lived worker processes shared by every site of a node, scheduled in runs
//! of pages, round-robin between the batches waiting.
//!
//! A run is a few consecutive pages of one batch sent in one frame: a worker then renders
//! them back to back without waiting for its driver, and the pool pays one write and one
//! wake-up per run instead of per page. Runs are as long as the batch's pages allow within
//! about [`RUN_MICROS_TARGET`] (measured as they render; at most [`RUN_PAGES_MAX`] pages),
//! and only one page long while another batch waits for its turn, so a batch of slow pages
//! goes page by page and another batch waits for about a run per worker. The worker still
//! answers each page with a frame of its own, so each page has its own time limit and a
//! failure is pinned on the page that caused it.
//!
//! Each worker slot has a driver thread here. A driver takes the next page (from the next
//! batch in rotation), starts its worker process if there is none, sends the page, and
//! answers the worker's questions until it sends the result: templates from the batch's
//! `TemplateSet`, reads from the batch's [`Preloaded`] memory
//! when it holds the whole collection, else from the thread that called
//! [`RenderPool::render_batch`], which holds the `Source`.
//!
//! A collection held whole that a worker reads a second time in a batch is sent to it whole
//! (up to [`COLLECTION_BYTES_SENT_MAX`] per worker and batch), and the worker answers its
//! later reads itself: a template that reads for every page (the demo's guestbook `list()`)
//! would otherwise cost a pipe round trip, two context switches each way, per page. The
//! worker still records every read as the page's dependency, as it always does; the driver
//! counts a collection it sent as read whole by the page in hand if the worker dies, when
//! the worker's own record is lost. The driver reads the worker's
//! frames with a deadline (`poll` before every read); a second thread per worker keeps the
//! tail of its stderr, which says why it died.
//!
//! A worker that dies (an allocation failed against its memory limit, a stack overflow, a
//! signal), sends garbage, or runs past the page's time limit (the driver kills it) fails
//! only the page it was rendering, with a message saying which limit it hit. The next page
//! starts a fresh worker.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io::{self, BufReader, Read};
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sesame_proto::Tuple;

use super::wire::{self, FromWorker, RenderRunRef, RenderedBody, ToWorker, WireError};
use crate::config::threads_or_cores;
use crate::deps::PageDeps;
use crate::error::{ProjectError, TemplateError};
use crate::render::{
    not_serving, BatchInputs, PageJob, PageOutcome, Preloaded, ReadRequest, Rendered,
    LIST_LIMIT_MAX, READS_PER_PAGE_MAX,
};
use crate::site::asset_path;
use crate::source::SourceError;

/// Address space a worker process may use, by default (its `RLIMIT_AS`).
pub const WORKER_MEMORY_BYTES_DEFAULT: u64 = 512 << 20;
/// Longest a page may take to render, by default, before its worker is killed.
pub const PAGE_TIME_MS_DEFAULT: u64 = 10_000;
/// Most worker processes one pool runs.
pub const WORKERS_MAX: usize = 64;
/// After a worker failed to start, pages fail at once with that error for this long instead
/// of each trying (and failing) to start one.
const START_RETRY_MS: u64 = 1_000;
/// Bytes of a worker's stderr kept to explain its death.
const STDERR_TAIL_BYTES: usize = 4 << 10;
/// Lines of a worker's stderr logged, per worker process.
const STDERR_LINES_LOGGED_MAX: usize = 20;
/// Pages a worker holds at once, at least: the one it renders and the next, so it need not
/// wait for its driver between pages. When only the page it renders is left in hand, the
/// driver takes the next run (only when no other batch waits for a turn).
const PIPELINE_PAGES: usize = 2;
/// Most pages in one run.
pub const RUN_PAGES_MAX: usize = 16;
/// About how long one run should take to render, in microseconds.
const RUN_MICROS_TARGET: u64 = 2_000;
/// Most bytes of runs the driver writes at once (but always the page in hand). The driver
/// does not read the worker's `Done` frames while it writes, and a worker in a run writes
/// them without reading: the two must not wait for each other with full pipes, so what
/// the driver writes fits in the pipe's buffer (64 KiB on Linux) with room to spare.
const RUN_WRITE_BYTES_MAX: usize = 16 << 10;
/// What Rust's runtime prints before it aborts on a failed allocation.
const OUT_OF_MEMORY: &str = "memory allocation of";
/// Buffer for reading a worker's frames, in bytes.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Bytes of whole collections (as encoded on the wire) the pool sends one worker for one
/// batch. A worker holds them decoded, a few times that, within its memory limit.
pub const COLLECTION_BYTES_SENT_MAX: usize = 8 << 20;
/// Reads of a collection in a batch that a worker gets answered one by one before the
/// collection is sent to it whole: one page that reads a large collection once (a list page)
/// is not worth sending it all.
const READS_BEFORE_SENDING_WHOLE: u32 = 1;

/// How to start a worker process: a program that calls [`super::worker_main`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    pub fn new(program: impl Into<PathBuf>) -> WorkerCommand {
        WorkerCommand {
            program: program.into(),
            args: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> WorkerCommand {
        self.args.push(arg.into());
        self
    }

    /// This very executable, with `args` (the `sesame` binary: `render-worker`).
    pub fn current_exe(args: &[&str]) -> io::Result<WorkerCommand> {
        let mut command = WorkerCommand::new(std::env::current_exe()?);
        command.args = args.iter().map(OsString::from).collect();
        Ok(command)
    }
}

/// How a [`RenderPool`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub command: WorkerCommand,
    /// Worker processes (at most [`WORKERS_MAX`]); 0: one per available core.
    pub workers: usize,
    /// Address space of each worker (`RLIMIT_AS`), in bytes: the memory one page render may
    /// use, plus the worker's own (a few tens of MiB).
    pub memory_bytes_max: u64,
    /// Wall-clock time one page may take; its worker is killed past it.
    pub page_time_max: Duration,
}

impl PoolConfig {
    pub fn new(command: WorkerCommand) -> PoolConfig {
        PoolConfig {
            command,
            workers: 0,
            memory_bytes_max: WORKER_MEMORY_BYTES_DEFAULT,
            page_time_max: Duration::from_millis(PAGE_TIME_MS_DEFAULT),
        }
    }
}

/// Worker processes that render pages for any number of sites, each page bounded in memory
/// and time. Share one pool (`Arc`) between the sites of a node: [`RenderPool::render_batch`]
/// may be called from many threads at once, and pages of concurrent batches are taken in
/// turn, so a large batch delays a small one by about one page per worker. Workers start
/// when the first batch arrives; dropping the pool stops them.
pub struct RenderPool {
    shared: Arc<Shared>,
}

impl fmt::Debug for RenderPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenderPool")
            .field("config", &self.shared.config)
            .field("workers_started", &self.workers_started())
            .finish()
    }
}

struct Shared {
    config: PoolConfig,
    workers: usize,
    queue: Mutex<Queue>,
    /// Signalled when a batch arrives or the pool stops.
    work: Condvar,
    workers_started: AtomicU64,
    collections_sent: AtomicU64,
}

#[derive(Default)]
struct Queue {
    /// Batches with pages not yet taken, in rotation order.
    batches: VecDeque<Queued>,
    next_id: u64,
    drivers_started: bool,
    /// Drivers waiting for a page.
    idle: usize,
    stopping: bool,
}

struct Queued {
    batch: Arc<Batch>,
    /// The next job to hand out.
    next: usize,
}

/// A batch as the drivers see it. Only the queue and drivers hold it, so when the last
/// driver is done with it the caller's channel closes.
struct Batch {
    id: u64,
    inputs: BatchInputs,
    jobs: Arc<[PageJob]>,
    preloaded: Arc<Preloaded>,
    /// Where drivers put outcomes. Shared with the caller, which takes them in job order: it
    /// is woken for reads, when the page it waits for next is done, and once all are.
    outcomes: Arc<Outcomes>,
    events: mpsc::Sender<Event>,
    /// The encoded size of each collection held whole, once asked for.
    whole_bytes: Mutex<HashMap<String, usize>>,
    /// About how long a page of this batch takes, in microseconds (a moving average over
    /// the pages rendered so far; 0 before the first).
    page_micros: AtomicU64,
}

struct Outcomes {
    slots: Mutex<Slots>,
}

impl Outcomes {
    /// Hands `each` the done outcomes from the one the caller waits for on, in job order;
    /// `each` runs outside the lock, so drivers keep storing outcomes meanwhile.
    fn take_ready(&self, each: &mut dyn FnMut(PageOutcome)) {
        let ready: Vec<PageOutcome> = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let Slots {
                outcomes, taken, ..
            } = &mut *slots;
            let ready: Vec<PageOutcome> = outcomes[*taken..]
                .iter_mut()
                .map_while(Option::take)
                .collect();
            *taken += ready.len();
            ready
        };
        ready.into_iter().for_each(each);
    }
}

struct Slots {
    outcomes: Vec<Option<PageOutcome>>,
    /// Pages without an outcome yet.
    left: usize,
    /// Outcomes taken by the caller: it waits for the page at this index next.
    taken: usize,
}

/// What drivers tell the thread that called `render_batch`.
enum Event {
    Read(ReadRequest),
    /// A page's read failed in the store: the projection fails.
    SourceFailed(SourceError),
    /// The page the caller waits for next is done (and maybe some after it).
    Ready,
    /// The last page is done.
    Finished,
}

impl Batch {
    /// How many pages to hand out at once, with `left` not handed out yet and `workers` to
    /// share them: enough for about [`RUN_MICROS_TARGET`], one before any page was timed.
    fn run_len(&self, left: usize, workers: usize) -> usize {
        let micros = self.page_micros.load(Ordering::Relaxed);
        if micros == 0 {
            return 1;
        }
        let by_time = usize::try_from(RUN_MICROS_TARGET / micros).unwrap_or(RUN_PAGES_MAX);
        // The last pages are shared among the workers rather than left to one.
        let share = left.div_ceil(workers.max(1));
        by_time.min(share).clamp(1, RUN_PAGES_MAX)
    }

    /// Notes that a page took `took` (drivers race here; an estimate is all it is).
    fn page_took(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.page_micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old.saturating_mul(7).saturating_add(sample) / 8
        };
        self.page_micros.store(new.max(1), Ordering::Relaxed);
    }

    /// The bytes `collection` takes on the wire, sent whole as `tuples`.
    fn whole_bytes(&self, collection: &str, tuples: &Vec<&Tuple>) -> usize {
        let mut known = self
            .whole_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *known
            .entry(collection.to_string())
            .or_insert_with(|| wire::encoded_bytes(tuples))
    }

    /// Stores a page's outcome, telling the caller when it matters.
    fn done(&self, i: usize, mut outcome: PageOutcome) {
        // A caller that went away (it unwound) needs no answer.
        if let Some(e) = outcome.source_error.take() {
            let _ = self.events.send(Event::SourceFailed(e));
        }
        let mut slots = self
            .outcomes
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        assert!(slots.outcomes[i].is_none(), "page {i} rendered twice");
        slots.outcomes[i] = Some(outcome);
        slots.left -= 1;
        if slots.left == 0 {
            let _ = self.events.send(Event::Finished);
        } else if i == slots.taken {
            let _ = self.events.send(Event::Ready);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next run to render, round-robin between batches (a single page while another
    /// batch waits); `None` once the pool stops.
    fn next_run(&self) -> Option<(Arc<Batch>, Range<usize>)> {
        let mut queue = self.lock();
        loop {
            if queue.stopping {
                return None;
            }
            if let Some(mut entry) = queue.batches.pop_front() {
                let batch = Arc::clone(&entry.batch);
                let left = batch.jobs.len() - entry.next;
                let len = if queue.batches.is_empty() {
                    batch.run_len(left, self.workers)
                } else {
                    1
                };
                let run = entry.next..entry.next + len;
                entry.next = run.end;
                if entry.next < batch.jobs.len() {
                    queue.batches.push_back(entry);
                }
                return Some((batch, run));
            }
            queue.idle += 1;
            queue = self
                .work
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
            queue.idle -= 1;
        }
    }

    /// The next run, if there is one, no other batch is waiting for its turn (the run
    /// would make that batch wait longer) and no driver is idle (it should render the pages
    /// at once instead).
    fn next_run_uncontended(&self) -> Option<(Arc<Batch>, Range<usize>)> {
        let mut queue = self.lock();
        if queue.stopping || queue.batches.len() != 1 || queue.idle > 0 {
            return None;
        }
        let entry = queue.batches.front_mut().expect("one batch is queued");
        let batch = Arc::clone(&entry.batch);
        let len = batch.run_len(batch.jobs.len() - entry.next, self.workers);
        let run = entry.next..entry.next + len;
        entry.next = run.end;
        if entry.next == batch.jobs.len() {
            queue.batches.pop_front();
        }
        Some((batch, run))
    }

    /// Takes a batch's remaining pages out of the rotation.
    fn withdraw(&self, id: u64) {
        self.lock().batches.retain(|q| q.batch.id != id);
    }
}

/// Withdraws a batch when `render_batch` returns or unwinds.
struct Withdraw<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.shared.withdraw(self.id);
    }
}

impl RenderPool {
    pub fn new(config: PoolConfig) -> RenderPool {
        let workers = threads_or_cores(config.workers).min(WORKERS_MAX);
        RenderPool {
            shared: Arc::new(Shared {
                config,
                workers,
                queue: Mutex::default(),
                work: Condvar::new(),
                workers_started: AtomicU64::new(0),
                collections_sent: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// Worker processes started so far (restarts included).
    pub fn workers_started(&self) -> u64 {
        self.shared.workers_started.load(Ordering::Relaxed)
    }

    /// Collections sent whole to a worker so far (see the module docs).
    pub fn collections_sent(&self) -> u64 {
        self.shared.collections_sent.load(Ordering::Relaxed)
    }

    /// Renders `jobs` in the worker processes, answering from `src` on this thread the reads
    /// that `preloaded` cannot. Outcomes are in the order of `jobs`. A page that hits a
    /// limit, or whose worker dies, fails alone with a [`TemplateError`]; the batch fails
    /// only if `src` does.
    pub fn render_batch(
        &self,
        src: &dyn crate::Source,
        inputs: &BatchInputs,
        jobs: Arc<[PageJob]>,
        preloaded: Arc<Preloaded>,
    ) -> Result<Vec<PageOutcome>, ProjectError> {
        let mut outcomes = Vec::with_capacity(jobs.len());
        self.render_each(src, inputs, jobs, preloaded, &mut |o| outcomes.push(o))?;
        Ok(outcomes)
    }

    /// Renders `jobs` as [`RenderPool::render_batch`] does, handing each page's outcome to
    /// `each` in job order as soon as it and every page before it are done, so the caller
    /// takes in finished pages while later ones still render. On an error, `each` may have
    /// had some of the outcomes.
    pub fn render_each(
        &self,
        src: &dyn crate::Source,
        inputs: &BatchInputs,
        jobs: Arc<[PageJob]>,
        preloaded: Arc<Preloaded>,
        each: &mut dyn FnMut(PageOutcome),
    ) -> Result<(), ProjectError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let total = jobs.len();
        let (events, incoming) = mpsc::channel();
        let outcomes = Arc::new(Outcomes {
            slots: Mutex::new(Slots {
                outcomes: (0..total).map(|_| None).collect(),
                left: total,
                taken: 0,
            }),
        });
        let id = {
            let mut queue = self.shared.lock();
            if !queue.drivers_started {
                self.start_drivers()?;
                queue.drivers_started = true;
            }
            let id = queue.next_id;
            queue.next_id += 1;
            queue.batches.push_back(Queued {
                batch: Arc::new(Batch {
                    id,
                    inputs: inputs.clone(),
                    jobs,
                    preloaded,
                    outcomes: Arc::clone(&outcomes),
                    events,
                    whole_bytes: Mutex::default(),
                    page_micros: AtomicU64::new(0),
                }),
                next: 0,
            });
            id
        };
        self.shared.work.notify_all();
        let withdraw = Withdraw {
            shared: &self.shared,
            id,
        };

        let mut source_error = None;
        // Ends when every page is done, or when the drivers let go of the batch (after a
        // source error withdrew it, or if a driver thread died).
        loop {
            match incoming.recv() {
                Ok(Event::Read(request)) => request.answer(src),
                Ok(Event::SourceFailed(e)) => {
                    // The projection fails: render no more of it.
                    source_error.get_or_insert(e);
                    self.shared.withdraw(id);
                }
                Ok(Event::Ready) if source_error.is_none() => outcomes.take_ready(each),
                Ok(Event::Ready) => {}
                Ok(Event::Finished) | Err(mpsc::RecvError) => break,
            }
        }
        drop(withdraw);
        if let Some(e) = source_error {
            return Err(ProjectError::Source(e));
        }
        outcomes.take_ready(each);
        let left = outcomes
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .left;
        if left > 0 {
            return Err(ProjectError::Pool(format!(
                "the render pool stopped with {left} of {total} pages not rendered"
            )));
        }
        Ok(())
    }

    fn start_drivers(&self) -> Result<(), ProjectError> {
        for slot in 0..self.shared.workers {
            let shared = Arc::clone(&self.shared);
            thread::Builder::new()
                .name(format!("sesame-render-pool-{slot}"))
                .spawn(move || drive(&shared))
                .map_err(ProjectError::Threads)?;
        }
        Ok(())
    }
}

impl Drop for RenderPool {
    fn drop(&mut self) {
        // Drivers finish the page in hand (bounded by the page time limit), stop their
        // workers and end; nothing waits for them here.
        self.shared.lock().stopping = true;
        self.shared.work.notify_all();
    }
}

/// A driver: renders pages on one worker slot until the pool stops.
///
/// Pages are pipelined: while the worker renders one page, the next is already in its pipe
/// (in its run, or the next run when no other batch is waiting for a turn and no driver is
/// idle), so the worker need not wait for the driver between pages. Only the page being
/// rendered can fail with its worker; the ones queued behind it are sent again to the next
/// worker.
fn drive(shared: &Shared) {
    let mut slot = Slot::default();
    // Pages handed to this driver, in the order the worker renders them.
    let mut pages: VecDeque<InHand> = VecDeque::new();
    loop {
        if pages.is_empty() {
            match shared.next_run() {
                Some((batch, run)) => take_run(&mut pages, batch, run),
                None => break,
            }
        }
        // A panic here is a bug in the pool; it fails the page, not the driver (a pool
        // whose drivers all died would leave its callers waiting forever).
        let rendered = panic::catch_unwind(AssertUnwindSafe(|| {
            render_head(shared, &mut slot, &mut pages)
        }));
        let outcome = match rendered {
            Ok(Some(outcome)) => outcome,
            // To be rendered again, on a fresh worker.
            Ok(None) => continue,
            Err(_) => {
                if let Some(worker) = slot.worker.take() {
                    worker.stop();
                }
                for page in pages.iter_mut() {
                    page.sent = false;
                }
                let head = pages.front().expect("a page is in hand");
                let job = &head.batch.jobs[head.i];
                PageOutcome {
                    deps: PageDeps::default(),
                    result: Err(TemplateError {
                        template: job.template.clone(),
                        line: None,
                        message: "the render pool failed on this page (a bug; see the log)".into(),
                        path: Some(job.path.clone()),
                    }),
                    source_error: None,
                }
            }
        };
        let page = pages.pop_front().expect("a page is in hand");
        page.batch.done(page.i, outcome);
    }
    if let Some(worker) = slot.worker.take() {
        worker.stop();
    }
}

fn take_run(pages: &mut VecDeque<InHand>, batch: Arc<Batch>, run: Range<usize>) {
    pages.extend(run.map(|i| InHand::new(Arc::clone(&batch), i)));
}

/// A page a driver holds.
struct InHand {
    batch: Arc<Batch>,
    i: usize,
    /// Sent to the current worker.
    sent: bool,
    /// Rendered once already on a worker that died of memory after other pages: then the
    /// page gets one more try on a fresh worker, since what those pages left behind (cached
    /// templates) may have counted against the limit.
    retried: bool,
}

impl InHand {
    fn new(batch: Arc<Batch>, i: usize) -> InHand {
        InHand {
            batch,
            i,
            sent: false,
            retried: false,
        }
    }
}

/// A driver's worker process, if it has one, and why the last start failed.
#[derive(Default)]
struct Slot {
    worker: Option<Worker>,
    start_failed: Option<(Instant, String)>,
    /// Reused for every frame sent.
    buf: Vec<u8>,
}

/// Renders the first of `pages` (starting a worker and sending it the pages in hand first,
/// and the next page from the queue when it can) and returns its outcome, or `None` when it
/// must be rendered again on a fresh worker.
fn render_head(
    shared: &Shared,
    slot: &mut Slot,
    pages: &mut VecDeque<InHand>,
) -> Option<PageOutcome> {
    let head = pages.front().expect("a page is in hand");
    let (batch, i) = (Arc::clone(&head.batch), head.i);
    let mut reads = PageReads::default();
    let result = match ensure_worker(shared, slot) {
        Err(message) => Err(format!("the renderer could not start: {message}")),
        Ok(()) => {
            let sent = send_pages(shared, slot, pages);
            let worker = slot.worker.as_mut().expect("started above");
            let started = Instant::now();
            let deadline = started + shared.config.page_time_max;
            let conversation = sent.and_then(|()| {
                worker.set_deadline(deadline);
                worker.sent.start_batch(batch.id);
                converse(shared, worker, &batch, &mut reads, &mut slot.buf)
            });
            match conversation {
                Ok(result) => {
                    worker.pages += 1;
                    batch.page_took(started.elapsed());
                    Ok(result)
                }
                Err(cause) => {
                    let worker = slot.worker.take().expect("in use above");
                    let rendered_before = worker.pages > 0;
                    // The worker answered reads of what it held itself; its record of them
                    // dies with it.
                    if worker.sent.batch == Some(batch.id) {
                        for collection in &worker.sent.held {
                            reads.observed.add_prefix(collection, "", None);
                        }
                    }
                    // Pages queued behind this one were never started: the next worker
                    // gets them.
                    for page in pages.iter_mut() {
                        page.sent = false;
                    }
                    let death = worker.kill(cause);
                    let head = pages.front_mut().expect("a page is in hand");
                    if death.out_of_memory() && rendered_before && !head.retried {
                        head.retried = true;
                        return None;
                    }
                    Err(death.describe(&shared.config, "rendering the page"))
                }
            }
        }
    };
    let (deps, result) = match result {
        Ok((deps, result)) => (deps, result),
        Err(message) => {
            let job = &batch.jobs[i];
            let error = TemplateError {
                template: job.template.clone(),
                line: None,
                message,
                path: Some(job.path.clone()),
            };
            // What the worker read before it died, as the driver saw it: a change there may
            // make the page render again.
            (std::mem::take(&mut reads.observed), Err(error))
        }
    };
    Some(PageOutcome {
        deps,
        result,
        source_error: reads.source_error,
    })
}

/// Starts the slot's worker if it has none (unless one failed to start just now).
fn ensure_worker(shared: &Shared, slot: &mut Slot) -> Result<(), String> {
    if slot.worker.is_some() {
        return Ok(());
    }
    if let Some((at, message)) = &slot.start_failed {
        if at.elapsed() < Duration::from_millis(START_RETRY_MS) {
            return Err(message.clone());
        }
    }
    let deadline = Instant::now() + shared.config.page_time_max;
    match Worker::start(shared, deadline, &mut slot.buf) {
        Ok(worker) => {
            slot.start_failed = None;
            slot.worker = Some(worker);
            Ok(())
        }
        Err(message) => {
            slot.start_failed = Some((Instant::now(), message.clone()));
            Err(message)
        }
    }
}

/// Sends the worker the pages in hand it does not have yet, as runs of consecutive pages of
/// one batch, and takes the next run from the queue when it can.
fn send_pages(shared: &Shared, slot: &mut Slot, pages: &mut VecDeque<InHand>) -> Result<(), Cause> {
    if pages.len() < PIPELINE_PAGES {
        if let Some((batch, run)) = shared.next_run_uncontended() {
            take_run(pages, batch, run);
        }
    }
    let worker = slot.worker.as_mut().expect("started before sending");
    let mut written = 0;
    let mut start = 0;
    while start < pages.len() {
        if pages[start].sent {
            start += 1;
            continue;
        }
        let mut end = start + 1;
        while end < pages.len()
            && end - start < RUN_PAGES_MAX
            && !pages[end].sent
            && Arc::ptr_eq(&pages[end].batch, &pages[start].batch)
            && pages[end].i == pages[end - 1].i + 1
        {
            end += 1;
        }
        let first = pages[start].i;
        let budget = RUN_WRITE_BYTES_MAX.saturating_sub(written);
        // The page in hand goes whatever its size (as a lone page always did).
        let must = start == 0;
        let Some((sent, bytes)) = send_run(
            worker,
            &pages[start].batch,
            first..first + (end - start),
            budget,
            must,
            &mut slot.buf,
        )?
        else {
            break;
        };
        for page in pages.range_mut(start..start + sent) {
            page.sent = true;
        }
        written += bytes;
        start += sent;
    }
    Ok(())
}

/// Sends the longest start of `batch`'s pages `run` (halving it) whose frame fits in
/// `budget` bytes, or its first page anyway if `must`. Returns the pages and bytes sent, or
/// `None` if none fit.
fn send_run(
    worker: &mut Worker,
    batch: &Batch,
    mut run: Range<usize>,
    budget: usize,
    must: bool,
    buf: &mut Vec<u8>,
) -> Result<Option<(usize, usize)>, Cause> {
    loop {
        let render: ToWorker<RenderRunRef<'_>> = ToWorker::Render(RenderRunRef {
            batch: batch.id,
            templates: &batch.inputs.templates.id,
            fuel_per_page: batch.inputs.templates.fuel_per_page,
            recursion_depth_max: batch.inputs.templates.recursion_depth_max as u64,
            site: &batch.inputs.site,
            base_url: &batch.inputs.base_url,
            // The body must fit in a frame, with room for the page's dependencies.
            page_bytes_max: batch.inputs.page_bytes_max.min(wire::FRAME_BYTES_MAX / 2) as u64,
            jobs: &batch.jobs[run.clone()],
        });
        let encoded = wire::encode(&render, buf);
        let fits = encoded.is_ok() && buf.len() <= budget;
        if !fits && run.len() > 1 {
            run.end = run.start + run.len() / 2;
            continue;
        }
        if !fits && !must {
            return Ok(None);
        }
        // A lone page too large for a frame fails here, as it always did.
        encoded.map_err(Cause::Wire)?;
        worker.write_frame(buf).map_err(Cause::Wire)?;
        return Ok(Some((run.len(), buf.len())));
    }
}

/// What a page's worker read, as the driver answered it.
#[derive(Default)]
struct PageReads {
    /// A safe over-approximation of the page's dependencies (whole ranges for lists), used
    /// only if the worker dies before it reports its own.
    observed: PageDeps,
    count: usize,
    source_error: Option<SourceError>,
}

type RenderResult = (PageDeps, Result<Rendered, TemplateError>);

/// Why the driver gave up on a worker.
enum Cause {
    Timeout,
    Wire(WireError),
    Protocol(String),
}

impl From<WireError> for Cause {
    fn from(e: WireError) -> Cause {
        match e {
            WireError::Io(e) if e.kind() == io::ErrorKind::TimedOut => Cause::Timeout,
            e => Cause::Wire(e),
        }
    }
}

/// Answers the worker about the page it renders until it is done.
fn converse(
    shared: &Shared,
    worker: &mut Worker,
    batch: &Batch,
    reads: &mut PageReads,
    buf: &mut Vec<u8>,
) -> Result<RenderResult, Cause> {
    loop {
        let answer: ToWorker = match worker.receive()? {
            FromWorker::Done { deps, result } => {
                let result = match result {
                    Ok(RenderedBody { body }) => Ok(Rendered::hashing(body)),
                    Err(e) => Err(e),
                };
                return Ok((deps, result));
            }
            FromWorker::LoadTemplate(name) => {
                ToWorker::Template(batch.inputs.templates.sources.get(&name).cloned())
            }
            FromWorker::Get { collection, key } => {
                reads.count_one()?;
                reads.observed.add_key(&collection, &key);
                if send_whole(shared, worker, batch, collection.clone(), buf)? {
                    continue;
                }
                let answer = read_get(batch, collection, key);
                ToWorker::Got(reads.note(answer))
            }
            FromWorker::List {
                collection,
                prefix,
                limit,
            } => {
                reads.count_one()?;
                let limit = usize::try_from(limit)
                    .ok()
                    .filter(|l| *l <= LIST_LIMIT_MAX)
                    .ok_or_else(|| Cause::Protocol(format!("a list() limit of {limit}")))?;
                reads.observed.add_prefix(&collection, &prefix, None);
                if send_whole(shared, worker, batch, collection.clone(), buf)? {
                    continue;
                }
                let answer = read_list(batch, collection, prefix, limit);
                ToWorker::Listed(reads.note(answer))
            }
            FromWorker::Asset { key } => {
                reads.count_one()?;
                let answer = batch.inputs.assets.find(&key).cloned();
                if let Ok(path) = asset_path(&key) {
                    reads.observed.add_asset_url(&key, &path);
                }
                ToWorker::AssetIs(answer)
            }
            FromWorker::Started => {
                return Err(Cause::Protocol("a second start".into()));
            }
        };
        match worker.send(&answer, buf) {
            Err(WireError::TooLarge { bytes }) => {
                let message = format!(
                    "the answer is {bytes} bytes, more than the {} a render may receive at once",
                    wire::FRAME_BYTES_MAX
                );
                let refusal: ToWorker = match answer {
                    ToWorker::Got(_) => ToWorker::Got(Err(message)),
                    ToWorker::Listed(_) => ToWorker::Listed(Err(message)),
                    _ => return Err(Cause::Protocol(message)),
                };
                worker.send(&refusal, buf)?;
            }
            other => other?,
        }
    }
}

/// Answers a read of `collection` with all of it, if the batch holds it whole, the worker
/// read it before in this batch and it fits the worker's budget. Returns whether it did.
fn send_whole(
    shared: &Shared,
    worker: &mut Worker,
    batch: &Batch,
    collection: String,
    buf: &mut Vec<u8>,
) -> Result<bool, Cause> {
    let sent = &mut worker.sent;
    if sent.held.contains(&collection) {
        return Err(Cause::Protocol(format!(
            "a read of {collection}, which it was sent whole"
        )));
    }
    if !batch.preloaded.is_complete(&collection) {
        return Ok(false);
    }
    // Bounded: only collections the batch holds whole are counted.
    let asked = sent.asked.entry(collection.clone()).or_insert(0);
    *asked += 1;
    if *asked <= READS_BEFORE_SENDING_WHOLE {
        return Ok(false);
    }
    let tuples = batch
        .preloaded
        .whole(&collection)
        .expect("the collection is held whole");
    let bytes = batch.whole_bytes(&collection, &tuples);
    if bytes > COLLECTION_BYTES_SENT_MAX - sent.bytes {
        return Ok(false);
    }
    sent.bytes += bytes;
    sent.held.push(collection.clone());
    let whole: ToWorker<RenderRunRef<'_>, Vec<&Tuple>> =
        ToWorker::Collection { collection, tuples };
    worker.send(&whole, buf)?;
    shared.collections_sent.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

impl PageReads {
    /// The worker enforces the per-page read limit itself; this only stops a worker that
    /// does not.
    fn count_one(&mut self) -> Result<(), Cause> {
        self.count += 1;
        if self.count > READS_PER_PAGE_MAX + 1 {
            return Err(Cause::Protocol(format!(
                "more than {READS_PER_PAGE_MAX} reads for one page"
            )));
        }
        Ok(())
    }

    /// Keeps a store failure (the projection must stop) and passes its message on.
    fn note<T>(&mut self, answer: Result<T, SourceError>) -> Result<T, String> {
        answer.map_err(|e| {
            let message = e.to_string();
            self.source_error.get_or_insert(e);
            message
        })
    }
}

fn read_get(batch: &Batch, collection: String, key: String) -> Result<Option<Tuple>, SourceError> {
    if let Some(answer) = batch.preloaded.get(&collection, &key) {
        return Ok(answer);
    }
    let (reply, answer) = mpsc::sync_channel(1);
    let request = ReadRequest::Get {
        collection,
        key,
        reply,
    };
    batch
        .events
        .send(Event::Read(request))
        .map_err(|_| not_serving())?;
    answer.recv().map_err(|_| not_serving())?
}

fn read_list(
    batch: &Batch,
    collection: String,
    prefix: String,
    limit: usize,
) -> Result<Vec<Tuple>, SourceError> {
    if let Some(answer) = batch.preloaded.list(&collection, &prefix, limit) {
        return Ok(answer);
    }
    let (reply, answer) = mpsc::sync_channel(1);
    let request = ReadRequest::List {
        collection,
        prefix,
        limit,
        reply,
    };
    batch
        .events
        .send(Event::Read(request))
        .map_err(|_| not_serving())?;
    answer.recv().map_err(|_| not_serving())?
}

/// A running worker process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<DeadlineReader>,
    /// Reused for every frame read.
    read_buf: Vec<u8>,
    stderr: Option<JoinHandle<String>>,
    /// Pages it has rendered.
    pages: u64,
    sent: Sent,
}

/// What the pool sent a worker for the batch it renders, mirroring what the worker keeps
/// (`BatchMemory` in `worker.rs`: it too starts over when the batch changes).
#[derive(Default)]
struct Sent {
    batch: Option<u64>,
    /// Reads so far of each collection the batch holds whole and the worker does not.
    asked: HashMap<String, u32>,
    /// Collections sent whole.
    held: Vec<String>,
    /// Their bytes on the wire.
    bytes: usize,
}

impl Sent {
    fn start_batch(&mut self, batch: u64) {
        if self.batch != Some(batch) {
            *self = Sent {
                batch: Some(batch),
                ..Sent::default()
            };
        }
    }
}

/// How a worker ended.
struct Death {
    cause: Cause,
    status: Option<ExitStatus>,
    /// The end of what it wrote to stderr.
    stderr: String,
}

impl Worker {
    /// Starts a worker and waits until it has set its limits. Returns why not, for people.
    fn start(shared: &Shared, deadline: Instant, buf: &mut Vec<u8>) -> Result<Worker, String> {
        let config = &shared.config;
        let mut child = Command::new(&config.command.program)
            .args(&config.command.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // One malloc arena: each extra one reserves 64 MiB of address space, which would
            // count against the memory limit without being used.
            .env("MALLOC_ARENA_MAX", "1")
            // The same for mimalloc (the `sesame` binary's allocator): it reserves address
            // space 1 GiB at a time, which the limit refuses; a worker that cannot reserve
            // then crawls instead of failing fast at its limit. 8 MiB steps fit.
            .env("MIMALLOC_ARENA_RESERVE", "8MiB")
            .spawn()
            .map_err(|e| format!("running {}: {e}", config.command.program.display()))?;
        shared.workers_started.fetch_add(1, Ordering::Relaxed);
        let pid = child.id();
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr = thread::Builder::new()
            .name(format!("sesame-render-err-{pid}"))
            .spawn(move || keep_stderr(stderr, pid));
        let stderr = match stderr {
            Ok(stderr) => stderr,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("starting a thread for it: {e}"));
            }
        };
        let mut worker = Worker {
            child,
            stdin,
            stdout: BufReader::with_capacity(
                READ_BUFFER_BYTES,
                DeadlineReader { stdout, deadline },
            ),
            read_buf: Vec::new(),
            stderr: Some(stderr),
            pages: 0,
            sent: Sent::default(),
        };
        let start: ToWorker = ToWorker::Start {
            memory_bytes_max: config.memory_bytes_max,
        };
        // A worker that exits at once breaks the pipe before it could read this; what it
        // wrote (or its exit) explains that better than the broken pipe, so read on.
        let _ = worker.send(&start, buf);
        match worker.receive() {
            Ok(FromWorker::Started) => Ok(worker),
            Ok(_) => Err(worker
                .kill(Cause::Protocol("something else than started".into()))
                .describe(config, "starting")),
            Err(cause) => Err(worker.kill(cause).describe(config, "starting")),
        }
    }

    fn send<R: bincode::Encode, C: bincode::Encode>(
        &mut self,
        message: &ToWorker<R, C>,
        buf: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        wire::send(&mut self.stdin, message, buf)
    }

    /// Writes a frame made by [`wire::encode`].
    fn write_frame(&mut self, frame: &[u8]) -> Result<(), WireError> {
        use std::io::Write as _;
        self.stdin.write_all(frame)?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Until when [`Worker::receive`] waits.
    fn set_deadline(&mut self, deadline: Instant) {
        self.stdout.get_mut().deadline = deadline;
    }

    /// The worker's next message, or why there is none by the deadline.
    fn receive(&mut self) -> Result<FromWorker, Cause> {
        wire::receive(&mut self.stdout, &mut self.read_buf).map_err(Cause::from)
    }

    /// Kills the worker (it may be dead already) and collects how it ended.
    fn kill(self, cause: Cause) -> Death {
        let Worker {
            mut child,
            stdin,
            stdout,
            stderr,
            ..
        } = self;
        drop(stdin);
        drop(stdout);
        // Killing a process std has already reaped is a no-op, never another process.
        let _ = child.kill();
        let status = child.wait().ok();
        let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        Death {
            cause,
            status,
            stderr,
        }
    }

    /// Stops an idle worker.
    fn stop(self) {
        self.kill(Cause::Wire(WireError::Closed));
    }
}

/// A worker's stdout, read with a deadline: every read first waits (`poll`) until there is
/// something to read, and fails with `TimedOut` past the deadline, so a worker that hangs,
/// even in the middle of a frame, cannot hold its driver.
struct DeadlineReader {
    stdout: ChildStdout,
    deadline: Instant,
}

impl Read for DeadlineReader {
    #[cfg(unix)]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            let timeout = Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: left.subsec_nanos().into(),
            };
            let mut fds = [PollFd::new(&self.stdout, PollFlags::IN)];
            match poll(&mut fds, Some(&timeout)) {
                // Timed out: the loop reports it.
                Ok(0) => continue,
                // Readable, or closed (then the read sees the end).
                Ok(_) => return self.stdout.read(buf),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    #[cfg(not(unix))]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stdout.read(buf)
    }
}

/// Logs the first lines a worker writes to stderr and returns the end of it.
fn keep_stderr(stderr: impl Read, pid: u32) -> String {
    use std::io::BufRead as _;
    let mut tail = String::new();
    let mut logged = 0;
    let mut input = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        // A line is bounded by what the tail keeps; the rest of a longer one is dropped.
        match input
            .by_ref()
            .take(STDERR_TAIL_BYTES as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return tail,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        if logged < STDERR_LINES_LOGGED_MAX {
            tracing::warn!(worker = pid, "render worker: {}", text.trim_end());
            logged += 1;
        }
        tail.push_str(&text);
        if tail.len() > STDERR_TAIL_BYTES {
            let mut cut = tail.len() - STDERR_TAIL_BYTES;
            while !tail.is_char_boundary(cut) {
                cut += 1;
            }
            tail.drain(..cut);
        }
    }
}

impl Death {
    /// Whether an allocation failed against the memory limit.
    fn out_of_memory(&self) -> bool {
        matches!(self.cause, Cause::Wire(_)) && self.stderr.contains(OUT_OF_MEMORY)
    }

    /// Why the page failed, for site status; `during` is what the worker was doing.
    fn describe(&self, config: &PoolConfig, during: &str) -> String {
        let wire_error = match &self.cause {
            Cause::Timeout => {
                return format!(
                    "the page took longer than its time limit of {}",
                    duration(config.page_time_max)
                )
            }
            Cause::Protocol(what) => {
                return format!("the renderer broke the protocol: it sent {what}")
            }
            Cause::Wire(e) => e,
        };
        if self.out_of_memory() {
            let what = if during == "starting" {
                "the renderer itself"
            } else {
                "the page"
            };
            return format!(
                "{what} needed more than its memory limit of {}",
                mib(config.memory_bytes_max)
            );
        }
        if self.stderr.contains("has overflowed its stack") {
            return "the page nests too deeply: the renderer ran out of stack".to_string();
        }
        if !matches!(wire_error, WireError::Closed | WireError::Io(_)) {
            return format!("the renderer sent a malformed message: {wire_error}");
        }
        let how = match self.status {
            Some(status) => describe_status(status),
            None => "stopped".to_string(),
        };
        match self.stderr.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(last) => format!(
                "the renderer {how} while {during}: {}",
                truncate(last.trim(), 200)
            ),
            None => format!("the renderer {how} while {during}"),
        }
    }
}

#[cfg(unix)]
fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "stopped".to_string(),
    }
}

#[cfg(not(unix))]
fn describe_status(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => "stopped".to_string(),
    }
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn mib(bytes: u64) -> String {
    if bytes & ((1 << 20) - 1) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

fn duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
