//! The cluster's certificates and the mutual-TLS configurations built from them.
//!
//! `sesame cluster certs --out DIR --nodes 1,2,3` makes one certificate authority for the
//! cluster and a certificate per node, signed by it:
//!
//! ```text
//! DIR/ca.crt          the cluster CA (PEM)
//! DIR/ca.key          its private key (0600): keep it safe, it is needed only to add nodes
//! DIR/<id>/node.crt   node <id>'s certificate (PEM), for both server and client auth
//! DIR/<id>/node.key   its private key (0600)
//! DIR/<id>/ca.crt     a copy of DIR/ca.crt, so the node folder is all a node needs
//! ```
//!
//! A node runs with `--certs DIR/<id>` and [`NodeCerts::load`] reads that folder. Running the
//! command again on the same `DIR` with new ids signs their certificates with the existing CA.
//!
//! Identity follows from the node id: node N's certificate carries exactly one DNS name,
//! [`node_dns_name`]`(N)` (`node-N.sesame`). A dialler asks for that name, so it reaches node
//! N or nobody; a server reads the caller's id from the name in its client certificate
//! ([`peer_node_id`]). Both sides trust the cluster CA and nothing else, so a peer with a
//! certificate from any other CA, or none, is refused during the handshake.
//!
//! One crypto provider everywhere: ring, passed explicitly to every config
//! ([`crypto_provider`]), so nothing depends on a process-wide default.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use thiserror::Error;

use crate::raft::NodeId;

/// The application protocol peers speak; a peer offering anything else is refused.
pub const ALPN: &[u8] = b"sesame-peer/1";

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NODE_CERT_FILE: &str = "node.crt";
pub const NODE_KEY_FILE: &str = "node.key";

/// The CA's subject. Every cluster CA has the same name; what tells them apart is the key,
/// and only a certificate whose signature verifies against this cluster's CA key is trusted.
const CA_COMMON_NAME: &str = "Sesame cluster CA";
const ORGANIZATION: &str = "Sesame";
/// How long the CA is valid. A cluster has no certificate rotation yet, so both are long.
const CA_VALIDITY_YEARS: i32 = 100;
/// How long a node certificate is valid.
const NODE_VALIDITY_YEARS: i32 = 25;
/// Certificates are valid from a year back, so a node whose clock is behind accepts them.
const BACKDATE_YEARS: i32 = 1;
/// Certificate files are a few kilobytes; anything far larger is not ours.
const CERT_FILE_BYTES_MAX: u64 = 1 << 20;
/// Most nodes one `cluster certs` run makes.
pub const NODES_PER_RUN_MAX: usize = 1_000;

const DNS_PREFIX: &str = "node-";
const DNS_SUFFIX: &str = ".sesame";

/// The DNS name node `id`'s certificate carries, and the name a dialler asks for.
pub fn node_dns_name(id: NodeId) -> String {
    format!("{DNS_PREFIX}{id}{DNS_SUFFIX}")
}

/// The node id a DNS name of [`node_dns_name`]'s form names; `None` for any other name.
/// Strict: decimal digits without a leading zero (or `0` itself), so one id has one name.
pub fn node_id_from_dns_name(name: &str) -> Option<NodeId> {
    let digits = name.strip_prefix(DNS_PREFIX)?.strip_suffix(DNS_SUFFIX)?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok()
}

/// The crypto provider of every TLS configuration here.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{path} is {bytes} bytes, more than the {CERT_FILE_BYTES_MAX} a certificate file may be"
    )]
    FileTooLarge { path: PathBuf, bytes: u64 },
    #[error("cannot read PEM from {path}: {source}")]
    Pem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds {found} certificates, expected {expected}")]
    CertCount {
        path: PathBuf,
        found: usize,
        expected: &'static str,
    },
    #[error("{path}: {reason}")]
    NotANodeCert { path: PathBuf, reason: String },
    #[error(
        "certificate of node {node} in {path} does not verify against the cluster CA: {source}"
    )]
    Untrusted {
        node: NodeId,
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{path} exists: node {node} already has a certificate")]
    NodeExists { node: NodeId, path: PathBuf },
    #[error("{cert} exists but {key} does not: cannot sign with this CA without its key")]
    MissingCaKey { cert: PathBuf, key: PathBuf },
    #[error("{key} exists but {cert} does not: refusing to make a new CA over a CA key")]
    MissingCaCert { cert: PathBuf, key: PathBuf },
    #[error("no node ids given")]
    NoNodes,
    #[error("{0} node ids in one run; the limit is {NODES_PER_RUN_MAX}")]
    TooManyNodes(usize),
    #[error("node id {0} is given twice")]
    DuplicateNode(NodeId),
    #[error("make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn io_error<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> TlsError + 'p {
    move |source| TlsError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What a node needs to take part in the cluster: the CA, its certificate and its key.
pub struct NodeCerts {
    node_id: NodeId,
    ca: CertificateDer<'static>,
    /// The node's certificate first, then any intermediates.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for NodeCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("NodeCerts")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl NodeCerts {
    /// Loads a node folder made by `sesame cluster certs` (`DIR/<id>`): `ca.crt`, `node.crt`
    /// and `node.key`. Checks that the certificate names exactly one node, verifies against
    /// the CA for both server and client use, and matches the key.
    pub fn load(dir: &Path) -> Result<NodeCerts, TlsError> {
        let ca = read_small(&dir.join(CA_CERT_FILE))?;
        let cert = read_small(&dir.join(NODE_CERT_FILE))?;
        let key = read_small(&dir.join(NODE_KEY_FILE))?;
        NodeCerts::from_pem(dir, &ca, &cert, &key)
    }

    /// Parses and checks the three files of node folder `dir` (named in errors only).
    fn from_pem(dir: &Path, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<NodeCerts, TlsError> {
        let ca_path = dir.join(CA_CERT_FILE);
        let mut cas = parse_certs(&ca_path, ca)?;
        if cas.len() != 1 {
            return Err(TlsError::CertCount {
                path: ca_path,
                found: cas.len(),
                expected: "exactly one",
            });
        }
        let ca = cas.remove(0);
        let cert_path = dir.join(NODE_CERT_FILE);
        let chain = parse_certs(&cert_path, cert)?;
        let Some(end_entity) = chain.first() else {
            return Err(TlsError::CertCount {
                path: cert_path,
                found: 0,
                expected: "at least one",
            });
        };
        let node_id = cert_node_id(end_entity).map_err(|reason| TlsError::NotANodeCert {
            path: cert_path.clone(),
            reason,
        })?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::Pem {
            path: dir.join(NODE_KEY_FILE),
            source,
        })?;
        let certs = NodeCerts {
            node_id,
            ca,
            chain,
            key,
        };
        certs.verify_own_chain(&cert_path)?;
        // Building the configurations checks that the key belongs to the certificate.
        certs.server_config()?;
        certs.client_config()?;
        Ok(certs)
    }

    /// The node's certificate chain and key, for the client-facing endpoint (which presents
    /// the same identity but asks clients for no certificate), and the CA as PEM.
    pub fn identity(
        &self,
    ) -> (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        CertificateDer<'static>,
    ) {
        (self.chain.clone(), self.key.clone_key(), self.ca.clone())
    }

    /// A secret for `context` derived from this node's private key: the same in every run
    /// of the node, and unrelated to the key itself and to other contexts.
    pub fn derived_key(&self, context: &'static str) -> [u8; 32] {
        blake3::derive_key(context, self.key.secret_der())
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        ca_roots(&self.ca)
    }

    /// The server side: TLS 1.3, ALPN [`ALPN`], and a client certificate signed by the cluster
    /// CA required of every caller.
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        let provider = crypto_provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone()).build()?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The client side: TLS 1.3, ALPN [`ALPN`], the cluster CA as the only root, and this
    /// node's certificate presented to every server.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Verifies this node's certificate the way its peers will: as a server named after the
    /// node, and as a client.
    fn verify_own_chain(&self, path: &Path) -> Result<(), TlsError> {
        let untrusted = |source| TlsError::Untrusted {
            node: self.node_id,
            path: path.to_path_buf(),
            source,
        };
        let provider = crypto_provider();
        let now = UnixTime::now();
        let (end_entity, intermediates) = self
            .chain
            .split_first()
            .expect("load refuses an empty chain");
        let name = ServerName::try_from(node_dns_name(self.node_id))
            .expect("node DNS names are valid DNS names");
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()
        .map_err(|e| untrusted(rustls::Error::General(e.to_string())))?
        .verify_server_cert(end_entity, intermediates, &name, &[], now)
        .map_err(untrusted)?;
        WebPkiClientVerifier::builder_with_provider(self.roots()?, provider)
            .build()?
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(untrusted)?;
        Ok(())
    }
}

/// A root store holding the cluster CA alone.
pub(crate) fn ca_roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(Arc::new(roots))
}

/// The node id of a verified peer: the one node name in the end-entity certificate of its
/// chain. Call it only on a chain the TLS handshake has verified against the cluster CA.
pub fn peer_node_id(chain: &[CertificateDer<'_>]) -> Result<NodeId, String> {
    let end_entity = chain
        .first()
        .ok_or_else(|| "the peer presented no certificate".to_string())?;
    cert_node_id(end_entity)
}

/// The node id a certificate names: it must carry exactly one DNS name, of the form
/// [`node_dns_name`] makes.
fn cert_node_id(cert: &CertificateDer<'_>) -> Result<NodeId, String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let names: Vec<&str> = parsed.valid_dns_names().collect();
    match names.as_slice() {
        [name] => node_id_from_dns_name(name)
            .ok_or_else(|| format!("certificate name {name:?} does not name a node")),
        _ => Err(format!(
            "a node certificate carries exactly one DNS name, this one has {names:?}"
        )),
    }
}

fn read_small(path: &Path) -> Result<Vec<u8>, TlsError> {
    let meta = fs::metadata(path).map_err(io_error("read", path))?;
    if meta.len() > CERT_FILE_BYTES_MAX {
        return Err(TlsError::FileTooLarge {
            path: path.to_path_buf(),
            bytes: meta.len(),
        });
    }
    fs::read(path).map_err(io_error("read", path))
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })
}

/// What [`write_cluster_certs`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertsWritten {
    /// True when it made a new CA; false when it signed with the one in the folder.
    pub new_ca: bool,
    /// Node folders written, one per id, in the order given.
    pub node_dirs: Vec<PathBuf>,
}

/// Makes the cluster CA in `out` (unless one is there) and a certificate for each of `nodes`,
/// signed by it. Refuses an id that already has a folder with a certificate.
///
/// Every file is written atomically (write, fsync, rename); keys are readable by the owner
/// only.
pub fn write_cluster_certs(out: &Path, nodes: &[NodeId]) -> Result<CertsWritten, TlsError> {
    if nodes.is_empty() {
        return Err(TlsError::NoNodes);
    }
    if nodes.len() > NODES_PER_RUN_MAX {
        return Err(TlsError::TooManyNodes(nodes.len()));
    }
    for (i, id) in nodes.iter().enumerate() {
        if nodes[..i].contains(id) {
            return Err(TlsError::DuplicateNode(*id));
        }
        let existing = out.join(id.to_string()).join(NODE_CERT_FILE);
        if existing.exists() {
            return Err(TlsError::NodeExists {
                node: *id,
                path: existing,
            });
        }
    }
    fs::create_dir_all(out).map_err(io_error("create", out))?;

    let ca_cert_path = out.join(CA_CERT_FILE);
    let ca_key_path = out.join(CA_KEY_FILE);
    let (ca_key, ca_pem, new_ca) = match (ca_cert_path.exists(), ca_key_path.exists()) {
        (true, true) => {
            let key_pem = read_small(&ca_key_path)?;
            let key_pem = String::from_utf8(key_pem).map_err(|_| TlsError::NotANodeCert {
                path: ca_key_path.clone(),
                reason: "the CA key is not PEM text".into(),
            })?;
            let ca_pem = read_small(&ca_cert_path)?;
            (KeyPair::from_pem(&key_pem)?, ca_pem, false)
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            write_file(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
            write_file(&ca_cert_path, cert.pem().as_bytes(), false)?;
            (key, cert.pem().into_bytes(), true)
        }
        (true, false) => {
            return Err(TlsError::MissingCaKey {
                cert: ca_cert_path,
                key: ca_key_path,
            })
        }
        (false, true) => {
            return Err(TlsError::MissingCaCert {
                cert: ca_cert_path,
                key: ca_key_path,
            })
        }
    };
    // The issuer is rebuilt from the same name and key as the CA certificate on disk; that is
    // all a signature needs. Each node folder is then loaded back and verified against that
    // certificate, which catches a CA key that does not belong to it.
    let issuer = ca_params()?.self_signed(&ca_key)?;

    let mut node_dirs = Vec::with_capacity(nodes.len());
    for &id in nodes {
        let dir = out.join(id.to_string());
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let cert_pem = node_params(id)?.signed_by(&key, &issuer, &ca_key)?.pem();
        // Check the folder as a node will load it before writing any of it.
        let checked = NodeCerts::from_pem(&dir, &ca_pem, cert_pem.as_bytes(), key_pem.as_bytes())?;
        assert_eq!(checked.node_id(), id, "a new certificate names its node");
        fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        write_file(&dir.join(CA_CERT_FILE), &ca_pem, false)?;
        write_file(&dir.join(NODE_KEY_FILE), key_pem.as_bytes(), true)?;
        // The certificate last: its presence marks the folder complete.
        write_file(&dir.join(NODE_CERT_FILE), cert_pem.as_bytes(), false)?;
        node_dirs.push(dir);
    }
    Ok(CertsWritten { new_ca, node_dirs })
}

/// The current year, from the clock; validity periods are whole years around it.
fn current_year() -> i32 {
    const SECONDS_PER_YEAR: u64 = 31_556_952; // 365.2425 days
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + i32::try_from(seconds / SECONDS_PER_YEAR).expect("the year fits in an i32")
}

fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| TlsError::Io {
        action: "draw a serial number for",
        path: PathBuf::from("a certificate"),
        source: io::Error::other(e.to_string()),
    })?;
    // A positive DER integer: clear the top bit.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let year = current_year();
    params.not_before = rcgen::date_time_ymd(year - BACKDATE_YEARS, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + CA_VALIDITY_YEARS, 1, 1);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

fn node_params(id: NodeId) -> Result<CertificateParams, TlsError> {
    let dns = node_dns_name(id);
    let mut params = CertificateParams::new(vec![dns.clone()])?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, dns);
    name.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let year = current_year();
    params.not_before = rcgen::date_time_ymd(year - BACKDATE_YEARS, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + NODE_VALIDITY_YEARS, 1, 1);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// Writes `bytes` to `path` atomically; `secret` files are readable by the owner only.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secret {
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        }
        let mut file = options.open(&tmp).map_err(io_error("create", &tmp))?;
        // A leftover tmp file may have had looser permissions.
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::PermissionsExt as _;
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_error("restrict", &tmp))?;
        }
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_error("write", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_error("rename into place", path))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("fsync directory", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip_and_are_strict() {
        assert_eq!(node_dns_name(7), "node-7.sesame");
        assert_eq!(node_id_from_dns_name("node-7.sesame"), Some(7));
        assert_eq!(node_id_from_dns_name("node-0.sesame"), Some(0));
        assert_eq!(
            node_id_from_dns_name(&node_dns_name(u64::MAX)),
            Some(u64::MAX)
        );
        for bad in [
            "node-07.sesame",
            "node-.sesame",
            "node-+7.sesame",
            "node-7.sesame.evil",
            "xnode-7.sesame",
            "node-18446744073709551616.sesame",
        ] {
            assert_eq!(node_id_from_dns_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn certs_are_made_loaded_and_added_with_the_same_ca() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let written = write_cluster_certs(dir.path(), &[1, 2])?;
        assert!(written.new_ca);
        for id in [1, 2] {
            let node_dir = dir.path().join(id.to_string());
            assert_eq!(NodeCerts::load(&node_dir)?.node_id(), id);
            assert_eq!(
                fs::read(node_dir.join(CA_CERT_FILE))?,
                fs::read(dir.path().join(CA_CERT_FILE))?
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for key in [dir.path().join(CA_KEY_FILE), dir.path().join("1/node.key")] {
                let mode = fs::metadata(&key)?.permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }

        // Adding a node later signs it with the same CA; existing nodes are refused.
        let added = write_cluster_certs(dir.path(), &[4])?;
        assert!(!added.new_ca);
        assert_eq!(NodeCerts::load(&dir.path().join("4"))?.node_id(), 4);
        assert!(matches!(
            write_cluster_certs(dir.path(), &[2]),
            Err(TlsError::NodeExists { node: 2, .. })
        ));
        assert!(matches!(
            write_cluster_certs(dir.path(), &[5, 5]),
            Err(TlsError::DuplicateNode(5))
        ));
        assert!(matches!(
            write_cluster_certs(dir.path(), &[]),
            Err(TlsError::NoNodes)
        ));
        Ok(())
    }

    #[test]
    fn a_node_folder_mixing_two_cas_is_refused() -> anyhow::Result<()> {
        let ours = tempfile::tempdir()?;
        let theirs = tempfile::tempdir()?;
        write_cluster_certs(ours.path(), &[1])?;
        write_cluster_certs(theirs.path(), &[1])?;
        fs::copy(
            theirs.path().join(CA_CERT_FILE),
            ours.path().join("1").join(CA_CERT_FILE),
        )?;
        assert!(matches!(
            NodeCerts::load(&ours.path().join("1")),
            Err(TlsError::Untrusted { node: 1, .. })
        ));
        Ok(())
    }

    #[test]
    fn a_ca_key_that_is_not_the_cas_is_caught() -> anyhow::Result<()> {
        let ours = tempfile::tempdir()?;
        let theirs = tempfile::tempdir()?;
        write_cluster_certs(ours.path(), &[1])?;
        write_cluster_certs(theirs.path(), &[1])?;
        fs::copy(
            theirs.path().join(CA_KEY_FILE),
            ours.path().join(CA_KEY_FILE),
        )?;
        assert!(matches!(
            write_cluster_certs(ours.path(), &[2]),
            Err(TlsError::Untrusted { node: 2, .. })
        ));
        assert!(
            !ours.path().join("2").exists(),
            "nothing written for node 2"
        );
        Ok(())
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        write_cluster_certs(dir.path(), &[1, 2])?;
        fs::copy(dir.path().join("2/node.key"), dir.path().join("1/node.key"))?;
        assert!(matches!(
            NodeCerts::load(&dir.path().join("1")),
            Err(TlsError::Rustls(_))
        ));
        Ok(())
    }
}
