//! Frames on a peer stream: a fixed header, then a payload of at most its kind's limit.
//!
//! ```text
//! magic "SSP" | format version (u8) | kind (u8) | payload length (u32, big endian) | payload
//! ```
//!
//! A stream carries one request frame, then (for a snapshot) chunk frames and an end frame,
//! and the answer comes back as one response frame. The header is checked before a byte of the
//! payload is read or allocated: a wrong magic, an unknown version or kind, or a length over
//! the kind's limit ends the stream with an error and never reaches a decoder. Payloads are
//! bincode 2; adding a variant at the end of a message enum keeps old frames decodable, so new
//! request kinds need no new framing.

use std::io;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// First bytes of every frame (Sesame peer).
pub const MAGIC: [u8; 3] = *b"SSP";
/// Bumped whenever the encoding of a frame or of any message changes incompatibly.
pub const FORMAT_VERSION: u8 = 1;
/// Magic, version, kind and length.
pub const HEADER_BYTES: usize = MAGIC.len() + 1 + 1 + 4;

/// Largest request: an append-entries batch. Log entries are bounded well below this (group
/// commit stops at 16 MiB, plus one transaction); a larger batch is split by openraft.
pub const REQUEST_BYTES_MAX: usize = 64 << 20;
/// Largest response.
pub const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// Largest snapshot chunk a peer accepts; senders use smaller chunks (see
/// [`crate::raft::network::SNAPSHOT_CHUNK_BYTES_DEFAULT`]).
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 4 << 20;
/// The end-of-snapshot frame is a length and a hash.
pub const SNAPSHOT_END_BYTES_MAX: usize = 64;

/// What a frame holds; each kind has its own size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A [`super::PeerRequest`].
    Request = 1,
    /// `Result<PeerResponse, PeerError>`.
    Response = 2,
    /// Raw bytes of a snapshot being streamed.
    SnapshotChunk = 3,
    /// [`super::SnapshotEnd`]: the snapshot's length and hash, after its last chunk.
    SnapshotEnd = 4,
}

impl FrameKind {
    /// The largest payload a frame of this kind may carry.
    pub const fn bytes_max(self) -> usize {
        match self {
            FrameKind::Request => REQUEST_BYTES_MAX,
            FrameKind::Response => RESPONSE_BYTES_MAX,
            FrameKind::SnapshotChunk => SNAPSHOT_CHUNK_BYTES_MAX,
            FrameKind::SnapshotEnd => SNAPSHOT_END_BYTES_MAX,
        }
    }

    fn from_u8(byte: u8) -> Option<FrameKind> {
        match byte {
            1 => Some(FrameKind::Request),
            2 => Some(FrameKind::Response),
            3 => Some(FrameKind::SnapshotChunk),
            4 => Some(FrameKind::SnapshotEnd),
            _ => None,
        }
    }
}

/// The largest payload of any kind, which bounds every decoder's allocations.
const PAYLOAD_BYTES_MAX: usize = {
    let a = if REQUEST_BYTES_MAX > RESPONSE_BYTES_MAX {
        REQUEST_BYTES_MAX
    } else {
        RESPONSE_BYTES_MAX
    };
    if a > SNAPSHOT_CHUNK_BYTES_MAX {
        a
    } else {
        SNAPSHOT_CHUNK_BYTES_MAX
    }
};

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<PAYLOAD_BYTES_MAX>()
}

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("stream: {0}")]
    Io(#[from] io::Error),
    #[error("the stream ended before a frame")]
    Closed,
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("frame does not start with the Sesame peer magic")]
    Magic,
    #[error("frame has format version {found}, this build speaks version {FORMAT_VERSION}")]
    Version { found: u8 },
    #[error("unknown frame kind {found}")]
    UnknownKind { found: u8 },
    #[error("expected a frame of kind {expected:?}, got {found:?}")]
    Unexpected {
        expected: &'static [FrameKind],
        found: FrameKind,
    },
    #[error("{kind:?} frame of {bytes} bytes, the limit is {limit}")]
    TooLarge {
        kind: FrameKind,
        bytes: usize,
        limit: usize,
    },
    #[error("cannot encode a {kind:?} frame: {source}")]
    Encode {
        kind: FrameKind,
        source: bincode::error::EncodeError,
    },
    #[error("cannot decode a {kind:?} frame: {source}")]
    Decode {
        kind: FrameKind,
        source: bincode::error::DecodeError,
    },
    #[error("{kind:?} frame has {trailing} bytes after its message")]
    Trailing { kind: FrameKind, trailing: usize },
}

fn header(kind: FrameKind, len: usize) -> [u8; HEADER_BYTES] {
    let len = u32::try_from(len).expect("frame limits fit in a u32");
    let mut out = [0u8; HEADER_BYTES];
    out[..3].copy_from_slice(&MAGIC);
    out[3] = FORMAT_VERSION;
    out[4] = kind as u8;
    out[5..].copy_from_slice(&len.to_be_bytes());
    out
}

/// Encodes `value` as one whole frame of `kind`, header included, refusing one over the
/// kind's limit.
pub fn encode<T: bincode::Encode>(kind: FrameKind, value: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_BYTES];
    bincode::encode_into_std_write(value, &mut out, config())
        .map_err(|source| FrameError::Encode { kind, source })?;
    let bytes = out.len() - HEADER_BYTES;
    let limit = kind.bytes_max();
    if bytes > limit {
        return Err(FrameError::TooLarge { kind, bytes, limit });
    }
    out[..HEADER_BYTES].copy_from_slice(&header(kind, bytes));
    Ok(out)
}

/// The encoded size of `value`, without a header.
pub fn encoded_len<T: bincode::Encode>(value: &T) -> usize {
    let mut counter = bincode::enc::write::SizeWriter::default();
    match bincode::encode_into_writer(value, &mut counter, config()) {
        Ok(()) => counter.bytes_written,
        // Sizing fails only past the limit.
        Err(_) => PAYLOAD_BYTES_MAX + 1,
    }
}

/// Decodes the payload of a frame of `kind`; every byte must belong to the message.
pub fn decode<T: bincode::Decode<()>>(kind: FrameKind, payload: &[u8]) -> Result<T, FrameError> {
    let (value, used) = bincode::decode_from_slice(payload, config())
        .map_err(|source| FrameError::Decode { kind, source })?;
    if used != payload.len() {
        return Err(FrameError::Trailing {
            kind,
            trailing: payload.len() - used,
        });
    }
    Ok(value)
}

/// Writes a frame of `kind` around raw `payload` bytes (snapshot chunks).
pub async fn write_raw<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), FrameError> {
    let limit = kind.bytes_max();
    if payload.len() > limit {
        return Err(FrameError::TooLarge {
            kind,
            bytes: payload.len(),
            limit,
        });
    }
    w.write_all(&header(kind, payload.len())).await?;
    w.write_all(payload).await?;
    Ok(())
}

/// Reads one frame whose kind is one of `expected`, and returns its kind and payload.
///
/// [`FrameError::Closed`] means the stream ended cleanly where a frame would start.
pub async fn read<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    expected: &'static [FrameKind],
) -> Result<(FrameKind, Vec<u8>), FrameError> {
    let (kind, bytes) = read_header(r, expected).await?;
    Ok((kind, read_payload(r, bytes).await?))
}

/// Reads and checks one frame header; returns the frame's kind and payload length, which is
/// within the kind's limit. Read the payload next with [`read_payload`].
pub async fn read_header<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    expected: &'static [FrameKind],
) -> Result<(FrameKind, usize), FrameError> {
    let mut head = [0u8; HEADER_BYTES];
    let mut filled = 0;
    while filled < HEADER_BYTES {
        match r.read(&mut head[filled..]).await? {
            0 if filled == 0 => return Err(FrameError::Closed),
            0 => return Err(FrameError::Truncated),
            n => filled += n,
        }
    }
    if head[..3] != MAGIC {
        return Err(FrameError::Magic);
    }
    if head[3] != FORMAT_VERSION {
        return Err(FrameError::Version { found: head[3] });
    }
    let kind = FrameKind::from_u8(head[4]).ok_or(FrameError::UnknownKind { found: head[4] })?;
    if !expected.contains(&kind) {
        return Err(FrameError::Unexpected {
            expected,
            found: kind,
        });
    }
    let len = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
    let bytes = usize::try_from(len).unwrap_or(usize::MAX);
    let limit = kind.bytes_max();
    if bytes > limit {
        return Err(FrameError::TooLarge { kind, bytes, limit });
    }
    Ok((kind, bytes))
}

/// Reads a payload of `bytes` bytes, whose header [`read_header`] checked.
pub async fn read_payload<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    bytes: usize,
) -> Result<Vec<u8>, FrameError> {
    assert!(
        bytes <= PAYLOAD_BYTES_MAX,
        "payload length {bytes} was not checked against its kind's limit"
    );
    let mut payload = vec![0u8; bytes];
    r.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: &[FrameKind] = &[
        FrameKind::Request,
        FrameKind::Response,
        FrameKind::SnapshotChunk,
        FrameKind::SnapshotEnd,
    ];

    #[tokio::test]
    async fn round_trip() -> anyhow::Result<()> {
        let frame = encode(FrameKind::Request, &(7u64, String::from("hello")))?;
        assert_eq!(&frame[..3], b"SSP");
        let mut reader = frame.as_slice();
        let (kind, payload) = read(&mut reader, &[FrameKind::Request]).await?;
        assert_eq!(kind, FrameKind::Request);
        let back: (u64, String) = decode(kind, &payload)?;
        assert_eq!(back, (7, "hello".to_string()));
        assert!(matches!(
            read(&mut reader, ANY).await,
            Err(FrameError::Closed)
        ));
        Ok(())
    }

    #[tokio::test]
    async fn bad_headers_are_refused_before_the_payload() -> anyhow::Result<()> {
        let good = encode(FrameKind::Response, &1u8)?;
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            read(&mut bad.as_slice(), ANY).await,
            Err(FrameError::Magic)
        ));
        let mut bad = good.clone();
        bad[3] = 9;
        assert!(matches!(
            read(&mut bad.as_slice(), ANY).await,
            Err(FrameError::Version { found: 9 })
        ));
        let mut bad = good.clone();
        bad[4] = 77;
        assert!(matches!(
            read(&mut bad.as_slice(), ANY).await,
            Err(FrameError::UnknownKind { found: 77 })
        ));
        assert!(matches!(
            read(&mut good.as_slice(), &[FrameKind::Request]).await,
            Err(FrameError::Unexpected { .. })
        ));
        // A chunk header claiming more than the chunk limit, with no payload behind it.
        let mut huge = header(FrameKind::SnapshotChunk, 0).to_vec();
        huge[5..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read(&mut huge.as_slice(), ANY).await,
            Err(FrameError::TooLarge {
                kind: FrameKind::SnapshotChunk,
                ..
            })
        ));
        assert!(matches!(
            read(&mut &good[..good.len() - 1], ANY).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read(&mut &good[..4], ANY).await,
            Err(FrameError::Truncated)
        ));
        Ok(())
    }

    #[test]
    fn encode_enforces_the_kind_limit() {
        let big = vec![0u8; SNAPSHOT_END_BYTES_MAX + 1];
        assert!(matches!(
            encode(FrameKind::SnapshotEnd, &big),
            Err(FrameError::TooLarge {
                kind: FrameKind::SnapshotEnd,
                ..
            })
        ));
    }

    #[test]
    fn trailing_bytes_and_garbage_are_errors_not_panics() {
        let frame = encode(FrameKind::Request, &(1u32, 2u32)).expect("encode");
        let mut payload = frame[HEADER_BYTES..].to_vec();
        payload.push(0);
        assert!(matches!(
            decode::<(u32, u32)>(FrameKind::Request, &payload),
            Err(FrameError::Trailing { trailing: 1, .. })
        ));
        for cut in 0..payload.len() {
            let _ = decode::<(u32, String)>(FrameKind::Request, &payload[..cut]);
        }
    }
}
