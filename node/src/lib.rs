//! The Sesame server: openraft replication, the HTTP API and the `sesame` command line.
//!
//! Where to start reading: [`node::start`] wires storage, Raft and HTTP together;
//! [`api`] is where every request enters; [`node::Node::write_tx`] is where a write is
//! ordered; [`raft::state_machine`] is where it is applied; [`projection`] turns commits
//! into published pages and [`serve`] serves them.

pub mod api;
pub mod api_cluster;
pub mod auth;
pub mod bundle;
pub mod cli;
pub mod cluster;
pub mod edge;
pub mod error;
pub mod follow;
pub mod limits;
pub mod node;
pub mod peer;
pub mod private;
pub mod projection;
pub mod raft;
pub mod reads;
pub mod serve;
pub mod write;

pub use node::{start, ClusterConfig, NodeConfig, RunningNode};
