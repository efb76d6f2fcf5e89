//! The client sync protocol: what an app client (over QUIC) or a browser (over a WebRTC data
//! channel) and a node say to each other. One protocol for both transports: every message is
//! one frame of the codec (magic, format version, bincode), and on a byte stream each frame
//! is preceded by its length as a big-endian `u32` ([`FrameReader`] splits a stream back into
//! frames; a data channel carries one frame per message).
//!
//! A session: the client says [`ClientMsg::Hello`] (protocol version, token, client id); the
//! node answers [`ServerMsg::Welcome`] or [`ServerMsg::Error`] and closes. Then the client
//! subscribes to parts of sites ([`Subscription`]) from the index it has seen; the node
//! catches it up (a streamed [`ServerMsg::Snapshot`] of the subscription when it starts from
//! nothing, else the changes since its index) and then sends [`ServerMsg::Changes`] as
//! entries commit, in commit order. The client pushes transactions carrying its
//! `(client_id, seq)`; each is answered [`ServerMsg::Acked`] with the commit index or a
//! rejection. A subscriber that falls too far behind is told [`ServerMsg::Resync`] and must
//! subscribe again. Every size and count has a limit; breaking one is an error that closes
//! the session.

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::tuple::{Home, Origin, Transaction};
use crate::value::Value;
use crate::LogIndex;

/// The protocol version this build speaks. A node refuses a hello with another.
pub const SYNC_PROTOCOL_VERSION: u32 = 1;
/// Largest frame either side sends or accepts, in bytes (a transaction is at most 8 MiB).
pub const SYNC_FRAME_BYTES_MAX: usize = 16 << 20;
/// Most subscriptions one session may hold.
pub const SUBSCRIPTIONS_PER_SESSION_MAX: usize = 64;
/// Most pushes one session may have waiting for their acknowledgement.
pub const PUSHES_IN_FLIGHT_MAX: usize = 256;
/// Most tuples in one [`ServerMsg::Changes`] or [`ServerMsg::Snapshot`].
pub const TUPLES_PER_MESSAGE_MAX: usize = 1_000;
/// Longest token, client id or key prefix in a message, in bytes.
pub const FIELD_BYTES_MAX: usize = 1_024;

/// Which tuples a subscription follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub enum Target {
    /// Tuples of `site`, in `collection` (every collection when `None`) whose key starts with
    /// `prefix`.
    Site {
        site: String,
        collection: Option<String>,
        prefix: String,
    },
    /// Tuples of `site` whose home is this client's mailbox.
    Mailbox { site: String },
}

impl Target {
    /// The site this target is in.
    pub fn site(&self) -> &str {
        match self {
            Target::Site { site, .. } | Target::Mailbox { site } => site,
        }
    }
}

/// A subscription: which tuples, and from which index the client has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Subscription {
    /// Chosen by the client; names the subscription in the node's messages.
    pub id: u32,
    pub target: Target,
    /// The client has every change up to this index (0: nothing; it gets a snapshot).
    pub since: LogIndex,
}

/// A tuple as the protocol carries it: a put (`value: Some`) or a delete (`None`) at
/// `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct SyncTuple {
    pub collection: String,
    pub key: String,
    pub value: Option<Value>,
    pub version: LogIndex,
    pub origin: Option<Origin>,
    pub home: Home,
}

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub enum ClientMsg {
    /// First message of a session.
    Hello {
        version: u32,
        token: String,
        client_id: String,
    },
    Subscribe(Subscription),
    Unsubscribe {
        id: u32,
    },
    /// A transaction to commit; its origin must be this client with its next seq. `id` names
    /// the acknowledgement.
    Push {
        id: u64,
        tx: Transaction,
    },
    /// A mailbox tuple arrived: mark it delivered (the sender can see that).
    Delivered {
        site: String,
        collection: String,
        key: String,
        version: LogIndex,
    },
    Ping {
        nonce: u64,
    },
    /// Count this session among the viewers of `topic` (a page, say) and tell it the count
    /// as it changes, until the session ends. Ephemeral: never in the log.
    Presence {
        topic: String,
    },
    /// Tell the session when `site` publishes a new version ([`ServerMsg::Version`]).
    WatchVersion {
        site: String,
    },
}

/// Most presence topics one session may join.
pub const PRESENCE_TOPICS_MAX: usize = 4;

/// How a pushed transaction ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub enum PushResult {
    /// Committed at this index.
    Committed { index: LogIndex },
    /// Applied before (a retry), at this index; nothing changed now.
    Duplicate { index: LogIndex },
    /// Refused; nothing was written. `code` is the HTTP API's error code (`conflict`,
    /// `forbidden`, `bad_request`, `rate_limited`, `stale_seq`, ...).
    Rejected { code: String, message: String },
    /// The node failed while committing it: retry the same `(client_id, seq)`.
    Unknown { message: String },
}

/// What a node sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub enum ServerMsg {
    Welcome {
        version: u32,
        node_id: u64,
        /// The node's applied index when the session began.
        applied_index: LogIndex,
    },
    /// Part of a subscription's catch-up from nothing: tuples as of index `at`. The last part
    /// has `last: true`; the subscription then has everything up to `at`.
    Snapshot {
        sub: u32,
        at: LogIndex,
        tuples: Vec<SyncTuple>,
        last: bool,
    },
    /// Changes of the subscription, in commit order: after this message the subscription has
    /// every change up to `through`. `through: 0` means more tuples of the same step follow
    /// (a step larger than one message): the client holds its previous index until a
    /// message with a `through` arrives. `tuples` may be empty (the subscription moved on
    /// without a change it follows).
    Changes {
        sub: u32,
        through: LogIndex,
        tuples: Vec<SyncTuple>,
    },
    Acked {
        id: u64,
        result: PushResult,
    },
    /// The subscription fell too far behind (or its site went away): it has ended; subscribe
    /// again from the index the client has.
    Resync {
        sub: u32,
        reason: String,
    },
    /// The session ends: a bad message, a refused hello, a limit.
    Error {
        code: String,
        message: String,
    },
    Pong {
        nonce: u64,
    },
    /// How many sessions (on this node) count themselves among the viewers of `topic` now.
    Presence {
        topic: String,
        count: u64,
    },
    /// `site`'s published version now reflects commit `index`.
    Version {
        site: String,
        index: LogIndex,
    },
}

/// Encodes a message as one frame (what a data channel carries).
pub fn encode<T: bincode::Encode>(msg: &T) -> Vec<u8> {
    codec::encode(msg)
}

/// Encodes a message as a length-prefixed frame (what a byte stream carries).
pub fn encode_prefixed<T: bincode::Encode>(msg: &T) -> Vec<u8> {
    let frame = codec::encode(msg);
    let mut out = Vec::with_capacity(4 + frame.len());
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(&frame);
    out
}

/// Decodes one frame, refusing one over [`SYNC_FRAME_BYTES_MAX`].
pub fn decode<T: bincode::Decode<()>>(frame: &[u8]) -> Result<T, CodecError> {
    if frame.len() > SYNC_FRAME_BYTES_MAX {
        return Err(CodecError::TooLarge { bytes: frame.len() });
    }
    codec::decode(frame)
}

/// Splits a byte stream of length-prefixed frames back into frames, holding at most one
/// frame (of at most [`SYNC_FRAME_BYTES_MAX`]) in memory. Sans-I/O: feed it what arrives.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

/// A stream that breaks the framing: the session must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a frame of {bytes} bytes is over the limit of {SYNC_FRAME_BYTES_MAX}")]
pub struct FrameTooLarge {
    pub bytes: usize,
}

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// Adds bytes that arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameTooLarge> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > SYNC_FRAME_BYTES_MAX {
            return Err(FrameTooLarge { bytes: len });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }

    /// Bytes held that are not a whole frame yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_a_stream_cut_anywhere() {
        let msgs = vec![
            ClientMsg::Hello {
                version: SYNC_PROTOCOL_VERSION,
                token: "t".into(),
                client_id: "phone".into(),
            },
            ClientMsg::Subscribe(Subscription {
                id: 7,
                target: Target::Site {
                    site: "demo".into(),
                    collection: Some("profiles".into()),
                    prefix: "a".into(),
                },
                since: 42,
            }),
            ClientMsg::Ping { nonce: 9 },
        ];
        let stream: Vec<u8> = msgs.iter().flat_map(encode_prefixed).collect();
        for cut in 1..stream.len() {
            let mut reader = FrameReader::new();
            let mut got = Vec::new();
            for chunk in [&stream[..cut], &stream[cut..]] {
                reader.push(chunk);
                while let Some(frame) = reader.next_frame().unwrap() {
                    got.push(decode::<ClientMsg>(&frame).unwrap());
                }
            }
            assert_eq!(got, msgs, "cut at {cut}");
            assert_eq!(reader.pending(), 0);
        }
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut reader = FrameReader::new();
        reader.push(&u32::MAX.to_be_bytes());
        assert!(reader.next_frame().is_err());
        assert!(decode::<ServerMsg>(b"not a frame").is_err());
        let mut truncated = encode(&ServerMsg::Pong { nonce: 1 });
        truncated.pop();
        assert!(decode::<ServerMsg>(&truncated).is_err());
    }
}
