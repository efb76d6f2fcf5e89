//! Runs SQLite work on tokio's blocking pool so it never stalls the async workers.
//!
//! Every storage call makes one hop: the whole batch openraft hands over goes to one blocking
//! task, never one task per entry.

use std::sync::{Arc, Mutex};

/// Runs `work` with exclusive access to `shared` on the blocking pool and returns its output.
///
/// A panic inside `work` is re-raised here: storage that panicked is in an unknown state, and
/// the node must go down rather than carry on.
pub(crate) async fn run<S, T>(
    shared: &Arc<Mutex<S>>,
    work: impl FnOnce(&mut S) -> T + Send + 'static,
) -> T
where
    S: Send + 'static,
    T: Send + 'static,
{
    let shared = Arc::clone(shared);
    let task = tokio::task::spawn_blocking(move || {
        let mut guard = shared
            .lock()
            .expect("storage mutex is poisoned only after a panic, which already stopped the node");
        work(&mut guard)
    });
    match task.await {
        Ok(output) => output,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // A blocking task is cancelled only when the runtime shuts down before it starts, and
        // then the task awaiting it here is being dropped too.
        Err(e) => panic!("storage task was cancelled: {e}"),
    }
}
