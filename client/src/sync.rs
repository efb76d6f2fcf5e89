//! The sync client: a local replica of what the application subscribes to, kept current over
//! QUIC, and a persisted queue of the application's own transactions, pushed in order and
//! applied at most once (see `sesame_sync::client::ClientSession`, which this drives).
//!
//! ```no_run
//! # async fn demo() -> Result<(), sesame_client::SyncError> {
//! use sesame_client::{Client, Options};
//! use sesame_proto::sync::Target;
//! let client = Client::connect(Options::new(["http://127.0.0.1:7700"], "ssm_…")).await?;
//! let mut changes = client.subscribe(Target::Site {
//!     site: "demo".into(), collection: Some("profiles".into()), prefix: String::new(),
//! })?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Deserialize;
use sesame_proto::sync::{encode_prefixed, FrameReader, SyncTuple, Target};
use sesame_proto::{Home, LogIndex, Op, Origin, Value};
use sesame_sync::client::{ClientSession, Event};
use sesame_sync::replica::Entry;
use sesame_sync::Replica;
use tokio::sync::{broadcast, oneshot, watch, Notify};

/// The application protocol of the node's client endpoint.
const ALPN: &[u8] = b"sesame-sync/1";
/// Events kept for slow listeners of [`Client::events`] and subscription streams; one that
/// falls further behind skips the oldest (the replica itself misses nothing).
const EVENTS_MAX: usize = 4_096;
/// How often an idle connection is pinged (the node closes one silent for 30 s).
const PING_EVERY: Duration = Duration::from_secs(10);
/// Longest a dial, handshake or `GET /v1/sync` may take.
const DIAL_WAIT: Duration = Duration::from_secs(5);
/// Longest [`Client::connect`] waits for the first welcome.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Nodes' HTTP URLs; the client learns each node's QUIC address from `GET /v1/sync`, and
    /// tries the leader first.
    pub nodes: Vec<String>,
    pub token: String,
    /// The replica file; `None`: in memory (lost with the process, queue included).
    pub replica: Option<PathBuf>,
    /// The client id; `None`: the replica's own (made on first use).
    pub client_id: Option<String>,
    /// The cluster CA (PEM) to verify nodes against; `None`: pin the certificate the node's
    /// `GET /v1/sync` names (trust on the HTTP answer).
    pub ca_pem: Option<String>,
}

impl Options {
    pub fn new<S: Into<String>>(nodes: impl IntoIterator<Item = S>, token: &str) -> Options {
        Options {
            nodes: nodes.into_iter().map(Into::into).collect(),
            token: token.to_string(),
            replica: None,
            client_id: None,
            ca_pem: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("replica: {0}")]
    Replica(String),
    /// The node refused the session (`unauthorized`, `forbidden`, `version`, ...).
    #[error("the node refused the session: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("no node answered within {0:?}")]
    Unreachable(Duration),
    #[error("rejected: {code}: {message}")]
    Rejected { code: String, message: String },
    #[error("{0}")]
    Config(String),
}

impl From<sesame_sync::client::ClientError> for SyncError {
    fn from(e: sesame_sync::client::ClientError) -> SyncError {
        SyncError::Replica(e.to_string())
    }
}

impl From<sesame_sync::StoreError> for SyncError {
    fn from(e: sesame_sync::StoreError) -> SyncError {
        SyncError::Replica(e.to_string())
    }
}

/// A change of a subscription, as the application sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The commit index of the change (the tuple's version).
    pub index: LogIndex,
    pub collection: String,
    pub key: String,
    /// `None` for a delete.
    pub value: Option<Value>,
    pub origin: Option<Origin>,
    pub home: Home,
}

impl From<SyncTuple> for Change {
    fn from(t: SyncTuple) -> Change {
        Change {
            index: t.version,
            collection: t.collection,
            key: t.key,
            value: t.value,
            origin: t.origin,
            home: t.home,
        }
    }
}

/// What a queued transaction became.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub site: String,
    pub seq: u64,
}

struct Inner {
    session: Mutex<ClientSession>,
    /// Something to send: wakes the connection.
    outgoing: Notify,
    events: broadcast::Sender<Event>,
    /// Whether a session is open, and the last refusal.
    state: watch::Sender<Connection>,
    /// [`Client::transact_wait`]s waiting for their transaction's outcome, by (site, seq).
    waiters: Mutex<HashMap<(String, u64), oneshot::Sender<Outcome>>>,
    /// Bytes received from nodes over all sessions (the sync stream's, above QUIC).
    received: std::sync::atomic::AtomicU64,
    options: Options,
}

type Outcome = Result<LogIndex, (String, String)>;

#[derive(Debug, Clone, PartialEq)]
enum Connection {
    Offline,
    Open,
    Refused { code: String, message: String },
}

/// A sync client; clones share one session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _stop: Arc<tokio_util_drop::StopOnDrop>,
}

mod tokio_util_drop {
    /// Stops the connection task when the last clone of the client goes.
    pub struct StopOnDrop(pub tokio::task::AbortHandle);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
}

impl Client {
    /// Opens the replica and starts connecting in the background; works offline (writes
    /// queue, reads see the replica).
    pub fn open(options: Options) -> Result<Client, SyncError> {
        if options.nodes.is_empty() {
            return Err(SyncError::Config("no node URL given".into()));
        }
        let replica = match &options.replica {
            Some(path) => Replica::open(path)?,
            None => Replica::in_memory()?,
        };
        let session =
            ClientSession::new(replica, options.token.clone(), options.client_id.as_deref())?;
        let inner = Arc::new(Inner {
            session: Mutex::new(session),
            outgoing: Notify::new(),
            events: broadcast::channel(EVENTS_MAX).0,
            state: watch::channel(Connection::Offline).0,
            waiters: Mutex::new(HashMap::new()),
            received: Default::default(),
            options,
        });
        let task = tokio::spawn(run(inner.clone()));
        Ok(Client {
            inner,
            _stop: Arc::new(tokio_util_drop::StopOnDrop(task.abort_handle())),
        })
    }

    /// Opens and waits for the first session: an error if the node refuses it (a bad token)
    /// or none answers in time.
    pub async fn connect(options: Options) -> Result<Client, SyncError> {
        let client = Client::open(options)?;
        client.wait_connected(CONNECT_WAIT).await?;
        Ok(client)
    }

    /// Waits until a session is open.
    pub async fn wait_connected(&self, wait: Duration) -> Result<(), SyncError> {
        let mut state = self.inner.state.subscribe();
        let result =
            tokio::time::timeout(wait, state.wait_for(|s| !matches!(s, Connection::Offline))).await;
        match result {
            Ok(Ok(s)) => match &*s {
                Connection::Refused { code, message } => Err(SyncError::Refused {
                    code: code.clone(),
                    message: message.clone(),
                }),
                _ => Ok(()),
            },
            _ => Err(SyncError::Unreachable(wait)),
        }
    }

    pub fn client_id(&self) -> String {
        self.lock().client_id().to_string()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClientSession> {
        self.inner
            .session
            .lock()
            .expect("client session lock poisoned")
    }

    /// Everything the session reports (changes, acknowledgements, rejections, connection).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Subscribes to `target` and returns its changes as they reach the replica (the
    /// snapshot first when it starts from nothing). The subscription is kept in the replica
    /// and resumed from where it was on every connection.
    pub fn subscribe(
        &self,
        target: Target,
    ) -> Result<impl Stream<Item = Change> + Unpin, SyncError> {
        self.subscribe_from(target, 0)
    }

    /// Like [`Client::subscribe`] for a new subscription that starts after index `since`
    /// (changes only, no snapshot), as if the replica had everything up to it.
    pub fn subscribe_from(
        &self,
        target: Target,
        since: LogIndex,
    ) -> Result<impl Stream<Item = Change> + Unpin, SyncError> {
        let events = self.inner.events.subscribe();
        let sub = self.lock().subscribe_from(target, since)?;
        self.inner.outgoing.notify_one();
        let stream = futures::stream::unfold(
            (events, Vec::<Change>::new()),
            move |(mut events, mut ready)| async move {
                loop {
                    if let Some(c) = ready.pop() {
                        return Some((c, (events, ready)));
                    }
                    match events.recv().await {
                        Ok(Event::Changed { sub: s, tuples, .. }) if s == sub.id => {
                            ready = tuples.into_iter().rev().map(Change::from).collect();
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }

    /// Subscribes without a stream: follow it through [`Client::events`] (`Changed` with
    /// this id).
    pub fn subscribe_id(&self, target: Target) -> Result<u32, SyncError> {
        let sub = self.lock().subscribe(target)?;
        self.inner.outgoing.notify_one();
        Ok(sub.id)
    }

    /// Queues a transaction: it is in the replica's pending view at once and pushed when
    /// connected. Returns its site and sequence number.
    pub fn transact(&self, site: &str, ops: Vec<Op>) -> Result<Queued, SyncError> {
        let p = self.lock().transact(site, ops)?;
        self.inner.outgoing.notify_one();
        Ok(Queued {
            site: site.to_string(),
            seq: p.tx.origin.map_or(0, |o| o.seq),
        })
    }

    /// Queues a transaction and waits for its outcome: the commit index, or the rejection.
    pub async fn transact_wait(&self, site: &str, ops: Vec<Op>) -> Result<LogIndex, SyncError> {
        let mut state = self.inner.state.subscribe();
        // Registered before the transaction exists, so its outcome cannot slip past.
        let (tx, outcome) = oneshot::channel();
        let q = {
            // Lock order: the session, then the waiters (as where outcomes are handed out).
            let mut session = self.lock();
            let p = session.transact(site, ops)?;
            let seq = p.tx.origin.map_or(0, |o| o.seq);
            self.inner
                .waiters
                .lock()
                .expect("waiters lock poisoned")
                .insert((site.to_string(), seq), tx);
            Queued {
                site: site.to_string(),
                seq,
            }
        };
        self.inner.outgoing.notify_one();
        let refused = async {
            let s = state
                .wait_for(|s| matches!(s, Connection::Refused { .. }))
                .await;
            match s.as_deref() {
                Ok(Connection::Refused { code, message }) => SyncError::Refused {
                    code: code.clone(),
                    message: message.clone(),
                },
                _ => SyncError::Config("the client stopped".into()),
            }
        };
        let result = tokio::select! {
            o = outcome => match o {
                Ok(Ok(index)) => Ok(index),
                Ok(Err((code, message))) => Err(SyncError::Rejected { code, message }),
                Err(_) => Err(SyncError::Config("the client stopped".into())),
            },
            e = refused => Err(e),
        };
        self.inner
            .waiters
            .lock()
            .expect("waiters lock poisoned")
            .remove(&(q.site, q.seq));
        result
    }

    /// A tuple as this client sees it (its pending write over the committed value).
    pub fn get(&self, site: &str, collection: &str, key: &str) -> Result<Option<Entry>, SyncError> {
        Ok(self.lock().replica().get(site, collection, key)?)
    }

    /// Tuples of a collection under `prefix`, as this client sees them, in key order.
    pub fn scan(
        &self,
        site: &str,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Entry>, SyncError> {
        Ok(self
            .lock()
            .replica()
            .scan(site, collection, prefix, limit)?)
    }

    /// Transactions not yet acknowledged.
    pub fn pending_count(&self) -> Result<u64, SyncError> {
        Ok(self.lock().pending_count()?)
    }

    /// Bytes received from nodes so far (the sync stream's, above QUIC's own framing).
    pub fn bytes_received(&self) -> u64 {
        self.inner
            .received
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a session is open now.
    pub fn is_connected(&self) -> bool {
        *self.inner.state.borrow() == Connection::Open
    }
}

/// Keeps a session open: dial, run, and after a failure wait (backoff with jitter) and dial
/// again, the leader first.
async fn run(inner: Arc<Inner>) {
    let http = reqwest::Client::builder()
        .timeout(DIAL_WAIT)
        .build()
        .expect("build an HTTP client");
    let mut next = 0usize;
    let mut preferred: Option<String> = None;
    loop {
        let url = preferred
            .take()
            .unwrap_or_else(|| inner.options.nodes[next % inner.options.nodes.len()].clone());
        next += 1;
        let outcome = session(&inner, &http, &url, &mut preferred).await;
        let (code, message) = match outcome {
            Ok(()) => ("closed".to_string(), "the connection closed".to_string()),
            Err(e) => e,
        };
        let delay = {
            let mut s = inner.session.lock().expect("client session lock poisoned");
            if s.is_offline() {
                s.dial_failed();
            } else {
                s.disconnected(&code, &message);
            }
            drain_events(&inner, &mut s);
            s.reconnect_delay(random())
        };
        let refused = refusal(&code);
        inner.state.send_replace(if refused {
            Connection::Refused { code, message }
        } else {
            Connection::Offline
        });
        tokio::time::sleep(delay).await;
    }
}

/// Whether a session ended for a reason retrying does not change (the client keeps trying
/// with backoff, but [`Client::connect`] reports it at once).
fn refusal(code: &str) -> bool {
    matches!(code, "unauthorized" | "forbidden" | "version" | "tls")
}

fn random() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("read the operating system's random source");
    u64::from_le_bytes(b)
}

#[derive(Deserialize)]
struct SyncInfo {
    quic: Option<String>,
    server_name: String,
    cert_blake3: String,
    leader_http: Option<String>,
}

/// One session: learn the endpoint, dial, then shuttle frames until it ends.
async fn session(
    inner: &Arc<Inner>,
    http: &reqwest::Client,
    url: &str,
    preferred: &mut Option<String>,
) -> Result<(), (String, String)> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| ("unreachable".to_string(), format!("{what}: {e}"));
    let info: SyncInfo = http
        .get(format!("{}/v1/sync", url.trim_end_matches('/')))
        .send()
        .await
        .map_err(|e| fail(url, &e))?
        .error_for_status()
        .map_err(|e| fail(url, &e))?
        .json()
        .await
        .map_err(|e| fail(url, &e))?;
    // Follow the leader: its node takes writes without a hop.
    if let Some(leader) = info.leader_http.filter(|l| !l.is_empty()) {
        let leader = if leader.contains("://") {
            leader
        } else {
            format!("http://{leader}")
        };
        if leader.trim_end_matches('/') != url.trim_end_matches('/') {
            *preferred = Some(leader);
        }
    }
    let quic = info
        .quic
        .ok_or_else(|| fail(url, &"the node names no QUIC address"))?;
    let addr = tokio::net::lookup_host(&quic)
        .await
        .map_err(|e| fail(&quic, &e))?
        .next()
        .ok_or_else(|| fail(&quic, &"no address"))?;
    let crypto = tls_config(inner.options.ca_pem.as_deref(), &info.cert_blake3)
        .map_err(|e| ("config".to_string(), e))?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("literal address");
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| fail("bind UDP", &e))?;
    let mut config = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(crypto).map_err(|e| fail("QUIC TLS", &e))?,
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(PING_EVERY));
    config.transport_config(Arc::new(transport));
    let connecting = endpoint
        .connect_with(config, addr, &info.server_name)
        .map_err(|e| fail(&quic, &e))?;
    let conn = tokio::time::timeout(DIAL_WAIT, connecting)
        .await
        .map_err(|_| fail(&quic, &"handshake timed out"))?
        .map_err(|e| match e {
            // The node's certificate does not verify (or the handshake was refused): no
            // retry will change that.
            quinn::ConnectionError::TransportError(t) => (
                "tls".to_string(),
                format!("{quic}: the TLS handshake failed: {t}"),
            ),
            e => fail(&quic, &e),
        })?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(&quic, &e))?;
    inner
        .session
        .lock()
        .expect("client session lock poisoned")
        .connected();
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let result = loop {
        // Send what the session has to say.
        let out: Vec<u8> = {
            let mut s = inner.session.lock().expect("client session lock poisoned");
            let mut out = Vec::new();
            while let Some(msg) = s.poll_transmit() {
                out.extend_from_slice(&encode_prefixed(&msg));
            }
            out
        };
        if !out.is_empty() {
            if let Err(e) = send.write_all(&out).await {
                break Err(fail("send", &e));
            }
        }
        tokio::select! {
            read = recv.read(&mut buf) => match read {
                Ok(Some(n)) => {
                    inner.received.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    reader.push(&buf[..n]);
                    let mut s = inner.session.lock().expect("client session lock poisoned");
                    let mut ended = None;
                    loop {
                        match reader.next_frame() {
                            Ok(Some(frame)) => {
                                if let Err(e) = s.receive(&frame) {
                                    ended = Some(("bad_frame".to_string(), e.to_string()));
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                ended = Some(("bad_frame".to_string(), e.to_string()));
                                break;
                            }
                        }
                    }
                    drain_events(inner, &mut s);
                    if s.is_open() {
                        inner.state.send_if_modified(|c| {
                            let changed = *c != Connection::Open;
                            *c = Connection::Open;
                            changed
                        });
                    }
                    if let Some(e) = ended {
                        break Err(e);
                    }
                    if let Some(close) = s.take_close() {
                        break Err(close);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(fail("receive", &e)),
            },
            _ = inner.outgoing.notified() => {}
        }
    };
    conn.close(0u32.into(), b"bye");
    endpoint.close(0u32.into(), b"bye");
    result
}

/// Hands the session's events to listeners, and acknowledges mailbox tuples that arrived.
fn drain_events(inner: &Inner, s: &mut ClientSession) {
    while let Some(event) = s.poll_event() {
        if let Event::Changed { site, tuples, .. } = &event {
            let me = Home::Mailbox(s.client_id().to_string());
            for t in tuples {
                let receipt = t.collection == sesame_sync::server::RECEIPTS_COLLECTION;
                if t.home == me && t.value.is_some() && !receipt {
                    s.delivered(site, &t.collection, &t.key, t.version);
                }
            }
        }
        let settled = match &event {
            Event::Committed { site, seq, index } => Some(((site.clone(), *seq), Ok(*index))),
            Event::Rejected {
                site,
                seq,
                code,
                message,
            } => Some(((site.clone(), *seq), Err((code.clone(), message.clone())))),
            _ => None,
        };
        if let Some((key, outcome)) = settled {
            let waiter = inner
                .waiters
                .lock()
                .expect("waiters lock poisoned")
                .remove(&key);
            if let Some(w) = waiter {
                let _ = w.send(outcome);
            }
        }
        if let Event::Disconnected { code, message } = &event {
            if refusal(code) {
                inner.state.send_replace(Connection::Refused {
                    code: code.clone(),
                    message: message.clone(),
                });
            }
        }
        let _ = inner.events.send(event);
    }
    inner.outgoing.notify_one();
}

/// The TLS configuration: verify against the cluster CA, or pin the certificate.
pub fn tls_config(ca_pem: Option<&str>, pin: &str) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let mut config = match ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots
                    .add(cert.map_err(|e| format!("CA PEM: {e}"))?)
                    .map_err(|e| format!("CA: {e}"))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                pin: pin.to_ascii_lowercase(),
                provider,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Accepts exactly the certificate whose blake3 is the pin (and checks the handshake's
/// signatures with it).
#[derive(Debug)]
struct Pinned {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if blake3::hash(end_entity).to_hex().as_str() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the node's certificate is not the pinned one".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
