//! What the cluster membership records about each node: where to reach it.
//!
//! openraft stores a [`Member`] per node id in every membership config, in the log and in
//! snapshots, so this type is part of the on-disk format: add fields only with
//! `#[serde(default)]`, never rename or remove one.
//!
//! A node's certificate identity is not stored here: it follows from the node id (see
//! [`crate::peer::tls::node_dns_name`]), so a peer dialled at `raft` must prove it is that id.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How to reach one node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Member {
    /// The node's peer (QUIC) address, `host:port`.
    pub raft: String,
    /// The node's HTTP address, `host:port` or a URL, for clients sent to the leader.
    pub http: String,
}

impl Member {
    pub fn new(raft: impl Into<String>, http: impl Into<String>) -> Member {
        Member {
            raft: raft.into(),
            http: http.into(),
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{raft: {}, http: {}}}", self.raft, self.http)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_both_addresses() {
        let m = Member::new("10.0.0.1:7800", "http://10.0.0.1:7700");
        assert_eq!(
            m.to_string(),
            "{raft: 10.0.0.1:7800, http: http://10.0.0.1:7700}"
        );
    }

    #[test]
    fn json_form_is_stable() {
        // Membership is stored as JSON in the log and the state machine.
        let m = Member::new("a:1", "b:2");
        let json = serde_json::to_string(&m).expect("encode");
        assert_eq!(json, r#"{"raft":"a:1","http":"b:2"}"#);
        let back: Member = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, m);
    }
}
