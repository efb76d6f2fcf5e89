//! The pipe protocol between the pool and its worker processes: messages, and frames that
//! carry them.
//!
//! A frame is [`MAGIC`], [`PROTOCOL_VERSION`], the body's length (`u32`, little endian) and
//! the body: one message in bincode. The length is checked against [`FRAME_BYTES_MAX`]
//! before anything is allocated for the body, and bincode bounds every allocation it makes
//! by the same limit, so a garbled frame is an error, never a crash or a huge allocation.
//!
//! A conversation: the pool sends [`ToWorker::Start`] and the worker answers
//! [`FromWorker::Started`] once its limits are set. Then, per page, the pool sends
//! [`ToWorker::Render`]; the worker asks for templates ([`FromWorker::LoadTemplate`]) and
//! reads ([`FromWorker::Get`], [`FromWorker::List`]) one at a time, each answered before it
//! goes on, and ends with [`FromWorker::Done`]. `asset_url()` asks about an asset the same
//! way ([`FromWorker::Asset`]), once per asset and batch: the answer holds for every page of
//! the batch, so the worker keeps it.

use std::io::{self, Read, Write};

use bincode::{Decode, Encode};
use sesame_proto::Tuple;
use thiserror::Error;

use crate::deps::PageDeps;
use crate::error::TemplateError;
use crate::render::{PageJob, ServedAsset};

/// First bytes of every frame ("Sesame render worker").
pub(crate) const MAGIC: [u8; 3] = *b"SRW";
/// Bumped whenever a message changes incompatibly; a worker from another build is refused.
pub(crate) const PROTOCOL_VERSION: u8 = 3;
/// Largest frame body either side writes or reads, in bytes.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
const HEADER_BYTES: usize = MAGIC.len() + 1 + 4;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// What the pool sends a worker. `R` is the page: the pool encodes a [`RenderJobRef`]
/// (borrowing the job, not copying it), the worker decodes the same bytes as a [`RenderJob`].
#[derive(Debug, Encode, Decode)]
pub(crate) enum ToWorker<R = Box<RenderJob>> {
    /// The first message: the limits the worker sets on itself before anything else.
    Start {
        memory_bytes_max: u64,
    },
    Render(R),
    /// The source of the template asked for, if the site has it.
    Template(Option<String>),
    /// The answer to [`FromWorker::Get`]; an error is the store's message.
    Got(Result<Option<Tuple>, String>),
    /// The answer to [`FromWorker::List`].
    Listed(Result<Vec<Tuple>, String>),
    /// The answer to [`FromWorker::Asset`]: where the asset is served and its hash, if it is.
    AssetIs(Option<ServedAsset>),
}

/// One page to render, with what the worker needs to know about its batch.
#[derive(Debug, Encode, Decode)]
pub(crate) struct RenderJob {
    /// The pool's batch (one site version being made): the worker keeps the answers about
    /// assets, which hold for a whole batch, until the batch changes.
    pub batch: u64,
    /// `TemplateSet::id`: the worker caches environments by it.
    pub templates: [u8; 32],
    pub fuel_per_page: u64,
    pub recursion_depth_max: u64,
    pub site: String,
    pub base_url: String,
    pub page_bytes_max: u64,
    pub job: PageJob,
}

/// [`RenderJob`] as the pool encodes it: the same fields in the same order, borrowed.
#[derive(Debug, Encode)]
pub(crate) struct RenderJobRef<'a> {
    pub batch: u64,
    pub templates: &'a [u8; 32],
    pub fuel_per_page: u64,
    pub recursion_depth_max: u64,
    pub site: &'a str,
    pub base_url: &'a str,
    pub page_bytes_max: u64,
    pub job: &'a PageJob,
}

/// What a worker sends the pool.
#[derive(Debug, Encode, Decode)]
pub(crate) enum FromWorker {
    /// The limits are set; the worker waits for pages.
    Started,
    LoadTemplate(String),
    Get {
        collection: String,
        key: String,
    },
    List {
        collection: String,
        prefix: String,
        limit: u64,
    },
    /// For `asset_url()`: how the version being made serves `_assets/<key>`.
    Asset {
        key: String,
    },
    Done {
        deps: PageDeps,
        result: Result<RenderedBody, TemplateError>,
    },
}

/// A rendered page on the wire.
#[derive(Debug, Encode, Decode)]
pub(crate) struct RenderedBody {
    pub body: Vec<u8>,
    /// blake3 of `body`, as the worker computed it (the pool checks it).
    pub hash: String,
}

#[derive(Debug, Error)]
pub(crate) enum WireError {
    #[error("the pipe was closed")]
    Closed,
    #[error("pipe: {0}")]
    Io(#[from] io::Error),
    #[error("frame does not start with the render worker magic")]
    Magic,
    #[error("frame has protocol version {found}, this build speaks version {PROTOCOL_VERSION}")]
    Version { found: u8 },
    #[error("frame body is {bytes} bytes, the limit is {FRAME_BYTES_MAX}")]
    TooLarge { bytes: usize },
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("cannot decode frame: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("frame has {0} trailing bytes")]
    Trailing(usize),
}

/// Encodes `message` as one frame into `buf` (replacing what it held, keeping its memory).
/// Fails with [`WireError::TooLarge`] when the body is over the limit; `buf` is then garbage.
pub(crate) fn encode<T: Encode>(message: &T, buf: &mut Vec<u8>) -> Result<(), WireError> {
    buf.clear();
    buf.extend_from_slice(&MAGIC);
    buf.push(PROTOCOL_VERSION);
    buf.extend_from_slice(&[0; 4]);
    bincode::encode_into_std_write(message, buf, config())?;
    let bytes = buf.len() - HEADER_BYTES;
    if bytes > FRAME_BYTES_MAX {
        return Err(WireError::TooLarge { bytes });
    }
    let len = u32::try_from(bytes).expect("FRAME_BYTES_MAX fits in u32");
    buf[MAGIC.len() + 1..HEADER_BYTES].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Encodes and writes one message, flushing it.
pub(crate) fn send<T: Encode>(
    out: &mut impl Write,
    message: &T,
    buf: &mut Vec<u8>,
) -> Result<(), WireError> {
    encode(message, buf)?;
    out.write_all(buf)?;
    out.flush()?;
    Ok(())
}

/// Reads one frame and decodes its message, using `buf` for the body. A pipe closed before
/// the first byte of a frame is [`WireError::Closed`]; closed within one, an I/O error.
pub(crate) fn receive<T: Decode<()>>(
    input: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<T, WireError> {
    let mut header = [0u8; HEADER_BYTES];
    let first = loop {
        match input.read(&mut header) {
            Ok(0) => return Err(WireError::Closed),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    };
    input.read_exact(&mut header[first..])?;
    if header[..MAGIC.len()] != MAGIC {
        return Err(WireError::Magic);
    }
    let found = header[MAGIC.len()];
    if found != PROTOCOL_VERSION {
        return Err(WireError::Version { found });
    }
    let len = u32::from_le_bytes(
        header[MAGIC.len() + 1..]
            .try_into()
            .expect("the header ends with four length bytes"),
    ) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(WireError::TooLarge { bytes: len });
    }
    buf.clear();
    buf.resize(len, 0);
    input.read_exact(buf)?;
    let (message, used) = bincode::decode_from_slice(buf, config())?;
    if used != len {
        return Err(WireError::Trailing(len - used));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(message: &FromWorker) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(message, &mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trip() {
        let message = FromWorker::Get {
            collection: "profiles".into(),
            key: "alice".into(),
        };
        let bytes = frame(&message);
        let mut buf = Vec::new();
        let back: FromWorker = receive(&mut &bytes[..], &mut buf).unwrap();
        assert!(
            matches!(back, FromWorker::Get { collection, key } if collection == "profiles" && key == "alice")
        );
        // Two frames back to back are two messages, then the end.
        let twice = [bytes.clone(), bytes].concat();
        let mut input = &twice[..];
        for _ in 0..2 {
            receive::<FromWorker>(&mut input, &mut buf).unwrap();
        }
        assert!(matches!(
            receive::<FromWorker>(&mut input, &mut buf),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn a_borrowed_job_decodes_as_an_owned_one() {
        let job = PageJob {
            path: "/alice".into(),
            template: "profile".into(),
            key: Some("alice".into()),
            tuple: None,
            canonical: true,
        };
        let mut buf = Vec::new();
        let sent: ToWorker<RenderJobRef<'_>> = ToWorker::Render(RenderJobRef {
            batch: 4,
            templates: &[7; 32],
            fuel_per_page: 5,
            recursion_depth_max: 6,
            site: "demo",
            base_url: "https://x.test",
            page_bytes_max: 9,
            job: &job,
        });
        encode(&sent, &mut buf).unwrap();
        let ToWorker::Render(got) = receive::<ToWorker>(&mut &buf[..], &mut Vec::new()).unwrap()
        else {
            panic!("not a page")
        };
        assert_eq!(
            (
                got.batch,
                got.templates,
                got.fuel_per_page,
                got.recursion_depth_max
            ),
            (4, [7; 32], 5, 6)
        );
        assert_eq!(
            (got.site.as_str(), got.base_url.as_str()),
            ("demo", "https://x.test")
        );
        assert_eq!((got.page_bytes_max, got.job.path.as_str()), (9, "/alice"));
        assert_eq!(got.job.key.as_deref(), Some("alice"));
    }

    #[test]
    fn garbage_is_an_error() {
        let mut buf = Vec::new();
        let good = frame(&FromWorker::Started);
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            receive::<FromWorker>(&mut &bad[..], &mut buf),
            Err(WireError::Magic)
        ));
        let mut bad = good.clone();
        bad[3] = PROTOCOL_VERSION + 1;
        assert!(matches!(
            receive::<FromWorker>(&mut &bad[..], &mut buf),
            Err(WireError::Version { .. })
        ));
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            receive::<FromWorker>(&mut &huge[..], &mut buf),
            Err(WireError::TooLarge { .. })
        ));
        assert!(receive::<FromWorker>(&mut &b"garbage\n"[..], &mut buf).is_err());
        for cut in 1..good.len() {
            assert!(receive::<FromWorker>(&mut &good[..cut], &mut buf).is_err());
        }
        let done = frame(&FromWorker::Done {
            deps: PageDeps::default(),
            result: Ok(RenderedBody {
                body: b"<p>hi</p>".to_vec(),
                hash: "h".into(),
            }),
        });
        for i in HEADER_BYTES..done.len() {
            for bit in 0..8 {
                let mut flipped = done.clone();
                flipped[i] ^= 1 << bit;
                let _ = receive::<FromWorker>(&mut &flipped[..], &mut buf);
            }
        }
    }
}
