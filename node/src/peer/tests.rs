//! The transport on loopback: mutual TLS refusals in both directions, round trips,
//! connection reuse, oversized frames, reconnection after a restart, and streamed snapshots.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use openraft::raft::{SnapshotResponse, VoteRequest, VoteResponse};
use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use sesame_proto::{Command, Op, Transaction, Value};
use tempfile::TempDir;
use tokio::io::{AsyncRead, ReadBuf};

use super::endpoint::SlotState;
use super::frame::{self, FrameKind};
use super::tls::{self, write_cluster_certs, NodeCerts};
use super::*;
use crate::raft::{NodeId, SnapshotMeta, Vote};

const WAIT: Duration = Duration::from_secs(5);
const LOCALHOST: &str = "127.0.0.1:0";

/// A snapshot as it arrived: its chunk sizes and its bytes.
type Received = (Vec<usize>, Vec<u8>);

/// Records what reached it; answers votes by granting them and snapshots by reading them.
#[derive(Default)]
struct Recorder {
    calls: AtomicUsize,
    callers: Mutex<Vec<NodeId>>,
    /// Snapshot chunks received, over all snapshots.
    chunks: AtomicUsize,
    /// Chunk sizes of each snapshot received, and its bytes, or why it failed.
    snapshots: Mutex<Vec<Result<Received, PeerError>>>,
}

impl PeerHandler for Recorder {
    async fn handle(&self, from: NodeId, request: PeerRequest) -> Result<PeerResponse, PeerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.callers.lock().expect("lock").push(from);
        match request {
            PeerRequest::Vote(v) => Ok(PeerResponse::Vote(VoteResponse::new(
                v.vote,
                v.last_log_id,
                true,
            ))),
            other => Err(PeerError::Unsupported(format!("{:?}", other.kind()))),
        }
    }

    async fn install_snapshot(
        &self,
        from: NodeId,
        offer: SnapshotOffer,
        chunks: &mut SnapshotChunks<'_>,
    ) -> Result<PeerResponse, PeerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.callers.lock().expect("lock").push(from);
        let mut sizes = Vec::new();
        let mut bytes = Vec::new();
        let result = loop {
            match chunks.next().await {
                Ok(Some(chunk)) => {
                    self.chunks.fetch_add(1, Ordering::SeqCst);
                    sizes.push(chunk.len());
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break Ok((sizes, bytes)),
                Err(e) => break Err(e),
            }
        };
        let answer = match &result {
            Ok(_) => Ok(PeerResponse::InstallSnapshot(SnapshotResponse::new(
                offer.vote,
            ))),
            Err(e) => Err(e.clone()),
        };
        self.snapshots.lock().expect("lock").push(result);
        answer
    }
}

fn bind(dir: &Path, addr: &str) -> anyhow::Result<PeerEndpoint> {
    let certs = NodeCerts::load(dir)?;
    Ok(PeerEndpoint::bind(PeerConfig::new(addr.parse()?), &certs)?)
}

/// A cluster's certificates for `ids` in a new temporary folder.
fn cluster(ids: &[NodeId]) -> anyhow::Result<TempDir> {
    let dir = TempDir::new()?;
    write_cluster_certs(dir.path(), ids)?;
    Ok(dir)
}

fn vote_request() -> PeerRequest {
    PeerRequest::Vote(VoteRequest::new(Vote::new(3, 1), None))
}

async fn served(dir: &Path) -> anyhow::Result<(PeerEndpoint, Arc<Recorder>, String)> {
    let server = bind(dir, LOCALHOST)?;
    let recorder = Arc::new(Recorder::default());
    server.serve(recorder.clone());
    let addr = server.local_addr()?.to_string();
    Ok((server, recorder, addr))
}

fn cached_connection_id(endpoint: &PeerEndpoint, to: NodeId) -> Option<usize> {
    let peers = endpoint.inner.peers.lock().expect("lock");
    match &peers.get(&to)?.state {
        SlotState::Connected(c) => Some(c.stable_id()),
        _ => None,
    }
}

#[tokio::test]
async fn round_trip_names_the_caller_and_reuses_one_connection() -> anyhow::Result<()> {
    let certs = cluster(&[1, 2])?;
    let (server, recorder, addr) = served(&certs.path().join("2")).await?;
    let client = bind(&certs.path().join("1"), LOCALHOST)?;

    let pong = client
        .request(2, &addr, &PeerRequest::Ping(7), WAIT)
        .await?;
    assert_eq!(pong, PeerResponse::Pong(7));
    let first = cached_connection_id(&client, 2).expect("a cached connection");
    for _ in 0..5 {
        let answer = client.request(2, &addr, &vote_request(), WAIT).await?;
        let PeerResponse::Vote(v) = answer else {
            anyhow::bail!("not a vote response: {answer:?}");
        };
        assert!(v.vote_granted);
        assert_eq!(v.vote, Vote::new(3, 1));
    }
    assert_eq!(
        cached_connection_id(&client, 2),
        Some(first),
        "one connection"
    );
    assert_eq!(*recorder.callers.lock().expect("lock"), vec![1; 5]);

    // Requests in parallel share the connection too.
    let pings: Vec<PeerRequest> = (0..20).map(PeerRequest::Ping).collect();
    let answers =
        futures::future::join_all(pings.iter().map(|p| client.request(2, &addr, p, WAIT))).await;
    for (n, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer?, PeerResponse::Pong(n as u64));
    }
    assert_eq!(cached_connection_id(&client, 2), Some(first));

    // A kind the handler does not serve comes back as the handler's error.
    let unsupported = client
        .request(2, &addr, &PeerRequest::AppendEntries(empty_append()), WAIT)
        .await;
    assert!(matches!(
        unsupported,
        Err(TransportError::Remote {
            to: 2,
            error: PeerError::Unsupported(_)
        })
    ));
    client.close().await;
    server.close().await;
    Ok(())
}

fn empty_append() -> AppendEntries {
    AppendEntries {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        leader_commit: None,
        entries: Vec::new(),
    }
}

#[tokio::test]
async fn dialling_an_address_that_is_another_node_fails() -> anyhow::Result<()> {
    let certs = cluster(&[1, 2, 3])?;
    let (server, recorder, addr) = served(&certs.path().join("2")).await?;
    let client = bind(&certs.path().join("1"), LOCALHOST)?;
    // Node 2 listens there, but the dialler wants node 3: the server name does not match.
    let answer = client.request(3, &addr, &PeerRequest::Ping(1), WAIT).await;
    assert!(
        matches!(answer, Err(TransportError::Unreachable { to: 3, .. })),
        "{answer:?}"
    );
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 0);
    client.close().await;
    server.close().await;
    Ok(())
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused() -> anyhow::Result<()> {
    let ours = cluster(&[1, 2])?;
    let theirs = cluster(&[1])?;
    let (server, recorder, addr) = served(&ours.path().join("2")).await?;
    // The control: the same raw client with our node 1's certificate is answered.
    let member = IntruderCerts::load(&ours.path().join("1"))?.endpoint()?;
    let answer = member.request(2, &addr, &vote_request(), WAIT).await?;
    assert!(matches!(answer, PeerResponse::Vote(_)), "{answer:?}");
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 1);
    let intruder = bind(&theirs.path().join("1"), LOCALHOST)?;
    // The intruder trusts neither our CA nor we its: both checks fail; make sure ours does by
    // giving it our CA to trust, so only its certificate is wrong.
    std::fs::copy(
        ours.path().join(tls::CA_CERT_FILE),
        theirs.path().join("1").join(tls::CA_CERT_FILE),
    )?;
    let answer = intruder.request(2, &addr, &vote_request(), WAIT).await;
    assert!(answer.is_err(), "{answer:?}");
    let intruder_trusting_us = IntruderCerts::load(&theirs.path().join("1"))?.endpoint()?;
    let answer = intruder_trusting_us
        .request(2, &addr, &vote_request(), WAIT)
        .await;
    assert!(answer.is_err(), "{answer:?}");
    assert_eq!(
        recorder.calls.load(Ordering::SeqCst),
        1,
        "no intruder got through"
    );
    intruder.close().await;
    server.close().await;
    Ok(())
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused() -> anyhow::Result<()> {
    let ours = cluster(&[1])?;
    let theirs = cluster(&[2])?;
    let (impostor, recorder, addr) = served(&theirs.path().join("2")).await?;
    let client = bind(&ours.path().join("1"), LOCALHOST)?;
    let answer = client.request(2, &addr, &vote_request(), WAIT).await;
    assert!(
        matches!(answer, Err(TransportError::Unreachable { to: 2, .. })),
        "{answer:?}"
    );
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 0);
    client.close().await;
    impostor.close().await;
    Ok(())
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() -> anyhow::Result<()> {
    let certs = cluster(&[2])?;
    let (server, recorder, addr) = served(&certs.path().join("2")).await?;
    let ca = CertificateDer::from_pem_file(certs.path().join(tls::CA_CERT_FILE))?;
    let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(tls::ca_roots(&ca)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(config)?));
    let endpoint = quinn::Endpoint::client(LOCALHOST.parse()?)?;
    let addr: SocketAddr = addr.parse()?;
    let attempt = async {
        let conn = endpoint
            .connect_with(config, addr, &tls::node_dns_name(2))?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&frame::encode(FrameKind::Request, &vote_request())?)
            .await?;
        send.finish()?;
        let answer = frame::read(&mut recv, &[FrameKind::Response]).await?;
        anyhow::Ok(answer)
    };
    let outcome = tokio::time::timeout(WAIT, attempt).await?;
    assert!(
        outcome.is_err(),
        "a client without a certificate got {outcome:?}"
    );
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 0);
    server.close().await;
    Ok(())
}

/// A node certificate and a CA to trust, used by a raw QUIC client outside `PeerEndpoint`.
struct IntruderCerts {
    chain: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    ca: CertificateDer<'static>,
}

impl IntruderCerts {
    fn load(dir: &Path) -> anyhow::Result<IntruderCerts> {
        Ok(IntruderCerts {
            chain: CertificateDer::pem_file_iter(dir.join(tls::NODE_CERT_FILE))?
                .collect::<Result<_, _>>()?,
            key: rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join(tls::NODE_KEY_FILE))?,
            ca: CertificateDer::from_pem_file(dir.join(tls::CA_CERT_FILE))?,
        })
    }

    /// A raw client that trusts the folder's CA and presents the folder's certificate.
    fn endpoint(&self) -> anyhow::Result<RawClient> {
        let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(tls::ca_roots(&self.ca)?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![tls::ALPN.to_vec()];
        let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(config)?));
        let endpoint = quinn::Endpoint::client(LOCALHOST.parse()?)?;
        Ok(RawClient { endpoint, config })
    }
}

struct RawClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl RawClient {
    async fn request(
        &self,
        to: NodeId,
        addr: &str,
        request: &PeerRequest,
        wait: Duration,
    ) -> anyhow::Result<PeerResponse> {
        let attempt = async {
            let conn = self
                .endpoint
                .connect_with(self.config.clone(), addr.parse()?, &tls::node_dns_name(to))?
                .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&frame::encode(FrameKind::Request, request)?)
                .await?;
            send.finish()?;
            let (kind, payload) = frame::read(&mut recv, &[FrameKind::Response]).await?;
            let answer: Result<PeerResponse, PeerError> = frame::decode(kind, &payload)?;
            Ok(answer?)
        };
        tokio::time::timeout(wait, attempt).await?
    }
}

#[tokio::test]
async fn oversized_frames_are_refused_and_the_connection_survives() -> anyhow::Result<()> {
    let certs = cluster(&[1, 2])?;
    let (server, recorder, addr) = served(&certs.path().join("2")).await?;
    let client = bind(&certs.path().join("1"), LOCALHOST)?;
    client
        .request(2, &addr, &PeerRequest::Ping(1), WAIT)
        .await?;
    let conn_id = cached_connection_id(&client, 2).expect("connected");

    // The sender refuses a request over the limit before anything goes out.
    let huge = Command::Txs(vec![Transaction {
        site: "demo".into(),
        ops: vec![Op::Put {
            collection: "c".into(),
            key: "k".into(),
            value: Value::Bytes(vec![0; frame::REQUEST_BYTES_MAX + 1]),
            if_version: None,
        }],
        origin: None,
    }]);
    let mut append = empty_append();
    append.entries.push(message::WireEntry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
        payload: message::WirePayload::Normal(huge),
    });
    let refused = client
        .request(2, &addr, &PeerRequest::AppendEntries(append), WAIT)
        .await;
    assert!(
        matches!(
            refused,
            Err(TransportError::TooLarge(frame::FrameError::TooLarge { .. }))
        ),
        "{refused:?}"
    );

    // A peer that claims a larger frame anyway is answered with an error, on that stream only.
    let conn = client.connection(2, &addr).await?;
    assert_eq!(conn.stable_id(), conn_id);
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut header = Vec::from(frame::MAGIC);
    header.push(frame::FORMAT_VERSION);
    header.push(FrameKind::Request as u8);
    header.extend_from_slice(&u32::try_from(frame::REQUEST_BYTES_MAX + 1)?.to_be_bytes());
    send.write_all(&header).await?;
    send.write_all(&[0u8; 1024]).await?;
    let (kind, payload) = frame::read(&mut recv, &[FrameKind::Response]).await?;
    let answer: Result<PeerResponse, PeerError> = frame::decode(kind, &payload)?;
    assert!(
        matches!(&answer, Err(PeerError::BadRequest(m)) if m.contains("limit")),
        "{answer:?}"
    );
    // Garbage instead of a frame: also an error on its stream alone.
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    send.finish()?;
    let (kind, payload) = frame::read(&mut recv, &[FrameKind::Response]).await?;
    let answer: Result<PeerResponse, PeerError> = frame::decode(kind, &payload)?;
    assert!(
        matches!(answer, Err(PeerError::BadRequest(_))),
        "{answer:?}"
    );

    // The connection still serves everyone else.
    let answer = client.request(2, &addr, &vote_request(), WAIT).await?;
    assert!(matches!(answer, PeerResponse::Vote(_)));
    assert_eq!(cached_connection_id(&client, 2), Some(conn_id));
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 1);
    client.close().await;
    server.close().await;
    Ok(())
}

#[tokio::test]
async fn reconnects_after_the_server_restarts() -> anyhow::Result<()> {
    let certs = cluster(&[1, 2])?;
    let server_dir = certs.path().join("2");
    let (server, _, addr) = served(&server_dir).await?;
    let client = bind(&certs.path().join("1"), LOCALHOST)?;
    client
        .request(2, &addr, &PeerRequest::Ping(1), WAIT)
        .await?;
    let before = cached_connection_id(&client, 2).expect("connected");

    server.close().await;
    drop(server);
    let down = client
        .request(2, &addr, &PeerRequest::Ping(2), Duration::from_secs(1))
        .await;
    assert!(down.is_err(), "a stopped server answered: {down:?}");

    // The same address again, once the old socket is gone.
    let deadline = Instant::now() + WAIT;
    let restarted = loop {
        match bind(&server_dir, &addr) {
            Ok(endpoint) => break endpoint,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("rebind: {e:#}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let recorder = Arc::new(Recorder::default());
    restarted.serve(recorder.clone());

    // Requests fail while the client backs off, then one goes through on a new connection.
    let deadline = Instant::now() + WAIT;
    loop {
        match client
            .request(2, &addr, &vote_request(), Duration::from_secs(1))
            .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("while reconnecting: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => anyhow::bail!("no reconnection: {e}"),
        }
    }
    let after = cached_connection_id(&client, 2).expect("connected again");
    assert_ne!(before, after, "a new connection");
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 1);
    client.close().await;
    restarted.close().await;
    Ok(())
}

fn offer() -> SnapshotOffer {
    SnapshotOffer {
        vote: Vote::new_committed(2, 1),
        meta: SnapshotMeta::default(),
    }
}

fn snapshot_options(chunk_bytes: usize) -> SnapshotSendOptions {
    SnapshotSendOptions {
        chunk_bytes,
        chunk_timeout: WAIT,
        install_timeout: WAIT,
    }
}

#[tokio::test]
async fn a_snapshot_streams_in_chunks() -> anyhow::Result<()> {
    let certs = cluster(&[1, 2])?;
    let (server, recorder, addr) = served(&certs.path().join("2")).await?;
    let client = bind(&certs.path().join("1"), LOCALHOST)?;

    const CHUNK: usize = 64 << 10;
    let data: Vec<u8> = (0..(CHUNK * 5 / 2)).map(|i| (i % 251) as u8).collect();
    let answer = client
        .send_snapshot(
            2,
            &addr,
            &offer(),
            &mut data.as_slice(),
            snapshot_options(CHUNK),
        )
        .await?;
    assert_eq!(
        answer,
        PeerResponse::InstallSnapshot(SnapshotResponse::new(offer().vote))
    );
    {
        let snapshots = recorder.snapshots.lock().expect("lock");
        let [Ok((sizes, bytes))] = snapshots.as_slice() else {
            anyhow::bail!("expected one complete snapshot, got {snapshots:?}");
        };
        assert_eq!(sizes, &vec![CHUNK, CHUNK, CHUNK / 2]);
        assert!(bytes == &data, "the snapshot arrived changed");
    }

    // An empty snapshot is a snapshot too.
    client
        .send_snapshot(2, &addr, &offer(), &mut &[][..], snapshot_options(CHUNK))
        .await?;

    // A sender whose file fails mid-way abandons the transfer; the receiver, midway through
    // it, sees the transfer cut short and keeps nothing.
    let (feed, mut source) = ChannelReader::new();
    let cut_offer = offer();
    let sending = client.send_snapshot(2, &addr, &cut_offer, &mut source, snapshot_options(CHUNK));
    let cut = async {
        feed.send(Ok(vec![1; CHUNK])).await?;
        feed.send(Ok(vec![2; CHUNK])).await?;
        let deadline = Instant::now() + WAIT;
        while recorder.chunks.load(Ordering::SeqCst) < 3 + 2 {
            anyhow::ensure!(Instant::now() < deadline, "the receiver got no chunks");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        feed.send(Err(std::io::Error::other("disk on fire")))
            .await?;
        anyhow::Ok(())
    };
    let (failed, cut) = tokio::join!(sending, cut);
    cut?;
    assert!(
        matches!(failed, Err(TransportError::Snapshot(_))),
        "{failed:?}"
    );
    let deadline = Instant::now() + WAIT;
    while recorder.snapshots.lock().expect("lock").len() < 3 {
        assert!(Instant::now() < deadline, "the receiver never noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last = recorder.snapshots.lock().expect("lock").pop();
    assert!(
        matches!(last, Some(Err(PeerError::BadRequest(_)))),
        "{last:?}"
    );

    // The connection is still good.
    client
        .request(2, &addr, &PeerRequest::Ping(3), WAIT)
        .await?;
    client.close().await;
    server.close().await;
    Ok(())
}

/// Reads what the test feeds it, chunk by chunk, including errors.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    pending: Vec<u8>,
}

impl ChannelReader {
    fn new() -> (
        tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
        ChannelReader,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let reader = ChannelReader {
            rx,
            pending: Vec::new(),
        };
        (tx, reader)
    }
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.pending.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                // The feed ended: end of data.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(bytes))) => self.pending = bytes,
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_closed_endpoint_refuses_to_dial() -> anyhow::Result<()> {
    let certs = cluster(&[1])?;
    let client = bind(&certs.path().join("1"), LOCALHOST)?;
    client.close().await;
    let answer = client
        .request(2, "127.0.0.1:9", &PeerRequest::Ping(1), WAIT)
        .await;
    assert!(matches!(answer, Err(TransportError::Unreachable { .. })));
    Ok(())
}

#[tokio::test]
async fn failed_dials_back_off() -> anyhow::Result<()> {
    let certs = cluster(&[1])?;
    // Nothing listens on the port of a socket we hold and never read.
    let silent = std::net::UdpSocket::bind(LOCALHOST)?;
    let addr = silent.local_addr()?.to_string();
    let mut config = PeerConfig::new(LOCALHOST.parse()?);
    config.dial_timeout = Duration::from_millis(200);
    let client = PeerEndpoint::bind(config, &NodeCerts::load(&certs.path().join("1"))?)?;
    let first = client.request(2, &addr, &PeerRequest::Ping(1), WAIT).await;
    assert!(
        matches!(&first, Err(TransportError::Unreachable { reason, .. }) if reason.contains("handshake")),
        "{first:?}"
    );
    // Straight after, the client does not dial again: it is backing off.
    let second = client.request(2, &addr, &PeerRequest::Ping(2), WAIT).await;
    assert!(
        matches!(&second, Err(TransportError::Unreachable { reason, .. }) if reason.contains("next dial")),
        "{second:?}"
    );
    client.close().await;
    Ok(())
}
