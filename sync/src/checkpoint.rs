//! Checkpoints of a store's write-ahead log, off the write path.
//!
//! SQLite checkpoints a WAL database itself every 1,000 pages of log, in the connection
//! that commits: that commit then copies pages into the database file and fsyncs it before
//! it returns. For the store's writer that is a write's acknowledgement held for the copy;
//! on a large store (a million tuples) these checkpoints were the slowest acknowledgements.
//! A [`Checkpointer`] runs them on a thread of its own instead, with its own connection:
//! a passive checkpoint copies what no reader still needs and never waits for the writer,
//! which goes on appending to the log meanwhile. The writer keeps an automatic checkpoint
//! of its own far above the background one ([`WRITER_CHECKPOINT_PAGES`]), so the log stays
//! bounded should the thread ever fall behind.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use crate::store::StoreError;

/// How often the background thread checkpoints. Each checkpoint that copies anything ends
/// in an fsync of the database file, which on ext4 waits for the journal that the Raft log's
/// own fsyncs use too: checkpoints every 200 ms made single edits' publishes slower.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Log pages past which the writer checkpoints itself (64 MiB of 4 KiB pages): only when the
/// background thread falls behind.
pub const WRITER_CHECKPOINT_PAGES: u32 = 16_384;

/// Checkpoints the store's log every [`CHECKPOINT_INTERVAL`] on its own thread until
/// dropped. Made by [`crate::Store::checkpoint_in_background`].
pub struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(crate) fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path)?;
        crate::schema::configure(&conn)?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("sesame-checkpoint".into())
            .spawn(move || run(&conn, &stopped))
            .map_err(StoreError::Thread)?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

fn run(conn: &Connection, stop: &(Mutex<bool>, Condvar)) {
    let (lock, wake) = stop;
    let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        stopped = wake
            .wait_timeout(stopped, CHECKPOINT_INTERVAL)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if *stopped {
            return;
        }
        // A failure (a full disk) is tried again next time; meanwhile the writer's own
        // checkpoint bounds the log.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!("checkpoint of the store's log: {e}");
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
