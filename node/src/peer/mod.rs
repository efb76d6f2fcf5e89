//! Node-to-node transport: QUIC with mutual TLS from the cluster CA.

pub mod tls;

pub use tls::NodeCerts;
