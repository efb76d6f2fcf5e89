//! The QUIC endpoint: one UDP socket that serves peers and dials them, with mutual TLS.
//!
//! Serving: [`PeerEndpoint::serve`] accepts at most [`CONNECTIONS_MAX`] connections, reads
//! each caller's node id from its certificate, and answers every bidirectional stream (at
//! most [`STREAMS_PER_CONNECTION_MAX`] open per connection) with one response frame. Request
//! payloads wait for room in a node-wide budget ([`REQUEST_BYTES_IN_FLIGHT_MAX`]) before they
//! are read, so many peers sending large batches at once cannot exhaust memory.
//!
//! Dialling: one connection per peer, cached and reused by every request. A dial runs in a
//! task of its own, so a caller that gives up (openraft's short heartbeat timeout) does not
//! cancel it for the next. After a failed dial the peer is not dialled again until a backoff
//! (exponential, with jitter, capped) has passed; requests meanwhile fail at once as
//! unreachable. A connection that closes is dropped from the cache and re-dialled on the next
//! request.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rustls_pki_types::CertificateDer;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::frame::{self, FrameError, FrameKind};
use super::handler::{PeerHandler, SnapshotChunks};
use super::message::{PeerError, PeerRequest, PeerResponse, SnapshotEnd, SnapshotOffer};
use super::tls::{self, NodeCerts, TlsError};
use super::transport::{PeerTransport, SnapshotSendOptions, TransportError};
use crate::raft::NodeId;

/// Most peer connections served at once; more are refused.
pub const CONNECTIONS_MAX: usize = 64;
/// Most requests in flight on one connection; a caller past it waits for a stream.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 64;
/// Most peers with a cached connection or dial state.
pub const PEERS_MAX: usize = 1_024;
/// Longest a dial (address lookup and handshake) or an accepted handshake may take.
pub const DIAL_TIMEOUT_MS: u64 = 3_000;
/// A connection with no traffic for this long is closed; keep-alives prevent it between live
/// peers, so this is how fast a vanished peer is noticed.
pub const IDLE_TIMEOUT_MS: u64 = 5_000;
/// Keep-alive interval on idle connections.
pub const KEEP_ALIVE_MS: u64 = 1_000;
/// Longest a handler may take to answer one request.
pub const HANDLE_TIMEOUT_MS: u64 = 30_000;
/// Longest a snapshot receiver waits for the next chunk.
pub const SNAPSHOT_CHUNK_WAIT_MS: u64 = 30_000;
/// Request bytes a node holds for all its peers at once, from the frame header until the
/// handler answered: past it, requests wait for room (within the handler timeout). At least
/// the largest request, so every request can be served.
pub const REQUEST_BYTES_IN_FLIGHT_MAX: usize = 256 << 20;
const _: () = assert!(REQUEST_BYTES_IN_FLIGHT_MAX >= frame::REQUEST_BYTES_MAX);
/// Longest [`PeerEndpoint::close`] waits for connections to close cleanly.
const CLOSE_WAIT_MS: u64 = 1_000;

/// Connection close codes.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_UNIDENTIFIED: u32 = 1;
/// Stream error codes.
const STREAM_BAD_REQUEST: u32 = 1;
const STREAM_ABANDONED: u32 = 2;

/// How to run a peer endpoint. Defaults are the constants above.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The UDP address to listen on and dial from (the node's `--raft` address).
    pub listen: SocketAddr,
    pub connections_max: usize,
    pub streams_per_connection_max: u32,
    pub dial_timeout: Duration,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    pub handle_timeout: Duration,
    pub snapshot_chunk_wait: Duration,
    pub backoff: Backoff,
}

impl PeerConfig {
    pub fn new(listen: SocketAddr) -> PeerConfig {
        PeerConfig {
            listen,
            connections_max: CONNECTIONS_MAX,
            streams_per_connection_max: STREAMS_PER_CONNECTION_MAX,
            dial_timeout: Duration::from_millis(DIAL_TIMEOUT_MS),
            idle_timeout: Duration::from_millis(IDLE_TIMEOUT_MS),
            keep_alive: Duration::from_millis(KEEP_ALIVE_MS),
            handle_timeout: Duration::from_millis(HANDLE_TIMEOUT_MS),
            snapshot_chunk_wait: Duration::from_millis(SNAPSHOT_CHUNK_WAIT_MS),
            backoff: Backoff::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum EndpointError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("QUIC needs TLS 1.3 with AES-128-GCM: {0}")]
    Crypto(String),
    #[error("invalid transport setting: {0}")]
    Config(String),
    #[error("bind the peer endpoint on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// A node's peer endpoint: serves its peers and sends them requests. Cheap to clone.
#[derive(Clone)]
pub struct PeerEndpoint {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    node_id: NodeId,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    config: PeerConfig,
    pub(super) peers: Mutex<HashMap<NodeId, Slot>>,
    /// Counts dials, so a finished dial can tell whether its slot still waits for it.
    dials: std::sync::atomic::AtomicU64,
    /// Bytes of requests being read or handled; see [`REQUEST_BYTES_IN_FLIGHT_MAX`].
    request_bytes: Arc<Semaphore>,
    cancel: CancellationToken,
}

/// What is known about reaching one peer.
pub(super) struct Slot {
    addr: String,
    pub(super) state: SlotState,
    /// Failed dials in a row.
    failures: u32,
}

type DialResult = Option<Result<Connection, String>>;

pub(super) enum SlotState {
    Idle,
    Dialing {
        id: u64,
        done: watch::Receiver<DialResult>,
    },
    Connected(Connection),
    BackingOff {
        until: Instant,
        reason: String,
    },
}

impl std::fmt::Debug for PeerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerEndpoint")
            .field("node_id", &self.inner.node_id)
            .field("addr", &self.inner.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

fn transport_config(config: &PeerConfig) -> Result<Arc<quinn::TransportConfig>, EndpointError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(config.streams_per_connection_max));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.max_idle_timeout(Some(
        config
            .idle_timeout
            .try_into()
            .map_err(|e| EndpointError::Config(format!("idle timeout: {e}")))?,
    ));
    t.keep_alive_interval(Some(config.keep_alive));
    Ok(Arc::new(t))
}

/// Connection ids and stateless-reset tokens made from keys that every run of this node
/// shares (derived from its private key), not from random ones per run. A peer that still
/// sends on a connection to a run that was killed then hears from the next run at once, in
/// a stateless reset (RFC 9000, 10.3), and re-dials, instead of sending into the void until
/// its idle timeout: the restarted node is reached within a heartbeat, before its election
/// timer runs out and its higher term deposes a healthy leader.
fn restartable_endpoint_config(certs: &NodeCerts) -> quinn::EndpointConfig {
    let reset = certs.derived_key("sesame 2025 peer QUIC stateless reset key");
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset);
    let cid = certs.derived_key("sesame 2025 peer QUIC connection id key");
    let (cid, _) = cid.split_first_chunk::<8>().expect("32 bytes hold 8");
    let cid = u64::from_le_bytes(*cid);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid)));
    config
}

impl PeerEndpoint {
    /// Binds the endpoint on `config.listen` with the node's certificates. Call inside a
    /// tokio runtime. It dials at once; it answers peers once [`PeerEndpoint::serve`] runs.
    pub fn bind(config: PeerConfig, certs: &NodeCerts) -> Result<PeerEndpoint, EndpointError> {
        let transport = transport_config(&config)?;
        let server_crypto = QuicServerConfig::try_from(certs.server_config()?)
            .map_err(|e| EndpointError::Crypto(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(certs.client_config()?)
            .map_err(|e| EndpointError::Crypto(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);
        let bind_error = |source| EndpointError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind_error)?;
        let endpoint = quinn::Endpoint::new(
            restartable_endpoint_config(certs),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        Ok(PeerEndpoint {
            inner: Arc::new(Inner {
                node_id: certs.node_id(),
                endpoint,
                client,
                config,
                peers: Mutex::new(HashMap::new()),
                dials: std::sync::atomic::AtomicU64::new(0),
                request_bytes: Arc::new(Semaphore::new(REQUEST_BYTES_IN_FLIGHT_MAX)),
                cancel: CancellationToken::new(),
            }),
        })
    }

    /// This node's id, from its certificate.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The bound UDP address (with the port the system chose for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Starts answering peers with `handler`, until [`PeerEndpoint::close`]. The returned
    /// task ends when the accept loop does.
    pub fn serve<H: PeerHandler>(&self, handler: Arc<H>) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(accept_loop(inner, handler))
    }

    /// Stops serving and dialling: closes every connection and waits (briefly) for peers to
    /// hear about it.
    pub async fn close(&self) {
        self.inner.cancel.cancel();
        self.inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
        self.inner
            .peers
            .lock()
            .expect("peer table lock is never held across a panic")
            .clear();
        let wait = self.inner.endpoint.wait_idle();
        let _ = tokio::time::timeout(Duration::from_millis(CLOSE_WAIT_MS), wait).await;
    }

    /// A cached, open connection to `to` at `addr`, or a new one.
    pub(super) async fn connection(
        &self,
        to: NodeId,
        addr: &str,
    ) -> Result<Connection, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable { to, reason };
        let (dial, mut done) = {
            let mut peers = self
                .inner
                .peers
                .lock()
                .expect("peer table lock is never held across a panic");
            if self.inner.cancel.is_cancelled() {
                return Err(unreachable("this endpoint is closed".into()));
            }
            if !peers.contains_key(&to) && peers.len() >= PEERS_MAX {
                return Err(unreachable(format!(
                    "more than {PEERS_MAX} peers; not dialling another"
                )));
            }
            let slot = peers.entry(to).or_insert_with(|| Slot {
                addr: addr.to_string(),
                state: SlotState::Idle,
                failures: 0,
            });
            if slot.addr != addr {
                // The peer moved (a membership change): forget the old address entirely.
                if let SlotState::Connected(old) = &slot.state {
                    old.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"peer address changed");
                }
                *slot = Slot {
                    addr: addr.to_string(),
                    state: SlotState::Idle,
                    failures: 0,
                };
            }
            match &slot.state {
                SlotState::Connected(conn) if conn.close_reason().is_none() => {
                    return Ok(conn.clone())
                }
                SlotState::Dialing { id, done } => (*id, done.clone()),
                SlotState::BackingOff { until, reason } if Instant::now() < *until => {
                    let left = until.saturating_duration_since(Instant::now());
                    return Err(unreachable(format!(
                        "{reason}; next dial in {} ms",
                        left.as_millis()
                    )));
                }
                _ => {
                    let id = self
                        .inner
                        .dials
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    slot.state = SlotState::Dialing {
                        id,
                        done: rx.clone(),
                    };
                    tokio::spawn(dial_task(self.inner.clone(), to, addr.to_string(), id, tx));
                    (id, rx)
                }
            }
        };
        let result = match done.wait_for(Option::is_some).await {
            Ok(result) => result.clone().expect("waited for a result"),
            Err(_) => {
                // The dial task ended without a word (the runtime is stopping): let the next
                // caller dial again.
                self.reset_dial(to, dial);
                Err("the dial was abandoned".to_string())
            }
        };
        result.map_err(unreachable)
    }

    /// Forgets dial `dial` to `to` if its slot still waits for it.
    fn reset_dial(&self, to: NodeId, dial: u64) {
        let mut peers = self
            .inner
            .peers
            .lock()
            .expect("peer table lock is never held across a panic");
        if let Some(slot) = peers.get_mut(&to) {
            if matches!(&slot.state, SlotState::Dialing { id, .. } if *id == dial) {
                slot.state = SlotState::Idle;
            }
        }
    }

    /// Drops `conn` from the cache if it is the cached connection to `to`, so the next request
    /// dials afresh.
    fn forget(&self, to: NodeId, conn: &Connection) {
        let mut peers = self
            .inner
            .peers
            .lock()
            .expect("peer table lock is never held across a panic");
        if let Some(slot) = peers.get_mut(&to) {
            if matches!(&slot.state, SlotState::Connected(c) if c.stable_id() == conn.stable_id()) {
                slot.state = SlotState::Idle;
            }
        }
    }

    /// Classifies a failure on an open connection: a closed connection makes the peer
    /// unreachable (and is forgotten); anything else is the peer breaking the protocol.
    fn stream_failed(&self, to: NodeId, conn: &Connection, e: FrameError) -> TransportError {
        if let Some(reason) = conn.close_reason() {
            self.forget(to, conn);
            return TransportError::Unreachable {
                to,
                reason: format!("connection lost: {reason}"),
            };
        }
        match e {
            FrameError::Io(e) => TransportError::Unreachable {
                to,
                reason: format!("stream failed: {e}"),
            },
            e => TransportError::Protocol { to, source: e },
        }
    }

    async fn open(
        &self,
        to: NodeId,
        addr: &str,
    ) -> Result<(Connection, SendStream, RecvStream), TransportError> {
        let conn = self.connection(to, addr).await?;
        match conn.open_bi().await {
            Ok((send, recv)) => Ok((conn, send, recv)),
            Err(e) => {
                self.forget(to, &conn);
                Err(TransportError::Unreachable {
                    to,
                    reason: format!("open a stream: {e}"),
                })
            }
        }
    }

    async fn exchange(
        &self,
        to: NodeId,
        addr: &str,
        frame_bytes: &[u8],
    ) -> Result<PeerResponse, TransportError> {
        let (conn, mut send, mut recv) = self.open(to, addr).await?;
        let sent = async {
            send.write_all(frame_bytes).await?;
            send.finish().map_err(io::Error::other)?;
            Ok::<(), io::Error>(())
        };
        let sent = sent.await;
        // A peer that refuses a request stops reading it and answers why: read the answer
        // even when sending failed, and report the send failure only if there is none.
        match (read_response(&mut recv).await, sent) {
            (Ok(answer), _) => answer.map_err(|error| TransportError::Remote { to, error }),
            (Err(_), Err(e)) => Err(self.stream_failed(to, &conn, FrameError::Io(e))),
            (Err(e), Ok(())) => Err(self.stream_failed(to, &conn, e)),
        }
    }

    async fn stream_snapshot(
        &self,
        to: NodeId,
        addr: &str,
        offer: &SnapshotOffer,
        data: &mut (dyn AsyncRead + Send + Unpin),
        options: SnapshotSendOptions,
    ) -> Result<PeerResponse, TransportError> {
        let chunk_bytes = options
            .chunk_bytes
            .clamp(1, frame::SNAPSHOT_CHUNK_BYTES_MAX);
        let head = frame::encode(
            FrameKind::Request,
            &PeerRequest::InstallSnapshot(offer.clone()),
        )
        .map_err(TransportError::TooLarge)?;
        let step = options.chunk_timeout;
        let timed_out = |after| TransportError::Timeout { to, after };

        let (conn, send, mut recv) = tokio::time::timeout(step, self.open(to, addr))
            .await
            .map_err(|_| timed_out(step))??;
        // Abandoning the transfer anywhere below resets the stream: the receiver sees the
        // reset, not a clean end, and discards what it got.
        let mut send = ResetOnDrop(Some(send));
        let stream = send.0.as_mut().expect("set above");
        tokio::time::timeout(step, stream.write_all(&head))
            .await
            .map_err(|_| timed_out(step))?
            .map_err(|e| self.stream_failed(to, &conn, FrameError::Io(e.into())))?;

        let mut buf = vec![0u8; chunk_bytes];
        let mut hasher = blake3::Hasher::new();
        let mut bytes = 0u64;
        loop {
            let n = read_full(data, &mut buf)
                .await
                .map_err(TransportError::Snapshot)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
            tokio::time::timeout(
                step,
                frame::write_raw(stream, FrameKind::SnapshotChunk, &buf[..n]),
            )
            .await
            .map_err(|_| timed_out(step))?
            .map_err(|e| self.stream_failed(to, &conn, e))?;
        }
        let end = frame::encode(
            FrameKind::SnapshotEnd,
            &SnapshotEnd {
                bytes,
                hash: *hasher.finalize().as_bytes(),
            },
        )
        .expect("a snapshot end frame is far below its limit");
        tokio::time::timeout(step, stream.write_all(&end))
            .await
            .map_err(|_| timed_out(step))?
            .map_err(|e| self.stream_failed(to, &conn, FrameError::Io(e.into())))?;
        send.finish()
            .map_err(|e| self.stream_failed(to, &conn, FrameError::Io(e)))?;

        let wait = options.install_timeout;
        tokio::time::timeout(wait, read_response(&mut recv))
            .await
            .map_err(|_| timed_out(wait))?
            .map_err(|e| self.stream_failed(to, &conn, e))?
            .map_err(|error| TransportError::Remote { to, error })
    }
}

/// Resets a send stream dropped before [`ResetOnDrop::finish`].
struct ResetOnDrop(Option<SendStream>);

impl ResetOnDrop {
    fn finish(&mut self) -> io::Result<()> {
        let mut stream = self.0.take().expect("finish is called once");
        stream.finish().map_err(io::Error::other)
    }
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(mut stream) = self.0.take() {
            // Already reset or the connection is gone: nothing left to tell the peer.
            let _ = stream.reset(VarInt::from_u32(STREAM_ABANDONED));
        }
    }
}

/// Reads until `buf` is full or the data ends; returns how many bytes it read.
async fn read_full(data: &mut (dyn AsyncRead + Send + Unpin), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match data.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

async fn read_response(
    recv: &mut RecvStream,
) -> Result<Result<PeerResponse, PeerError>, FrameError> {
    let (kind, payload) = frame::read(recv, &[FrameKind::Response]).await?;
    frame::decode(kind, &payload)
}

impl PeerTransport for PeerEndpoint {
    fn request<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
        request: &'a PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<PeerResponse, TransportError>> {
        Box::pin(async move {
            if let PeerRequest::InstallSnapshot(_) = request {
                return Err(TransportError::Remote {
                    to,
                    error: PeerError::BadRequest(
                        "a snapshot is streamed with send_snapshot, not sent as a request".into(),
                    ),
                });
            }
            // Refuse an oversized request before dialling anyone.
            let bytes =
                frame::encode(FrameKind::Request, request).map_err(TransportError::TooLarge)?;
            tokio::time::timeout(timeout, self.exchange(to, addr, &bytes))
                .await
                .map_err(|_| TransportError::Timeout { to, after: timeout })?
        })
    }

    fn send_snapshot<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
        offer: &'a SnapshotOffer,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
        options: SnapshotSendOptions,
    ) -> BoxFuture<'a, Result<PeerResponse, TransportError>> {
        Box::pin(self.stream_snapshot(to, addr, offer, data, options))
    }
}

/// Resolves `addr` to a socket address of the endpoint's own address family.
async fn resolve(local: SocketAddr, addr: &str) -> Result<SocketAddr, String> {
    let found = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("resolve {addr:?}: {e}"))?;
    let mut any = false;
    for candidate in found {
        any = true;
        if candidate.is_ipv4() == local.is_ipv4() {
            return Ok(candidate);
        }
    }
    Err(if any {
        format!("{addr:?} has no address of this endpoint's family ({local})")
    } else {
        format!("{addr:?} resolves to nothing")
    })
}

/// Dials `to` at `addr` and records the outcome in its slot (if the slot still waits for
/// this dial), then tells whoever waits.
async fn dial_task(
    inner: Arc<Inner>,
    to: NodeId,
    addr: String,
    id: u64,
    done: watch::Sender<DialResult>,
) {
    let dial = async {
        let local = inner
            .endpoint
            .local_addr()
            .map_err(|e| format!("read the local address: {e}"))?;
        let remote = resolve(local, &addr).await?;
        let connecting = inner
            .endpoint
            .connect_with(inner.client.clone(), remote, &tls::node_dns_name(to))
            .map_err(|e| format!("dial {remote}: {e}"))?;
        let conn = connecting
            .await
            .map_err(|e| format!("handshake with {remote}: {e}"))?;
        // The TLS layer checked the name; check the identity the same way the server does.
        let found = connection_node_id(&conn)?;
        if found != to {
            conn.close(VarInt::from_u32(CLOSE_UNIDENTIFIED), b"wrong node");
            return Err(format!("{remote} is node {found}, not node {to}"));
        }
        Ok(conn)
    };
    let timeout = inner.config.dial_timeout;
    let result = match tokio::time::timeout(timeout, dial).await {
        Ok(result) => result,
        Err(_) => Err(format!("no handshake with {addr} within {timeout:?}")),
    };
    {
        let mut peers = inner
            .peers
            .lock()
            .expect("peer table lock is never held across a panic");
        if let Some(slot) = peers.get_mut(&to) {
            let ours = matches!(&slot.state, SlotState::Dialing { id: d, .. } if *d == id);
            if ours {
                match &result {
                    Ok(conn) => {
                        slot.failures = 0;
                        slot.state = SlotState::Connected(conn.clone());
                    }
                    Err(reason) => {
                        slot.failures = slot.failures.saturating_add(1);
                        let wait = inner.config.backoff.delay(slot.failures);
                        tracing::debug!(node = to, %addr, failures = slot.failures, ?wait, "dial failed: {reason}");
                        slot.state = SlotState::BackingOff {
                            until: Instant::now() + wait,
                            reason: reason.clone(),
                        };
                    }
                }
            }
        }
    }
    // Nobody may be waiting any more; the slot has the outcome.
    let _ = done.send(Some(result));
}

/// The node id of the peer at the other end of a connection, from its verified certificate.
fn connection_node_id(conn: &Connection) -> Result<NodeId, String> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| "the peer presented no certificate".to_string())?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "the peer identity is not a certificate chain".to_string())?;
    tls::peer_node_id(&chain)
}

async fn accept_loop<H: PeerHandler>(inner: Arc<Inner>, handler: Arc<H>) {
    let connections = Arc::new(Semaphore::new(inner.config.connections_max));
    loop {
        let incoming = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            incoming = inner.endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                remote = %incoming.remote_address(),
                "refusing a peer connection: {} are open", inner.config.connections_max
            );
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            serve_connection(inner, handler, incoming).await;
            drop(permit);
        });
    }
}

async fn serve_connection<H: PeerHandler>(
    inner: Arc<Inner>,
    handler: Arc<H>,
    incoming: quinn::Incoming,
) {
    let remote = incoming.remote_address();
    let handshake = tokio::time::timeout(inner.config.dial_timeout, incoming).await;
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            // Peers without a certificate from the cluster CA end here.
            tracing::warn!(%remote, "peer handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, "peer handshake timed out");
            return;
        }
    };
    let from = match connection_node_id(&conn) {
        Ok(id) => id,
        Err(reason) => {
            tracing::warn!(%remote, "refusing a peer: {reason}");
            conn.close(
                VarInt::from_u32(CLOSE_UNIDENTIFIED),
                b"not a node certificate",
            );
            return;
        }
    };
    tracing::debug!(%remote, node = from, "peer connected");
    loop {
        let stream = tokio::select! {
            _ = inner.cancel.cancelled() => {
                conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
                return;
            }
            stream = conn.accept_bi() => stream,
        };
        match stream {
            Ok((send, recv)) => {
                // Bounded: the peer may open at most `streams_per_connection_max` at once.
                tokio::spawn(serve_stream(
                    inner.clone(),
                    handler.clone(),
                    from,
                    send,
                    recv,
                ));
            }
            Err(e) => {
                tracing::debug!(%remote, node = from, "peer connection ended: {e}");
                return;
            }
        }
    }
}

async fn serve_stream<H: PeerHandler>(
    inner: Arc<Inner>,
    handler: Arc<H>,
    from: NodeId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let answer = answer(&inner, &*handler, from, &mut recv).await;
    if let Err(PeerError::BadRequest(reason)) = &answer {
        tracing::warn!(node = from, "bad peer request: {reason}");
        // Stop the sender: whatever else it sends on this stream is unread.
        let _ = recv.stop(VarInt::from_u32(STREAM_BAD_REQUEST));
    }
    let frame = match frame::encode(FrameKind::Response, &answer) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::error!(node = from, "cannot encode a peer response: {e:#}");
            let error: Result<PeerResponse, PeerError> = Err(PeerError::Failed(format!(
                "cannot encode the response: {e}"
            )));
            frame::encode(FrameKind::Response, &error)
                .expect("an error response is far below the frame limit")
        }
    };
    let sent = async {
        send.write_all(&frame).await?;
        send.finish().map_err(io::Error::other)
    };
    if let Err(e) = sent.await {
        tracing::debug!(node = from, "cannot answer a peer: {e}");
    }
}

async fn answer<H: PeerHandler>(
    inner: &Inner,
    handler: &H,
    from: NodeId,
    recv: &mut RecvStream,
) -> Result<PeerResponse, PeerError> {
    let wait = inner.config.handle_timeout;
    let read = async {
        let (kind, bytes) = frame::read_header(recv, &[FrameKind::Request])
            .await
            .map_err(|e| PeerError::BadRequest(e.to_string()))?;
        // Room for the payload before it is allocated; held until the answer.
        let permits = u32::try_from(bytes).expect("request frames are far below 4 GiB");
        let room = inner
            .request_bytes
            .clone()
            .acquire_many_owned(permits)
            .await
            .expect("the request budget is never closed");
        let request: PeerRequest = frame::read_payload(recv, bytes)
            .await
            .and_then(|payload| frame::decode(kind, &payload))
            .map_err(|e| PeerError::BadRequest(e.to_string()))?;
        Ok::<_, PeerError>((request, room))
    };
    let (request, _room) = tokio::time::timeout(wait, read)
        .await
        .map_err(|_| PeerError::Unavailable(format!("no request read within {wait:?}")))??;
    match request {
        PeerRequest::Ping(n) => Ok(PeerResponse::Pong(n)),
        PeerRequest::InstallSnapshot(offer) => {
            let mut chunks = SnapshotChunks::new(recv, inner.config.snapshot_chunk_wait);
            handler.install_snapshot(from, offer, &mut chunks).await
        }
        request => with_timeout(wait, handler.handle(from, request)).await,
    }
}

async fn with_timeout(
    wait: Duration,
    work: impl Future<Output = Result<PeerResponse, PeerError>>,
) -> Result<PeerResponse, PeerError> {
    tokio::time::timeout(wait, work)
        .await
        .unwrap_or_else(|_| Err(PeerError::Unavailable(format!("no answer within {wait:?}"))))
}
