//! The Sesame server: openraft replication, the HTTP API and the `sesame` command line.
//!
//! Where to start reading: [`node::start`] wires storage, Raft and HTTP together;
//! [`api`] is where every request enters; [`node::Node::propose`] is where a write is
//! ordered; [`raft::state_machine`] is where it is applied.

pub mod api;
pub mod auth;
pub mod cli;
pub mod error;
pub mod node;
pub mod raft;

pub use node::{start, NodeConfig, RunningNode};
