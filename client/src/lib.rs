//! The Sesame Rust client library.
//!
//! - [`Client`]: the sync client, over QUIC: a local replica of what it subscribes to, an
//!   offline queue of its own transactions (applied at most once), live changes.
//! - [`Http`]: the HTTP API client that the `sesame` CLI, the tests and the benchmark harness
//!   use.

mod http;
mod sync;

pub use http::{ClientError, Http, NODES_MAX, RETRY_ROUNDS_MAX};
pub use sesame_sync::client::Event;
pub use sesame_sync::replica::Entry;
pub use sync::{tls_config as sync_tls_config, Change, Client, Options, Queued, SyncError};
