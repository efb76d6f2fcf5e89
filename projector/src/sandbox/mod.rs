//! Rendering in worker processes, so that no template can take the node down.
//!
//! minijinja's fuel bounds the instructions a template runs and our writer bounds its
//! output, but neither bounds the values in between: `s|replace("a", s)` or `s ~ s` in a
//! loop builds gigabytes in a handful of instructions, and `indent(1000000000)` takes
//! one. In the node's own process that is an out-of-memory kill, and after a restart the
//! same page kills it again. So the node renders in a [`RenderPool`] of worker processes:
//! each limits its own address space at start-up (an allocation past it aborts the worker),
//! and the pool kills a worker whose page runs past the wall-clock limit. Either way only
//! that page fails, with a [`crate::TemplateError`] naming the limit, and the next page gets
//! a fresh worker.
//!
//! The worker runs the same page renderer as everything else
//! (`render::render_page`, with the same environment, `get`/`list`
//! dependency recording, fuel, recursion and output limits); its reads and template loads
//! come back to the pool over the pipe (`wire`), except reads of a collection the pool sent
//! it whole for the batch. The in-process thread renderer
//! ([`crate::Renderer::Threads`]) stays for library users, tests and examples; the node
//! always uses the pool.
//!
//! The pool is shared by every site of a node and takes pages of concurrent batches in turn
//! (see `pool`), so one site's slow pages delay another site's edit by about one run of
//! pages per worker (a run of slow pages is one page long), not by the whole batch.
//!
//! A program becomes a worker by calling [`worker_main`]; the `sesame` binary does so for
//! its hidden `render-worker` subcommand.

mod pool;
mod wire;
mod worker;

pub use pool::{
    PoolConfig, RenderPool, WorkerCommand, COLLECTION_BYTES_SENT_MAX, PAGE_TIME_MS_DEFAULT,
    RUN_PAGES_MAX, WORKERS_MAX, WORKER_MEMORY_BYTES_DEFAULT,
};
pub use wire::FRAME_BYTES_MAX;
pub use worker::worker_main;

/// Compiled template environments a worker keeps (by template set and escaping).
pub const ENVIRONMENTS_CACHED_MAX: usize = 16;
/// Template source a worker keeps compiled, over all its environments, in bytes (about: the
/// environment in use is never evicted).
pub const TEMPLATE_BYTES_CACHED_MAX: usize = 8 << 20;
