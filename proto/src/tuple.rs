//! Tuples, transactions and their validation.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names::{validate_collection, validate_key, validate_site, NameError};
use crate::value::{Value, VALUE_DEPTH_MAX};
use crate::{codec, LogIndex, INDEX_MAX};

/// Largest encoded value, in bytes (SPEC.md: 1 MiB by default).
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Most operations in one transaction.
pub const TX_OPS_MAX: usize = 10_000;
/// Largest encoded transaction, in bytes.
pub const TX_BYTES_MAX: usize = 8 << 20;
/// Longest client id, in bytes.
pub const CLIENT_ID_BYTES_MAX: usize = 128;
/// How many of a client's latest sequence numbers (per site) the store remembers with the
/// index each was applied at: a retry of any of them is answered with its own index. A
/// retry of an older one is answered [`crate::CommandResult::StaleSeq`].
pub const CLIENT_SEQ_WINDOW: u64 = 1_024;

/// Where a tuple was born: the client that wrote it and that client's sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Origin {
    pub client_id: String,
    pub seq: u64,
}

/// Where a tuple wants to live.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
#[serde(rename_all = "snake_case")]
pub enum Home {
    /// The site's Raft group: the tuple is part of the site's data.
    #[default]
    Site,
    /// One client's mailbox: stored and forwarded to that client.
    Mailbox(String),
}

/// A committed tuple: `(site, collection, key) → value` at `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Tuple {
    pub site: String,
    pub collection: String,
    pub key: String,
    pub value: Value,
    /// The log index of the commit that last wrote this tuple.
    pub version: LogIndex,
    pub origin: Option<Origin>,
    pub home: Home,
}

/// One operation of a transaction. In JSON: `{ "put": { ... } }` or `{ "delete": { ... } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    Put {
        collection: String,
        key: String,
        value: Value,
        /// Compare-and-set: the tuple's current version must equal this (0: must not exist).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_version: Option<LogIndex>,
    },
    Delete {
        collection: String,
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_version: Option<LogIndex>,
    },
    /// A put whose home is client `to`'s mailbox: the cluster stores it and delivers it to
    /// that client when it connects (see `proto::sync`). It replaces what the key held.
    Send {
        to: String,
        collection: String,
        key: String,
        value: Value,
    },
}

impl Op {
    pub fn collection(&self) -> &str {
        match self {
            Op::Put { collection, .. }
            | Op::Delete { collection, .. }
            | Op::Send { collection, .. } => collection,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } | Op::Send { key, .. } => key,
        }
    }

    /// The value a put or send writes (`None` for a delete).
    pub fn value(&self) -> Option<&Value> {
        match self {
            Op::Put { value, .. } | Op::Send { value, .. } => Some(value),
            Op::Delete { .. } => None,
        }
    }

    /// The mailbox a send goes to.
    pub fn home(&self) -> Home {
        match self {
            Op::Send { to, .. } => Home::Mailbox(to.clone()),
            Op::Put { .. } | Op::Delete { .. } => Home::Site,
        }
    }

    pub fn if_version(&self) -> Option<LogIndex> {
        match self {
            Op::Put { if_version, .. } | Op::Delete { if_version, .. } => *if_version,
            Op::Send { .. } => None,
        }
    }
}

/// An ordered list of operations on one site that commit at one index, or not at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Transaction {
    pub site: String,
    pub ops: Vec<Op>,
    /// With an origin the transaction is applied at most once per `(client_id, seq)`.
    pub origin: Option<Origin>,
}

/// Why a transaction was refused before it reached the log.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TxError {
    #[error("transaction has no operations")]
    Empty,
    #[error("transaction has {count} operations, the limit is {max}")]
    TooManyOps { count: usize, max: usize },
    #[error("transaction is {bytes} bytes encoded, the limit is {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error(
        "op {op}: value of {collection}/{key} is {bytes} bytes encoded, the limit is {max} bytes"
    )]
    ValueTooLarge {
        op: usize,
        collection: String,
        key: String,
        bytes: usize,
        max: usize,
    },
    #[error("op {op}: value nests {depth} levels deep, the limit is {max}")]
    ValueTooDeep { op: usize, depth: usize, max: usize },
    #[error("op {op}: {source}")]
    Name {
        op: usize,
        #[source]
        source: NameError,
    },
    #[error("{0}")]
    Site(NameError),
    #[error("invalid client_id: {0}")]
    ClientId(String),
    #[error("op {op}: invalid mailbox (send.to): {message}")]
    Mailbox { op: usize, message: String },
    #[error("seq {0} is over the maximum of {INDEX_MAX}")]
    SeqTooLarge(u64),
    #[error("op {op}: if_version {version} is over the maximum of {INDEX_MAX}")]
    IfVersionTooLarge { op: usize, version: LogIndex },
}

impl Transaction {
    /// Checks names, counts and sizes against the limits. A valid transaction can always be
    /// encoded into a log entry.
    pub fn validate(&self) -> Result<(), TxError> {
        validate_site(&self.site).map_err(TxError::Site)?;
        if self.ops.is_empty() {
            return Err(TxError::Empty);
        }
        if self.ops.len() > TX_OPS_MAX {
            return Err(TxError::TooManyOps {
                count: self.ops.len(),
                max: TX_OPS_MAX,
            });
        }
        if let Some(origin) = &self.origin {
            validate_client_id(&origin.client_id).map_err(TxError::ClientId)?;
            if origin.seq > INDEX_MAX {
                return Err(TxError::SeqTooLarge(origin.seq));
            }
        }
        for (i, op) in self.ops.iter().enumerate() {
            let name_err = |source| TxError::Name { op: i, source };
            validate_collection(op.collection()).map_err(name_err)?;
            validate_key(op.key()).map_err(name_err)?;
            if let Some(version) = op.if_version().filter(|v| *v > INDEX_MAX) {
                return Err(TxError::IfVersionTooLarge { op: i, version });
            }
            if let Op::Send { to, .. } = op {
                validate_client_id(to).map_err(|e| TxError::Mailbox { op: i, message: e })?;
            }
            if let Some(value) = op.value() {
                let (collection, key) = (op.collection(), op.key());
                let depth = value.depth();
                if depth > VALUE_DEPTH_MAX {
                    return Err(TxError::ValueTooDeep {
                        op: i,
                        depth,
                        max: VALUE_DEPTH_MAX,
                    });
                }
                let bytes = codec::encoded_len(value);
                if bytes > VALUE_BYTES_MAX {
                    return Err(TxError::ValueTooLarge {
                        op: i,
                        collection: collection.to_string(),
                        key: key.to_string(),
                        bytes,
                        max: VALUE_BYTES_MAX,
                    });
                }
            }
        }
        let bytes = codec::encoded_len(self);
        if bytes > TX_BYTES_MAX {
            return Err(TxError::TooLarge {
                bytes,
                max: TX_BYTES_MAX,
            });
        }
        Ok(())
    }
}

/// Checks a client id: 1 to 128 bytes of `[A-Za-z0-9_.:-]`.
pub fn validate_client_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= CLIENT_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} must be 1 to {CLIENT_ID_BYTES_MAX} bytes of [A-Za-z0-9_.:-]"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(coll: &str, key: &str, value: Value) -> Op {
        Op::Put {
            collection: coll.into(),
            key: key.into(),
            value,
            if_version: None,
        }
    }

    fn tx(ops: Vec<Op>) -> Transaction {
        Transaction {
            site: "demo".into(),
            ops,
            origin: None,
        }
    }

    #[test]
    fn op_json_shape() {
        let op: Op = serde_json::from_str(
            r#"{ "put": { "collection": "p", "key": "k", "value": {"a": 1}, "if_version": 0 } }"#,
        )
        .unwrap();
        assert_eq!(op.if_version(), Some(0));
        let del: Op =
            serde_json::from_str(r#"{ "delete": { "collection": "p", "key": "k" } }"#).unwrap();
        assert_eq!(del.if_version(), None);
        let unknown = serde_json::from_str::<Op>(
            r#"{ "put": { "collection": "p", "key": "k", "value": 1, "colour": 2 } }"#,
        );
        assert!(unknown.unwrap_err().to_string().contains("colour"));
    }

    #[test]
    fn validation_limits() {
        assert_eq!(tx(vec![]).validate(), Err(TxError::Empty));
        assert!(tx(vec![put("p", "k", Value::Null)]).validate().is_ok());

        let many = vec![put("p", "k", Value::Null); TX_OPS_MAX + 1];
        assert!(matches!(
            tx(many).validate(),
            Err(TxError::TooManyOps { .. })
        ));

        let big = Value::Bytes(vec![0; VALUE_BYTES_MAX]);
        let err = tx(vec![put("p", "k", big)]).validate().unwrap_err();
        assert!(matches!(err, TxError::ValueTooLarge { op: 0, .. }), "{err}");
        assert!(err.to_string().contains("1048576"), "{err}");

        let err = tx(vec![put("p", "", Value::Null)]).validate().unwrap_err();
        assert!(matches!(err, TxError::Name { op: 0, .. }));
        let err = tx(vec![put("bad/coll", "k", Value::Null)])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("collection"), "{err}");

        let mut t = tx(vec![put("p", "k", Value::Null)]);
        t.site = "Bad Site".into();
        assert!(matches!(t.validate(), Err(TxError::Site(_))));

        // Each value under the limit, the sum over it.
        let value = Value::Bytes(vec![0; VALUE_BYTES_MAX - 64]);
        let ops = (0..9)
            .map(|i| put("p", &format!("k{i}"), value.clone()))
            .collect();
        assert!(matches!(tx(ops).validate(), Err(TxError::TooLarge { .. })));
    }

    #[test]
    fn numbers_past_sqlite_integers_are_refused() {
        let mut t = tx(vec![Op::Delete {
            collection: "p".into(),
            key: "k".into(),
            if_version: Some(INDEX_MAX + 1),
        }]);
        assert!(matches!(
            t.validate(),
            Err(TxError::IfVersionTooLarge { op: 0, .. })
        ));
        t.ops = vec![put("p", "k", Value::Null)];
        t.origin = Some(Origin {
            client_id: "c".into(),
            seq: u64::MAX,
        });
        assert_eq!(t.validate(), Err(TxError::SeqTooLarge(u64::MAX)));
        t.origin = Some(Origin {
            client_id: "c".into(),
            seq: INDEX_MAX,
        });
        assert_eq!(t.validate(), Ok(()));
    }

    #[test]
    fn client_ids() {
        assert!(validate_client_id("app-1:phone").is_ok());
        assert!(validate_client_id("").is_err());
        assert!(validate_client_id("a b").is_err());
        assert!(validate_client_id(&"c".repeat(129)).is_err());
    }
}
