//! The client-facing endpoint: app clients connect over QUIC, keep a local replica of what
//! they subscribe to, and push their transactions (the client sync protocol of
//! `sesame_proto::sync`, whose node side is `sesame_sync::server::ServerSession`).
//!
//! - [`ClientEndpoint`] accepts connections (TLS with the node's identity: its cluster
//!   certificate, or in a single node a self-signed one kept in the data folder; clients
//!   verify against the cluster CA or pin the certificate `GET /v1/sync` names). It bounds
//!   connections, streams per connection and idle time.
//! - [`feed::Feed`] reads the change feed once per applied batch and hands the batch to every
//!   session, each through a bounded queue: a session that does not keep up loses batches
//!   (and resyncs), the feed never waits for it.
//! - [`session`] drives one connection: frames in, the session's tasks (authenticate, catch
//!   up from a store snapshot, commit pushes through the [`Writer`], mailbox receipts), and
//!   frames out.

pub mod feed;
pub mod presence;
pub mod session;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::peer::tls::{crypto_provider, NodeCerts};
use crate::raft::{NodeId, RaftHandle};
use crate::reads::Reads;
use crate::write::Writer;

/// The application protocol clients speak.
pub const ALPN: &[u8] = b"sesame-sync/1";
/// Most client connections a node holds at once; more are refused.
pub const CONNECTIONS_MAX: usize = 10_000;
/// A connection with nothing heard for this long is closed (clients ping more often).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The server name a single node's self-signed certificate carries.
pub const SINGLE_NODE_SERVER_NAME: &str = "sesame-node";

const SELF_SIGNED_CERT_FILE: &str = "client-tls.crt";
const SELF_SIGNED_KEY_FILE: &str = "client-tls.key";

/// What the node presents to clients.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The name clients ask for (the certificate's DNS name).
    pub server_name: String,
    /// The cluster CA, PEM, when the certificate is signed by one.
    pub ca_pem: Option<String>,
}

impl Identity {
    /// A cluster node presents its node certificate.
    pub fn from_node_certs(certs: &NodeCerts) -> Identity {
        let (chain, key, ca) = certs.identity();
        let ca_pem = pem("CERTIFICATE", &ca);
        Identity {
            chain,
            key,
            server_name: crate::peer::tls::node_dns_name(certs.node_id()),
            ca_pem: Some(ca_pem),
        }
    }

    /// A single node makes a self-signed certificate once and keeps it in its data folder,
    /// so a client's pin stays valid across restarts.
    pub fn self_signed(data_dir: &Path) -> anyhow::Result<Identity> {
        let cert_path = data_dir.join(SELF_SIGNED_CERT_FILE);
        let key_path = data_dir.join(SELF_SIGNED_KEY_FILE);
        if !cert_path.exists() || !key_path.exists() {
            let key = rcgen::KeyPair::generate().context("make a key")?;
            let params = rcgen::CertificateParams::new(vec![SINGLE_NODE_SERVER_NAME.to_string()])
                .context("certificate parameters")?;
            let cert = params.self_signed(&key).context("self-sign")?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            write_private(&cert_path, cert.pem().as_bytes())?;
        }
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("read {}: {e}", cert_path.display()))?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| anyhow::anyhow!("read {}: {e}", key_path.display()))?;
        anyhow::ensure!(
            !chain.is_empty(),
            "{} holds no certificate",
            cert_path.display()
        );
        Ok(Identity {
            chain,
            key,
            server_name: SINGLE_NODE_SERVER_NAME.to_string(),
            ca_pem: None,
        })
    }

    /// The pin a client may check instead of a CA: blake3 of the certificate (DER), hex.
    pub fn pin(&self) -> String {
        blake3::hash(&self.chain[0]).to_hex().to_string()
    }

    fn server_config(&self) -> anyhow::Result<quinn::ServerConfig> {
        let mut tls = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("the client endpoint's certificate")?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).context("QUIC TLS configuration")?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        // One stream per session; nothing else.
        transport.max_concurrent_bidi_streams(1u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("30 s fits")));
        server.transport_config(Arc::new(transport));
        Ok(server)
    }
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))?;
    crate::private::make_file_private(path)
        .with_context(|| format!("make {} private", path.display()))
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// What a session needs from the node.
pub struct ClientContext {
    pub node_id: NodeId,
    pub reads: Reads,
    pub writer: Arc<Writer>,
    pub raft: Arc<RaftHandle>,
    pub feed: Arc<feed::Feed>,
    /// The admin token's hash.
    pub admin_hash: String,
    pub connections: AtomicUsize,
    pub presence: Arc<presence::Presence>,
    /// Site write rates (visitors' posts are held to them).
    pub limiter: Arc<crate::http::limits::SiteLimiter>,
}

/// Where clients reach this node, as `GET /v1/sync` tells them.
#[derive(Debug, Clone, Serialize)]
pub struct SyncInfo {
    pub node_id: NodeId,
    /// The UDP port of the QUIC endpoint (the host is the one the client used for HTTP,
    /// unless `quic` names one).
    pub port: u16,
    /// `host:port` when the endpoint is bound to a specific address.
    pub quic: Option<String>,
    pub server_name: String,
    /// blake3 of the node's certificate (DER), hex: what a client pins.
    pub cert_blake3: String,
    /// The cluster CA (PEM), when there is one.
    pub ca_pem: Option<String>,
    pub alpn: String,
    pub protocol_version: u32,
}

/// The running endpoint.
pub struct ClientEndpoint {
    endpoint: quinn::Endpoint,
    pub info: SyncInfo,
}

impl ClientEndpoint {
    /// Binds on `addr` (UDP) and accepts sessions until `cancel`.
    pub fn start(
        addr: SocketAddr,
        identity: &Identity,
        ctx: Arc<ClientContext>,
        cancel: CancellationToken,
    ) -> anyhow::Result<ClientEndpoint> {
        let endpoint = quinn::Endpoint::server(identity.server_config()?, addr)
            .with_context(|| format!("bind the client endpoint on UDP {addr}"))?;
        let bound = endpoint.local_addr().context("read the bound address")?;
        let info = SyncInfo {
            node_id: ctx.node_id,
            port: bound.port(),
            quic: (!bound.ip().is_unspecified()).then(|| bound.to_string()),
            server_name: identity.server_name.clone(),
            cert_blake3: identity.pin(),
            ca_pem: identity.ca_pem.clone(),
            alpn: String::from_utf8_lossy(ALPN).into_owned(),
            protocol_version: sesame_proto::sync::SYNC_PROTOCOL_VERSION,
        };
        tokio::spawn(accept_loop(endpoint.clone(), ctx, cancel));
        tracing::info!(%bound, "client sync endpoint (QUIC)");
        Ok(ClientEndpoint { endpoint, info })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"node stopping");
        self.endpoint.wait_idle().await;
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    ctx: Arc<ClientContext>,
    cancel: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => return,
            i = endpoint.accept() => match i { Some(i) => i, None => return },
        };
        if ctx.connections.load(Ordering::Relaxed) >= CONNECTIONS_MAX {
            incoming.refuse();
            continue;
        }
        let ctx = ctx.clone();
        let cancel = cancel.clone();
        ctx.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _count = ConnectionCount(&ctx.connections);
            match incoming.await {
                Ok(conn) => session::serve(conn, ctx.clone(), cancel).await,
                Err(e) => tracing::debug!("client handshake failed: {e}"),
            }
        });
    }
}

struct ConnectionCount<'a>(&'a AtomicUsize);

impl Drop for ConnectionCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
