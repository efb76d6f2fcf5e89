//! The Sesame Rust client library.
//!
//! For now this is the HTTP API client ([`Http`]) that the `sesame` CLI, the tests and the
//! benchmark harness use. The local replica, offline queue and subscriptions come with the
//! live-features work.

mod http;

pub use http::{ClientError, Http, NODES_MAX, RETRY_ROUNDS_MAX};
