//! The Sesame server: openraft replication, the HTTP API and the `sesame` command line.
//!
//! Where to start reading, in the order a write travels: [`http::api`] is where every request
//! enters; [`write::Writer`] is where a write is batched and sent to the leader;
//! [`raft`] orders and replicates it and [`raft::state_machine`] applies it; [`pages`] turns
//! commits into published pages (on the leader) and serves them (on every node);
//! [`cluster`] is what a node answers its peers over [`peer`]. [`app::start`] wires the
//! parts together.
//!
//! Rooms: `http/` (the API, auth, errors, rate limits, the edge layer), `pages/` (projection,
//! following committed roots, serving), `raft/` (storage, network, the supervised instance),
//! `peer/` (QUIC with mutual TLS), and the write and read paths at the top.

pub mod app;
pub mod backup;
pub mod cli;
pub mod clients;
pub mod cluster;
pub mod edge;
pub mod http;
pub mod live;
pub mod metrics;
pub mod pages;
pub mod peer;
pub mod private;
pub mod raft;
pub mod reads;
pub mod studio;
pub mod transfer;
pub mod write;

pub use app::{start, ClusterConfig, NodeConfig, RunningNode};
