//! Everything that speaks HTTP: the JSON API under `/v1` ([`api`], [`cluster`]), who is
//! calling ([`auth`]), error bodies ([`error`]), per-site rate limits ([`limits`]), WebRTC signalling and the live scripts ([`live`]), and the
//! layer every answer passes on its way out ([`answer`]). Pages are served by
//! [`crate::pages::serve`], which the router falls back to.

pub mod accounts;
pub mod answer;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod error;
pub mod limits;
pub mod live;

pub use api::router;
