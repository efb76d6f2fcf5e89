//! Sesame's wire and storage types and their binary codec.
//!
//! This crate does no I/O: it defines what a tuple, a transaction and a Raft command are,
//! how names and sizes are validated, how values map to and from JSON, and how any of them is
//! encoded for the log, the disk and the wire. Every other crate speaks these types.

pub mod api;
pub mod codec;
pub mod command;
pub mod names;
pub mod sync;
pub mod tuple;
pub mod value;

pub use command::{
    Command, CommandResult, Conflict, PreviewRecord, Publish, Role, Scope, TokenRecord,
    PREVIEWS_PER_SITE_MAX, SCOPES_PER_TOKEN_MAX,
};
pub use names::{encode_segment, validate_collection, validate_key, validate_site, NameError};
pub use tuple::{Home, Op, Origin, Transaction, Tuple, TxError};
pub use value::Value;

/// A Raft log index. Tuple versions are log indexes: the index of the commit that last wrote
/// the tuple. Index 0 never holds a commit, so `if_version: 0` means "must not exist".
pub type LogIndex = u64;

/// The largest index, version or sequence number anything accepts: the store keeps them in
/// SQLite's signed 64-bit integers, so a larger one would wrap around. Input past it is
/// refused (the API answers 400).
pub const INDEX_MAX: u64 = i64::MAX as u64;
