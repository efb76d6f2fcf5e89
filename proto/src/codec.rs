//! The binary codec: bincode 2 behind a magic and a format version, with a size limit.
//!
//! Every encoded frame starts with [`MAGIC`] and [`FORMAT_VERSION`], so a reader can tell our
//! bytes from garbage and refuse a format it does not know.

use thiserror::Error;

/// First bytes of every frame.
pub const MAGIC: [u8; 3] = *b"SSM";
/// Bumped whenever the encoding of any type changes incompatibly. 2: tokens carry their
/// creation and expiry times.
pub const FORMAT_VERSION: u8 = 2;
/// Largest frame we encode or decode, in bytes.
pub const FRAME_BYTES_MAX: usize = 64 << 20;

const HEADER_BYTES: usize = MAGIC.len() + 1;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("frame is {0} bytes, shorter than its header")]
    Short(usize),
    #[error("frame does not start with the Sesame magic")]
    Magic,
    #[error("frame has format version {found}, this build reads version {FORMAT_VERSION}")]
    Version { found: u8 },
    #[error("frame is {bytes} bytes, the limit is {FRAME_BYTES_MAX}")]
    TooLarge { bytes: usize },
    #[error("cannot decode frame: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("frame has {0} trailing bytes")]
    Trailing(usize),
}

/// Encodes `value` into a frame.
///
/// Panics if the value is larger than [`FRAME_BYTES_MAX`]: callers validate sizes first
/// (see [`crate::Transaction::validate`]).
pub fn encode<T: bincode::Encode>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(value, &mut out);
    out
}

/// [`encode`], appending the frame to `out` (a buffer reused across many values).
pub fn encode_into<T: bincode::Encode>(value: &T, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    bincode::encode_into_std_write(value, out, config())
        .expect("encode a value that validation bounded in size");
}

/// Decodes a frame made by [`encode`].
pub fn decode<T: bincode::Decode<()>>(frame: &[u8]) -> Result<T, CodecError> {
    if frame.len() < HEADER_BYTES {
        return Err(CodecError::Short(frame.len()));
    }
    if frame.len() > FRAME_BYTES_MAX + HEADER_BYTES {
        return Err(CodecError::TooLarge { bytes: frame.len() });
    }
    if frame[..MAGIC.len()] != MAGIC {
        return Err(CodecError::Magic);
    }
    let found = frame[MAGIC.len()];
    if found != FORMAT_VERSION {
        return Err(CodecError::Version { found });
    }
    let (value, used) = bincode::decode_from_slice(&frame[HEADER_BYTES..], config())?;
    let trailing = frame.len() - HEADER_BYTES - used;
    if trailing != 0 {
        return Err(CodecError::Trailing(trailing));
    }
    Ok(value)
}

/// The encoded size of `value` without the frame header.
pub fn encoded_len<T: bincode::Encode>(value: &T) -> usize {
    let mut counter = bincode::enc::write::SizeWriter::default();
    // Sizing never fails short of the limit; past it report the limit plus one.
    match bincode::encode_into_writer(value, &mut counter, config()) {
        Ok(()) => counter.bytes_written,
        Err(_) => FRAME_BYTES_MAX + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, Op, Transaction, Value};

    fn sample() -> Command {
        Command::Txs(vec![Transaction {
            site: "demo".into(),
            ops: vec![Op::Put {
                collection: "profiles".into(),
                key: "alice".into(),
                value: Value::from_json(serde_json::json!({"name": "Alice", "n": [1, 2.5]}))
                    .unwrap(),
                if_version: Some(3),
            }],
            origin: None,
        }])
    }

    #[test]
    fn round_trip() {
        let frame = encode(&sample());
        assert_eq!(&frame[..3], b"SSM");
        assert_eq!(encoded_len(&sample()) + HEADER_BYTES, frame.len());
        let back: Command = decode(&frame).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn refuses_garbage() {
        let frame = encode(&sample());
        assert!(matches!(
            decode::<Command>(&frame[..2]),
            Err(CodecError::Short(2))
        ));
        let mut bad = frame.clone();
        bad[0] = b'X';
        assert!(matches!(decode::<Command>(&bad), Err(CodecError::Magic)));
        let mut bad = frame.clone();
        bad[3] = 99;
        assert!(matches!(
            decode::<Command>(&bad),
            Err(CodecError::Version { found: 99 })
        ));
        let mut bad = frame.clone();
        bad.push(0);
        assert!(matches!(
            decode::<Command>(&bad),
            Err(CodecError::Trailing(1))
        ));
        assert!(decode::<Command>(&frame[..frame.len() - 1]).is_err());
    }

    #[test]
    fn truncations_and_flips_never_panic() {
        let frame = encode(&sample());
        for cut in 0..frame.len() {
            let _ = decode::<Command>(&frame[..cut]);
        }
        for i in 4..frame.len() {
            for bit in 0..8 {
                let mut f = frame.clone();
                f[i] ^= 1 << bit;
                let _ = decode::<Command>(&f);
            }
        }
    }

    #[test]
    fn huge_length_prefix_is_refused_not_allocated() {
        // A string length claiming ~2^60 bytes.
        let mut frame = MAGIC.to_vec();
        frame.push(FORMAT_VERSION);
        frame.extend_from_slice(&[2, 253, 0, 0, 0, 0, 0, 0, 0, 16]);
        assert!(decode::<Command>(&frame).is_err());
    }
}
