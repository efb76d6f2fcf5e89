//! The pipe protocol between the pool and its worker processes: messages, and frames that
//! carry them.
//!
//! A frame is [`MAGIC`], [`PROTOCOL_VERSION`], the body's length (`u32`, little endian) and
//! the body: one message in bincode. The length is checked against [`FRAME_BYTES_MAX`]
//! before anything is allocated for the body, and bincode bounds every allocation it makes
//! by the same limit, so a garbled frame is an error, never a crash or a huge allocation.
//!
//! A conversation: the pool sends [`ToWorker::Start`] and the worker answers
//! [`FromWorker::Started`] once its limits are set. Then the pool sends pages in runs, several
//! consecutive pages of one batch in one [`ToWorker::Render`] (one write and one wake-up for
//! them all, not one per page). Per page of a run, in order, the worker asks for templates
//! ([`FromWorker::LoadTemplate`]) and reads ([`FromWorker::Get`], [`FromWorker::List`]) one
//! at a time, each answered before it goes on, and ends with [`FromWorker::Done`]: one
//! `Done` frame per page, so the pool knows which page a worker is on and times each page
//! alone. `asset_url()` asks about an asset the same
//! way ([`FromWorker::Asset`]), once per asset and batch: the answer holds for every page of
//! the batch, so the worker keeps it.
//!
//! A read of a collection the pool holds whole for the batch may be answered with the whole
//! collection ([`ToWorker::Collection`]) instead: the worker keeps it for the rest of the
//! batch and answers later reads of it itself, recording them as dependencies exactly as it
//! records reads the pool answers (`render::PageReads` records before it reads). Without
//! this, a template like the demo's profile page (a `list()` of the page's guestbook) costs
//! a round trip per page.

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
pub(crate) const PROTOCOL_VERSION: u8 = 4;
/// Largest frame body either side writes or reads, in bytes.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
const HEADER_BYTES: usize = MAGIC.len() + 1 + 4;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// What the pool sends a worker. `R` is a run of pages and `C` a collection's tuples: the
/// pool encodes a [`RenderRunRef`] and `Vec<&Tuple>` (borrowing, not copying), the worker
/// decodes the same bytes as a [`RenderRun`] and `Vec<Tuple>`.
#[derive(Debug, Encode, Decode)]
pub(crate) enum ToWorker<R = Box<RenderRun>, C = Vec<Tuple>> {
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
    /// The answer to a [`FromWorker::Get`] or [`FromWorker::List`] of `collection`: every
    /// tuple it has, in key order, as the batch's snapshot holds it. The worker answers the
    /// read, and every later read of the collection until the batch changes, from these.
    Collection {
        collection: String,
        tuples: C,
    },
}

/// Consecutive pages of one batch to render in order, with what the worker needs to know
/// about their batch.
#[derive(Debug, Encode, Decode)]
pub(crate) struct RenderRun {
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
    pub jobs: Vec<PageJob>,
}

/// [`RenderRun`] as the pool encodes it: the same fields in the same order, borrowed (a
/// slice encodes as a `Vec`).
#[derive(Debug, Encode)]
pub(crate) struct RenderRunRef<'a> {
    pub batch: u64,
    pub templates: &'a [u8; 32],
    pub fuel_per_page: u64,
    pub recursion_depth_max: u64,
    pub site: &'a str,
    pub base_url: &'a str,
    pub page_bytes_max: u64,
    pub jobs: &'a [PageJob],
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

/// A rendered page on the wire. The pool hashes it: a hash from the worker would have to
/// be checked, which costs the same as computing it.
#[derive(Debug, Encode, Decode)]
pub(crate) struct RenderedBody {
    pub body: Vec<u8>,
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

/// The bytes `message` takes in a frame body, without encoding it anywhere.
pub(crate) fn encoded_bytes<T: Encode>(message: &T) -> usize {
    let mut size = bincode::enc::write::SizeWriter::default();
    match bincode::encode_into_writer(message, &mut size, config()) {
        Ok(()) => size.bytes_written,
        Err(_) => usize::MAX,
    }
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
    fn a_borrowed_run_decodes_as_an_owned_one() {
        let job = |key: &str| PageJob {
            path: format!("/{key}"),
            template: "profile".into(),
            key: Some(key.into()),
            tuple: None,
            canonical: true,
        };
        let jobs = [job("alice"), job("bob")];
        let mut buf = Vec::new();
        let sent: ToWorker<RenderRunRef<'_>> = ToWorker::Render(RenderRunRef {
            batch: 4,
            templates: &[7; 32],
            fuel_per_page: 5,
            recursion_depth_max: 6,
            site: "demo",
            base_url: "https://x.test",
            page_bytes_max: 9,
            jobs: &jobs,
        });
        encode(&sent, &mut buf).unwrap();
        let ToWorker::Render(got) = receive::<ToWorker>(&mut &buf[..], &mut Vec::new()).unwrap()
        else {
            panic!("not a run")
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
        assert_eq!(got.page_bytes_max, 9);
        let paths: Vec<&str> = got.jobs.iter().map(|j| j.path.as_str()).collect();
        assert_eq!(paths, ["/alice", "/bob"]);
        assert_eq!(got.jobs[1].key.as_deref(), Some("bob"));
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
